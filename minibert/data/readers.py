"""Reading labelled examples from files: tables (CSV, TSV), JSON Lines and CoNLL, and guessing the task type.

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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path

from tokenizers import Tokenizer

from minibert import spans
from minibert.data.examples import DEFAULT_TASK, DataError, Example, check_task_type
from minibert.data.labels import class_label, labels_task_type, parse_label
from minibert.text_files import csv_rows, json_values, utf8_lines

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CONLL_SUFFIXES = (".conll", ".iob", ".bio")  # surely CoNLL (token classification reads other suffixes as CoNLL too)


# ---------------------------------------------------------------------------------------------------
# Lines, rows and records


def _table_rows(path: Path, column_names: Sequence[str] | None) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and the (line number, cells) rows of a .csv or .tsv file; blank and whitespace-only
    lines are skipped, but not a quoted empty text ("" in a one-column CSV): that is an example."""
    lines = utf8_lines(path, error=DataError)
    if path.suffix.lower() == ".csv":  # csv_rows reads a blank line as [] and "" as ['']
        rows = csv_rows(path, (line for _, line in lines), error=DataError)
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


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    """("line N" or "record N", object) of a JSON Lines file, or of a .json file holding one array."""
    for where, record in json_values(path, error=DataError):
        if not isinstance(record, dict):
            raise DataError(f"{path} {where}: expected a JSON object, found {type(record).__name__}")
        yield where, record


def _conll_sentences(path: Path, require_labels: bool) -> Iterator[tuple[str, Example]]:
    """("line N", sentence) of a CoNLL file: `word ... tag` lines, blank lines between sentences."""
    sentence: list[tuple[int, str, str | None]] = []
    # The blank line added after the end ends the last sentence.
    for lineno, line in chain(utf8_lines(path, error=DataError), [(0, "")]):
        line = line.rstrip()
        cells = line.split("\t") if "\t" in line else line.split()
        if not line or cells[0] == "-DOCSTART-":
            if sentence:
                linenos, words, tags = zip(*sentence)
                yield f"line {linenos[0]}", Example(list(words), None, None if tags[0] is None else list(tags))
                sentence = []
            continue
        if not cells[0].strip() or (len(cells) < 2 and require_labels):  # (the line is stripped: its last cell is not empty)
            raise DataError(
                f"{path} line {lineno}: expected a word and its tag separated by a space or tab, found "
                f"{line!r}; put one word per line, its tag in the last column, a blank line between sentences"
            )
        tag = cells[-1].strip() if len(cells) > 1 else None
        if sentence and (tag is None) != (sentence[0][2] is None):
            raise DataError(f"{path} line {lineno}: some words of this sentence have a tag and some do not")
        sentence.append((lineno, cells[0].strip(), tag))


# ---------------------------------------------------------------------------------------------------
# Examples


def _flag(param: str) -> str:
    """The command-line flag that sets a load_examples parameter (text_column -> --text-column)."""
    return "--" + param.replace("_", "-")


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
    check_task_type(task_type)
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
                label = parse_label(cell, task_type, where)
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
        label = None if label is None else parse_label(label, task_type, where)
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
    return Example(words, None, [class_label(tag, where) for tag in tags])


# ---------------------------------------------------------------------------------------------------
# The task type of a file


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
            return DEFAULT_TASK
        if suffix in CONLL_SUFFIXES:
            return "token-classification", f"a {suffix} file"
        if suffix in JSON_SUFFIXES:
            return _json_task_type(path, text_column, label_column)
        if suffix in (".csv", ".tsv"):
            header, rows = _table_rows(path, None)
            if label_column not in header:
                return DEFAULT_TASK
            at = header.index(label_column)
            return labels_task_type(cells[at] for _, cells in rows if len(cells) > at and cells[at].strip())
    except (DataError, OSError):
        pass
    return DEFAULT_TASK


def _json_task_type(path: Path, text_column: str | None, label_column: str) -> tuple[str, str]:
    records = (record for _, record in _json_records(path))
    first = next(records, None)
    if first is None:
        return DEFAULT_TASK
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
    return labels_task_type(labels)
