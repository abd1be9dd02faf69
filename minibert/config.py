"""BertConfig: every size and switch of the model in one dataclass, readable and writable as HF config.json.

    cfg = BertConfig.preset("mini")                    # Google's BERT-Mini: 4 layers, hidden 256
    cfg = BertConfig.from_json_file("dir/config.json")  # any Hugging Face BERT config
    cfg.to_hf_dict()                                   # back to HF's keys (unknown keys kept)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# Named sizes of Google's small BERTs (Turc et al., 2019, "Well-Read Students Learn Better", 24 models of
# 2-12 layers and hidden 128-768) plus the two originals. Unless a preset says otherwise, heads are
# hidden / 64 and intermediate is 4 * hidden, as in all of them.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128),
    "mini": dict(num_hidden_layers=4, hidden_size=256),
    "small": dict(num_hidden_layers=4, hidden_size=512),
    "medium": dict(num_hidden_layers=8, hidden_size=512),
    "base": dict(num_hidden_layers=12, hidden_size=768),
    "large": dict(num_hidden_layers=24, hidden_size=1024),
}

# The label that takes no loss (torch's cross_entropy skips it): padding, special tokens, unmasked MLM positions.
IGNORE_INDEX = -100

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu", "swish", "tanh")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
# The names of model.ATTENTION_BACKENDS, the registry of attention functions. Written out here so that the
# config, which every module builds on, can check attn_impl without importing the model (tests hold the
# two equal: a new backend is added in both places).
ATTENTION_BACKEND_NAMES = ("eager", "sdpa", "triton")


@dataclass
class BertConfig:
    # --- sizes (the defaults are bert-base-uncased) ---
    vocab_size: int = 30522  # WordPiece vocabulary of the uncased English BERT
    hidden_size: int = 768  # width of every token vector; must divide evenly into heads
    num_hidden_layers: int = 12  # depth of the encoder
    num_attention_heads: int = 12  # head_dim = hidden_size / heads = 64, the size attention kernels like
    intermediate_size: int = 3072  # feed-forward width, 4 * hidden_size in every Google BERT
    max_position_embeddings: int = 512  # learned absolute positions: the longest input the model accepts
    type_vocab_size: int = 2  # segment A / segment B, for sentence pairs and NSP
    # --- behaviour ---
    hidden_act: str = "gelu"  # "gelu" is the exact erf form HF uses; "gelu_new" is the tanh approximation
    hidden_dropout_prob: float = 0.1  # after embeddings, attention output and feed-forward output
    attention_probs_dropout_prob: float = 0.1  # on the attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's (tiny) epsilon; changing it changes every number
    initializer_range: float = 0.02  # std of the normal init of weights when training from scratch
    pad_token_id: int = 0  # id of [PAD]: its embedding row starts at zero
    # --- minibert's own switches ---
    attn_impl: str = "sdpa"  # attention backend by name: "eager" (readable reference), "sdpa", "triton"
    unpad: bool = True  # run dense layers on real tokens only when a batch has padding (same numbers, faster)
    # --- task heads (HF keeps these in the same config.json) ---
    num_labels: int = 2  # outputs of a classification head; 1 means regression
    problem_type: str | None = None  # HF's name for the loss; None infers it from the labels' dtype
    classifier_dropout: float | None = None  # dropout before a classifier; None uses hidden_dropout_prob
    id2label: dict[int, str] | None = None  # label names of a trained classifier, saved for inference
    # Keys of a config.json that minibert does not use (architectures, torch_dtype, ...), kept so that a
    # round trip through minibert loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: choose heads so that hidden_size / heads is a whole number (64 is usual)"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
        if self.attn_impl not in ATTENTION_BACKEND_NAMES:
            raise ValueError(f"attn_impl {self.attn_impl!r} is unknown; choose one of {', '.join(ATTENTION_BACKEND_NAMES)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is unknown; choose one of {', '.join(PROBLEM_TYPES)}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            if sorted(self.id2label) != list(range(len(self.id2label))):
                raise ValueError(f"id2label must number labels 0..n-1, got ids {sorted(self.id2label)}")
        self.check_labels()

    def check_labels(self) -> None:
        """A name per output: 3 names for a 2-output head would label predictions wrongly."""
        if self.id2label is not None and len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label names {len(self.id2label)} labels but num_labels is {self.num_labels}: give "
                             "one name per classifier output (or id2label=None for unnamed labels)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        sizes = dict(PRESETS[name])
        if "hidden_size" in overrides:  # another width: the preset's heads and feed-forward size were for its own
            sizes = {k: v for k, v in sizes.items() if k not in ("num_attention_heads", "intermediate_size")}
        hidden = overrides.get("hidden_size", sizes["hidden_size"])
        sizes.setdefault("num_attention_heads", max(1, hidden // 64))
        sizes.setdefault("intermediate_size", 4 * hidden)
        return cls(**{**sizes, **overrides})

    def replace(self, **changes) -> "BertConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "BertConfig":
        d = dict(d)
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(
                f"config.json has model_type {model_type!r}, but minibert implements BERT only: "
                "pass a BERT checkpoint (model_type 'bert')"
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type {d['position_embedding_type']!r} is not supported; minibert "
                "implements BERT's learned absolute positions"
            )
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("this config is a BERT decoder (is_decoder/add_cross_attention); minibert is an encoder only")
        own = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in own}
        if kwargs.get("id2label"):  # transformers' rule: the label names decide how many labels there are
            kwargs["num_labels"] = len(kwargs["id2label"])
        d.pop("label2id", None)  # derived from id2label when writing
        extra = {**d.pop("extra", {}), **d}
        kwargs.update(overrides)
        # An override of one of the two keeps the other consistent: a head of another size drops the old
        # names (they name other outputs); new names set the size.
        if "num_labels" in overrides and "id2label" not in overrides and kwargs.get("id2label") \
                and len(kwargs["id2label"]) != overrides["num_labels"]:
            kwargs["id2label"] = None
        if overrides.get("id2label") and "num_labels" not in overrides:
            kwargs["num_labels"] = len(overrides["id2label"])
        return cls(**kwargs, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        self.check_labels()  # the fields may have been changed after construction
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "attn_impl", "unpad")}
        # minibert's switches travel under their own prefix so transformers ignores them.
        d["minibert_attn_impl"] = self.attn_impl
        d["minibert_unpad"] = self.unpad
        if self.id2label is not None:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = {v: k for k, v in self.id2label.items()}
        for key in ("problem_type", "classifier_dropout", "id2label"):
            if d[key] is None:
                del d[key]
        d["model_type"] = "bert"
        d["position_embedding_type"] = "absolute"
        return {**self.extra, **d}

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides) -> "BertConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}: pass a directory holding a BERT checkpoint") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): re-download or rewrite the checkpoint's config") from None
        for key in ("attn_impl", "unpad"):  # read back minibert's own switches, unless overridden
            if f"minibert_{key}" in d:
                overrides.setdefault(key, d.pop(f"minibert_{key}"))
        return cls.from_hf_dict(d, **overrides)

    def to_json_file(self, path: str | Path, **more: Any) -> None:
        d = {**self.to_hf_dict(), **more}
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
