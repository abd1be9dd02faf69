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
- Checkpoints that resume exactly: model, optimizer, scheduler, every RNG, and the data position, written
  atomically. What a run's folder holds, resuming under the run's own settings, and the one-live-run lock
  are minibert.runs'.
- Deterministic on a CPU for a given seed. Per-rank randomness under torchrun: each rank seeds its
  dropout from (seed, rank), and checkpoints keep every rank's random states.
- metrics.jsonl logging (minibert.curves draws it).
- start_training: a script's run begun the same way by both scripts (its settings saved, a resume or a clean folder).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from minibert import precision as precisions
from minibert.atomic_write import atomic_write_text, write_json
from minibert.embedding_grad import keep_embedding_gradients
from minibert.runs import (
    CHECKPOINT,
    TRAINING_STATE_FORMAT,
    absolute_paths,
    find_checkpoint,
    read_training_state,
    remove_checkpoint,
    remove_earlier_results,
    remove_temporary_files,
    rng_state,
    set_rng_state,
)

logger = logging.getLogger("minibert")

# Whether "auto" trains in bf16 on a CPU that multiplies bf16 faster than fp32 (AMX), as prediction's
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
            f"{reason}; this CPU multiplies bf16 faster (AMX), and --precision bf16 trains in it"
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
        # Closed at exit, however the run ends: a process group left to the interpreter's teardown can abort
        # the process ("terminate called without an active exception", seen once under torchrun on the CPU).
        atexit.register(_close_process_group)
    return Distributed(rank, world_size, dev)


def _close_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


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
        return self.output_dir / CHECKPOINT

    def save_checkpoint(self, state: TrainState, tokenizer=None, run_config: dict | None = None) -> None:
        """Write DIR/checkpoint atomically: into a temporary folder, then swapped in by renames. Every rank
        calls it; rank 0 writes, with each rank's random states, so that each resumes its own dropout."""
        rng = [rng_state()]
        if self.dist.enabled:
            rng = [None] * self.dist.world_size
            torch_dist.all_gather_object(rng, rng_state())
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.output_dir / f".{CHECKPOINT}.tmp"
            old = self.output_dir / f".{CHECKPOINT}.old"
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
            for name in (f".{CHECKPOINT}.tmp", f".{CHECKPOINT}.old", CHECKPOINT):
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


# ----------------------------------------------------------------------------- a script's run


def start_training(cfg, model: nn.Module, settings: TrainingSettings, total_steps: int, dist: Distributed, *,
                   record_file: str, resolved: dict, loss_fn=None) -> tuple[Trainer, TrainState, dict]:
    """Start one run of a script: the Trainer, the state to start from (its checkpoint's when cfg.resume), and
    the run's record, saved as --output-dir/record_file. cfg is the script's settings dataclass
    (FinetuneConfig, PretrainConfig); the record holds it as given (what --resume compares and restores),
    then under "resolved" what it resolved to. A new run first removes the results an earlier one left
    there (minibert.runs.remove_earlier_results)."""
    out_dir = Path(cfg.output_dir)
    trainer = Trainer(model, settings, total_steps, out_dir, dist, loss_fn=loss_fn)
    run_config = {**asdict(cfg), "resolved": {"precision": settings.precision, "world_size": dist.world_size, **resolved}}
    state = trainer.resume() if cfg.resume else TrainState()
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            remove_earlier_results(out_dir)
        write_json(out_dir / record_file, run_config)
    return trainer, state, run_config


def check_attention_backend(attn_impl: str | None, device: torch.device) -> None:
    """--attn-impl triton where it cannot run fails now, not at the first forward pass after data loading."""
    if attn_impl == "triton" and not (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        from minibert.kernels import NO_DEVICE_MESSAGE

        raise ValueError(f"--attn-impl triton: {NO_DEVICE_MESSAGE}")


class Throughput:
    """Examples (or tokens) per second of training over the last `window` steps, for the progress bar and
    the log. Each step's own time is counted, so evaluations and checkpoint saves do not slow it."""

    def __init__(self, window: int = 20):
        self.recent = collections.deque(maxlen=window)  # (count, seconds) of each recent step

    def update(self, count: float, seconds: float) -> float:
        self.recent.append((count, seconds))
        return sum(c for c, _ in self.recent) / max(1e-9, sum(t for _, t in self.recent))


