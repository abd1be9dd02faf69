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

The mask must be right-padded, as BERT tokenizers produce: each row some 1s, then only 0s. Any other
mask is refused, in the packed layout and the padded one alike. BERT reads [CLS] at position 0 and
numbers positions from there, so a left-padded row has no right answer: transformers shifts its
positions and pools a [PAD] vector, and packing would pool the first real token instead. A row of
zeros has no [CLS] to pool at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minibert.config import IGNORE_INDEX


def mask_error(empty: Tensor, hole: Tensor) -> str:
    """The one-line error for the first refused row; empty and hole are (batch,) bool (see from_mask)."""
    row = int((empty | hole).nonzero()[0])
    if hole[row]:
        return (f"attention_mask row {row} is not right-padded (a 0 before a 1): pad on the right, as BERT tokenizers "
                "do (padding_side='right'), with the real tokens first and [CLS] at position 0")
    return (f"attention_mask row {row} has no tokens (all zeros): every sequence needs at least its [CLS] token; "
            "leave empty rows out of the batch")


@dataclass
class TokenLayout:
    """Where the real tokens of a batch are, and whether the hidden states are packed (unpadded)."""

    batch_size: int
    seqlen: int
    attention_mask: Tensor | None  # (batch, seqlen) bool, True = real token; None when nothing is padded
    indices: Tensor | None = None  # (total_tokens,) set when packed
    cu_seqlens: Tensor | None = None  # (batch + 1,) int32, set when packed
    max_seqlen: int | None = None  # set when packed

    @property
    def packed(self) -> bool:
        """True when hidden states are (total_tokens, ...) rather than (batch, seqlen, ...)."""
        return self.indices is not None

    @classmethod
    @torch.compiler.disable  # reads the mask's values (data-dependent shapes): runs eagerly under torch.compile
    def from_mask(cls, attention_mask: Tensor | None, batch_size: int, seqlen: int, *, pack: bool) -> "TokenLayout":
        """Describe a batch; pack the real tokens only when asked and when there is padding to remove.
        A mask that is not right-padded, or has an empty row, is a ValueError (see the module docstring)."""
        if attention_mask is None:
            return cls(batch_size, seqlen, None)
        mask = attention_mask.bool()
        if torch.compiler.is_exporting():  # an exported graph (ONNX, for int8 prediction) cannot branch on the
            return cls(batch_size, seqlen, mask)  # mask's values: the padded layout with the mask fits every mask
        empty = ~mask[:, 0]  # (batch,): a right-padded row that starts with a 0 has no tokens at all
        hole = (~mask[:, :-1] & mask[:, 1:]).any(dim=1)  # (batch,): a 0 before a 1, left padding or a gap
        no_padding, refused = torch.stack((mask.all(), (empty | hole).any())).tolist()  # one read from the device
        if refused:
            raise ValueError(mask_error(empty, hole))
        if no_padding:
            return cls(batch_size, seqlen, None)  # nothing to skip: the padded path is the fast one
        if not pack:
            return cls(batch_size, seqlen, mask)
        seqlens = mask.sum(dim=1, dtype=torch.int32)  # (batch,)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()  # (total_tokens,)
        cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))  # (batch + 1,)
        return cls(batch_size, seqlen, mask, indices, cu_seqlens, int(seqlens.max()))

    def pack(self, x: Tensor) -> Tensor:
        """(batch, seqlen, ...) -> (total_tokens, ...): the real tokens, in (batch, position) order."""
        return x.flatten(0, 1)[self.indices]

    def unpack(self, x: Tensor) -> Tensor:
        """(total_tokens, ...) -> (batch, seqlen, ...), zeros at padded positions."""
        out = x.new_zeros(self.batch_size * self.seqlen, *x.shape[1:])
        out[self.indices] = x  # index_put: differentiable, gradients flow back to x
        return out.unflatten(0, (self.batch_size, self.seqlen))

    def first_tokens(self, x: Tensor) -> Tensor:
        """The [CLS] vector of each sequence: (batch, seqlen, C) or (total_tokens, C) -> (batch, C)."""
        return x[self.cu_seqlens[:-1].long()] if self.packed else x[:, 0]

    def flat_labels(self, labels: Tensor) -> Tensor:
        """Per-token labels (batch, seqlen) in the hidden states' flat layout, (total_tokens,) when packed,
        (batch * seqlen,) otherwise, with IGNORE_INDEX at padded positions: padding never takes a loss,
        whatever label it carries, so the loss is the same in both layouts."""
        if self.packed:
            return self.pack(labels)
        if self.attention_mask is not None:
            labels = labels.masked_fill(~self.attention_mask, IGNORE_INDEX)
        return labels.flatten(0, 1)
