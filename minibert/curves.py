"""training_curves.png: the training loss (raw, faint, and smoothed over it), the validation loss beside
it, and each validation metric, against optimizer steps, from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minibert.atomic_write import atomic_write


def smoothed(values: list[float]) -> np.ndarray:
    """An exponential moving average over about a thirtieth of the run (5 to 200 steps), bias-corrected
    at the start as TensorBoard's is, so that the first points are not pulled towards zero."""
    window = min(200, max(5, len(values) // 30))
    beta = 1.0 - 1.0 / window
    average, out = 0.0, []
    for step, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**step))
    return np.array(out)


def plot_curves(metrics_path: Path, out_path: Path, *, eval_metrics: tuple[str, ...] = ()) -> bool:
    """Draw the curves of metrics.jsonl: records {"split": "train" | "eval", "step": N, "loss": ..., ...}.
    The "loss" of eval records is the validation loss. False when matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # draws into a file, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("split") == "eval"]
    validation_loss = [(r["step"], r["loss"]) for r in evals if r.get("loss") is not None]
    metrics = [(name, [(r["step"], r[name]) for r in evals if r.get(name) is not None]) for name in eval_metrics]
    metrics = [(name, points) for name, points in metrics if points]
    if not train and not validation_loss and not metrics:
        return False
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.5 * (1 + len(metrics)), 3.5), squeeze=False)
    loss_axis = axes[0][0]
    if train:
        steps, losses = zip(*train)
        loss_axis.plot(steps, losses, color="C0", alpha=0.25, linewidth=0.8)
        loss_axis.plot(steps, smoothed(list(losses)), color="C0", label="training (smoothed)")
    if validation_loss:
        steps, losses = zip(*validation_loss)
        loss_axis.plot(steps, losses, color="C1", marker="o", markersize=3, label="validation")
    loss_axis.set_title("loss")
    loss_axis.legend()
    for axis, (name, points) in zip(axes[0][1:], metrics):
        steps, values = zip(*points)
        axis.plot(steps, values, color="C1", marker="o" if len(steps) < 30 else None, markersize=3)
        axis.set_title(f"validation {name}")
    for axis in axes[0]:
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True
