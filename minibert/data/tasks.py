"""Tasks minibert knows by name: the built-in movie-review polarity task and the GLUE benchmark."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from minibert import assets
from minibert.data.examples import DataError, Example
from minibert.data.readers import load_examples
from minibert.text_files import utf8_lines


# ---------------------------------------------------------------------------------------------------
# Movie reviews


def _movie_review_split(sentence_id: str) -> int:
    """0 train, 1 validation, 2 test: 80/10/10 by a hash of the sentence id, the same on every machine."""
    bucket = int.from_bytes(hashlib.sha256(sentence_id.encode()).digest()[:8], "big") % 10
    return 2 if bucket == 0 else 1 if bucket == 1 else 0


def movie_reviews(task_type: str = "classification") -> tuple[list[Example], list[Example], list[Example]]:
    """Pang & Lee's movie-review sentences with mean human ratings in -4..4: (train, validation, test).

    classification: "negative" / "positive" by the rating's sign; the 37 sentences rated exactly 0 are
    left out. regression: the rating itself. The 80/10/10 split is fixed by a hash of each sentence id.
    """
    if task_type not in ("classification", "regression"):
        raise ValueError(f"movie_reviews is a classification or regression task, not {task_type!r}")
    path = assets.movie_reviews_file()
    splits: tuple[list[Example], ...] = ([], [], [])
    for _, line in utf8_lines(path, error=DataError):
        line = line.rstrip("\r\n")
        if not line:
            continue
        sentence_id, rating, text = line.split("\t")
        rating = float(rating)
        if task_type == "classification":
            if rating == 0:
                continue
            label = "positive" if rating > 0 else "negative"
        else:
            label = rating
        splits[_movie_review_split(sentence_id)].append(Example(text, None, label))
    return splits  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# GLUE


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's data lies in the GLUE download and how to read and score it."""

    directory: str  # the task's folder in the GLUE download (glue_data/SST-2)
    task_type: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    labels: tuple[str, ...] | None  # in id order, as Hugging Face's GLUE configs have them; None for regression
    metrics: tuple[str, ...]  # names of minibert.metrics
    main_metric: str  # the number the GLUE papers report (BERT: F1 for MRPC/QQP, Spearman for STS-B)
    validation_file: str = "dev.tsv"
    test_file: str = "test.tsv"  # no labels
    train_file: str = "train.tsv"
    headerless_columns: tuple[str, ...] | None = None  # train/dev without a header row (CoLA); test has one


_BINARY = ("0", "1")
_NLI = ("entailment", "not_entailment")
_MNLI = ("contradiction", "entailment", "neutral")
_ACCURACY, _ACCURACY_F1, _CORRELATIONS = ("accuracy",), ("accuracy", "f1"), ("pearson", "spearman")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", "classification", "sentence", None, "label", _BINARY, ("mcc",), "mcc",
                     headerless_columns=("source", "label", "orig_label", "sentence")),
    "sst2": GlueTask("SST-2", "classification", "sentence", None, "label", _BINARY, _ACCURACY, "accuracy"),
    "mrpc": GlueTask("MRPC", "classification", "#1 String", "#2 String", "Quality", _BINARY, _ACCURACY_F1, "f1"),
    "qqp": GlueTask("QQP", "classification", "question1", "question2", "is_duplicate", _BINARY, _ACCURACY_F1, "f1"),
    "stsb": GlueTask("STS-B", "regression", "sentence1", "sentence2", "score", None, _CORRELATIONS, "spearman"),
    "mnli": GlueTask("MNLI", "classification", "sentence1", "sentence2", "gold_label", _MNLI, _ACCURACY, "accuracy",
                     validation_file="dev_matched.tsv", test_file="test_matched.tsv"),
    "mnli-mm": GlueTask("MNLI", "classification", "sentence1", "sentence2", "gold_label", _MNLI, _ACCURACY, "accuracy",
                        validation_file="dev_mismatched.tsv", test_file="test_mismatched.tsv"),
    "qnli": GlueTask("QNLI", "classification", "question", "sentence", "label", _NLI, _ACCURACY, "accuracy"),
    "rte": GlueTask("RTE", "classification", "sentence1", "sentence2", "label", _NLI, _ACCURACY, "accuracy"),
    "wnli": GlueTask("WNLI", "classification", "sentence1", "sentence2", "label", _BINARY, _ACCURACY, "accuracy"),
}  # fmt: skip


def load_glue(task: str, data_dir: str | Path) -> tuple[list[Example], list[Example], list[Example] | None, GlueTask]:
    """(train, validation, test, spec) of a GLUE task from the GLUE download's TSV files.

    data_dir is the task's folder (glue_data/SST-2) or the folder above it (glue_data). The test examples
    have label None; test is None when the folder has no test file.
    """
    spec = GLUE_TASKS.get(task.lower())
    if spec is None:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)}")
    data_dir = Path(data_dir)
    if not (data_dir / spec.train_file).is_file() and (data_dir / spec.directory).is_dir():
        data_dir = data_dir / spec.directory
    for name in (spec.train_file, spec.validation_file):
        if not (data_dir / name).is_file():
            raise DataError(
                f"GLUE {task} needs {spec.train_file} and {spec.validation_file} in {data_dir} "
                f"(the {spec.directory} folder of the GLUE download); {name} is missing"
            )

    def load(name: str, labelled: bool) -> list[Example]:
        return load_examples(
            data_dir / name,
            task_type=spec.task_type,
            text_column=spec.text_column,
            text_pair_column=spec.text_pair_column,
            label_column=spec.label_column,
            require_labels=labelled,
            column_names=spec.headerless_columns if labelled else None,
        )

    test = load(spec.test_file, False) if (data_dir / spec.test_file).is_file() else None
    return load(spec.train_file, True), load(spec.validation_file, True), test, spec
