"""Tests of minibert.wordpiece: word counting against tokenizers' own BERT normaliser and pre-tokenizer, the
trainer against merges worked out by hand and against a naive trainer written straight from the recipe."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from tokenizers import normalizers, pre_tokenizers

from minibert.wordpiece import count_words, train_wordpiece_vocab

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
