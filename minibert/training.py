"""The training loop's pieces, shared by train_finetune.py and train_pretrain.py: one implementation.

    dist = setup_distributed()                      # torchrun's environment, or a single process
    trainer = Trainer(model, TrainingSettings(...), total_steps, output_dir, dist)
    state = trainer.resume() if resume else TrainState()
    loss = trainer.step(micro_batches)              # accumulate, clip, AdamW, schedule
    trainer.save_checkpoint(state)                  # atomic: a killed save never corrupts the last one

What is here and why:
- AdamW with no weight decay on biases and LayerNorms, optional layer-wise learning-rate decay.
- Linear warmup, then linear decay to zero (BERT's schedule).
- Gradient accumulation and clipping; bf16/fp16 autocast; torch.compile on request.
- DDP when launched with torchrun (gloo on CPU, nccl on GPU): the same script, no extra flag.
- Checkpoints that resume exactly: model, optimizer, scheduler, every RNG, and the data position, under
  the settings the run was started with (saved beside them): the same command again continues a killed
  run, --resume alone restores those settings, and a changed one is an error (resolve_resume).
- One live run per output folder (hold_output_dir): an OS lock that dies with its process.
- Per-rank randomness under torchrun: each rank seeds its dropout from (seed, rank), and checkpoints keep
  every rank's random states; training_state.pt holds tensors and plain values only (weights_only=True).
- metrics.jsonl logging (minibert.curves draws it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from minibert import precision as precisions
from minibert.atomic_write import atomic_write_text
from minibert.embedding_grad import keep_embedding_gradients

logger = logging.getLogger("minibert")

# Whether "auto" trains in bf16 on a CPU that multiplies bf16 natively (AMX, AVX512-BF16), as prediction's
# auto does. Off: bf16 fine-tuning on the CPU has not been shown to keep fp32's accuracy over 3 seeds of the
# built-in task (benchmarks/README.md, "bf16 on the CPU", has what was measured).
CPU_AUTO_BF16 = False
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")  # fp16 only on a GPU, with loss scaling


def resolve_precision(precision: str, device: torch.device) -> str:
    """Training's precision, logged with the reason: "auto" is bf16 on a GPU that has it (no loss scaling
    needed, 2-3x faster), fp32 on the CPU unless CPU_AUTO_BF16 (minibert.precision decides, for training
    and prediction alike). bf16 asked for on a CPU without native bf16 runs, with a warning: torch then
    emulates it, several times slower than fp32."""
    chosen = precisions.resolve_precision(precision, device, choices=TRAINING_PRECISIONS, cpu_auto_bf16=CPU_AUTO_BF16)
    reason = chosen.reason
    if precision == "auto" and device.type == "cpu" and not CPU_AUTO_BF16:  # say what the hardware would give
        hardware = precisions.resolve_precision("auto", device, choices=TRAINING_PRECISIONS, cpu_auto_bf16=True)
        reason = hardware.reason if hardware.name == "fp32" else \
            f"{reason}; this CPU multiplies bf16 natively, and --precision bf16 trains in it"
    logger.info("minibert: training in %s (%s)", chosen.name, reason)
    if chosen.name == "bf16" and device.type == "cpu" and not precisions.cpu_has_native_bf16():
        logger.warning("minibert: --precision bf16 on a CPU without AMX or AVX512-BF16: torch emulates bf16 matrix "
                       "products, several times slower than fp32; --precision fp32 trains at full speed")
    return chosen.name


# ----------------------------------------------------------------------------- distributed


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.item() / self.world_size


def setup_distributed(device: str | None = None) -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; start the process group if there are several ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device torch knows: use cuda, cuda:N or cpu") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here (or is a CPU build): use --device cpu")
        if dev.index is None:  # "cuda": this process's GPU under torchrun, the first one otherwise
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world_size, dev)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, numpy and torch (CPU and every GPU) for this process, from (seed, rank): each rank of a
    distributed run draws dropout masks of its own (the same masks on every GPU would make their noise
    alike), and a rerun draws the same ones again. Rank 0 takes the seed itself, so a one-process run
    draws what it always did. Batches and MLM masks do not come from these generators: they are seeded
    from the seed alone, per epoch and per example, the same at any number of processes."""
    if rank:
        seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ----------------------------------------------------------------------------- settings and state


@dataclass
class TrainingSettings:
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 turns clipping off
    layer_lr_decay: float = 1.0  # in (0, 1]: layer i of L learns at lr * decay**(L - i)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 only on GPU, with loss scaling)
    compile: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8  # HF Trainer's; Google's BERT used 1e-6

    def __post_init__(self):
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"--precision {self.precision!r} is unknown; choose fp32, bf16 or fp16")
        if self.grad_accum < 1:
            raise ValueError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        check_layer_lr_decay(self.layer_lr_decay)


def check_layer_lr_decay(value: float) -> None:
    """0 would zero the embeddings' learning rate and a negative decay ascend the loss on alternate layers."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"--layer-lr-decay must be in (0, 1] (1 is no decay, 0.8-0.95 are usual), got {value}")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # the epoch in progress
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0


# ----------------------------------------------------------------------------- optimizer and schedule


def build_optimizer(model: nn.Module, settings: TrainingSettings) -> torch.optim.AdamW:
    groups = model.parameter_groups(settings.weight_decay, settings.layer_lr_decay)
    for group in groups:
        group["lr"] = settings.lr * group["lr_scale"]
    # The fused update is one pass over each tensor: on a CPU it is ~6x faster than the default (foreach),
    # which matters because BERT's 23M-parameter embedding matrix is updated every step.
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.adam_eps, fused=True)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak, then linear decay to 0 at total_steps (as BERT and HF do)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """Owns the model's optimizer, schedule, precision and checkpoints; the scripts own their data loops."""

    CHECKPOINT = "checkpoint"  # DIR/checkpoint/: the latest resumable state

    def __init__(self, model: nn.Module, settings: TrainingSettings, total_steps: int, output_dir: str | Path,
                 dist: Distributed | None = None, loss_fn=None):
        """loss_fn(logits, labels) -> loss replaces the model's own loss (class weights, minibert.class_weights):
        the model then runs without labels, as transformers' Trainer does with compute_loss_func."""
        self.settings, self.total_steps, self.loss_fn = settings, total_steps, loss_fn
        self.dist = dist or Distributed()
        self.output_dir = Path(output_dir)
        self.device = self.dist.device
        if settings.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("--precision fp16 needs a CUDA GPU (loss scaling); use bf16 or fp32 on the CPU")
        self.model = model.to(self.device)  # the bare model: saved, evaluated
        if self.device.type == "cpu" and not self.dist.enabled and not settings.compile:
            keep_embedding_gradients(self.model)  # no new 47-94 MB word-embedding gradient each step
        self.optimizer = build_optimizer(self.model, settings)
        self.scheduler = linear_schedule(self.optimizer, round(settings.warmup_ratio * total_steps), total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
        self.train_model = self.model  # what the forward pass calls: maybe compiled, maybe DDP-wrapped
        if settings.compile:
            self.train_model = torch.compile(self.train_model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)

    def autocast(self):
        return precisions.autocast(self.settings.precision, self.device)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def step(self, micro_batches: list[dict], metrics_fn=None) -> dict:
        """One optimizer step over grad_accum micro-batches; returns the mean loss, the lr used, the
        gradient norm, and the means of metrics_fn(output, batch) -> {name: float} if given."""
        self.train_model.train()
        total = 0.0
        extra: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients on every backward; skip that until the last micro-batch.
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.train_model.no_sync()
            with sync:
                inputs = self.to_device(batch)
                labels = inputs.pop("labels") if self.loss_fn is not None else None
                with self.autocast():
                    out = self.train_model(**inputs)
                loss = (out.loss if labels is None else self.loss_fn(out.logits, labels)) / len(micro_batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item()
            if metrics_fn is not None:
                with torch.no_grad():
                    for name, value in metrics_fn(out, batch).items():
                        extra[name] = extra.get(name, 0.0) + value / len(micro_batches)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.settings.max_grad_norm > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_scale", 1.0)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        extra = {name: self.dist.all_reduce_mean(value) for name, value in extra.items()}
        return {"loss": self.dist.all_reduce_mean(total), "lr": lr, "grad_norm": grad_norm, **extra}

    # --------------------------------------------------------------------- checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / self.CHECKPOINT

    def save_checkpoint(self, state: TrainState, tokenizer=None, run_config: dict | None = None) -> None:
        """Write DIR/checkpoint atomically: into a temporary folder, then swapped in by renames. Every rank
        calls it; rank 0 writes, with each rank's random states, so that each resumes its own dropout."""
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            torch_dist.all_gather_object(rng, rng_state())
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.output_dir / f".{self.CHECKPOINT}.tmp"
            old = self.output_dir / f".{self.CHECKPOINT}.old"
            remove_checkpoint(tmp)
            self.model.save_pretrained(tmp, tokenizer=tokenizer)
            # Tensors and plain values only, so that resume reads it with weights_only=True: a checkpoint
            # folder from anyone must not run code.
            torch.save(
                {
                    "format": TRAINING_STATE_FORMAT,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None,
                    "state": asdict(state),
                    "rng": rng,  # one per rank, in rank order
                },
                tmp / "training_state.pt",
            )
            if run_config is not None:
                atomic_write_text(tmp / "run_config.json", json.dumps(absolute_paths(run_config), indent=2, default=str) + "\n")
            remove_checkpoint(old)
            if self.checkpoint_dir.exists():
                os.replace(self.checkpoint_dir, old)
            os.replace(tmp, self.checkpoint_dir)
            remove_checkpoint(old)
        self.dist.barrier()

    def remove_checkpoints(self) -> None:
        """At the end of a run, whose results are written: the resumable state, and whatever a killed save
        left behind in the output folder, are no longer needed."""
        if self.dist.is_main:
            for name in (f".{self.CHECKPOINT}.tmp", f".{self.CHECKPOINT}.old", self.CHECKPOINT):
                remove_checkpoint(self.output_dir / name)
            remove_temporary_files(self.output_dir)

    def find_checkpoint(self) -> Path | None:
        return find_checkpoint(self.output_dir)

    def resume(self) -> TrainState:
        """Restore model, optimizer, scheduler and RNGs from DIR/checkpoint; returns the saved TrainState."""
        path = self.find_checkpoint()
        if path is None:
            raise FileNotFoundError(
                f"--resume: no checkpoint in {self.output_dir} (expected {self.checkpoint_dir}/training_state.pt); "
                "drop --resume to start a new run, or pass the --output-dir of the run to continue"
            )
        try:
            loaded = type(self.model).from_pretrained(str(path), verbose=False, attn_impl=self.model.config.attn_impl,
                                                       unpad=self.model.config.unpad)
        except (ValueError, OSError) as e:  # a checkpoint damaged outside minibert (its own saves are atomic)
            raise ValueError(f"cannot read the checkpoint {path} ({e}): delete {path} and start again without --resume") from None
        self.model.load_state_dict(loaded.state_dict())
        del loaded
        saved = read_training_state(path)
        processes = len(saved["rng"])
        if processes != self.dist.world_size:  # each rank's data share and random states belong to its rank
            raise ValueError(f"the run in {self.output_dir} was started with {processes} process(es) and is resumed with "
                             f"{self.dist.world_size}: resume it with {processes} (torchrun --nproc_per_node {processes}), "
                             "or start a new run in another --output-dir")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"][self.dist.rank])
        state = TrainState(**saved["state"])
        self._forget_metrics_after(state.step)
        logging.getLogger("minibert").info("minibert: resuming at step %d of %d from %s", state.step, self.total_steps, path)
        return state

    # --------------------------------------------------------------------- logging

    def _forget_metrics_after(self, step: int) -> None:
        """A killed run logged steps past its last checkpoint; the resumed run logs them again."""
        path = self.output_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def log_metrics(self, record: dict) -> None:
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


TRAINING_STATE_FORMAT = 2  # 1 (unnumbered): numpy's RNG state object, which needed weights_only=False


def read_training_state(checkpoint: Path) -> dict:
    """checkpoint/training_state.pt, read with weights_only=True: tensors and plain values, never code."""
    path = checkpoint / "training_state.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only reader met an object it does not build
        raise ValueError(f"{path} holds Python objects besides tensors and plain values, which minibert does not load "
                         "(they could run code): it was written by an older minibert, or by someone else; finish that run "
                         f"with the minibert that started it, or delete {checkpoint} and start again without --resume") from None
    except Exception as e:
        raise ValueError(f"cannot read {path} ({e}): delete {checkpoint} and start again without --resume") from None
    if not isinstance(saved, dict) or saved.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"{path} is not a training state this minibert wrote (format {TRAINING_STATE_FORMAT}): delete "
                         f"{checkpoint} and start again without --resume")
    return saved


def find_checkpoint(output_dir: str | Path) -> Path | None:
    """DIR/checkpoint, or DIR/.checkpoint.old, which survives a kill between save_checkpoint's two renames.
    A folder is a checkpoint while it holds training_state.pt: it is written last and removed first."""
    for candidate in (Path(output_dir) / Trainer.CHECKPOINT, Path(output_dir) / f".{Trainer.CHECKPOINT}.old"):
        if (candidate / "training_state.pt").is_file():
            return candidate
    return None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves the whole checkpoint or none:
    training_state.pt, the file that makes it one, goes first (rmtree's own order is arbitrary)."""
    (path / "training_state.pt").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# Names of the temporary files of atomic writes: ".model.safetensors.x1y2.tmp" (minibert.atomic_write) and ".tmpx1y2" (safetensors' own, inside that). A killed save can leave them behind.
_TEMPORARY_NAME = re.compile(r"\..+\.tmp|\.tmp\w+")


def remove_temporary_files(directory: Path) -> None:
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.is_file() and _TEMPORARY_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)


# Settings a resumed run may change: they say how to run or report, not what is trained.
RESUME_MAY_CHANGE = frozenset({"resume", "progress", "device", "compile", "eval_batch_size", "eval_steps", "eval_batches",
                               "save_steps", "early_stopping"})


def _comparable(value):
    """A setting as a resumed run compares it: paths that exist, absolute ("out/x/", "./out/x" and the
    full path name one folder), so a run resumes from any working directory; anything else as it is."""
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def absolute_paths(run_config: dict) -> dict:
    """run_config with its existing paths made absolute, as save_checkpoint writes it."""
    return {k: _comparable(v) if k != "resolved" else v for k, v in run_config.items()}


def _saved_settings(checkpoint: Path) -> dict | None:
    path = checkpoint / "run_config.json"  # None: a checkpoint of an older minibert, nothing to compare with
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _changed_settings(settings, saved: dict, given: frozenset | None) -> list[str]:
    """The typed settings (all of them when `given` is None) that differ from the run's, as flags."""
    return [f"--{f.name.replace('_', '-')} {getattr(settings, f.name)} (the run has {saved[f.name]})"
            for f in dataclasses.fields(settings)
            if f.name in saved and f.name not in RESUME_MAY_CHANGE and (given is None or f.name in given)
            and _comparable(getattr(settings, f.name)) != _comparable(saved[f.name])]


def settings_to_resume(settings, output_dir: str | Path) -> None:
    """--resume continues a run as it was started: the settings saved with its checkpoint fill in every flag
    not typed again, and a typed flag that would change what is trained is an error, not a silent splice
    (a new --max-steps would bend the schedule; new data would be trained under the old labels)."""
    output_dir = Path(output_dir)
    checkpoint = find_checkpoint(output_dir)
    if checkpoint is None:
        if (output_dir / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"--resume: the run in {output_dir} has finished (a finished run keeps no checkpoint), so there is "
                f"nothing to continue; to train it further, start a new run with --init {output_dir}")
        raise FileNotFoundError(
            f"--resume: no checkpoint in {output_dir} (expected {output_dir / Trainer.CHECKPOINT}/training_state.pt); "
            "drop --resume to start a new run, or pass the --output-dir of the run to continue")
    saved = _saved_settings(checkpoint)
    if saved is None:
        return
    given = getattr(settings, "given_flags", None)  # None: settings built in Python, every field was chosen
    changed = _changed_settings(settings, saved, given)
    if changed:
        raise ValueError(f"--resume continues the run in {output_dir} as it was started, but {'; '.join(changed)}: "
                         "drop those flags to continue it, or start a new run in another --output-dir")
    for f in dataclasses.fields(settings):  # what was not typed again is the run's own, intervals included
        typed = given is None or f.name in given
        if f.name in saved and f.name != "resume" and not (typed and f.name in RESUME_MAY_CHANGE):
            setattr(settings, f.name, saved[f.name])


def resolve_resume(settings) -> None:
    """Decide whether this run continues the one in --output-dir, and with which settings, so that a new
    run never mixes with an old one. --resume takes the old run's settings (settings_to_resume). Where a
    killed run left its checkpoint, the same command again continues it (it sets settings.resume), and a
    changed one stops with an error rather than throw that work away. Call it holding the folder
    (hold_output_dir), so that the run it looks at is not a live one."""
    output_dir = Path(settings.output_dir)
    if settings.resume:
        return settings_to_resume(settings, output_dir)
    checkpoint = find_checkpoint(output_dir)
    if checkpoint is not None:
        saved = _saved_settings(checkpoint)
        changed = ["its settings are unknown"] if saved is None else _changed_settings(settings, saved, None)
        if changed:
            raise FileExistsError(
                f"--output-dir {output_dir} holds an unfinished run, and this one differs ({'; '.join(changed)}): "
                f"add --resume to continue that run, choose another --output-dir, or delete {checkpoint} to start over")
        logging.getLogger("minibert").info(
            "minibert: continuing the unfinished run in %s, started with these settings (delete %s to start over)",
            output_dir, checkpoint)
        settings.resume = True


# ----------------------------------------------------------------------------- one live run per output folder

RUN_LOCK = ".minibert-run.lock"  # DIR/.minibert-run.lock: held by the live run's rank 0, names its pid and host


class OutputDirInUse(FileExistsError):
    """Another live run holds --output-dir (run_cli prints it as one line, like every input error)."""


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path, dist: Distributed):
    """Run the body as the only live run in output_dir: rank 0 holds an exclusive flock(2) on
    DIR/.minibert-run.lock, which the kernel releases when the process ends however it ends (kill -9
    leaves no stale lock to clean up), and the other ranks of the same run share rank 0's answer. A
    second run there, of either script, stops at once with the live run's pid and host. Take it before
    anything is read or written. A folder made for a run that then stopped on bad input is removed
    again, so such a run leaves nothing behind."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"--output-dir {output_dir} is a file: give a folder (it is created if missing)")
    created = not output_dir.exists()
    lock, answer = None, [None]  # rank 0's reason to stop, if any: (kind, message)
    if dist.is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock, owner = _lock_run(output_dir / RUN_LOCK)
            if owner is not None:
                answer = [("in use", f"--output-dir {output_dir} is in use by a live run ({owner}): wait for it to end, "
                                     "stop it, or choose another --output-dir")]
        except OSError as e:  # a folder this user cannot write, a read-only file system
            answer = [("unwritable", f"--output-dir {output_dir} cannot be written ({e.strerror}): choose a folder you "
                                     "can write to")]
    if dist.enabled:  # the other ranks learn rank 0's answer, so that every rank stops or none does
        torch_dist.broadcast_object_list(answer)
    if answer[0] is not None:
        kind, message = answer[0]
        raise OutputDirInUse(message) if kind == "in use" else ValueError(message)
    try:
        yield
    finally:
        if lock is not None:
            (output_dir / RUN_LOCK).unlink(missing_ok=True)  # while still held: see _lock_run
            lock.close()
            if created and not any(output_dir.iterdir()):
                output_dir.rmdir()


def _lock_run(path: Path):
    """(the open, locked file, None), or (None, "pid N on host H, script") when a live run holds it."""
    while True:
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "a run that is starting"
            f.close()
            return None, owner
        # The run that held it may have removed the file between our open and its release: then this lock is
        # on a file nobody else can find, and the next run would lock a new one. Lock the file at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on host {socket.gethostname()}, {Path(sys.argv[0]).name}\n")
            f.flush()
            return f, None
        f.close()


# What a finished run of either script leaves in --output-dir besides the model (which a new run overwrites):
# a new run there, fine-tuning or pretraining, removes all of them first.
RUN_RESULT_FILES = ("eval_results.json", "test_results.json", "train_results.json", "predictions.jsonl",
                    "metrics.jsonl", "training_curves.png", "finetune_config.json", "pretrain_config.json",
                    "adapter/adapter_config.json", "adapter/adapter_model.safetensors",  # a LoRA run's adapter
                    "reliability.png", "seeds_results.json", "explanations.html")


def remove_earlier_results(output_dir: str | Path) -> None:
    """A new run in the folder of a finished one removes that run's result files once its own input has
    passed every check, so that none of them can be taken for the new run's."""
    stale = [Path(output_dir) / name for name in RUN_RESULT_FILES if (Path(output_dir) / name).is_file()]
    for path in stale:
        path.unlink()
    if stale:
        logging.getLogger("minibert").info("minibert: replacing the earlier run in %s", output_dir)


def check_attention_backend(attn_impl: str | None, device: torch.device) -> None:
    """--attn-impl triton where it cannot run fails now, not at the first forward pass after data loading."""
    if attn_impl == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        from minibert.kernels import NO_DEVICE_MESSAGE

        raise ValueError(f"--attn-impl triton: {NO_DEVICE_MESSAGE}")


def rng_state() -> dict:
    """This process's random generators as tensors and plain values, which torch.load reads with
    weights_only=True (numpy's own state object is an array that only a full unpickler rebuilds)."""
    numpy = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),  # (version, a tuple of 625 ints, gauss_next)
        "numpy": {"key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": numpy["state"]["pos"],
                  "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Throughput:
    """Examples (or tokens) per second of training over the last `window` steps, for the progress bar and
    the log. Each step's own time is counted, so evaluations and checkpoint saves do not slow it."""

    def __init__(self, window: int = 20):
        self.recent = collections.deque(maxlen=window)  # (count, seconds) of each recent step

    def update(self, count: float, seconds: float) -> float:
        self.recent.append((count, seconds))
        return sum(c for c, _ in self.recent) / max(1e-9, sum(t for _, t in self.recent))


