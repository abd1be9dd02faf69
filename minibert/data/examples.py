"""What the fine-tuning data modules share: one Example, the task types, and DataError."""

from __future__ import annotations

from dataclasses import dataclass

from minibert import spans

TASK_TYPES = ("classification", "regression", "multilabel", "token-classification")
DEFAULT_TASK = ("classification", "default")


class DataError(ValueError):
    """Input data that cannot be used; the message says which file, where, and how to fix it."""


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; choose one of {', '.join(TASK_TYPES)}")


@dataclass(slots=True)
class Example:
    """One input and its label, before tokenization.

    text:      the text; for token classification, the list of words
    text_pair: the second text of a pair task (NLI, paraphrase), else None
    label:     a class name (str); a float (regression); a list of class names (multilabel); a list of
               tags, one per word (token classification); None in an unlabelled (test) file
    tagged_text: token classification of span-annotated text: the text, its words' character offsets
               and the record as read (minibert.spans.TaggedText), so that predictions go back as spans
    """

    text: str | list[str]
    text_pair: str | None = None
    label: str | float | list[str] | None = None
    tagged_text: spans.TaggedText | None = None
