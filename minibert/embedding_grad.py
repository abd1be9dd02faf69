"""A word-embedding gradient that lives across steps, instead of a new one each step.

nn.Embedding's backward builds its gradient as a new dense (V, C) tensor of zeros with the few rows of
the batch added in: 47 MB for MiniLM's 30,522 x 384 table, 94 MB for bert-base's 30,522 x 768. On a CPU
a new tensor that large is fresh memory from the operating system each time (the allocator hands blocks
over 32 MB back when they are freed), so every step pays for page faults and a full write of zeros,
which costs more than the rest of the embedding's backward by far.

PersistentGradEmbedding keeps one gradient buffer for the table. The first backward after the gradient
was cleared (optimizer.zero_grad(set_to_none=True)) zeroes the buffer, memory already in place, and
hands it over as weight.grad; every backward adds its rows into weight.grad. The numbers are
nn.Embedding's exactly (the padding row gets no gradient); clipping and AdamW see a dense gradient as
before. It is a drop-in subclass with the same weight, so state-dict keys, checkpoints and the tied
masked-LM decoder (which adds its own dense gradient into the same weight.grad) are unchanged.

Limitations: the gradient is written by the backward itself rather than through autograd's gradient
accumulation, so autograd hooks on the weight and DistributedDataParallel (which hooks there) do not
see it; max_norm, scale_grad_by_freq and sparse are not supported. Trainer uses it on a single CPU process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Lookup(torch.autograd.Function):
    """F.embedding whose backward adds into the owner's weight.grad and returns no gradient for the weight."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, owner: PersistentGradEmbedding) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.owner = owner
        return F.embedding(ids, weight, owner.padding_idx)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (ids,) = ctx.saved_tensors
        ctx.owner.add_to_grad(ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1]))
        return None, None, None


class PersistentGradEmbedding(nn.Embedding):
    """nn.Embedding with a gradient buffer kept across steps (see the module docstring)."""

    @classmethod
    def replacing(cls, embedding: nn.Embedding) -> PersistentGradEmbedding:
        """A PersistentGradEmbedding that shares `embedding`'s weight (the same Parameter, not a copy)."""
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("PersistentGradEmbedding supports neither max_norm, scale_grad_by_freq nor sparse")
        new = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                  _weight=embedding.weight, _freeze=not embedding.weight.requires_grad)
        new.weight = embedding.weight  # _weight= wraps the data in a new Parameter: keep the one the optimizer knows
        return new

    def forward(self, ids: Tensor) -> Tensor:
        if not (self.weight.requires_grad and torch.is_grad_enabled()):
            return super().forward(ids)
        return _Lookup.apply(ids, self.weight, self)

    @torch.no_grad()
    def add_to_grad(self, ids: Tensor, grad: Tensor) -> None:
        """weight.grad[ids] += grad, rows of ids repeated added up, the padding row left out."""
        if self.padding_idx is not None:
            keep = ids != self.padding_idx
            ids, grad = ids[keep], grad[keep]
        if self.weight.grad is None:  # the first backward since the gradient was cleared: hand over the buffer
            buffer = getattr(self, "_grad_buffer", None)
            if buffer is None or buffer.shape != self.weight.shape or buffer.dtype != self.weight.dtype \
                    or buffer.device != self.weight.device:
                buffer = self._grad_buffer = torch.zeros_like(self.weight)
            else:
                # All of it, not only the rows this module touched: a tied decoder adds its gradient into
                # weight.grad too, into every row, when its backward runs after this one.
                buffer.zero_()
            self.weight.grad = buffer
        self.weight.grad.index_add_(0, ids, grad.to(self.weight.grad.dtype))

def keep_embedding_gradients(model: nn.Module) -> None:
    """Swap each trainable nn.Embedding in `model` for a PersistentGradEmbedding with the same weight.
    A table shared by two modules (the masked-LM decoder's tie) gets one replacement, shared alike."""
    replacements: dict[nn.Embedding, PersistentGradEmbedding] = {}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Embedding and child.weight.requires_grad:
                if child not in replacements:
                    replacements[child] = PersistentGradEmbedding.replacing(child)
                setattr(module, name, replacements[child])
