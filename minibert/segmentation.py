"""Chinese word segmentation for whole-word masking (Cui et al. 2019, "Pre-Training with Whole Word
Masking for Chinese BERT"; ymcui/Chinese-BERT-wwm).

BERT's tokenizer makes every CJK character a word of its own, so whole-word masking on Chinese text
masks single characters: 北京 can be half masked, and the model fills in 京 from 北 without reading
the sentence. Chinese-BERT-wwm segments the text into words and masks a word's characters together,
while the tokens stay single characters. Here the segmenter is jieba (a well-kept, widely used one;
an optional dependency). It runs once, when the pretraining shards are built, over each row's runs of
CJK characters:

    continues = jieba_continuations(tokens)   # tokens: a row's token strings ("北", "京", "##ing", ...)
    # continues[i]: token i is a CJK character inside a jieba word that began before it, so whole-word
    # masking keeps it with the token before it, as it keeps a "##" piece with its word

A run ends at any token that is not a single CJK character (a Latin word, a digit, punctuation,
[UNK], [SEP]), so segmentation never joins characters across them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import numpy as np

SEGMENTERS = ("jieba", "none")


def is_cjk_character(token: str) -> bool:
    """Whether a token is one CJK ideograph: the ranges BERT's tokenizer splits into single characters
    (BasicTokenizer._is_chinese_char)."""
    if len(token) != 1:
        return False
    cp = ord(token)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


@cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise ImportError("whole-word masking of Chinese text segments words with jieba: `pip install jieba`, "
                          "or pass --segmenter none to mask single characters") from None
    jieba.setLogLevel(logging.WARNING)  # it announces loading its dictionary on every first use
    return jieba


def segmenter_version(segmenter: str) -> str:
    """What the shard cache key records of the segmenter: another jieba may segment differently. Without
    jieba installed this is no error yet: a corpus without Chinese text never needs it."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; choose one of {', '.join(SEGMENTERS)}")
    if segmenter == "none":
        return "none"
    try:
        return f"jieba-{_jieba().__version__}"
    except ImportError:
        return "jieba-not-installed"


def jieba_words(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of jieba's words in `text` (its default, accurate mode)."""
    return [(start, end) for _, start, end in _jieba().tokenize(text)]


def jieba_continuations(tokens: Sequence[str]) -> np.ndarray:
    """(T,) bool: True where a token is a CJK character that continues a jieba word (see the module
    docstring). All False when the tokens hold no two consecutive CJK characters."""
    continues = np.zeros(len(tokens), dtype=bool)
    cjk = [is_cjk_character(t) for t in tokens]
    i = 0
    while i < len(tokens):
        if not cjk[i]:
            i += 1
            continue
        j = i
        while j < len(tokens) and cjk[j]:
            j += 1
        if j - i >= 2:  # a run of CJK characters tokens[i:j], one character each
            for start, end in jieba_words("".join(tokens[i:j])):
                continues[i + start + 1 : i + end] = True
        i = j
    return continues
