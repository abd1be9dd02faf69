"""Training a WordPiece vocabulary that depends only on the text and the settings.

    counts = count_words(paragraphs, lowercase=True)      # {"the": 180211, "runner": 31, ...}
    tokens = train_wordpiece_vocab(counts, 8192, ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    # tokens[i] is the piece with id i: the special tokens, then "a", "b", ..., "##a", ..., "th", "##ing", ...

Why minibert has its own trainer: ``tokenizers``' WordPieceTrainer gives a different vocabulary in every
process (huggingface/tokenizers#1794; the fix, PR #2066, is in no release up to 0.23.3, and the 1.0 release
candidates on PyPI have no training API). It numbers the ``##`` pieces in the iteration order of a randomly
seeded Rust hash map and breaks ties between equally frequent merges by those numbers; it cuts the alphabet at
``limit_alphabet`` from a list sorted unstably by count; and even with the numbers fixed, its merge queue can
hold two entries for one pair with the same count, popped in an order that hash-map draining sets.
SentencePiece's BPE is deterministic, but it is another dependency, spends merges joining each word's first
character to its ``▁`` marker (which WordPiece has for free) and picks each merge from a shortlist refreshed
every 100 merges rather than from all pairs: a different recipe from the one minibert's models were trained
with. So this is the Hugging Face recipe itself, BPE on words with ``##`` for the pieces that continue a word,
written out with every choice explicit:

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

Limitations: the merges run in Python, on the distinct words (63,000 in the built-in corpus of 3 M words:
less CPU time than tokenizers' Rust trainer, which uses every core; benchmarks/tokenizer_quality.py), in one
process; a chunk of text that is not plain ASCII (most of a Chinese or Russian text) is split by tokenizers'
Python bindings, several times slower per word.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, models

from minibert.tokenizer import bert_text_splitting

# Part of the tokenizer cache key: a tokenizer trained by another version of the recipe is not reused.
TRAINER_VERSION = "minibert-wordpiece-1"

CONTINUATION_PREFIX = "##"


# ----------------------------------------------------------------------------------------------
# 1. Words.

# Counting through tokenizers' Python bindings costs microseconds a word (each call builds a NormalizedString
# that tracks offsets): for the built-in corpus, more than the whole rest of training. So the text is first
# cut at ASCII whitespace into chunks, counted with Counter (in C), and each distinct chunk is split once. For
# printable ASCII, BERT's normaliser only lower-cases, and its pre-tokenizer makes each punctuation character a
# word of its own (every printable ASCII character that is not a letter or digit counts as punctuation): one
# regex. A chunk holding any other character (accents, CJK, curly quotes, control characters) goes through
# tokenizers itself. Neither step acts across ASCII whitespace, so chunk by chunk gives exactly the words of
# the whole text (tested against tokenizers on mixed text).
_NOT_PLAIN_ASCII = re.compile(r"[^ -~\t\n\r]")
_ASCII_WHITESPACE = re.compile(r"[ \t\n\r]+")
_PLAIN_WORDS = re.compile(r"[0-9A-Za-z]+|[!-/:-@\[-`{-~]")


def count_words(texts: Iterable[str], *, lowercase: bool) -> Counter[str]:
    """How often each word occurs, the words being what BERT's normaliser (uncased when ``lowercase``) and
    pre-tokenizer make of each text: those the trained tokenizer splits text with (tokenizer.bert_text_splitting)."""
    chunks: Counter[str] = Counter()
    for text in texts:
        # str.split() cuts at more than ASCII whitespace (\x1c, \x85, ...), which BERT's normaliser deletes.
        chunks.update(_ASCII_WHITESPACE.split(text) if _NOT_PLAIN_ASCII.search(text) else text.split())

    counts: Counter[str] = Counter()
    splitter = bert_text_splitting(Tokenizer(models.WordPiece()), lowercase=lowercase)
    normalizer, pre_tokenizer = splitter.normalizer, splitter.pre_tokenizer
    for chunk, n in chunks.items():
        if chunk.isascii() and chunk.isprintable():
            if lowercase:
                chunk = chunk.lower()
            for word in [chunk] if chunk.isalnum() else _PLAIN_WORDS.findall(chunk):
                counts[word] += n
        else:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(chunk)):
                counts[word] += n
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
    continuation_id = {c: token_id[CONTINUATION_PREFIX + c] for c in continuations}.__getitem__
    symbols = [[token_id[w[0]], *map(continuation_id, w[1:])] for w in words]
    counts = [word_counts[w] for w in words]
    with _cyclic_garbage_collection_paused():
        _merge_pairs(tokens, token_id, symbols, counts, vocab_size, min_frequency)
    return tokens


@contextlib.contextmanager
def _cyclic_garbage_collection_paused():
    """The merges allocate millions of small tuples and lists and make no reference cycles; Python's cyclic
    collector would walk all of them again and again (a third of the time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _merge_pairs(tokens: list[str], token_id: dict[str, int], symbols: list[list[int]], counts: list[int],
                 vocab_size: int, min_frequency: int) -> None:
    """Step 4: merge in ``symbols`` (each word's symbol ids) and append the new pieces to ``tokens``."""
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


def _merge_in_word(word: list[int], a: int, b: int, new: int, count: int, pair_count, words_with, w: int,
                   gained: set) -> list[int]:
    """``word`` with every ``a b`` (left to right, so ``a a a`` with a == b gives ``new a``) replaced by
    ``new``; the counts of the neighbouring pairs move from ``(x, a)``/``(b, y)`` to ``(x, new)``/``(new, y)``."""
    out, start, i, last = [], 0, 0, len(word) - 1
    while True:
        try:
            i = word.index(a, i, last)  # an `a` that has a right neighbour
        except ValueError:
            break
        if word[i + 1] != b:
            i += 1
            continue
        out += word[start:i]
        if out:  # the left neighbour as it stands now: after `a b a b`'s first merge it is `new`
            left = out[-1]
            pair_count[left, a] -= count
            pair_count[left, new] += count
            words_with[left, new].add(w)
            gained.add((left, new))
        if i + 2 <= last:
            right = word[i + 2]
            pair_count[b, right] -= count
            pair_count[new, right] += count
            words_with[new, right].add(w)
            gained.add((new, right))
        out.append(new)
        start = i = i + 2
    if not start:  # the pair was broken up by an earlier merge
        return word
    out += word[start:]
    return out
