"""Preprocessing a corpus once into shards: sentences to token ids, NSP sentence pairs (Google's
create_pretraining_data.py) or packed full sentences (RoBERTa), and fixed-size rows in memory-mapped
files, cached under a key of (corpus, tokenizer, settings)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from minibert.pretraining_data.corpus import CorpusError, documents_fingerprint, split_sentences
from minibert.segmentation import jieba_continuations, segmenter_version
from minibert.tokenizer import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

# Bump whenever a change to this file changes what build_pretraining_shards writes: it is part of
# the cache key, so old shards are then rebuilt instead of silently reused.
SHARD_FORMAT_VERSION = 1


def _plain_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy with truncation and padding off: a tokenizer.json may have them baked in (MiniLM's
    pads and truncates to 128), which would silently cut sentences during preprocessing."""
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Shards on disk.


# position is just an index. b_start is the position of segment B's first token
# (= length when there is no B), from which token_type_ids are rebuilt.
# word_continues marks the CJK characters that continue a word of the segmenter's (minibert.segmentation),
# written only when one is used.
SHARD_ARRAYS = {"input_ids": np.int32, "lengths": np.int32, "b_start": np.int32, "nsp_labels": np.int8,
           "word_continues": np.int8}
ROW_ARRAYS = ("input_ids", "word_continues")  # (N, seq_len); the others are (N,)


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
    wanted = {name for name in SHARD_ARRAYS if (nsp or name != "nsp_labels") and (vocabulary or name != "word_continues")}
    files = {name: open(split_dir / f"{name}.bin", "wb") for name in SHARD_ARRAYS if name in wanted}
    buffer: dict[str, list[np.ndarray]] = {name: [] for name in files}

    def flush() -> None:
        for name, parts in buffer.items():
            if parts:
                files[name].write(np.stack(parts).astype(SHARD_ARRAYS[name]).tobytes())
                parts.clear()

    def add(tokens_a: list[int], tokens_b: list[int] | None, label: int | None) -> None:  # label: NSP's, None without
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
                add(row, None, None)
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
        corpus_id = documents_fingerprint(documents)
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
        logger.info("minibert: reusing pretraining shards in %s", shard_dir)
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
        "minibert: wrote %s train / %s held-out examples to %s in %.1f s",
        meta["splits"]["train"]["num_examples"], meta["splits"]["heldout"]["num_examples"], shard_dir,
        time.perf_counter() - started,
    )
    return shard_dir
