"""Training a WordPiece tokenizer on a corpus (BERT's uncased recipe), by minibert's own deterministic trainer
(minibert.wordpiece: the same files in every process and on every machine), and the cache that saves a run
the training."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer

from minibert import wordpiece
from minibert.pretraining_data.corpus import documents_fingerprint
from minibert.tokenizer import SPECIAL_TOKENS, bert_wordpiece_tokenizer

logger = logging.getLogger(__name__)


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

    The recipe of Hugging Face's BertWordPieceTokenizer, with every tie broken by a stated rule
    (minibert.wordpiece, because tokenizers' own trainer gives another vocabulary in every process:
    huggingface/tokenizers#1794): BERT's normalizer (clean control characters, space out CJK characters,
    lower-case and strip accents when ``lowercase``), BERT's pre-tokenizer (split on whitespace and
    punctuation), WordPiece with ``##`` continuations, min_frequency 2, at most 1000 alphabet characters.
    The result depends only on the text and the settings. Special tokens come first:
    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Encoding a pair gives
    ``[CLS] A [SEP] B [SEP]`` with type ids 0 then 1; padding and truncation are off.
    """
    counts = wordpiece.count_words(_texts(documents_or_text_iter), lowercase=lowercase)
    tokens = wordpiece.train_wordpiece_vocab(counts, vocab_size, SPECIAL_TOKENS)
    if len(tokens) < vocab_size:  # a small corpus has fewer word pieces seen twice than asked for
        logger.info("minibert: the corpus gives a vocabulary of %d word pieces, fewer than --vocab-size %d "
                    "(pieces must occur at least twice); the model is sized to %d", len(tokens), vocab_size,
                    len(tokens))
    # The trained vocabulary in the tokenizer every BERT vocabulary gets (post-processor, decoder, special tokens).
    return bert_wordpiece_tokenizer({token: i for i, token in enumerate(tokens)}, lowercase=lowercase)


def load_or_train_tokenizer(
    documents: Iterable[Sequence[str]],
    vocab_size: int,
    cache_root: str | os.PathLike,
    *,
    lowercase: bool = True,
    corpus_id: str | None = None,
) -> Tokenizer:
    """train_wordpiece_tokenizer, cached as ``cache_root/wordpiece-<key>.json``.

    Training gives the same file every time; the cache saves the training and, with ``corpus_id``, reading
    the corpus. The key hashes ``corpus_id`` (None: the documents' text), vocab_size, lowercase and the
    trainer's version (wordpiece.TRAINER_VERSION), so that a tokenizer cached by another trainer (tokenizers'
    own, before minibert's) is not reused. The file is published with an exclusive hard link, so when two
    DDP ranks train at once both load the same winner.
    """
    if corpus_id is None:
        documents = [list(d) for d in documents]
        corpus_id = documents_fingerprint(documents)
    key_source = json.dumps({"corpus": corpus_id, "vocab_size": vocab_size, "lowercase": lowercase,
                             "trainer": wordpiece.TRAINER_VERSION}, sort_keys=True)
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
