"""Unpadding: run the encoder on real tokens only.

A padded batch of shape (batch, seqlen) wastes work on [PAD] positions: every dense layer computes
them and throws them away. minibert removes the padding once, after reading the attention mask, and
keeps the tokens packed as (total_tokens, ...) through every layer. Attention is the only step that
needs to know where one sequence ends and the next begins; it reads that from `cu_seqlens`.

    attention_mask   (batch, seqlen)  1 for a real token, 0 for padding
    indices          (total_tokens,)  flat positions of the real tokens in the (batch * seqlen) grid
    cu_seqlens       (batch + 1,)     int32 cumulative lengths: sequence b is tokens[cu_seqlens[b]:cu_seqlens[b+1]]
    max_seqlen       int              the longest sequence, for kernels that tile by length

Example: attention_mask [[1, 1, 1], [1, 1, 0]] gives indices [0, 1, 2, 3, 4], cu_seqlens [0, 3, 5].
(The mask must be right-padded, as BERT tokenizers produce.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TokenLayout:
    """Where the real tokens of a batch are, and whether the hidden states are packed (unpadded)."""

    batch_size: int
    seqlen: int
    attention_mask: Tensor | None  # (batch, seqlen) bool, True = real token; None when nothing is padded
    indices: Tensor | None = None  # (total_tokens,) set when unpadded
    cu_seqlens: Tensor | None = None  # (batch + 1,) int32, set when unpadded
    max_seqlen: int | None = None  # set when unpadded

    @property
    def unpadded(self) -> bool:
        return self.indices is not None

    @classmethod
    @torch.compiler.disable  # reads the mask's values (data-dependent shapes): runs eagerly under torch.compile
    def from_mask(cls, attention_mask: Tensor | None, batch_size: int, seqlen: int, *, unpad: bool) -> "TokenLayout":
        """Describe a batch; unpad only when asked and when there is padding to remove."""
        if attention_mask is None:
            return cls(batch_size, seqlen, None)
        mask = attention_mask.bool()
        if bool(mask.all()):
            return cls(batch_size, seqlen, None)  # nothing to skip: the padded path is the fast one
        if not unpad:
            return cls(batch_size, seqlen, mask)
        seqlens = mask.sum(dim=1, dtype=torch.int32)  # (batch,)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # (total_tokens,)
        cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (batch + 1,)
        return cls(batch_size, seqlen, mask, indices, cu_seqlens, int(seqlens.max()))

    def unpad(self, x: Tensor) -> Tensor:
        """(batch, seqlen, ...) -> (total_tokens, ...)"""
        return x.flatten(0, 1)[self.indices]

    def pad(self, x: Tensor) -> Tensor:
        """(total_tokens, ...) -> (batch, seqlen, ...), zeros at padded positions."""
        out = x.new_zeros(self.batch_size * self.seqlen, *x.shape[1:])
        out[self.indices] = x  # index_put: differentiable, gradients flow back to x
        return out.unflatten(0, (self.batch_size, self.seqlen))

    def first_tokens(self, x: Tensor) -> Tensor:
        """The [CLS] vector of each sequence: (batch, seqlen, C) or (total_tokens, C) -> (batch, C)."""
        return x[self.cu_seqlens[:-1].long()] if self.unpadded else x[:, 0]

    def flat_tokens(self, x: Tensor) -> Tensor:
        """Per-token values in the hidden states' layout: (batch, seqlen, ...) -> (tokens, ...),
        i.e. only real tokens when unpadded, every position otherwise."""
        return self.unpad(x) if self.unpadded else x.flatten(0, 1)
