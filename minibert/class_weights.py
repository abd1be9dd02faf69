"""Class weights for imbalanced labels: `--class-weights balanced` or `--class-weights FILE.json`.

With one class ten times rarer than another, the plain loss is lowest for a model that seldom predicts
the rare class, and its recall suffers. Weighting each example's loss by its class evens this out:

    classification          cross-entropy weight per class; "balanced" = n_samples / (n_classes * count),
                            scikit-learn's definition (compute_class_weight("balanced")), so that every
                            class carries the same total weight
    multilabel              BCE pos_weight per label (a label's positive examples count pos_weight times);
                            "balanced" = negatives / positives, which is scikit-learn's balanced
                            weighting of that label's two classes, rescaled to leave the negatives at 1
    token-classification    cross-entropy weight per tag, counted over the tagged words

A FILE.json is {label: weight} for every label, each a positive number (pos_weight for multilabel).

    weights = class_weights("balanced", task_type, vocab.labels, [f.label for f in train_features])
    loss_fn = weighted_loss(task_type, torch.tensor(weights))    # loss_fn(logits, labels) -> scalar
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minibert.config import IGNORE_INDEX

TASK_TYPES = ("classification", "multilabel", "token-classification")


class ClassWeightsError(ValueError):
    """A --class-weights setting that cannot be used; the message says how to fix it."""


def balanced_weights(task_type: str, labels: Sequence[str], targets: Sequence) -> np.ndarray:
    """(num_labels,) float64 "balanced" weights from the training targets: class ids (classification),
    multi-hot rows (multilabel) or per-token tag ids with IGNORE_INDEX (token classification)."""
    num_labels = len(labels)
    if task_type == "multilabel":
        multi_hot = np.stack([np.asarray(t) for t in targets]).astype(bool)  # (N, L)
        positives = multi_hot.sum(axis=0)
        never = [label for label, n in zip(labels, positives) if n == 0]
        always = [label for label, n in zip(labels, positives) if n == len(multi_hot)]
        if never or always:
            which = f"no training example has {never}" if never else f"every training example has {always}"
            raise ClassWeightsError(f"--class-weights balanced: {which}, so a balanced weight is undefined; "
                                    "give the weights in a --class-weights FILE.json")
        return (len(multi_hot) - positives) / positives
    ids = np.concatenate([np.asarray(t).reshape(-1) for t in targets])
    ids = ids[ids != IGNORE_INDEX]
    counts = np.bincount(ids, minlength=num_labels)
    missing = [label for label, n in zip(labels, counts) if n == 0]
    if missing:
        raise ClassWeightsError(f"--class-weights balanced: the training data has no example of {missing}, so its "
                                "weight is undefined; give the weights in a --class-weights FILE.json")
    return len(ids) / (num_labels * counts)


def read_weights_file(path: str | Path, labels: Sequence[str]) -> np.ndarray:
    """(num_labels,) weights from a JSON object {label: weight}, in label id order."""
    path = Path(path)
    if not path.is_file():
        raise ClassWeightsError(f"--class-weights: no such file: {path} (give balanced, or a JSON file {{label: weight}})")
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClassWeightsError(f"--class-weights {path} is not valid JSON ({e}); write an object {{label: weight}}") from None
    if not isinstance(given, dict):
        raise ClassWeightsError(f"--class-weights {path} holds a {type(given).__name__}; write an object {{label: weight}}")
    given = {str(label): weight for label, weight in given.items()}
    unknown = [label for label in given if label not in labels]
    if unknown:
        raise ClassWeightsError(f"--class-weights {path} names labels the training data does not have: {unknown} "
                                f"(labels: {list(labels)}); correct or remove them")
    missing = [label for label in labels if label not in given]
    if missing:
        raise ClassWeightsError(f"--class-weights {path} has no weight for {missing}: give every label one "
                                "(1.0 leaves a label as it is)")
    bad = {label: w for label, w in given.items()
           if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0}
    if bad:
        raise ClassWeightsError(f"--class-weights {path}: weights must be positive numbers, found {bad}")
    return np.array([float(given[label]) for label in labels])


def class_weights(setting: str, task_type: str, labels: Sequence[str], targets: Sequence) -> np.ndarray:
    """The weights --class-weights names: "balanced" (from the training targets) or a JSON file."""
    if task_type not in TASK_TYPES:
        raise ClassWeightsError(f"--class-weights weights classes; a {task_type} task has none (it applies to "
                                f"{', '.join(TASK_TYPES)})")
    if setting == "balanced":
        return balanced_weights(task_type, labels, targets)
    return read_weights_file(setting, labels)


def weighted_loss(task_type: str, weights: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """loss_fn(logits, labels): the task's usual loss with the class weights applied.

    classification: logits (B, L), labels (B,); multilabel: (B, L) and multi-hot (B, L);
    token-classification: (B, T, L) and (B, T) with IGNORE_INDEX where there is no tag. As in the
    unweighted losses, a weighted cross-entropy is a weighted mean (divided by the summed weights).
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"no weighted loss for {task_type}")

    def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
        w = weights.to(logits.device, torch.float32)
        logits = logits.float()
        if task_type == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=w)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), weight=w,
                               ignore_index=IGNORE_INDEX)

    return loss_fn
