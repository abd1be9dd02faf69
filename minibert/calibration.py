"""Calibration: whether a classifier's probabilities mean what they say, and temperature scaling to make them.

A model is calibrated when, of the predictions it makes with 80% confidence, 80% are right. Fine-tuned
BERTs are accurate but over-confident (Guo et al. 2017, "On Calibration of Modern Neural Networks";
Desai & Durrett 2020, "Calibration of Pre-trained Transformers"). Temperature scaling (Guo et al.) divides
the logits by one number T, fitted on validation data by minimising the negative log-likelihood: T > 1
softens over-confident probabilities. Dividing by a positive number changes no argmax, so the predicted
labels, and accuracy, stay exactly as they were.

    T = fit_temperature("classification", val_logits, val_labels)        # a float (a list for multi-label)
    probs = probabilities("classification", logits, T)                  # softmax(logits / T)
    calibration_metrics("classification", logits, labels, T)            # {"ece": ..., "brier": ..., "nll": ...}
    plot_reliability("reliability.png", {"before": (conf, correct), "after": (conf_t, correct)})
    calibration_report("classification", logits, labels, T)            # the three, and *_uncalibrated beside them

A fine-tuned model keeps its T in config.json as `calibration_temperature` (a float, or {label: T} for
multi-label); a checkpoint without one predicts at T = 1. The key is not `temperature`, which transformers
5 reads as a text-generation setting and drops from any config it loads; calibration_temperature it keeps,
as an unknown key, and ignores.

The metrics, for N examples (lower is better for all three):
    ece    expected calibration error, top label: the confidences (the largest probability of each example)
           fall into 15 equal-width bins over [0, 1]; ECE = sum over bins of |bin| / N * |accuracy - mean
           confidence| in that bin (Guo et al. 2017; Naeini et al. 2015).
    brier  mean squared distance between the probabilities and the one-hot label (Brier 1950): scikit-learn's
           brier_score_loss, which halves it for two classes ("as customary", in [0, 1]) and keeps the sum
           over classes for more (in [0, 2]).
    nll    mean negative log-likelihood of the true label, -log p(y), computed from the logits in float64.

Multi-label classification asks one yes/no question per label, answered by sigmoid(logit / T_l): each label
has its own temperature, fitted on its own column, and the metrics above are taken over all N x L two-way
decisions (the confidence of one is max(p, 1 - p); it is right when p >= 0.5 matches the label).

Where T cannot be fitted it stays 1.0, with a warning: fewer than MIN_EXAMPLES_TO_FIT examples, a
validation set (or a label's column) of one class, or every example predicted right (the likelihood then
keeps rising as T falls to 0, so there is no minimum to find).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, log_expit, log_softmax, softmax
from sklearn.metrics import brier_score_loss

logger = logging.getLogger("minibert")

NUM_BINS = 15  # Guo et al.'s choice, the one papers report
MIN_EXAMPLES_TO_FIT = 10  # below this one scalar is fitted to noise
CALIBRATED_TASKS = ("classification", "multilabel")


def _check_task(task_type: str) -> None:
    if task_type not in CALIBRATED_TASKS:
        raise ValueError(f"calibration is for {' and '.join(CALIBRATED_TASKS)} models, not {task_type!r}")


def _temperatures(task_type: str, temperature, num_outputs: int) -> np.ndarray:
    """T as an array that broadcasts over (N, L) logits: one value, or one per label for multi-label."""
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim == 1 and (task_type != "multilabel" or len(t) != num_outputs):
        raise ValueError(f"{len(t)} temperatures for a {task_type} model with {num_outputs} outputs: give one "
                         "temperature, or (multi-label only) one per label")
    if t.ndim > 1 or not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"a temperature must be a positive number (or a list of them, one per label), got {temperature}")
    return t


def probabilities(task_type: str, logits, temperature: float | Sequence[float] = 1.0) -> np.ndarray:
    """(N, L) probabilities from (N, L) logits: softmax(logits / T), or sigmoid(logits / T_l) for multi-label."""
    _check_task(task_type)
    logits = np.asarray(logits, dtype=np.float64)
    scaled = logits / _temperatures(task_type, temperature, logits.shape[-1])
    return expit(scaled) if task_type == "multilabel" else softmax(scaled, axis=-1)


def expected_calibration_error(confidences, correct, num_bins: int = NUM_BINS) -> float:
    """Top-label ECE: confidences (N,) in [0, 1] and correct (N,) booleans, NUM_BINS equal-width bins."""
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    counts, accuracy, confidence = reliability_bins(confidences, correct, num_bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / len(confidences) * np.abs(accuracy[filled] - confidence[filled])))


def reliability_bins(confidences, correct, num_bins: int = NUM_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin: the number of examples, their accuracy and their mean confidence (NaN for empty bins).
    Bin b holds confidences in (b/num_bins, (b+1)/num_bins]; a confidence of exactly 0 goes into the first."""
    confidences, correct = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    bins = np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    counts = np.bincount(bins, minlength=num_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=num_bins) / counts
        confidence = np.bincount(bins, weights=confidences, minlength=num_bins) / counts
    return counts, accuracy, confidence


def top_label(task_type: str, logits, labels, temperature: float | Sequence[float] = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The (confidence, correct) pairs that ECE and the reliability diagram are made of, flattened over labels
    for multi-label."""
    probs = probabilities(task_type, logits, temperature)
    labels = np.asarray(labels)
    if task_type == "multilabel":
        return np.maximum(probs, 1 - probs).reshape(-1), ((probs >= 0.5) == labels.astype(bool)).reshape(-1)
    return probs.max(axis=-1), probs.argmax(axis=-1) == labels


def calibration_metrics(task_type: str, logits, labels, temperature: float | Sequence[float] = 1.0) -> dict[str, float]:
    """{"ece", "brier", "nll"} of the probabilities at this temperature; logits (N, L), labels (N,) class ids
    or (N, L) multi-hot."""
    _check_task(task_type)
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if len(logits) == 0 or len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions for {len(labels)} labels: calibration needs one label per prediction")
    t = _temperatures(task_type, temperature, logits.shape[-1])
    probs = probabilities(task_type, logits, t)
    ece = expected_calibration_error(*top_label(task_type, logits, labels, t))
    if task_type == "multilabel":
        labels = labels.astype(np.float64)
        return {
            "ece": ece,
            "brier": float(np.mean((probs - labels) ** 2)),  # each label's two-way Brier score, halved as above
            "nll": float(-np.mean(labels * log_expit(logits / t) + (1 - labels) * log_expit(-logits / t))),
        }
    labels = labels.astype(np.int64)
    return {
        "ece": ece,
        "brier": float(brier_score_loss(labels, probs, labels=np.arange(logits.shape[-1]))),
        "nll": float(-np.mean(log_softmax(logits / t, axis=-1)[np.arange(len(labels)), labels])),
    }


def _two_way(logit: np.ndarray) -> np.ndarray:
    """A sigmoid's logit z as the two softmax logits (0, z) of the same decision: (N,) -> (N, 2);
    softmax((0, z) / T) is (1 - sigmoid(z / T), sigmoid(z / T))."""
    return np.stack([np.zeros_like(logit), logit], axis=-1)


def fit_temperature(task_type: str, logits, labels) -> float | list[float]:
    """The temperature that minimises the validation NLL: one float, or one per label (a list) for multi-label.
    Fitted by L-BFGS on log T, which keeps T positive and is how Guo et al.'s reference code does it."""
    _check_task(task_type)
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    if task_type == "multilabel":
        return [_fit_one(_two_way(logits[:, j]), labels[:, j].astype(np.int64), f"label {j}")
                for j in range(logits.shape[-1])]
    return _fit_one(logits, labels.astype(np.int64), "the validation set")


def _fit_one(logits: np.ndarray, labels: np.ndarray, what: str) -> float:
    """One temperature for (N, C) logits and (N,) class ids, by L-BFGS on log T."""
    reason = None
    if len(labels) < MIN_EXAMPLES_TO_FIT:
        reason = f"{len(labels)} validation examples, fewer than the {MIN_EXAMPLES_TO_FIT} needed"
    elif len(np.unique(labels)) < 2:
        reason = f"{what} has examples of one class only"
    elif np.all(logits.argmax(axis=-1) == labels):
        reason = f"every example of {what} is predicted right, so the likelihood has no maximum"
    if reason is not None:
        logger.warning("minibert: temperature scaling kept T = 1 (no calibration): %s", reason)
        return 1.0
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(nll)
    return float(log_t.detach().exp())


def plot_reliability(path, curves: Mapping[str, tuple], title: str = "", num_bins: int = NUM_BINS) -> bool:
    """A reliability diagram, one panel per entry of curves ({"before": (confidences, correct), "after": ...}):
    accuracy per confidence bin against the diagonal of perfect calibration, with the ECE in each title.
    False when matplotlib is missing (it is an optional dependency, as for the training curves)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path = Path(path)
    centres = (np.arange(num_bins) + 0.5) / num_bins
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
    for ax, (name, (confidences, correct)) in zip(axes[0], curves.items()):
        counts, accuracy, confidence = reliability_bins(confidences, correct, num_bins)
        filled = counts > 0
        ax.bar(centres[filled], accuracy[filled], width=1 / num_bins, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centres[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=1 / num_bins,
               color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}: ECE {expected_calibration_error(confidences, correct, num_bins):.4f}")
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def plot_calibration(path: Path, title: str, task_type: str, logits: np.ndarray, labels: np.ndarray,
                     temperature: float | list[float] | None) -> None:
    """reliability.png: accuracy against confidence at T = 1, and at the fitted temperature (None: not fitted)."""
    curves = {"before (T = 1)": top_label(task_type, logits, labels)}
    if temperature is not None:
        shown = f"{temperature:.3g}" if np.ndim(temperature) == 0 else "one per label"
        curves[f"after (T = {shown})"] = top_label(task_type, logits, labels, temperature)
    plot_reliability(path, curves, title=title)


# ----------------------------------------------------------------------------- in a model's config.json

CONFIG_KEY = "calibration_temperature"  # not "temperature": transformers 5 drops that key (a generation setting)


def temperature_for_config(temperature: float | Sequence[float], labels: Sequence[str] | None = None) -> float | dict:
    """What config.json holds: a float, or {label: T} for multi-label (as label_thresholds is)."""
    if np.ndim(temperature) == 0:
        return float(temperature)
    return {label: float(t) for label, t in zip(labels, temperature, strict=True)}


def temperature_from_config(extra: Mapping, labels: Sequence[str] | None = None) -> float | list[float]:
    """The temperature a checkpoint's config saved (1.0, no scaling, when it saved none), in label order."""
    saved = extra.get(CONFIG_KEY, 1.0)
    if isinstance(saved, Mapping):
        missing = [label for label in labels if label not in saved]
        if missing:
            raise ValueError(f"config.json's {CONFIG_KEY} has no temperature for label(s) {', '.join(missing)}: "
                             "fine-tune the model again, or remove the key to predict uncalibrated")
        return [float(saved[label]) for label in labels]
    return float(saved)


def calibration_report(task_type: str, logits, labels, temperature: float | Sequence[float] | None) -> dict[str, float]:
    """ece, brier and nll of the probabilities as they are predicted; when a temperature was fitted (not None),
    at that temperature, with the same three at T = 1 beside them as ece_uncalibrated, brier_uncalibrated, ..."""
    report = calibration_metrics(task_type, logits, labels, 1.0 if temperature is None else temperature)
    if temperature is not None:
        report.update({f"{name}_uncalibrated": value for name, value in calibration_metrics(task_type, logits, labels).items()})
    return report
