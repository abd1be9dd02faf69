"""Dropout with a fast random mask on the CPU; torch's own dropout everywhere else.

Dropout is the same math in both: keep each entry with probability 1 - p and scale what is kept by
1 / (1 - p), so that the expected output is the input. Only the random draw differs. On the CPU,
torch draws the mask with `bernoulli_`, which asks its generator for one number per entry: in a LoRA
training step of MiniLM on 2 cores that draw was 18% of the step's time (torch.profiler over
benchmarks/bench_lora.py's batches), most of it for the (B, H, T, T) attention probabilities. Here the
generator fills 64 bits at a time (`torch.randint` over the whole int64 range), and each 64-bit number
gives two 32-bit uniforms: the same Bernoulli(1 - p) decision per entry, p resolved to 2**-32 (float32
`torch.rand` resolves it to 2**-24), at about 2.5x the speed of the mask torch draws, backward included.
The mask is kept as bool for backward, one byte per entry, as torch keeps its own.

On CUDA, torch's dropout draws from Philox in the kernel itself and is already fast: it is used as it is.
The masks differ from torch's for the same seed (a different draw), so a run is reproducible against
itself, not mask-for-mask against transformers; evaluation (no dropout) is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(shape: torch.Size, p: float, device: torch.device | None = None) -> Tensor:
    """bool of `shape`, True with probability 1 - p, independently per entry, from torch's generator."""
    numel = shape.numel()
    halves = torch.randint(-2**63, 2**63 - 1, ((numel + 1) // 2,), dtype=torch.int64, device=device)
    uniform32 = halves.view(torch.int32)[:numel]  # each int64 is two uniform int32s: (2 * ceil(numel / 2),) -> (numel,)
    return (uniform32 >= -2**31 + round(p * 2**32)).view(shape)  # P(keep) = 1 - round(p * 2**32) / 2**32


class _MaskedScale(torch.autograd.Function):
    """x * keep / (1 - p), with the bool mask saved for backward (gradients flow only through kept entries)."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0.0), None, None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training), with the fast mask on the CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:  # torch's kernels elsewhere; p = 1 drops everything (no 1 / 0 scale)
        return F.dropout(x, p, training=True)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout with minibert's dropout(): the same module, p and train/eval behaviour."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
