"""Fine-tuning data: read labelled text, map labels to ids, tokenize once, batch by length.

The pipeline, in the order of this file:

    infer_task_type(train_path)                                      -> task type, when none is given
    load_examples(path) / movie_reviews() / load_glue(task, dir)    -> list[Example]
    LabelVocab.from_examples(train)                                  -> label <-> id, training labels only
    encode_examples(tokenizer, examples, max_length=..., ...)        -> list[Features], tokenized once
    train_batches(lengths, ...) / eval_batches(lengths, ...)         -> lists of example indices
    collate(features, pad_token_id)                                  -> dict of padded tensors

Task types: "classification" (one label per text), "regression" (a float per text), "multilabel" (a set
of labels per text), "token-classification" (a tag per word).

File formats, told by the extension:
    .csv                 comma-separated with a header row and CSV quoting (a text holding a comma in "quotes").
    .tsv                 tab-separated with a header row, split on tabs only, quotes kept as text:
                         the GLUE convention (its texts hold unbalanced quotes). A file written with CSV
                         quoting should be saved as .csv. Blank and whitespace-only lines are skipped.
    .jsonl / .json       JSON Lines, one object per line; a .json file may instead hold one array of objects,
                         or one object whose only value is that array ({"data": [...]}).
    token-classification: .jsonl / .json objects with a list of words and a list of tags ("tokens",
                         "tags" by default), or raw text with entity spans as character offsets
                         ({"text", "spans": [{"start", "end", "label"}]}, doccano's and Label Studio's
                         exports: minibert.spans), which the tokenizer splits into words, tagged in
                         --tag-scheme; any other extension (.conll, .txt, .iob, .tsv ...) is read as
                         CoNLL: one word per line with its tag in the last column, a blank line between
                         sentences, `-DOCSTART-` lines skipped.
    multilabel:          a JSON list of labels, or in CSV/TSV the labels joined by "|" ("action|comedy";
                         an empty cell is an empty set).

Class labels are strings ("1" and 1 are the same label). Their ids come from sorting the training labels,
not from the order rows happen to be in: numbers numerically ("2" before "10", so labels 0..K-1 keep
their own numbers as ids; "2.0" before "10.0"), anything else alphabetically. Every problem with the input
raises a DataError with a one-line message that names the file, the line and the fix, before any training
starts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from minibert import assets, spans

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression", "multilabel", "token-classification")
MULTILABEL_SEPARATOR = "|"  # joins a multilabel example's labels in one CSV/TSV cell
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CONLL_SUFFIXES = (".conll", ".iob", ".bio")  # surely CoNLL (token classification reads other suffixes as CoNLL too)
IGNORE_INDEX = -100  # label of the tokens that take no loss: special tokens and non-first word pieces


class DataError(ValueError):
    """Input data that cannot be used; the message says which file, where, and how to fix it."""


def _check_task_type(task_type: str) -> None:
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


# ---------------------------------------------------------------------------------------------------
# Reading files


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line with its ending) of a UTF-8 file; a byte that is not UTF-8 is a DataError."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                utf8_path = path.with_name(f"{path.stem}.utf8{path.suffix}")
                if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # the byte order marks of UTF-16
                    raise DataError(
                        f"{path} is UTF-16 (it starts with a UTF-16 byte order mark), not UTF-8; re-encode it: "
                        f"`iconv -f UTF-16 -t UTF-8 {path} > {utf8_path}`"
                    ) from None
                raise DataError(
                    f"{path} is not UTF-8: line {lineno}, byte {offset + e.start} is "
                    f"{raw[e.start : e.start + 1]!r}; re-encode it, e.g. "
                    f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > {utf8_path}` "
                    f"(naming the file's real encoding)"
                ) from None
            offset += len(raw)
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line  # a BOM, as Excel writes


def _table_rows(path: Path, column_names: Sequence[str] | None) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and the (line number, cells) rows of a .csv or .tsv file; blank and whitespace-only
    lines are skipped, but not a quoted empty text ("" in a one-column CSV): that is an example."""
    lines = _utf8_lines(path)
    if path.suffix.lower() == ".csv":  # the csv module reads a blank line as [] and "" as ['']
        rows = _csv_rows(path, (line for _, line in lines))
        rows = ((n, cells) for n, cells in rows if len(cells) > 1 or cells == [""] or "".join(cells).strip())
    else:  # TSV: tabs only, no quoting (see the module docstring)
        rows = ((n, line.rstrip("\r\n").split("\t")) for n, line in lines)
        rows = ((n, cells) for n, cells in rows if len(cells) > 1 or "".join(cells).strip())
    if column_names is not None:
        return list(column_names), rows
    header = next(rows, (0, None))[1]
    if header is None:
        raise DataError(f"{path} has no examples: the file is empty")
    return [name.strip() for name in header], rows


def _csv_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(lines)
    try:
        for cells in reader:
            yield reader.line_num, cells
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: {e} (a quote that is never closed?)") from None


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("line N", object) for JSON Lines, or ("record N", object) for a .json file holding one array
    (or one object wrapping it, {"data": [...]})."""
    lines = _utf8_lines(path)
    head = []  # up to the first non-blank line, whose first character tells an array from JSON Lines
    for numbered_line in lines:
        head.append(numbered_line)
        if numbered_line[1].strip():
            break
    lines = chain(head, lines)
    records = None
    if path.suffix.lower() == ".json" and head and head[-1][1].lstrip()[:1] in ("[", "{"):
        text = "".join(line for _, line in lines)  # with the blank lines, so JSON errors give true line numbers
        records = _json_document_records(path, text)
        lines = enumerate(text.split("\n"), 1)  # read as JSON Lines when it is not one document
    if records is not None:
        numbered = ((f"record {n}", record) for n, record in enumerate(records, 1))
    else:
        numbered = ((f"line {n}", _json_line(path, n, line)) for n, line in lines if line.strip())
    for where, record in numbered:
        if not isinstance(record, dict):
            raise DataError(f"{path} {where}: expected a JSON object, found {type(record).__name__}")
        yield where, record


def _json_document_records(path: Path, text: str) -> list | None:
    """The records of a .json file holding one array, or one object whose only value is the array
    ({"data": [...]}, as some exporters write); None when the file is JSON Lines."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} is not valid JSON: {e}") from None
        return None  # several objects, one per line
    if isinstance(document, list):
        return document
    values = list(document.values())
    if len(values) == 1 and isinstance(values[0], list) and all(isinstance(record, dict) for record in values[0]):
        return values[0]
    return None  # a single object: JSON Lines of one line


def _json_line(path: Path, lineno: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}); write one object per line") from None


def _conll_sentences(path: Path, require_labels: bool) -> Iterator[tuple[str, Example]]:
    """("line N", sentence) of a CoNLL file: `word ... tag` lines, blank lines between sentences."""
    sentence: list[tuple[int, str, str | None]] = []
    for lineno, line in chain(_utf8_lines(path), [(0, "")]):  # the blank line after the end ends the last sentence
        line = line.rstrip()
        cells = line.split("\t") if "\t" in line else line.split()
        if not line or cells[0] == "-DOCSTART-":
            if sentence:
                linenos, words, tags = zip(*sentence)
                yield f"line {linenos[0]}", Example(list(words), None, None if tags[0] is None else list(tags))
                sentence = []
            continue
        if not cells[0].strip() or (len(cells) < 2 and require_labels) or (len(cells) > 1 and not cells[-1].strip()):
            raise DataError(
                f"{path} line {lineno}: expected a word and its tag separated by a space or tab, found "
                f"{line!r}; put one word per line, its tag in the last column, a blank line between sentences"
            )
        tag = cells[-1].strip() if len(cells) > 1 else None
        if sentence and (tag is None) != (sentence[0][2] is None):
            raise DataError(f"{path} line {lineno}: some words of this sentence have a tag and some do not")
        sentence.append((lineno, cells[0].strip(), tag))


def _flag(param: str) -> str:
    """The command-line flag that sets a load_examples parameter (text_column -> --text-column)."""
    return "--" + param.replace("_", "-")


def _finite_number(value) -> float | None:
    """A label as a float when it is a finite number, or a string of one (" 0.25"); else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _class_label(value, where: str) -> str:
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


def _parse_label(value, task_type: str, where: str):
    """The Example label of a CSV/TSV cell (a str) or a JSON value, for a task on whole texts."""
    if task_type == "classification":
        return _class_label(value, where)
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
    return list(dict.fromkeys(_class_label(label, where) for label in value))  # drops repeats, keeps order


def _check_columns(found: Sequence[str], columns: dict[str, str | None], where: str, hint: str = "") -> None:
    """DataError when a wanted column (parameter name -> column name) is not among `found`."""
    for param, name in columns.items():
        if name is not None and name not in found:
            raise DataError(
                f"{where} has no column {name!r} (columns: {', '.join(map(repr, found))}){hint}; "
                f"choose one with {_flag(param)}"
            )


def load_examples(
    path: str | Path,
    *,
    task_type: str,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    column_names: Sequence[str] | None = None,
    flag: str | None = None,
    tokenizer: Tokenizer | None = None,
    tag_scheme: str = "bio",
) -> list[Example]:
    """Read a .csv, .tsv, .jsonl/.json or CoNLL file into Examples (formats: the module docstring).

    text_column / label_column default to "text" / "label", or "tokens" / "tags" for token classification
    (CoNLL files have no column names). require_labels=False reads an unlabelled (test) file: without
    the label column, or with an empty label, an example gets label None; some examples with a label
    and some without are an error. column_names names the columns of a CSV/TSV file that has no header
    row. flag is the command-line option that gave `path`, named in the error when the file does not exist.
    Span-annotated text (token classification) needs the tokenizer, whose words get the tags, in tag_scheme.
    """
    _check_task_type(task_type)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag + ': ' if flag else ''}no such file: {path}")
    token_task = task_type == "token-classification"
    columns = {
        "text_column": text_column or ("tokens" if token_task else "text"),
        "text_pair_column": text_pair_column,
        "label_column": label_column or ("tags" if token_task else "label"),
    }
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES and token_task and _holds_spans(path, columns["text_column"]):
        if tokenizer is None:
            raise ValueError("span-annotated text is split into words by the tokenizer: pass tokenizer=")
        records = list(_json_records(path))
        tagged = spans.tag_records(records, tokenizer, tag_scheme, str(path))
        numbered = [(where, Example(t.words, None, t.tags, t)) for (where, _), t in zip(records, tagged)]
        if require_labels:
            unlabelled = next((where for where, example in numbered if example.label is None), None)
            if unlabelled:
                raise DataError(f"{path} {unlabelled} has no spans: give every text its spans ([] when it has no entity)")
    elif suffix in JSON_SUFFIXES:
        numbered = _json_examples(path, task_type, columns, require_labels)
    elif token_task:
        numbered = list(_conll_sentences(path, require_labels))
    elif suffix in (".csv", ".tsv"):
        numbered = _table_examples(path, task_type, columns, require_labels, column_names)
    elif suffix in CONLL_SUFFIXES:
        raise DataError(f"{path} is a CoNLL file, a tag per word: pass --task-type token-classification")
    else:
        raise DataError(
            f"cannot tell the format of {path} from its extension {suffix!r}: use .csv, .tsv, .jsonl or .json, "
            f"or for a CoNLL file (a word and its tag per line) pass --task-type token-classification"
        )
    if not numbered:
        raise DataError(f"{path} has no examples (is it empty, or only a header?)")
    unlabelled = next((where for where, example in numbered if example.label is None), None)
    labelled = next((where for where, example in numbered if example.label is not None), None)
    if unlabelled and labelled:  # scoring some test examples and only predicting others is surely a mistake
        raise DataError(
            f"{path} mixes labelled and unlabelled examples: {unlabelled} has no label but {labelled} has one; "
            f"fill in every label, or leave the label column out entirely to only get predictions"
        )
    empty = [where for where, example in numbered if not token_task and not example.text.strip()]
    if empty:  # legal, but more often a wrong column or a broken export than meant
        logger.warning("minibert: %s: %d example(s) with an empty text (the first at %s); they are kept",
                       path, len(empty), empty[0])
    return [example for _, example in numbered]


def _holds_spans(path: Path, text_column: str) -> bool:
    """Whether a token-classification JSON file holds raw text with spans rather than word lists: its
    first record has no list of words under text_column but is in one of minibert.spans.FORMATS."""
    first = next(_json_records(path), (None, None))[1]
    return first is not None and not isinstance(first.get(text_column), list) and spans.record_format(first) is not None


def _table_examples(path, task_type, columns, require_labels, column_names) -> list[tuple[str, Example]]:
    header, rows = _table_rows(path, column_names)
    label_column = columns["label_column"]
    wanted = columns if require_labels else {k: v for k, v in columns.items() if k != "label_column"}
    _check_columns(header, wanted, str(path), "" if column_names else " (the first line is read as the header)")
    text_at = header.index(columns["text_column"])
    pair_at = header.index(columns["text_pair_column"]) if columns["text_pair_column"] else None
    label_at = header.index(label_column) if label_column in header else None
    examples = []
    for n, cells in rows:
        where = f"{path} line {n}"
        if len(cells) != len(header):
            raise DataError(
                f"{where} has {len(cells)} fields but the header has {len(header)}"
                + ("; a .tsv is split on every tab, so a text cannot hold one" if path.suffix.lower() == ".tsv" else "")
            )
        label = None
        if label_at is not None:
            cell = cells[label_at]
            if cell.strip() or task_type == "multilabel":  # an empty multilabel cell is the empty set
                label = _parse_label(cell, task_type, where)
            elif require_labels:
                raise DataError(f"{where}: empty label in column {label_column!r}")
        pair = cells[pair_at] if pair_at is not None else None
        examples.append((f"line {n}", Example(cells[text_at], pair, label)))
    return examples


def _json_examples(path, task_type, columns, require_labels) -> list[tuple[str, Example]]:
    text_column, pair_column, label_column = columns.values()
    wanted = columns if require_labels else {k: v for k, v in columns.items() if k != "label_column"}
    examples = []
    for position, record in _json_records(path):
        where = f"{path} {position}"
        _check_columns(list(record), wanted, where)
        label = record.get(label_column)
        if label is None and require_labels:
            raise DataError(f"{where}: {label_column!r} is null")
        if task_type == "token-classification":
            example = _token_example(record[text_column], label, where)
            if example.text:  # an empty sentence has nothing to learn or predict
                examples.append((position, example))
            continue
        text = _text(record[text_column], where, text_column)
        pair = _text(record[pair_column], where, pair_column) if pair_column else None
        label = None if label is None else _parse_label(label, task_type, where)
        examples.append((position, Example(text, pair, label)))
    return examples


def _text(value, where: str, column: str) -> str:
    if isinstance(value, list):
        raise DataError(
            f"{where}: {column!r} holds a list, not a text; a list of words is token classification: "
            f"pass --task-type token-classification"
        )
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, found {value!r}")
    return value


def _token_example(words, tags, where: str) -> Example:
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise DataError(f"{where}: the words must be a list of non-empty strings, found {words!r}")
    if tags is None:
        return Example(words, None, None)
    if not isinstance(tags, list) or len(tags) != len(words):
        found = f"{len(tags)} tags" if isinstance(tags, list) else f"tags {tags!r}"
        raise DataError(f"{where}: {len(words)} words but {found}; give one tag per word")
    return Example(words, None, [_class_label(tag, where) for tag in tags])


_DEFAULT_TASK = ("classification", "default")


def infer_task_type(
    path: str | Path, *, text_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """The task type a training file looks like, and why (for a log line), when the user gives none.

    A CoNLL file (a suffix in CONLL_SUFFIXES) or JSON whose text column ("text", else "tokens") holds
    word lists: token-classification. JSON labels that are lists: multilabel. Labels that are all numbers,
    one at least with a fraction: regression. Anything else: classification, also for "|" in a CSV cell
    (a multilabel separator or part of a class name?) and for other suffixes, which load_examples reads
    only as CoNLL but which a plain text file is as likely to have. A file this cannot read gives
    ("classification", "default"), so that load_examples raises its usual error.
    """
    path, label_column = Path(path), label_column or "label"
    suffix = path.suffix.lower()
    try:
        if not path.is_file():
            return _DEFAULT_TASK
        if suffix in CONLL_SUFFIXES:
            return "token-classification", f"a {suffix} file"
        if suffix in JSON_SUFFIXES:
            return _json_task_type(path, text_column, label_column)
        if suffix in (".csv", ".tsv"):
            header, rows = _table_rows(path, None)
            if label_column not in header:
                return _DEFAULT_TASK
            at = header.index(label_column)
            return _labels_task_type(cells[at] for _, cells in rows if len(cells) > at and cells[at].strip())
    except (DataError, OSError):
        pass
    return _DEFAULT_TASK


def _json_task_type(path: Path, text_column: str | None, label_column: str) -> tuple[str, str]:
    records = (record for _, record in _json_records(path))
    first = next(records, None)
    if first is None:
        return _DEFAULT_TASK
    text_column = text_column or ("tokens" if "text" not in first and "tokens" in first else "text")
    words = first.get(text_column)
    if isinstance(words, list) and all(isinstance(word, str) for word in words):
        return "token-classification", f"the {text_column!r} field holds word lists"
    if spans.has_span_annotations(first):
        return "token-classification", "the records hold text with entity spans"
    labels = []
    for record in chain([first], records):
        label = record.get(label_column)
        if isinstance(label, list):
            return "multilabel", "the labels are JSON lists"
        if label is not None:
            labels.append(label)
    return _labels_task_type(labels)


def _labels_task_type(labels: Iterable) -> tuple[str, str]:
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
    return ("classification", "the labels are whole numbers") if any_label else _DEFAULT_TASK


# ---------------------------------------------------------------------------------------------------
# Labels


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    numbers = {label: _finite_number(label) for label in labels}
    if None not in numbers.values():
        return sorted(numbers, key=lambda label: (numbers[label], label))  # "1" and "1.0": one fixed order
    return sorted(numbers)


def _label_lists(examples: Sequence[Example], task_type: str) -> list[list[str]]:
    """Each labelled example's class names as a list (one name for classification)."""
    return [[ex.label] if task_type == "classification" else ex.label for ex in examples if ex.label is not None]


class LabelVocab:
    """Class names <-> ids for classification, multilabel and token classification.

    Built from the training data only (from_examples, ids in sorted order), or from the id2label of a
    checkpoint that already is a classifier (from_id2label), so that its ids keep their meaning.
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
        return cls(_sorted_labels(chain.from_iterable(_label_lists(examples, task_type))))

    @classmethod
    def from_id2label(cls, id2label: Mapping[int | str, str]) -> LabelVocab:
        """From a config's id2label, whose keys are ints or (as in config.json) strings."""
        by_id = {int(i): label for i, label in id2label.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"id2label ids must be 0..{len(by_id) - 1}, found {sorted(by_id)}")
        return cls([by_id[i] for i in range(len(by_id))])

    @property
    def id2label(self) -> dict[str, str]:
        """{"0": name, ...}: string keys, as a Hugging Face config.json stores them."""
        return {str(i): label for i, label in enumerate(self.labels)}

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
            scores = _labels_task_type(unseen)[0] == "regression"
            raise DataError(
                f"{source} has labels the training data does not: {', '.join(map(repr, _sorted_labels(unseen)))} "
                f"(known: {known}); correct them, or add training examples of them"
                + ("; if the labels are scores, pass --task-type regression" if scores else "")
            )
        return [self.label2id[label] for label in labels]


# ---------------------------------------------------------------------------------------------------
# Built-in tasks


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
    for _, line in _utf8_lines(path):
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


# ---------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(slots=True)
class Features:
    """One tokenized example. T = its length in tokens, [CLS] and [SEP]s included.

    input_ids:      (T,) int32, [CLS] A [SEP] or [CLS] A [SEP] B [SEP]
    token_type_ids: (T,) int8, 0 over [CLS] A [SEP], 1 over B [SEP]
    label:          int class id (classification); float (regression); (num_labels,) float32 multi-hot
                    (multilabel); (T,) int64 tag ids on each word's first piece, IGNORE_INDEX elsewhere
                    (token classification); None when unlabelled
    word_ids:       token classification only: (T,) int32, the word's index on its first piece, -1 on
                    other pieces and special tokens; maps predictions back to words, labelled or not
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    label: int | float | np.ndarray | None
    word_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_examples(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int,
    task_type: str,
    label_vocab: LabelVocab | None = None,
    source: str = "the data",
) -> list[Features]:
    """Tokenize all examples at once (Rust batch encoding), truncated to max_length tokens.

    Pairs are truncated longest-first. Token classification encodes the words as given
    (is_pretokenized) and labels each word's first piece; words past max_length are dropped, with a
    warning. label_vocab is required for labelled class data; source names the data in label errors.
    """
    _check_task_type(task_type)
    if not examples:
        raise DataError(f"{source} has no examples")
    token_task = task_type == "token-classification"
    pairs = examples[0].text_pair is not None
    labelled = examples[0].label is not None
    if any((ex.text_pair is not None) != pairs for ex in examples):
        raise DataError(f"{source} mixes examples with and without a text pair")
    if any((ex.label is not None) != labelled for ex in examples):
        unlabelled = next(i for i, ex in enumerate(examples) if ex.label is None)
        raise DataError(
            f"{source} mixes labelled and unlabelled examples: example {unlabelled + 1} has no label; "
            f"fill in every label, or leave them all out to only get predictions"
        )
    if labelled and task_type != "regression" and label_vocab is None:
        raise ValueError(f"{task_type} needs a label_vocab to turn labels into ids")

    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer keeps its settings
    tok.no_padding()
    specials = tok.num_special_tokens_to_add(pairs)
    if max_length <= specials + pairs:
        raise ValueError(f"max_length={max_length} leaves no room for text after {specials} special tokens")
    tok.enable_truncation(max_length, strategy="longest_first")
    if token_task:
        encodings = tok.encode_batch([ex.text for ex in examples], is_pretokenized=True)
    elif pairs:
        encodings = tok.encode_batch([(ex.text, ex.text_pair) for ex in examples])
    else:
        encodings = tok.encode_batch([ex.text for ex in examples])

    if labelled and task_type == "regression":
        labels = [float(ex.label) for ex in examples]
    elif labelled:
        lists = _label_lists(examples, task_type)
        flat = iter(label_vocab.encode(chain.from_iterable(lists), source=source))
        ids = [[next(flat) for _ in labels] for labels in lists]
        labels = [i[0] for i in ids] if task_type == "classification" else ids
    else:
        labels = [None] * len(examples)

    features = []
    truncated = lost_words = 0
    for ex, enc, label in zip(examples, encodings, labels, strict=True):
        truncated += bool(enc.overflowing)
        word_ids = None
        if token_task:
            word_ids, label, kept = _first_pieces(enc.word_ids, label)
            if enc.overflowing:
                lost_words += len(ex.text) - kept
        elif task_type == "multilabel" and label is not None:
            multi_hot = np.zeros(len(label_vocab), dtype=np.float32)
            multi_hot[label] = 1.0
            label = multi_hot
        features.append(
            Features(np.array(enc.ids, dtype=np.int32), np.array(enc.type_ids, dtype=np.int8), label, word_ids)
        )
    if token_task and truncated:
        message = (
            "%d of %d sentences in %s are longer than max_length=%d tokens: their last %d words get no tag "
            "(not trained on, not evaluated); raise --max-length to keep them"
        )
        logger.warning(message, truncated, len(examples), source, max_length, lost_words)
    elif truncated:
        logger.info("%d of %d examples in %s were truncated to %d tokens", truncated, len(examples), source, max_length)
    unk_id = tok.token_to_id("[UNK]")
    special_ids = {tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    counts = np.bincount(np.concatenate([f.input_ids for f in features]), minlength=tok.get_vocab_size())
    words = counts.sum() - sum(counts[i] for i in special_ids if i is not None and i < len(counts))
    if unk_id is not None and words and counts[unk_id] > 0.5 * words:  # a tokenizer whose vocabulary failed to load
        logger.warning("minibert: %.0f%% of the word pieces of %s are [UNK]: the tokenizer does not fit this text "
                       "(a vocabulary of another language or script, or a broken vocab.txt); the model sees almost "
                       "nothing of it", 100 * counts[unk_id] / words, source)
    return features


def _first_pieces(word_ids: list[int | None], tag_ids: list[int] | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-token word index on each word's first piece (-1 elsewhere), the tag ids aligned to it, and
    the number of words with a first piece (the others were cut off by truncation)."""
    first = np.full(len(word_ids), -1, dtype=np.int32)
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            first[position] = word
        previous = word
    is_first = first >= 0
    labels = None
    if tag_ids is not None:
        labels = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
        labels[is_first] = np.asarray(tag_ids, dtype=np.int64)[first[is_first]]
    return first, labels, int(is_first.sum())


# ---------------------------------------------------------------------------------------------------
# Batching


def train_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    skip: int = 0,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """One epoch of this rank's training batches (lists of example indices), grouped by length.

    Shuffle all examples; sort them by length within chunks of `chunk_batches` steps, so a batch holds
    examples of similar length and wastes little padding; cut them into steps of batch_size x world_size
    examples; shuffle the steps; give each rank its share of every step. The result depends only on
    (seed, epoch): the ranks agree without talking, and skip=N drops the first N batches of the same
    epoch to resume exactly. Every example appears exactly once per epoch across all ranks, and every
    rank gets the same number of batches; a last step too small to give each rank one example joins the
    step before it, whose batches then hold up to batch_size + 1 examples.
    """
    lengths = np.asarray(lengths)
    n, step_size = len(lengths), batch_size * world_size
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if n < world_size:
        raise DataError(f"{n} training examples cannot be shared among {world_size} processes")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    chunk = chunk_batches * step_size

    def by_length(idx: np.ndarray) -> np.ndarray:  # longest first
        return idx[np.argsort(-lengths[idx], kind="stable")]

    order = np.concatenate([by_length(c) for c in np.split(order, range(chunk, n, chunk))])
    steps = [order[start : start + step_size] for start in range(0, n, step_size)]
    if len(steps) > 1 and len(steps[-1]) < world_size:
        steps[-2:] = [by_length(np.concatenate(steps[-2:]))]
    steps = [steps[i] for i in rng.permutation(len(steps))]
    return [np.array_split(step, world_size)[rank].tolist() for step in steps[skip:]]


def eval_batches(lengths: Sequence[int], batch_size: int, *, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """Evaluation batches: no shuffling, sorted by length (longest first, so memory runs out at once if
    it will) to waste little padding; in DDP, rank r takes every world_size-th batch. Put the outputs
    back in example order with in_original_order."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    return batches[rank::world_size]


def in_original_order(batches: Sequence[Sequence[int]], outputs: Iterable[Sequence]) -> list:
    """Per-example outputs of `batches` (one sequence per batch) in ascending example index: the
    original order when the batches cover every example."""
    indices = [i for batch in batches for i in batch]
    flat = [output for batch_outputs in outputs for output in batch_outputs]
    if len(flat) != len(indices):
        raise ValueError(f"{len(flat)} outputs for {len(indices)} examples")
    return [flat[k] for k in np.argsort(indices, kind="stable")]


def collate(features: Sequence[Features], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example. Returns (B = batch, T = longest length):

    input_ids (B, T) long, pad_token_id after the end; attention_mask (B, T) long, 1 on real tokens;
    token_type_ids (B, T) long; labels, when the features have them: (B,) long class ids, (B,) float
    regression targets, (B, num_labels) float multi-hot, or (B, T) long tag ids padded with IGNORE_INDEX.
    """
    batch_size, width = len(features), max(len(f) for f in features)
    input_ids = np.full((batch_size, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((batch_size, width), dtype=np.int64)
    token_type_ids = np.zeros((batch_size, width), dtype=np.int64)
    for row, f in enumerate(features):
        input_ids[row, : len(f)] = f.input_ids
        attention_mask[row, : len(f)] = 1
        token_type_ids[row, : len(f)] = f.token_type_ids
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "token_type_ids": torch.from_numpy(token_type_ids),
    }
    labels = [f.label for f in features]
    if all(label is None for label in labels):
        return batch
    if any(label is None for label in labels):
        raise ValueError("a batch mixes labelled and unlabelled features")
    first = labels[0]
    if isinstance(first, np.ndarray) and first.dtype.kind == "f":  # multilabel multi-hot
        batch["labels"] = torch.from_numpy(np.stack(labels))
    elif isinstance(first, np.ndarray):  # token tags
        tags = np.full((batch_size, width), IGNORE_INDEX, dtype=np.int64)
        for row, label in enumerate(labels):
            tags[row, : len(label)] = label
        batch["labels"] = torch.from_numpy(tags)
    elif isinstance(first, float):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    return batch
