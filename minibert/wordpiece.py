"""Training a WordPiece vocabulary that depends only on the text and the settings.

    counts = count_words(paragraphs, lowercase=True)      # {"the": 180211, "runner": 31, ...}
    tokens = train_wordpiece_vocab(counts, 8192, ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    # tokens[i] is the piece with id i: the special tokens, then "a", "b", ..., "##a", ..., "th", "##ing", ...

Why minibert has its own trainer: ``tokenizers``' WordPieceTrainer gives a different vocabulary in every
process (huggingface/tokenizers#1794; the fix, PR #2066, is in no release up to 0.23.3, and the 1.0 release
candidates on PyPI have no training API). Its ``##`` pieces get ids in the iteration order of a randomly seeded Rust hash map, ties
between equally frequent merges go to the lower ids, and the characters kept under ``limit_alphabet`` are
cut from a list sorted unstably by count. Even with the ids fixed, its merge queue can hold two entries for
one pair with the same count, popped in an order set by hash-map draining. SentencePiece's BPE is
deterministic, but it is another dependency, treats a word's first character as a merge with its ``▁``
marker (which WordPiece gets for free) and picks merges from a periodically refreshed shortlist rather than
from all pairs; converting its pieces would give a different recipe from the one minibert's models were
trained with. So this is the Hugging Face recipe itself, BPE on words with ``##`` for pieces that continue
a word, written out with every choice explicit:

1. Words. BERT's normaliser and pre-tokenizer (the ones the trained tokenizer encodes with) split the text
   into words, which are counted.
2. Alphabet. The ``limit_alphabet`` most frequent characters; equally frequent ones by code point. A word
   with any other character is left out: WordPiece can only encode it as [UNK].
3. Symbols. A word starts as its first character, then ``##`` + each following character.
4. Merges. Join the adjacent pair that occurs most often, counting each word as often as it occurs; among
   equally frequent pairs, the one whose (left, right) strings sort first. The joined piece keeps the left
   one's prefix: ``t`` + ``##h`` -> ``th``, ``##i`` + ``##ng`` -> ``##ing``. Repeat until the vocabulary
   has ``vocab_size`` pieces or no pair occurs ``min_frequency`` times.
5. Vocabulary, in id order: the special tokens, the alphabet by code point, the ``##`` characters by code
   point, then each new piece in the order it was made.

The tokenizer encodes with WordPiece's greedy longest match, as BERT does, not by replaying the merges.
Nothing here depends on hash seeds, thread counts or dictionary order: the result is a function of the
word counts, and the counts of the text (tested across processes with different PYTHONHASHSEED and
thread settings). Bump TRAINER_VERSION with any change that can change a vocabulary, so that cached
tokenizers of the old trainer are not reused.

Limitations: the merges run in Python on the distinct words, about 5 s for the built-in corpus's 63,000;
counting a text that is mostly not ASCII (Chinese, Russian) goes through ``tokenizers``' Python bindings
word by word, a few times slower than for English.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from tokenizers import normalizers, pre_tokenizers

# Part of the tokenizer cache key: a tokenizer trained by another version of the recipe is not reused.
TRAINER_VERSION = "minibert-wordpiece-1"

CONTINUATION_PREFIX = "##"


# ----------------------------------------------------------------------------------------------
# 1. Words.

# Counting through tokenizers' Python bindings costs about 10 µs a word (each call builds a NormalizedString
# that tracks offsets), more than the whole rest of training. For printable ASCII, BERT's normaliser only
# lower-cases, and its pre-tokenizer splits on whitespace and makes each punctuation character a word of its
# own (every printable ASCII character that is not a letter or digit counts as punctuation): one regex in C.
# Any whitespace-delimited chunk holding another character (accents, CJK, curly quotes, control characters)
# goes through tokenizers itself. Both steps act character by character, never across ASCII whitespace, so
# chunk by chunk gives exactly the words of the whole text (tested against tokenizers on mixed text).
_NOT_PLAIN_ASCII = re.compile(r"[^ -~\t\n\r]")
_CHUNK_NOT_PLAIN_ASCII = re.compile(r"[^ \t\n\r]*[^ -~\t\n\r][^ \t\n\r]*")
_PLAIN_WORDS = {True: re.compile(r"[0-9a-z]+|[!-/:-@\[-`{-~]"), False: re.compile(r"[0-9A-Za-z]+|[!-/:-@\[-`{-~]")}
_CHUNKS_PER_CALL = 10_000


def bert_normalizer(lowercase: bool) -> normalizers.Normalizer:
    """BERT's uncased (``lowercase``: lower-case and strip accents) or cased normaliser, CJK spaced out."""
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                      lowercase=lowercase)


def count_words(texts: Iterable[str], *, lowercase: bool) -> Counter[str]:
    """How often each word occurs, the words being what ``bert_normalizer(lowercase)`` and BERT's
    pre-tokenizer make of each text. Counts in the order words are first seen."""
    normalizer, pre_tokenizer = bert_normalizer(lowercase), pre_tokenizers.BertPreTokenizer()
    plain_words = _PLAIN_WORDS[lowercase]
    counts: Counter[str] = Counter()
    other_chunks: list[str] = []

    def count_other_chunks() -> None:
        text = normalizer.normalize_str(" ".join(other_chunks))
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
        other_chunks.clear()

    for text in texts:
        if _NOT_PLAIN_ASCII.search(text):
            other_chunks.extend(_CHUNK_NOT_PLAIN_ASCII.findall(text))
            text = _CHUNK_NOT_PLAIN_ASCII.sub(" ", text)
            if len(other_chunks) >= _CHUNKS_PER_CALL:
                count_other_chunks()
        counts.update(plain_words.findall(text.lower() if lowercase else text))
    if other_chunks:
        count_other_chunks()
    return counts


# ----------------------------------------------------------------------------------------------
# 2-5. Alphabet, symbols, merges, vocabulary.


def train_wordpiece_vocab(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    limit_alphabet: int = 1000,
    min_frequency: int = 2,
) -> list[str]:
    """The WordPiece vocabulary of the recipe above, as a list: ``tokens[i]`` is the piece with id i.

    Fewer than ``vocab_size`` pieces when the words run out of pairs seen ``min_frequency`` times.
    """
    char_counts: defaultdict[str, int] = defaultdict(int)
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    alphabet = sorted(sorted(char_counts, key=lambda c: (-char_counts[c], c))[:limit_alphabet])
    in_alphabet = set(alphabet)
    words = sorted(word for word in word_counts if in_alphabet.issuperset(word))
    continuations = sorted({char for word in words for char in word[1:]})

    tokens = [*special_tokens, *alphabet, *(CONTINUATION_PREFIX + c for c in continuations)]
    if len(tokens) > vocab_size:
        raise ValueError(
            f"a vocabulary of {vocab_size} pieces cannot hold this corpus's {len(alphabet)} characters, "
            f"{len(continuations)} continuation characters and {len(special_tokens)} special tokens: "
            f"use a vocab size of at least {len(tokens)}"
        )
    token_id = {token: i for i, token in enumerate(tokens)}
    if len(token_id) != len(tokens):
        raise ValueError(f"the special tokens {list(special_tokens)} repeat each other or a character of the corpus")
    symbols = [[token_id[w[0]], *(token_id[CONTINUATION_PREFIX + c] for c in w[1:])] for w in words]
    counts = [word_counts[w] for w in words]

    # pair_count[(a, b)]: occurrences of symbol a followed by b, each word counted as often as it occurs.
    # words_with[(a, b)]: the words that hold, or once held, the pair (a word is checked before merging).
    pair_count: defaultdict[tuple[int, int], int] = defaultdict(int)
    words_with: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, (word, count) in enumerate(zip(symbols, counts)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += count
            words_with[pair].add(w)

    # A max-heap by count, then by the pair's strings: (-count, left, right, left id, right id). An entry
    # whose count is out of date (its pair was broken up by other merges) is put back with the true count when
    # it comes to the top; a pair that gains occurrences is pushed again with its new count.
    queue = [(-count, tokens[a], tokens[b], a, b) for (a, b), count in pair_count.items()]
    heapq.heapify(queue)
    prefix_len = len(CONTINUATION_PREFIX)
    while len(tokens) < vocab_size and queue:
        negative_count, left, right, a, b = heapq.heappop(queue)
        count = pair_count.get((a, b), 0)
        if count != -negative_count:
            if count > 0:
                heapq.heappush(queue, (-count, left, right, a, b))
            continue
        if count < min_frequency:
            break
        merged = left + right[prefix_len:]
        if merged not in token_id:  # else an earlier merge made the same piece: ##ab + ##c and ##a + ##bc
            token_id[merged] = len(tokens)
            tokens.append(merged)
        new = token_id[merged]
        gained = set()
        for w in words_with.pop((a, b)):
            symbols[w] = _merge_in_word(symbols[w], a, b, new, counts[w], pair_count, words_with, w, gained)
        del pair_count[(a, b)]
        for pair in gained:
            if pair_count[pair] > 0:  # `a b a b`: (new, a) is made, then made into (new, new)
                    heapq.heappush(queue, (-pair_count[pair], tokens[pair[0]], tokens[pair[1]], *pair))
    return tokens


def _merge_in_word(word: list[int], a: int, b: int, new: int, count: int, pair_count, words_with, w: int,
                   gained: set) -> list[int]:
    """``word`` with every ``a b`` (left to right, so ``a a a`` with a == b gives ``new a``) replaced by
    ``new``; the counts of the neighbouring pairs move from ``(x, a)``/``(b, y)`` to ``(x, new)``/``(new, y)``."""
    out = []
    start = 0
    while True:
        try:
            i = word.index(a, start)
        except ValueError:
            break
        if i + 1 == len(word):
            break
        if word[i + 1] != b:
            out.extend(word[start : i + 1])
            start = i + 1
            continue
        out.extend(word[start:i])
        if out:  # the left neighbour as it stands now: after `a b a b`'s first merge it is `new`
            pair_count[(out[-1], a)] -= count
            _add_pair(out[-1], new, count, pair_count, words_with, w, gained)
        if i + 2 < len(word):
            pair_count[(b, word[i + 2])] -= count
            _add_pair(new, word[i + 2], count, pair_count, words_with, w, gained)
        out.append(new)
        start = i + 2
    out.extend(word[start:])
    return out


def _add_pair(x: int, y: int, count: int, pair_count, words_with, w: int, gained: set) -> None:
    pair_count[(x, y)] += count
    words_with[(x, y)].add(w)
    gained.add((x, y))
