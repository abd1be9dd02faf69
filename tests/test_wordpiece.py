"""Tests of minibert.wordpiece: word counting against tokenizers' own BERT normaliser and pre-tokenizer, the
trainer against merges worked out by hand and against a naive trainer written straight from the recipe; and of
the tokenizer tokenizer_training makes with it: byte-identical files from processes with other hash seeds and
thread counts, encoded by transformers exactly as by minibert, retrained when the trainer's version changes."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import normalizers, pre_tokenizers

from minibert import wordpiece
from minibert.tokenizer import load_tokenizer, save_tokenizer
from minibert.tokenizer_training import load_or_train_tokenizer, train_wordpiece_tokenizer
from minibert.wordpiece import count_words, train_wordpiece_vocab

ROOT = Path(__file__).parents[1]
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Everything the shortcut for plain ASCII must hand on to tokenizers, next to text it handles itself.
MIXED_TEXTS = [
    "The RUNNER's 3.5-mile run (at 6:45am) cost $12, e.g. [sic] {x} ~50% of #2 @home; ok? yes! a|b^c_d`e\\f",
    "Café naïve déjà-vu, “curly quotes” and ‘single’ ones — an em dash… 10\u00a0000 (a non-breaking space)",
    "再见 hello世界, 東京タワー and 한국어 text; ＦＵＬＬＷＩＤＴＨ ５",
    "tab\there\nnew line\r\nCR; control\x0bchars\x0cand\x7fDEL, a NUL\x00here, bell\x07, \x1cfile sep",
    "ΟΔΟΣ and οδος, İstanbul, STRASSE, ǅemal, e\u0301 \u0301x (combining marks), zero\u200bwidth, \ufffdreplaced",
    "emoji 👍🏽 and ∑ math ≤ symbols ½ ² ™ © ® and ʼapostropheʼ",
    "",
    "   leading and trailing   ",
]


@pytest.mark.parametrize("lowercase", [True, False])
def test_count_words_gives_the_words_of_berts_normaliser_and_pre_tokenizer(lowercase):
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                            lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    expected = Counter()
    for text in MIXED_TEXTS * 3:
        expected.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    counts = count_words(MIXED_TEXTS * 3, lowercase=lowercase)
    assert counts == expected
    assert ("runner" if lowercase else "RUNNER") in counts and "再" in counts and "$" in counts


def test_merges_worked_out_by_hand():
    # Pairs: (h,##u) 15, (##u,##g) 20, (p,##u) 17, (##u,##n) 16, (b,##u) 4, (##g,##s) 5.
    # 1. ##u ##g (20) -> ##ug.  Then (##u,##n) 16, (h,##ug) 15, (p,##u) 12, (p,##ug) 5, (##ug,##s) 5.
    # 2. ##u ##n (16) -> ##un.  3. h ##ug (15) -> hug.  4. p ##un (12) -> pun.
    # 5. (hug,##s) and (p,##ug) both 5: ("hug", "##s") sorts first -> hugs.  6. pug (5).  7. bun (4).
    counts = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    alphabet = ["b", "g", "h", "n", "p", "s", "u"]
    continuations = ["##g", "##n", "##s", "##u"]
    merges = ["##ug", "##un", "hug", "pun", "hugs", "pug", "bun"]
    assert train_wordpiece_vocab(counts, 100, SPECIALS) == [*SPECIALS, *alphabet, *continuations, *merges]
    assert train_wordpiece_vocab(counts, 5 + 7 + 4 + 3, SPECIALS)[-3:] == ["##ug", "##un", "hug"]  # stops at the size
    # min_frequency: bun's pair occurs 4 times, the others 5 or more.
    assert train_wordpiece_vocab(counts, 100, SPECIALS, min_frequency=5)[-1] == "pug"


def test_alphabet_keeps_the_most_frequent_characters_ties_by_code_point():
    counts = {"a": 5, "c": 3, "b": 3, "d": 3, "xy": 1}
    vocab = train_wordpiece_vocab(counts, 100, SPECIALS, limit_alphabet=3)
    assert vocab == [*SPECIALS, "a", "b", "c"]  # c and d tie at 3: c sorts first; "xy" has no kept character


def naive_wordpiece_vocab(word_counts, vocab_size, specials, limit_alphabet, min_frequency):
    """The recipe of minibert.wordpiece's docstring, recounting every pair after every merge."""
    chars = Counter()
    for word, count in word_counts.items():
        for char in word:
            chars[char] += count
    alphabet = sorted(chars, key=lambda c: (-chars[c], c))[:limit_alphabet]
    words = {w: c for w, c in word_counts.items() if set(w) <= set(alphabet)}
    pieces = {w: [w[0], *("##" + c for c in w[1:])] for w in words}
    vocab = [*specials, *sorted(alphabet), *sorted({"##" + c for w in words for c in w[1:]})]
    while len(vocab) < vocab_size:
        pairs = Counter()
        for w, seq in pieces.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        (left, right), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_frequency:
            break
        merged = left + right[2:]
        if merged not in vocab:
            vocab.append(merged)
        for w, seq in pieces.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (left, right):
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            pieces[w] = out
    return vocab


@pytest.mark.parametrize("seed", range(4))
def test_trainer_equals_a_naive_trainer_on_words_full_of_ties(seed):
    rng = random.Random(seed)
    # Few letters, repeats (aaaa, abab) and small counts: many pairs tie, and merges overlap.
    counts = {"".join(rng.choice("aabcd") for _ in range(rng.randint(1, 9))): rng.randint(1, 4) for _ in range(150)}
    counts["aaaaaaa"], counts["abababab"] = 3, 2
    for limit_alphabet, min_frequency in [(1000, 2), (3, 1)]:
        expected = naive_wordpiece_vocab(counts, 120, SPECIALS, limit_alphabet, min_frequency)
        assert train_wordpiece_vocab(counts, 120, SPECIALS, limit_alphabet=limit_alphabet,
                                     min_frequency=min_frequency) == expected


def test_bad_sizes_and_specials_are_refused():
    with pytest.raises(ValueError, match="use a vocab size of at least 10"):
        train_wordpiece_vocab({"abc": 3}, 9, SPECIALS)  # 5 specials, a b c, ##b ##c
    with pytest.raises(ValueError, match="repeat"):
        train_wordpiece_vocab({"abc": 3}, 100, ("[PAD]", "[PAD]"))


# ----------------------------------------------------------------------------------------------
# The trained tokenizer: the same files in every process, read alike by transformers.

# Every 3-letter word over 7 letters, each twice: nearly every pair of pieces is as frequent as many others.
TIED_TEXT = " ".join("".join(w) for w in itertools.product("abcdefg", repeat=3))
# 1,500 different Chinese characters, each twice (more than the 1,000 the alphabet keeps, all equally
# frequent: which are kept is a tie), and kana words, whose characters BERT does not split apart.
CJK_TEXT = "".join(chr(0x4E00 + 7 * i) for i in range(1500)) + " " + " ".join(
    "".join(w) for w in itertools.product("かきくけこさしすせそ", repeat=2))

TRAIN_AND_SAVE = """
import sys
from pathlib import Path
from minibert.tokenizer import save_tokenizer
from minibert.tokenizer_training import train_wordpiece_tokenizer
sys.path.insert(0, sys.argv[2])  # the tests folder
from test_wordpiece import CJK_TEXT, TIED_TEXT
for name, texts in {"tied": [TIED_TEXT] * 2 + ["Déjà vu, CAFÉ, naïve."] * 2, "cjk": [CJK_TEXT] * 2}.items():
    out = Path(sys.argv[1]) / name
    out.mkdir(parents=True)
    save_tokenizer(train_wordpiece_tokenizer(texts, 1600), out)
"""


@pytest.mark.slow  # two fresh processes that import torch: a few seconds on a quiet machine
def test_training_gives_byte_identical_files_whatever_the_hash_seed_and_threads(tmp_path):
    outputs, processes = [], []
    for hash_seed, threads in [("1", "1"), ("4242", "2")]:  # at once: most of each one's time is importing torch
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RAYON_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "TOKENIZERS_PARALLELISM": "true" if threads != "1" else "false", "PYTHONPATH": str(ROOT)}
        outputs.append(tmp_path / f"seed{hash_seed}")
        processes.append(subprocess.Popen([sys.executable, "-c", TRAIN_AND_SAVE, str(outputs[-1]),
                                           str(ROOT / "tests")], env=env, cwd=tmp_path))
    assert [process.wait(timeout=300) for process in processes] == [0, 0]
    for corpus in ("tied", "cjk"):
        for name in ("vocab.txt", "tokenizer.json"):
            first, second = (out / corpus / name for out in outputs)
            assert first.read_bytes() == second.read_bytes(), f"{corpus}/{name} differs between the processes"
    cjk_vocab = (outputs[0] / "cjk" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    # The 10 kana (40 times each) and, of the 1,500 Chinese characters seen twice each, the first 990 by code point.
    assert cjk_vocab[5:1005] == sorted("かきくけこさしすせそ") + [chr(0x4E00 + 7 * i) for i in range(990)]
    tied_vocab = (outputs[0] / "tied" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tied_vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "deja" in tied_vocab


def test_transformers_encodes_the_saved_tokenizer_as_minibert_does(tmp_path):
    from transformers import AutoTokenizer, BertTokenizer

    texts = ["The runners ran; a café in Zürich — naïve déjà vu!", "东京 再见, 北京大学 and かきく words",
             "ΟΔΟΣ Straße İstanbul ½ ² ﬁne", TIED_TEXT[:400], CJK_TEXT[:300]]
    trained = train_wordpiece_tokenizer(texts * 3, 700)
    save_tokenizer(trained, tmp_path)
    probes = [("Runners in Zürich: naïve, DÉJÀ VU! 再见北京 かきくけ xyzzy ½", None),
              ("A café?", "東京 ΟΔΟΣ straße — abc dfg")]
    for reference in (AutoTokenizer.from_pretrained(tmp_path), BertTokenizer.from_pretrained(tmp_path)):
        for minibert_tokenizer in (trained, load_tokenizer(tmp_path)):
            for a, b in probes:
                encoding = minibert_tokenizer.encode(a, b) if b else minibert_tokenizer.encode(a)
                expected = reference(a, b) if b else reference(a)
                assert expected["input_ids"] == encoding.ids, (type(reference).__name__, a)
                assert expected["token_type_ids"] == encoding.type_ids
    pieces = trained.encode(probes[0][0]).tokens
    assert "再" in pieces and "[UNK]" in pieces  # CJK split into characters; "½" was never seen


def test_a_tokenizer_of_another_trainer_version_is_not_reused_from_the_cache(tmp_path, monkeypatch):
    documents = [["Runners ran and readers read.", "再见, café."]] * 5
    first = load_or_train_tokenizer(documents, 60, tmp_path, corpus_id="tiny")
    monkeypatch.setattr(wordpiece, "TRAINER_VERSION", "a-trainer-before-this-one")
    assert load_or_train_tokenizer(documents, 60, tmp_path, corpus_id="tiny").to_str() == first.to_str()
    assert len(list(tmp_path.glob("wordpiece-*.json"))) == 2  # trained again, under its own key
