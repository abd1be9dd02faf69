"""Tokenizing examples once into Features: token ids, segment ids and label ids, truncated to a length."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tokenizers import Tokenizer

from minibert.config import IGNORE_INDEX
from minibert.data.examples import DataError, Example, check_task_type
from minibert.data.labels import LabelVocab, label_lists
from minibert.tokenizer import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

@dataclass(slots=True)
class Features:
    """One tokenized example. T = its length in tokens, [CLS] and [SEP]s included.

    input_ids:      (T,) int32, [CLS] A [SEP] or [CLS] A [SEP] B [SEP]
    token_type_ids: (T,) int8, 0 over [CLS] A [SEP], 1 over B [SEP]
    label:          int class id (classification); float (regression); (num_labels,) float32 multi-hot
                    (multilabel); (T,) int64 tag ids on each word's first piece, IGNORE_INDEX elsewhere
                    (token classification); None when unlabelled
    word_ids:       token classification only: (T,) int32, the word's index on its first piece, -1 on
                    other pieces and special tokens; maps predictions back to words, labelled or not
    document:       the index of the example it was made from: with sliding windows, an example longer
                    than max_length gives several features in a row (its windows), all with its index
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    label: int | float | np.ndarray | None
    word_ids: np.ndarray | None = None
    document: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_examples(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    *,
    max_length: int,
    task_type: str,
    label_vocab: LabelVocab | None = None,
    source: str = "the data",
    stride: int | None = None,
) -> list[Features]:
    """Tokenize all examples at once (Rust batch encoding), truncated to max_length tokens.

    Pairs are truncated longest-first. Token classification encodes the words as given
    (is_pretokenized) and labels each word's first piece; words past max_length are dropped, with a
    warning. label_vocab is required for labelled class data; source names the data in label errors.

    With a stride (sliding windows), nothing is cut: an example longer than max_length becomes
    overlapping windows of max_length tokens, neighbours sharing `stride` tokens (the tokenizer's own
    overflow), each a Features with the example's label and index (`document`). A pair whose two texts
    are both too long gives every window of the one with every window of the other.
    """
    check_task_type(task_type)
    if not examples:
        raise DataError(f"{source} has no examples")
    token_task = task_type == "token-classification"
    pairs = examples[0].text_pair is not None
    labelled = examples[0].label is not None
    if any((ex.text_pair is not None) != pairs for ex in examples):
        raise DataError(f"{source} mixes examples with and without a text pair")
    if any((ex.label is not None) != labelled for ex in examples):
        unlabelled = next(i for i, ex in enumerate(examples) if ex.label is None)
        raise DataError(
            f"{source} mixes labelled and unlabelled examples: example {unlabelled + 1} has no label; "
            f"fill in every label, or leave them all out to only get predictions"
        )
    if labelled and task_type != "regression" and label_vocab is None:
        raise ValueError(f"{task_type} needs a label_vocab to turn labels into ids")

    specials = tokenizer.num_special_tokens_to_add(pairs)
    if max_length <= specials + pairs:
        raise ValueError(f"max_length={max_length} leaves no room for text after {specials} special tokens")
    if stride is not None:
        check_stride(stride, max_length, specials, pairs)
    tok = truncating_tokenizer(tokenizer, max_length, stride or 0)
    if token_task:
        encodings = tok.encode_batch([ex.text for ex in examples], is_pretokenized=True)
    elif pairs:
        encodings = tok.encode_batch([(ex.text, ex.text_pair) for ex in examples])
    else:
        encodings = tok.encode_batch([ex.text for ex in examples])

    if labelled and task_type == "regression":
        labels = [float(ex.label) for ex in examples]
    elif labelled:
        lists = label_lists(examples, task_type)
        flat = iter(label_vocab.encode(chain.from_iterable(lists), source=source))
        ids = [[next(flat) for _ in labels] for labels in lists]
        labels = [i[0] for i in ids] if task_type == "classification" else ids
    else:
        labels = [None] * len(examples)

    features = []
    truncated = lost_words = 0
    step = max_length - specials - (stride or 0)  # windows of one text start every `step` tokens
    for document, (ex, enc, label) in enumerate(zip(examples, encodings, labels, strict=True)):
        truncated += bool(enc.overflowing)
        if task_type == "multilabel" and label is not None:
            multi_hot = np.zeros(len(label_vocab), dtype=np.float32)
            multi_hot[label] = 1.0
            label = multi_hot
        windows = [enc, *enc.overflowing] if stride is not None else [enc]
        for k, window in enumerate(windows):
            word_ids, window_label = None, label
            if token_task:
                # The word of the token just before this window: if the window starts inside it, its
                # first piece (which carries the tag) lies in the window before.
                continued = windows[k - 1].word_ids[step] if k > 0 else None
                word_ids, window_label, kept = _first_pieces(window.word_ids, label, continued)
                if enc.overflowing and stride is None:
                    lost_words += len(ex.text) - kept
            features.append(Features(np.array(window.ids, dtype=np.int32), np.array(window.type_ids, dtype=np.int8),
                                     window_label, word_ids, document))
    if stride is not None and truncated:
        logger.info("minibert: %d of %d examples in %s are longer than max_length=%d tokens: read in %d windows "
                    "that share %d tokens", truncated, len(examples), source, max_length, len(features), stride)
    elif token_task and truncated:
        message = (
            "minibert: %d of %d sentences in %s are longer than max_length=%d tokens: their last %d words get no tag "
            "(not trained on, not evaluated); raise --max-length, or pass --sliding-window, to keep them"
        )
        logger.warning(message, truncated, len(examples), source, max_length, lost_words)
    elif truncated:
        logger.info("minibert: %d of %d examples in %s were cut to max_length=%d tokens (--sliding-window reads them "
                    "whole)", truncated, len(examples), source, max_length)
    unk_id = tok.token_to_id("[UNK]")
    special_ids = {tok.token_to_id(t) for t in SPECIAL_TOKENS if t != "[UNK]"}
    counts = np.bincount(np.concatenate([f.input_ids for f in features]), minlength=tok.get_vocab_size())
    words = counts.sum() - sum(counts[i] for i in special_ids if i is not None and i < len(counts))
    if unk_id is not None and words and counts[unk_id] > 0.5 * words:  # a tokenizer whose vocabulary failed to load
        logger.warning("minibert: %.0f%% of the word pieces of %s are [UNK]: the tokenizer does not fit this text "
                       "(a vocabulary of another language or script, or a broken vocab.txt); the model sees almost "
                       "nothing of it", 100 * counts[unk_id] / words, source)
    return features


def check_stride(stride: int, max_length: int, specials: int, pairs: bool) -> None:
    """Sliding windows need room for new text in each window: stride (the tokens neighbouring windows
    share) must be less than the text tokens a window holds (per text of a pair, as longest-first
    truncation gives each text at least half)."""
    room = (max_length - specials) // (2 if pairs else 1)
    if not 0 <= stride < room:
        raise ValueError(f"stride {stride} must be at least 0 and less than {room}, the text tokens a window of max_length "
                         f"{max_length} holds{' per text of a pair' if pairs else ''}: use a smaller stride (--stride) "
                         "or a larger max_length (--max-length)")


def truncating_tokenizer(tokenizer: Tokenizer, max_length: int, stride: int) -> Tokenizer:
    """The tokenizer as encode_examples uses it: truncating to max_length tokens, longest text first, the
    overflow in windows sharing `stride` tokens, no padding. A copy, so that the caller's tokenizer keeps
    its settings; one that is already set up so is returned as it is (copying a 30,000-word tokenizer
    takes longer than encoding a batch: a caller that encodes again and again, like the pipeline,
    prepares one once)."""
    wanted = {"max_length": max_length, "stride": stride, "strategy": "longest_first", "direction": "right"}
    if tokenizer.truncation == wanted and tokenizer.padding is None:
        return tokenizer
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length, stride=stride, strategy="longest_first")
    return tok


def _first_pieces(word_ids: list[int | None], tag_ids: list[int] | None,
                  continued: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Per-token word index on each word's first piece (-1 elsewhere), the tag ids aligned to it, and
    the number of words with a first piece (the others were cut off by truncation). `continued`: a
    word that began before these tokens (a sliding window that starts inside it), so has no first piece here."""
    first = np.full(len(word_ids), -1, dtype=np.int32)
    previous = continued
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            first[position] = word
        if word is not None:
            previous = word
    is_first = first >= 0
    labels = None
    if tag_ids is not None:
        labels = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
        labels[is_first] = np.asarray(tag_ids, dtype=np.int64)[first[is_first]]
    return first, labels, int(is_first.sum())
