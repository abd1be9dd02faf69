"""A run's folder (--output-dir): what it holds, and the rules that keep runs in it apart.

    DIR/checkpoint/            while a run is in progress: the latest resumable state
        config.json, model.safetensors, tokenizer files    the model, as save_pretrained writes it
        training_state.pt      optimizer, schedule, loss scaler, TrainState, every rank's random states
        run_config.json        the settings the run was started with
    DIR/.checkpoint.tmp/, .checkpoint.old/   only while a checkpoint is being swapped in
    DIR/.minibert-run.lock     held by the live run (its pid and host)
    DIR/config.json, model.safetensors, ...  a finished run's model, and RUN_RESULT_FILES beside it
    DIR/seeds/                 a --seeds run's runs, one folder each, and its settings while unfinished (minibert.seeds)

Why each rule:
- Atomic checkpoints: a new one is written beside the old and swapped in by renames (Trainer.save_checkpoint),
  and training_state.pt is written last and removed first (find_checkpoint, remove_checkpoint), so a kill at
  any moment leaves the last whole checkpoint, never half of one.
- Exact resume: training_state.pt holds every random generator (rng_state) as tensors and plain values, read
  with weights_only=True, so a checkpoint folder from anyone runs no code; the run continues under the
  settings it was started with (resolve_resume): the same command again continues a killed run, --resume
  alone restores those settings, and a changed one is an error rather than a silent splice.
- One live run per folder (hold_output_dir): an OS lock that dies with its process, so two runs never write
  into one folder and a killed run leaves no stale lock. A new run there removes the finished run's results
  first (remove_earlier_results), so none of them can be taken for its own.

Both scripts, fine-tuning and pretraining, follow these rules; minibert.training's Trainer writes and reads
the checkpoints.
"""

from __future__ import annotations

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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

CHECKPOINT = "checkpoint"  # DIR/checkpoint/: the latest resumable state


# ----------------------------------------------------------------------------- the checkpoint


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
    for candidate in (Path(output_dir) / CHECKPOINT, Path(output_dir) / f".{CHECKPOINT}.old"):
        if (candidate / "training_state.pt").is_file():
            return candidate
    return None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder so that a kill at any moment leaves the whole checkpoint or none:
    training_state.pt, the file that makes it one, goes first (rmtree's own order is arbitrary)."""
    (path / "training_state.pt").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


# Names of the temporary files of atomic writes: ".model.safetensors.x1y2.tmp" (minibert.atomic_write) and
# ".tmpx1y2" (safetensors' own, inside that). A killed save can leave them behind.
_TEMPORARY_NAME = re.compile(r"\..+\.tmp|\.tmp\w+")


def remove_temporary_files(directory: Path) -> None:
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.is_file() and _TEMPORARY_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)


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


# ----------------------------------------------------------------------------- resuming


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


def settings_to_resume(settings, output_dir: str | Path, find_unfinished=find_checkpoint) -> None:
    """--resume continues a run as it was started: the settings saved with its checkpoint fill in every flag
    not typed again, and a typed flag that would change what is trained is an error, not a silent splice
    (a new --max-steps would bend the schedule; new data would be trained under the old labels).
    find_unfinished(output_dir) is the folder holding an unfinished run's run_config.json (see resolve_resume)."""
    output_dir = Path(output_dir)
    checkpoint = find_unfinished(output_dir)
    if checkpoint is None:
        if (output_dir / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"--resume: the run in {output_dir} has finished (a finished run keeps no checkpoint), so there is "
                f"nothing to continue; to train it further, start a new run with --init {output_dir}")
        raise FileNotFoundError(
            f"--resume: no checkpoint in {output_dir} (expected {output_dir / CHECKPOINT}/training_state.pt); "
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


def resolve_resume(settings, find_unfinished=find_checkpoint) -> None:
    """Decide whether this run continues the one in --output-dir, and with which settings, so that a new
    run never mixes with an old one. --resume takes the old run's settings (settings_to_resume). Where a
    killed run left its checkpoint, the same command again continues it (it sets settings.resume), and a
    changed one stops with an error rather than throw that work away. Call it holding the folder
    (hold_output_dir), so that the run it looks at is not a live one. find_unfinished(output_dir) finds the
    folder where an unfinished run keeps the settings it was started with (run_config.json), or None: its
    checkpoint, or for a --seeds run DIR/seeds (minibert.seeds.find_unfinished_run)."""
    output_dir = Path(settings.output_dir)
    if settings.resume:
        return settings_to_resume(settings, output_dir, find_unfinished)
    checkpoint = find_unfinished(output_dir)
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
def hold_output_dir(output_dir: str | Path, dist):
    """Run the body as the only live run in output_dir: rank 0 holds an exclusive flock(2) on
    DIR/.minibert-run.lock, which the kernel releases when the process ends however it ends (kill -9
    leaves no stale lock to clean up), and the other ranks of the same run share rank 0's answer. A
    second run there, of either script, stops at once with the live run's pid and host. Take it before
    anything is read or written. A folder made for a run that then stopped on bad input is removed
    again, so such a run leaves nothing behind. `dist` is the run's minibert.training.Distributed, read
    for is_main and enabled only (training builds on this module, so this one does not import it)."""
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
