"""Training a WordPiece tokenizer on a corpus (BERT's uncased recipe), and the cache that keeps a run's
tokenizer the same from one run to the next."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, trainers

from minibert.pretraining_data.corpus import documents_fingerprint
from minibert.tokenizer import SPECIAL_TOKENS, bert_text_splitting, bert_wordpiece_tokenizer

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

    The recipe of Hugging Face's BertWordPieceTokenizer: BERT's normalizer (clean control
    characters, space out CJK characters, lower-case and strip accents when ``lowercase``), BERT's
    pre-tokenizer (split on whitespace and punctuation), WordPiece with ``##`` continuations,
    min_frequency 2, at most 1000 alphabet characters. Special tokens come first:
    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Encoding a pair gives
    ``[CLS] A [SEP] B [SEP]`` with type ids 0 then 1; padding and truncation are off.
    """
    tokenizer = bert_text_splitting(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase=lowercase)
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
    # The trained vocabulary in the tokenizer every BERT vocabulary gets (post-processor, decoder, special tokens).
    return bert_wordpiece_tokenizer(tokenizer.get_vocab(with_added_tokens=True), lowercase=lowercase)


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
        corpus_id = documents_fingerprint(documents)
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
