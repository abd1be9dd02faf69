"""BERT's WordPiece tokenizer as a `tokenizers.Tokenizer`, with padding and truncation left to the caller.

    tok = load_tokenizer("bert-base-uncased")          # or a local directory
    enc = tok.encode("Hello world!", "Second segment")  # enc.ids, enc.type_ids, enc.attention_mask
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from minibert.atomic_write import atomic_write, atomic_write_text
from minibert.hub import resolve_model_dir


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """From tokenizer.json when the checkpoint has one, else from vocab.txt and tokenizer_config.json's
    casing, built exactly as transformers' BertTokenizerFast builds it."""
    directory = resolve_model_dir(name_or_path, need_weights=False)
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    elif (directory / "vocab.txt").is_file():
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        tokenizer = bert_wordpiece_tokenizer(
            directory / "vocab.txt",
            lowercase=config.get("do_lower_case", True),
            strip_accents=config.get("strip_accents"),
            tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
        )
    else:
        raise FileNotFoundError(f"{directory} has no tokenizer.json or vocab.txt: pass a directory (or hub id) with BERT's tokenizer files")
    check_special_tokens(tokenizer, directory)
    # Some checkpoints bake in padding/truncation (MiniLM pads to 128); minibert pads per batch instead.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in a tokenizer train_wordpiece_tokenizer trains


# BERT's inputs are built from these: [CLS] text [SEP] (text [SEP]), padded with [PAD]; [UNK] stands for any
# word the vocabulary cannot spell. ([MASK] is needed for pretraining only.)
REQUIRED_SPECIAL_TOKENS = tuple(token for token in SPECIAL_TOKENS if token != "[MASK]")


def check_special_tokens(tokenizer: Tokenizer, source, needed=REQUIRED_SPECIAL_TOKENS) -> None:
    missing = [token for token in needed if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(
            f"the tokenizer of {source} has no {', '.join(missing)}: minibert needs a BERT WordPiece tokenizer "
            "(a RoBERTa/GPT-style <s> </s> tokenizer does not fit BERT's inputs); use the BERT checkpoint's own "
            "tokenizer files, or let train_pretrain.py train one"
        )


def bert_text_splitting(tokenizer: Tokenizer, *, lowercase=True, strip_accents=None,
                        tokenize_chinese_chars=True) -> Tokenizer:
    """Give `tokenizer` BERT's normalizer (control characters removed, CJK characters spaced out, lower case
    and no accents when lowercase; strip_accents=None follows lowercase) and pre-tokenizer (words split at
    whitespace and punctuation): what a WordPiece vocabulary is read with, and trained on."""
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def bert_wordpiece_tokenizer(vocab: str | os.PathLike | dict[str, int], *, lowercase=True, strip_accents=None,
                             tokenize_chinese_chars=True) -> Tokenizer:
    """BERT's tokenizer of a WordPiece vocabulary (a vocab.txt, or token -> id), built exactly as
    transformers' BertTokenizerFast builds it: [CLS] A [SEP] (B [SEP]) with token types 0 (then 1)."""
    source = "the vocabulary"
    if not isinstance(vocab, dict):
        source, vocab_file, vocab = vocab, vocab, {}
        for index, line in enumerate(Path(vocab_file).read_text(encoding="utf-8").splitlines()):
            vocab.setdefault(line.rstrip("\n"), index)
    missing = [token for token in REQUIRED_SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)}: it is not a BERT WordPiece vocabulary (one token "
                         "a line, with [PAD], [UNK], [CLS], [SEP] and [MASK]); use the BERT checkpoint's own vocab.txt")
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    bert_text_splitting(tokenizer, lowercase=lowercase, strip_accents=strip_accents,
                        tokenize_chinese_chars=tokenize_chinese_chars)
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens([token for token in SPECIAL_TOKENS if token in vocab])
    return tokenizer


def tokenizer_settings(tokenizer: Tokenizer) -> dict:
    """The normaliser settings transformers needs in tokenizer_config.json to rebuild the same tokenizer."""
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    if normalizer.get("type") == "Sequence":  # find the BertNormalizer inside a sequence
        normalizer = next((n for n in normalizer["normalizers"] if n.get("type") == "BertNormalizer"), {})
    return {
        "lowercase": normalizer.get("lowercase", True),
        "strip_accents": normalizer.get("strip_accents"),
        "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
    }


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens ([PAD], [CLS], ...): never masked, never drawn."""
    return sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def save_vocab(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``vocab.txt`` (one token a line, line number = id), the file BertTokenizer reads."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the vocabulary ids are not 0..V-1, so a vocab.txt cannot represent them")
    path = Path(path)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, model_max_length: int = 512) -> None:
    """tokenizer.json for `tokenizers`, and vocab.txt + tokenizer_config.json for transformers' BertTokenizer."""
    directory = Path(directory)
    settings = tokenizer_settings(tokenizer)
    specials = {f"{token.strip('[]').lower()}_token": token for token in SPECIAL_TOKENS}  # unk_token: [UNK], ...
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": settings["lowercase"],
        "strip_accents": settings["strip_accents"],
        "tokenize_chinese_chars": settings["tokenize_chinese_chars"],
        "model_max_length": model_max_length,
        **specials,
    }
    atomic_write(directory / "tokenizer.json", lambda tmp: tokenizer.save(tmp))
    atomic_write(directory / "vocab.txt", lambda tmp: save_vocab(tokenizer, tmp))
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
