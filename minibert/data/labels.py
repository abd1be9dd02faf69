"""Class labels: reading them from cells and JSON values, and LabelVocab, which numbers them.

Class labels are strings ("1" and 1 are the same label). Their ids come from sorting the training labels,
not from the order rows happen to be in: numbers numerically ("2" before "10", so labels 0..K-1 keep
their own numbers as ids; "2.0" before "10.0"), anything else alphabetically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from itertools import chain

from minibert.data.examples import DEFAULT_TASK, DataError, Example

MULTILABEL_SEPARATOR = "|"  # joins a multilabel example's labels in one CSV/TSV cell


# ---------------------------------------------------------------------------------------------------
# Label values


def _finite_number(value) -> float | None:
    """A label as a float when it is a finite number, or a string of one (" 0.25"); else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def class_label(value, where: str) -> str:
    """A class name from a cell or JSON value: strings as they are (stripped), numbers as Python writes them.

    A JSON number names its class by value, not by spelling: 1.0 is the class "1", like 1, because
    writers do not keep the spelling (pandas writes an integer column with a missing value as 1.0,
    JavaScript writes 1.0 as 1). A CSV cell is text and keeps its spelling: "1.0" stays "1.0".
    """
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return str(value)  # 0.25 -> "0.25", the class a CSV cell "0.25" names
    if isinstance(value, list):
        raise DataError(f"{where}: the label is a list {value!r}; a set of labels needs --task-type multilabel")
    raise DataError(f"{where}: {value!r} is not a class label; use a non-empty string or a number")


def parse_label(value, task_type: str, where: str):
    """The Example label of a CSV/TSV cell (a str) or a JSON value, for a task on whole texts."""
    if task_type == "classification":
        return class_label(value, where)
    if task_type == "regression":
        target = _finite_number(value)
        if target is None:
            raise DataError(
                f"{where}: regression label {value!r} is not a finite number; check --label-column, "
                f"or use --task-type classification for class names"
            )
        return target
    # multilabel
    if isinstance(value, str):
        value = [label for label in value.split(MULTILABEL_SEPARATOR) if label.strip()]
    if not isinstance(value, list):
        raise DataError(
            f"{where}: a multilabel label is a list or names joined by {MULTILABEL_SEPARATOR!r}, not {value!r}"
        )
    return list(dict.fromkeys(class_label(label, where) for label in value))  # drops repeats, keeps order


def labels_task_type(labels: Iterable) -> tuple[str, str]:
    """Regression when every label is a number and one at least has a fraction (a score), else classification."""
    any_label = any_fraction = False
    for label in labels:
        number = _finite_number(label)
        if number is None:
            return "classification", "the labels are not all numbers"
        any_label = True
        any_fraction = any_fraction or not number.is_integer()
    if any_fraction:
        return "regression", "the labels are numbers with fractions"
    return ("classification", "the labels are whole numbers") if any_label else DEFAULT_TASK


# ---------------------------------------------------------------------------------------------------
# Label ids


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    numbers = {label: _finite_number(label) for label in labels}
    if None not in numbers.values():
        return sorted(numbers, key=lambda label: (numbers[label], label))  # "1" and "1.0": one fixed order
    return sorted(numbers)


def label_lists(examples: Sequence[Example], task_type: str) -> list[list[str]]:
    """Each labelled example's class names as a list (one name for classification)."""
    return [[ex.label] if task_type == "classification" else ex.label for ex in examples if ex.label is not None]


class LabelVocab:
    """Class names <-> ids for classification, multilabel and token classification.

    Built from the training data only (from_examples, ids in sorted order), or from the labels of a
    checkpoint that already is a classifier, in its id order, so that its ids keep their meaning.
    """

    def __init__(self, labels: Sequence[str]):
        self.labels = [str(label) for label in labels]  # in id order
        if not self.labels:
            raise DataError("no labels: the training data has none")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"repeated labels in {self.labels}")
        self.label2id = {label: i for i, label in enumerate(self.labels)}

    @classmethod
    def from_examples(cls, examples: Sequence[Example], task_type: str) -> LabelVocab:
        if task_type not in ("classification", "multilabel", "token-classification"):
            raise ValueError(f"{task_type} has no class labels")
        return cls(_sorted_labels(chain.from_iterable(label_lists(examples, task_type))))

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"LabelVocab({self.labels})"

    def encode(self, labels: Iterable[str], *, source: str = "the data") -> list[int]:
        """Ids of class names; every name not in the vocabulary is listed in one DataError."""
        labels = list(labels)
        unseen = set(labels) - self.label2id.keys()
        if unseen:
            known = ", ".join(map(repr, self.labels[:20])) + (", ..." if len(self.labels) > 20 else "")
            scores = labels_task_type(unseen)[0] == "regression"
            raise DataError(
                f"{source} has labels the training data does not: {', '.join(map(repr, _sorted_labels(unseen)))} "
                f"(known: {known}); correct them, or add training examples of them"
                + ("; if the labels are scores, pass --task-type regression" if scores else "")
            )
        return [self.label2id[label] for label in labels]
