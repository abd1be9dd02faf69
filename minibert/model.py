"""BERT, the whole model in one file, read top to bottom.

    Embeddings -> attention backends -> SelfAttention -> FeedForward -> Layer -> BertModel
    -> heads (pooler, MLM, NSP, classifiers) -> BertForPreTraining / SequenceClassification / TokenClassification

The math and its order are Hugging Face's `modeling_bert.py` exactly (post-LayerNorm residual blocks,
exact-erf GELU, a tanh pooler on [CLS]), so the same weights give the same numbers; the class tree is
not. Checkpoint loading and saving in HF's format live in `checkpoint.py`; unpadding in `padding.py`.

Shapes use these letters:
    B batch, T sequence length (padded), N real tokens in the batch (unpadded), C hidden size,
    H attention heads, D head dim (C = H * D), V vocabulary size, L labels
When a batch has padding and `config.unpad` is on, the real tokens are packed: hidden states are (N, C)
instead of (B, T, C). Every layer works the same on either, because only attention needs to know where
sequences start. Attention masks must be right-padded with no empty row (padding.py says why); others
are refused in both layouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from minibert.config import IGNORE_INDEX, BertConfig
from minibert.dropout import Dropout, dropout
from minibert.padding import TokenLayout

# ----------------------------------------------------------------------------- activations

ACTIVATION_FUNCTIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU, what BERT was trained with
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the tanh approximation (HF "gelu_new")
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),  # the same function under HF's other name
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


# ----------------------------------------------------------------------------- embeddings


class Embeddings(nn.Module):
    """Token + position + segment embeddings, summed, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        # any leading shape, (B, T) or (N,) -> (..., C)
        x = self.word(input_ids) + self.position(position_ids) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


# ----------------------------------------------------------------------------- attention backends
#
# Every backend has one signature:
#     backend(q, k, v, layout, dropout_p) -> out
# q, k, v and out are (B, T, H, D) on a padded batch, or (N, H, D) when the layout is packed.
# `layout.attention_mask` (B, T) marks real keys; `layout.cu_seqlens` delimits packed sequences.
# The softmax scale is 1/sqrt(D). Choose one by name with `BertConfig.attn_impl`.
# Backends are interchangeable implementations of the same math (tests hold them to the eager reference):
# a different attention pattern is a different model, not a backend, and transformers would not know it.


def eager_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, dropout_p: float) -> Tensor:
    """The reference: softmax(q k^T / sqrt(D) + mask) v, written out."""
    if layout.packed:  # attention compares tokens within a sequence, so lay them out as (B, T) again
        q, k, v = layout.unpack(q), layout.unpack(k), layout.unpack(v)  # (B, T, H, D)
    q, k, v = (rearrange(t, "b t h d -> b h t d") for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    if layout.attention_mask is not None:  # padded keys get no weight (finfo.min, not -inf: no NaN in any row)
        scores = scores.masked_fill(~layout.attention_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = dropout(scores.softmax(dim=-1), p=dropout_p)  # the caller passes dropout_p=0.0 in eval mode
    out = rearrange(probs @ v, "b h t d -> b t h d")
    return layout.pack(out) if layout.packed else out


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, dropout_p: float) -> Tensor:
    """torch's fused scaled_dot_product_attention (flash / memory-efficient / C++ math kernels)."""
    if dropout_p > 0.0 and q.device.type == "cpu":  # torch fuses no CPU kernel with dropout: it runs eager's math,
        return eager_attention(q, k, v, layout, dropout_p)  # with the slow mask that minibert.dropout replaces
    if layout.packed:
        q, k, v = layout.unpack(q), layout.unpack(k), layout.unpack(v)  # (B, T, H, D)
    # transpose, not rearrange: the same axis swap as eager's, without einops' per-call cost (~35 us) on the hot path
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, D) -> (B, H, T, D)
    mask = None if layout.attention_mask is None else layout.attention_mask[:, None, None, :]  # (B, 1, 1, T)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    out = out.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)
    return layout.pack(out) if layout.packed else out


def triton_attention(q: Tensor, k: Tensor, v: Tensor, layout: TokenLayout, dropout_p: float) -> Tensor:
    """minibert's FlashAttention kernel (minibert/kernels): reads packed sequences directly, no padding."""
    from minibert.kernels import flash_attention  # triton is an optional dependency

    if layout.packed:
        return flash_attention(q, k, v, cu_seqlens=layout.cu_seqlens, max_seqlen=layout.max_seqlen, dropout_p=dropout_p)
    return flash_attention(q, k, v, key_padding_mask=layout.attention_mask, dropout_p=dropout_p)


# config.ATTENTION_BACKEND_NAMES lists these names too, so that BertConfig can check attn_impl without this file.
ATTENTION_BACKENDS = {"eager": eager_attention, "sdpa": sdpa_attention, "triton": triton_attention}


# ----------------------------------------------------------------------------- the transformer layer


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.output = nn.Linear(C, C)
        self.dropout_p = config.attention_probs_dropout_prob
        self.backend = ATTENTION_BACKENDS[config.attn_impl]

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        # x: (B, T, C) or (N, C); the heads split and join with unflatten/flatten, which cost nothing per call
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)) for proj in (self.query, self.key, self.value))  # (..., H, D)
        out = self.backend(q, k, v, layout, self.dropout_p if self.training else 0.0)  # (..., H, D)
        return self.output(out.flatten(-2))  # (..., H, D) -> (..., C)


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATION_FUNCTIONS[config.hidden_act]
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """One encoder block, post-LayerNorm as in the original BERT: x = LayerNorm(x + dropout(f(x))).

    attention_norm and feed_forward_norm are the norms *after* each residual sum. Attribute names are the
    checkpoint format: each is mapped to HF's name in checkpoint.ENCODER_MODULES, so a new weight here
    needs a line there (tests/test_checkpoint.py checks that every weight has one)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, layout)))
        return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))


# ----------------------------------------------------------------------------- the encoder


class Pooler(nn.Module):
    """tanh(dense(h_[CLS])): the sentence vector NSP and sequence classification read."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, cls_hidden: Tensor) -> Tensor:  # (B, C) -> (B, C)
        return torch.tanh(self.dense(cls_hidden))


@dataclass
class BertOutput:
    last_hidden_state: Tensor  # (B, T, C), zeros at padded positions when packed
    pooler_output: Tensor | None  # (B, C): tanh(dense([CLS])), None for a model built without a pooler


# Reading and writing Hugging Face checkpoints is checkpoint.py's work, and checkpoint.py builds on this file,
# so this file imports nothing from it: dependencies point one way (config -> model -> checkpoint), with no
# circle. `BertModel.from_pretrained(...)` stays a method all the same, because that is what users write:
# the two methods below call the loader and saver that checkpoint.py puts into this table when it is
# imported. `import minibert` imports checkpoint.py, and Python runs it before any `minibert.x` import, so
# the table is filled before a model class can be used.
CHECKPOINT_IO: dict[str, Callable] = {}  # "load": checkpoint.load_pretrained, "save": checkpoint.save_pretrained


class PreTrainedBert(nn.Module):
    """What every minibert model shares: BERT's initialisation and the Hugging Face checkpoint format."""

    config: BertConfig

    def init_weights(self, part: nn.Module | None = None) -> None:
        """BERT's initialisation for training from scratch: N(0, 0.02) weights, zero biases, unit norms.
        `part` (a submodule) re-initialises only that part, e.g. the top layers before fine-tuning."""
        std = self.config.initializer_range
        for module in (self if part is None else part).modules():  # an empty ModuleList is falsy, not None
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def parameter_groups(self, weight_decay: float, layer_lr_decay: float = 1.0) -> list[dict]:
        """AdamW parameter groups: no weight decay on biases and LayerNorms (the 1-D parameters); with
        layer_lr_decay < 1, layer i of L gets lr_scale = decay**(L - i), the embeddings decay**(L + 1), and
        everything above the encoder (pooler, heads) 1.0, as in ULMFiT and ELECTRA. Frozen parameters are left out."""
        if not 0.0 < layer_lr_decay <= 1.0:  # 0 zeroes the embeddings' rate, a negative one ascends the loss
            raise ValueError(f"layer_lr_decay must be in (0, 1] (1 is no decay, 0.8-0.95 are usual), got {layer_lr_decay}")
        encoder = getattr(self, "bert", self)  # task models hold the encoder as .bert
        L = len(encoder.layers)
        depth_of = {}  # parameter -> how many layers below the top it sits
        for p in encoder.embeddings.parameters():
            depth_of[p] = L + 1
        for i, layer in enumerate(encoder.layers):
            for p in layer.parameters():
                depth_of[p] = L - i
        groups: dict[tuple[float, float], list] = {}
        for p in self.parameters():
            if not p.requires_grad:
                continue
            key = (weight_decay if p.ndim >= 2 else 0.0, layer_lr_decay ** depth_of.get(p, 0))
            groups.setdefault(key, []).append(p)
        return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in sorted(groups.items())]

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, reinit_head: bool = False, verbose: bool = True, **config_overrides):
        """Load a Hugging Face BERT checkpoint: a hub id, a local HF directory, or a directory minibert wrote.

        `config_overrides` change config fields (e.g. num_labels=3, attn_impl="eager"). A classifier
        head whose shape differs from the checkpoint's is an error unless reinit_head=True.
        """
        return CHECKPOINT_IO["load"](cls, name_or_path, reinit_head=reinit_head, verbose=verbose, **config_overrides)

    def save_pretrained(self, directory, tokenizer=None) -> None:
        """Write an HF-format directory (config.json, model.safetensors, tokenizer files) that transformers loads."""
        CHECKPOINT_IO["save"](self, directory, tokenizer=tokenizer)


class BertModel(PreTrainedBert):
    """The encoder: embeddings, L layers, and the [CLS] pooler."""

    def __init__(self, config: BertConfig, add_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.pooler = Pooler(config) if add_pooler else None
        self.init_weights()

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None):
        """Run the encoder and return (hidden, layout): hidden is (N, C) when the layout is packed,
        (B, T, C) otherwise. Task heads take what they need from it without padding it back."""
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds the model's {self.config.max_position_embeddings} positions: "
                f"truncate inputs to at most {self.config.max_position_embeddings} tokens (--max-length)"
            )
        layout = TokenLayout.from_mask(attention_mask, B, T, pack=self.config.unpad)
        position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if layout.packed:  # embed only the real tokens: (B, T) -> (N,)
            input_ids, position_ids, token_type_ids = map(layout.pack, (input_ids, position_ids, token_type_ids))
        x = self.embeddings(input_ids, position_ids, token_type_ids)  # (B, T, C) or (N, C)
        for layer in self.layers:
            x = layer(x, layout)
        return x, layout

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> BertOutput:
        hidden, layout = self.encode(input_ids, attention_mask, token_type_ids)
        pooled = self.pooler(layout.first_tokens(hidden)) if self.pooler is not None else None
        return BertOutput(layout.unpack(hidden) if layout.packed else hidden, pooled)


# ----------------------------------------------------------------------------- the masked-LM head


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the word embeddings, plus its own bias."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATION_FUNCTIONS[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.word_embeddings = word_embeddings  # shared, not copied: the decoder is the embedding matrix
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., V)
        x = self.norm(self.act(self.dense(x)))
        return F.linear(x, self.word_embeddings.weight, self.bias)


# ----------------------------------------------------------------------------- task models


@dataclass
class PreTrainingOutput:
    loss: Tensor | None  # mlm_loss + nsp_loss (whichever labels were given)
    mlm_logits: Tensor  # (B, T, V); with labels, only the masked positions: (M, V), in (batch, position) order
    nsp_logits: Tensor  # (B, 2): index 0 = "B follows A", 1 = "B is random" (HF's convention)
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None


class BertForPreTraining(PreTrainedBert):
    """BERT with its two pretraining heads: masked-language modelling and next-sentence prediction."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.mlm_head = MaskedLMHead(config, self.bert.embeddings.word)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        self.init_weights()  # the new head(s); the encoder is drawn again, as transformers' post_init does

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids)
        nsp_logits = self.nsp_head(self.bert.pooler(layout.first_tokens(hidden)))  # (B, 2)
        mlm_loss = nsp_loss = None
        if labels is None:
            mlm_logits = self.mlm_head(layout.unpack(hidden) if layout.packed else hidden)  # (B, T, V)
        else:
            # The vocabulary projection is the most expensive matmul in pretraining; run it only on the
            # ~15% of positions that carry a label.
            flat_labels = layout.flat_labels(labels)  # (N,) or (B*T,), IGNORE_INDEX at padding
            masked = flat_labels != IGNORE_INDEX
            mlm_logits = self.mlm_head(hidden.reshape(-1, hidden.shape[-1])[masked])  # (M, V)
            if len(mlm_logits):
                mlm_loss = F.cross_entropy(mlm_logits.float(), flat_labels[masked])
            else:  # nothing masked in this batch: a zero that still reaches every weight (for DDP)
                mlm_loss = mlm_logits.sum() * 0.0
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
        losses = [x for x in (mlm_loss, nsp_loss) if x is not None]
        return PreTrainingOutput(sum(losses) if losses else None, mlm_logits, nsp_logits, mlm_loss, nsp_loss)


@dataclass
class ClassifierOutput:
    loss: Tensor | None
    logits: Tensor  # (B, L) for sequences, (B, T, L) for tokens


def classification_loss(logits: Tensor, labels: Tensor, problem_type: str | None) -> Tensor:
    """HF's rule: one output -> regression (MSE); integer labels -> cross-entropy; float labels with
    several outputs -> multi-label (BCE with logits). `problem_type` in the config overrides the guess."""
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.float()
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if num_labels == 1 else F.mse_loss(logits, labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.float())


class BertForSequenceClassification(PreTrainedBert):
    """Pooled [CLS] -> dropout -> linear. Classification, multi-label or regression (num_labels=1)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()  # the new head(s); the encoder is drawn again, as transformers' post_init does

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(self.bert.pooler(layout.first_tokens(hidden))))  # (B, L)
        loss = classification_loss(logits, labels, self.config.problem_type) if labels is not None else None
        return ClassifierOutput(loss, logits)


class BertForTokenClassification(PreTrainedBert):
    """Every token -> dropout -> linear; labels of IGNORE_INDEX (-100: special tokens, non-first word
    pieces) are ignored, and so is any label at a padded position."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooler=False)  # HF's token classifier has no pooler either
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.init_weights()  # the new head(s); the encoder is drawn again, as transformers' post_init does

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> ClassifierOutput:
        hidden, layout = self.bert.encode(input_ids, attention_mask, token_type_ids)
        logits = self.classifier(self.dropout(hidden))  # (B, T, L) or (N, L)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), layout.flat_labels(labels))
        return ClassifierOutput(loss, layout.unpack(logits) if layout.packed else logits)
