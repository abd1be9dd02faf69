"""Evaluation metrics for fine-tuning. Well-kept libraries do the math: scikit-learn (accuracy, F1,
Matthews correlation, mean squared error), scipy (Pearson, Spearman) and seqeval (entity-level scores).

    compute_metrics("classification", predictions, references) -> {"accuracy": ..., "f1": ..., "mcc": ...}

What each task type expects, and reports by default:

    classification        predictions: (N,) class ids or (N, C) logits (argmax taken); references: (N,) ids.
                          accuracy; f1 of the positive class, id 1, with two classes, else macro-averaged
                          over the classes present; mcc (Matthews).
    regression            predictions, references: (N,) floats. pearson, spearman, mse.
    multilabel            predictions: (N, L) probabilities (a label is predicted at >= 0.5) or 0/1
                          decisions, never logits; references: (N, L) multi-hot. f1_micro, f1_macro (over
                          all L labels), accuracy (exact match of the whole label set).
    token-classification  predictions, references: one sequence of tag ids per sentence, aligned to each
                          word's first piece; positions where the reference is -100 are dropped. id2label
                          names the tags. precision, recall, f1 of whole entities (seqeval's default
                          CoNLL-eval mode, which also accepts IOB1), and token accuracy.

per_class_scores(task_type, predictions, references, id2label=...) gives precision, recall, F1 and support
of each class (classification), label (multilabel) or entity type (token classification), from the same
inputs: the averages hide what happens to a rare class.

Degenerate cases: a correlation with a constant input (or fewer than two examples) is undefined; it is
reported as 0.0, "no correlation shown", so that choosing the best checkpoint stays well defined. An F1,
precision or recall whose denominator is zero is 0.0 too (zero_division=0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from seqeval.metrics import accuracy_score as token_accuracy
from seqeval.metrics import classification_report as entity_report
from seqeval.metrics import f1_score as entity_f1
from seqeval.metrics import precision_score as entity_precision
from seqeval.metrics import recall_score as entity_recall
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_squared_error, precision_recall_fscore_support

from minibert.config import IGNORE_INDEX

METRICS = {  # every metric of each task type, all reported by default
    "classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman", "mse"),
    "multilabel": ("f1_micro", "f1_macro", "accuracy"),
    "token-classification": ("precision", "recall", "f1", "accuracy"),
}
MAIN_METRIC = {  # the one that picks the best checkpoint
    "classification": "accuracy",
    "regression": "pearson",
    "multilabel": "f1_micro",
    "token-classification": "f1",
}
LOWER_IS_BETTER = frozenset({"mse"})
MULTILABEL_THRESHOLD = 0.5


def greater_is_better(metric_name: str) -> bool:
    """Whether a higher value of this metric means a better model (all but the errors, like mse)."""
    return metric_name not in LOWER_IS_BETTER


def compute_metrics(
    task_type: str,
    predictions,
    references,
    *,
    id2label: Mapping[int | str, str] | None = None,
    metric_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """{metric name: value} for one evaluation; inputs as described in the module docstring.

    id2label (int or str keys) is needed for token classification; for classification it fixes the
    number of classes (two: binary F1). metric_names picks among METRICS[task_type] (default: all).
    """
    if task_type not in METRICS:
        raise ValueError(f"unknown task type {task_type!r}; choose one of {', '.join(METRICS)}")
    names = tuple(metric_names) if metric_names is not None else METRICS[task_type]
    unknown = [name for name in names if name not in METRICS[task_type]]
    if unknown:
        raise ValueError(f"{task_type} has no metric {', '.join(unknown)}; choose from {', '.join(METRICS[task_type])}")
    if len(references) == 0:
        raise ValueError("no examples to score")
    labels = {int(i): label for i, label in id2label.items()} if id2label is not None else None
    compute = {
        "classification": _classification,
        "regression": _regression,
        "multilabel": _multilabel,
        "token-classification": _token_classification,
    }[task_type]
    scores = compute(predictions, references, labels)
    return {name: float(scores[name]) for name in names}


def per_class_scores(
    task_type: str, predictions, references, *, id2label: Mapping[int | str, str]
) -> dict[str, dict[str, float]]:
    """{name: {"precision", "recall", "f1", "support"}} for each class, label or entity type (support: how
    many references have it), in id order (entity types sorted); inputs as for compute_metrics."""
    labels = {int(i): label for i, label in id2label.items()}
    if task_type == "token-classification":
        predicted_tags, reference_tags = _tag_sequences(predictions, references, labels)
        report = entity_report(reference_tags, predicted_tags, output_dict=True, zero_division=0)
        types = sorted(k for k in report if not k.endswith(" avg"))
        return {t: {"precision": float(report[t]["precision"]), "recall": float(report[t]["recall"]),
                    "f1": float(report[t]["f1-score"]), "support": int(report[t]["support"])} for t in types}
    if task_type == "classification":
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.ndim == 2:
            predictions = predictions.argmax(axis=-1)
    elif task_type == "multilabel":
        predictions, references = _multilabel_decisions(predictions, references)
    else:
        raise ValueError(f"{task_type} has no classes to score one by one")
    _same_length(predictions, references)
    ids = sorted(labels)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=ids, average=None, zero_division=0.0)
    return {labels[i]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for i, p, r, f, n in zip(ids, precision, recall, f1, support)}


def _same_length(predictions: np.ndarray, references: np.ndarray) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def _classification(predictions, references, id2label: dict[int, str] | None) -> dict[str, float]:
    predictions, references = np.asarray(predictions), np.asarray(references)
    if predictions.ndim == 2:  # logits or probabilities
        predictions = predictions.argmax(axis=-1)
    _same_length(predictions, references)
    num_classes = len(id2label) if id2label is not None else int(max(predictions.max(), references.max())) + 1
    if num_classes <= 2:
        f1 = f1_score(references, predictions, average="binary", pos_label=1, zero_division=0.0)
    else:
        f1 = f1_score(references, predictions, average="macro", zero_division=0.0)
    return {
        "accuracy": accuracy_score(references, predictions),
        "f1": f1,
        "mcc": matthews_corrcoef(references, predictions),
    }


def _correlation(statistic, predictions: np.ndarray, references: np.ndarray) -> float:
    """A correlation, or 0.0 where it is undefined (a constant input, fewer than two examples)."""
    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return 0.0
    return statistic(predictions, references).statistic


def _regression(predictions, references, id2label=None) -> dict[str, float]:
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)  # (N,) or (N, 1) model outputs
    references = np.asarray(references, dtype=np.float64).reshape(-1)
    _same_length(predictions, references)
    return {
        "pearson": _correlation(pearsonr, predictions, references),
        "spearman": _correlation(spearmanr, predictions, references),
        "mse": mean_squared_error(references, predictions),
    }


def _multilabel_decisions(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    """(N, L) 0/1 predictions and references from probabilities (>= MULTILABEL_THRESHOLD) or decisions."""
    predictions, references = np.asarray(predictions), np.asarray(references).astype(np.int64)
    if predictions.shape != references.shape or predictions.ndim != 2:
        raise ValueError(
            f"multilabel predictions {predictions.shape} and references {references.shape} must both be (N, num_labels)"
        )
    if predictions.dtype.kind == "f":
        if predictions.min() < 0 or predictions.max() > 1:
            raise ValueError("multilabel predictions outside [0, 1] look like logits; pass sigmoid probabilities")
        predictions = predictions >= MULTILABEL_THRESHOLD
    return predictions.astype(np.int64), references


def _multilabel(predictions, references, id2label=None) -> dict[str, float]:
    predictions, references = _multilabel_decisions(predictions, references)
    return {
        "f1_micro": f1_score(references, predictions, average="micro", zero_division=0.0),
        "f1_macro": f1_score(references, predictions, average="macro", zero_division=0.0),
        "accuracy": accuracy_score(references, predictions),  # on label sets: exact match
    }


def _tag_sequences(predictions, references, id2label: dict[int, str]) -> tuple[list[list[str]], list[list[str]]]:
    """Predicted and reference tags per sentence, without the positions whose reference is -100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences for {len(references)} references")
    predicted_tags, reference_tags = [], []
    for i, (predicted, reference) in enumerate(zip(predictions, references, strict=True)):
        predicted, reference = np.asarray(predicted).reshape(-1), np.asarray(reference).reshape(-1)
        if len(predicted) != len(reference):
            raise ValueError(f"sentence {i}: {len(predicted)} predicted tags for {len(reference)} references")
        kept = reference != IGNORE_INDEX
        predicted_tags.append([id2label[int(tag)] for tag in predicted[kept]])
        reference_tags.append([id2label[int(tag)] for tag in reference[kept]])
    return predicted_tags, reference_tags


def _token_classification(predictions, references, id2label: dict[int, str] | None) -> dict[str, float]:
    if id2label is None:
        raise ValueError("token classification metrics need id2label to turn tag ids into tags")
    predicted_tags, reference_tags = _tag_sequences(predictions, references, id2label)
    return {
        "precision": entity_precision(reference_tags, predicted_tags, zero_division=0),
        "recall": entity_recall(reference_tags, predicted_tags, zero_division=0),
        "f1": entity_f1(reference_tags, predicted_tags, zero_division=0),
        "accuracy": token_accuracy(reference_tags, predicted_tags),
    }
