"""Per-label decision thresholds for multi-label classification (`--tune-thresholds`).

A multi-label model predicts each label whose probability reaches its threshold, 0.5 by default.
For a rare label the best cut is usually lower (and for a frequent one higher): tune_thresholds
picks, for each label on its own, the threshold that maximises that label's F1 on the validation
set. They are saved in config.json as `label_thresholds` ({label: threshold}) and used for every
prediction the model makes after that.

For one label with validation probabilities p and gold answers y: sort p from high to low; predicting
the top k as positive gives tp = (gold among the top k), and F1 = 2 tp / (k + positives). The best k
(the smallest one on ties) is kept, and the threshold put halfway between the k-th and the (k+1)-th
probability, so that it separates them with the widest margin. Only cuts between different
probabilities are possible: equal probabilities get the same answer. Probabilities closer than
TIE_TOLERANCE count as equal: the same text read in two batches of different padding gets logits
that differ in float32 rounding (~1e-8), and a cut between two copies of one text is no decision.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from minibert.metrics import MULTILABEL_THRESHOLD

TIE_TOLERANCE = 1e-6  # well above float32 rounding of a probability (~6e-8 near 1), far below a real margin


def best_threshold(probabilities: np.ndarray, gold: np.ndarray) -> float | None:
    """The F1-maximising threshold of one label (see the module docstring); None when the validation
    set has no positive example of it, so that no threshold is better than another."""
    probabilities, gold = np.asarray(probabilities, dtype=np.float64), np.asarray(gold).astype(bool)
    positives = int(gold.sum())
    if positives == 0:
        return None
    order = np.argsort(-probabilities, kind="stable")
    p, y = probabilities[order], gold[order]
    k = np.arange(1, len(p) + 1)  # predict the top k as positive
    f1 = 2 * np.cumsum(y) / (k + positives)
    distinct = np.append(p[1:] < p[:-1] - TIE_TOLERANCE, True)  # a cut after position k-1 separates two values
    f1 = np.where(distinct, f1, -1.0)
    best = int(np.argmax(f1))  # the first maximum: the fewest positives
    below = p[best + 1] if best + 1 < len(p) else 0.0
    return float((p[best] + below) / 2)


def tune_thresholds(probabilities: np.ndarray, gold: np.ndarray, labels: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """{label: threshold} from validation probabilities (N, L) and multi-hot gold (N, L), and the labels
    that kept MULTILABEL_THRESHOLD because the validation set has no positive example of them."""
    probabilities, gold = np.asarray(probabilities), np.asarray(gold)
    if probabilities.shape != gold.shape or probabilities.ndim != 2 or probabilities.shape[1] != len(labels):
        raise ValueError(f"probabilities {probabilities.shape} and gold {gold.shape} must both be (N, {len(labels)})")
    thresholds, untuned = {}, []
    for j, label in enumerate(labels):
        threshold = best_threshold(probabilities[:, j], gold[:, j])
        if threshold is None:
            untuned.append(label)
            threshold = MULTILABEL_THRESHOLD
        thresholds[label] = threshold
    return thresholds, untuned


def threshold_vector(label_thresholds: Mapping[str, float] | None, labels: Sequence[str]) -> np.ndarray:
    """(L,) thresholds in label id order from a config's label_thresholds; MULTILABEL_THRESHOLD without them."""
    if not label_thresholds:
        return np.full(len(labels), MULTILABEL_THRESHOLD)
    missing = [label for label in labels if label not in label_thresholds]
    if missing:
        raise ValueError(f"label_thresholds in config.json has no threshold for {missing}: it belongs to another "
                         "model; remove label_thresholds (0.5 for every label) or tune them again")
    return np.array([float(label_thresholds[label]) for label in labels])
