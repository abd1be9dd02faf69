"""Reading text files as both data pipelines (fine-tuning data and pretraining corpora) need them.

    utf8_lines(path, error=DataError)                 (line number, line) of a UTF-8 file
    csv_rows(path, lines, error=DataError)            (line number, cells) of CSV text
    json_values(path, error=DataError)                ("line N" or "record N", value) of JSON Lines, or of
                                                      the one array a .json file holds

A file these cannot read is an `error` (the caller's class: DataError, CorpusError) whose one-line
message names the file, the place, and the fix.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

csv.field_size_limit(2**31 - 1)  # a long article runs past the csv module's 128 KiB default cell limit


def utf8_lines(path: Path, *, error: type[Exception]) -> Iterator[tuple[int, str]]:
    """Yield (line number, line with its ending) of a UTF-8 file, without the byte order mark Excel writes;
    a byte that is not UTF-8 is an error that names it and the iconv command that re-encodes the file."""
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                utf8_path = path.with_name(f"{path.stem}.utf8{path.suffix}")
                if lineno == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # the byte order marks of UTF-16
                    raise error(
                        f"{path} is UTF-16 (it starts with a UTF-16 byte order mark), not UTF-8; re-encode it: "
                        f"`iconv -f UTF-16 -t UTF-8 {path} > {utf8_path}`"
                    ) from None
                raise error(
                    f"{path} is not UTF-8: line {lineno}, byte {offset + e.start} is "
                    f"{raw[e.start : e.start + 1]!r}; re-encode it, e.g. "
                    f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > {utf8_path}` "
                    f"(naming the file's real encoding)"
                ) from None
            offset += len(raw)
            yield lineno, line.removeprefix("\ufeff") if lineno == 1 else line


def csv_rows(path: Path, lines: Iterable[str], *, error: type[Exception],
             delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each row of CSV `lines` (with their endings, so a quoted cell may span
    lines); a blank line is the row []."""
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        for cells in reader:
            yield reader.line_num, cells
    except csv.Error as e:  # with no field limit (above), what the csv module still refuses is a lone \r
        why = str(e)
        if why.startswith("new-line character seen in unquoted field"):
            why = ("a carriage return (\\r) inside a cell that is not quoted: quote the cell, or save the file with "
                   "\\n or \\r\\n line endings")
        raise error(f"{path} line {reader.line_num}: {why}") from None


def json_values(path: Path, *, error: type[Exception]) -> Iterator[tuple[str, object]]:
    """("line N", value) for JSON Lines, or ("record N", value) for a .json file holding one array
    (or one object wrapping it, {"data": [...]})."""
    path = Path(path)
    lines = utf8_lines(path, error=error)
    head = []  # up to the first non-blank line, whose first character tells an array from JSON Lines
    for numbered_line in lines:
        head.append(numbered_line)
        if numbered_line[1].strip():
            break
    lines = chain(head, lines)
    records = None
    if path.suffix.lower() == ".json" and head and head[-1][1].lstrip()[:1] in ("[", "{"):
        text = "".join(line for _, line in lines)  # with the blank lines, so JSON errors give true line numbers
        records = _json_document_records(path, text, error)
        lines = enumerate(text.split("\n"), 1)  # read as JSON Lines when it is not one document
    if records is not None:
        yield from ((f"record {n}", record) for n, record in enumerate(records, 1))
    else:
        yield from ((f"line {n}", _json_line(path, n, line, error)) for n, line in lines if line.strip())


def _json_document_records(path: Path, text: str, error: type[Exception]) -> list | None:
    """The records of a .json file holding one array, or one object whose only value is the array
    ({"data": [...]}, as some exporters write); None when the file is JSON Lines."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise error(f"{path} is not valid JSON: {e}") from None
        return None  # several objects, one per line
    if isinstance(document, list):
        return document
    values = list(document.values())
    if len(values) == 1 and isinstance(values[0], list) and all(isinstance(record, dict) for record in values[0]):
        return values[0]
    return None  # a single object: JSON Lines of one line


def _json_line(path: Path, lineno: int, line: str, error: type[Exception]):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{path} line {lineno} is not valid JSON ({e.msg}); write one object per line") from None
