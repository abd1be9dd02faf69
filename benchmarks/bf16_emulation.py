"""bf16 training's numbers at fp32's speed, on a CPU without native bf16: for measuring accuracy only.

On a CPU without AMX or AVX512-BF16, torch's bf16 matrix multiply is a scalar fallback, 5-12x slower
than fp32, so fine-tuning in bf16 autocast takes hours. What a native bf16 GEMM computes (AMX's
TDPBF16PS, AVX512-BF16's VDPBF16PS, through oneDNN) is: bf16 inputs, products exact, sums in fp32, the
result rounded once to bf16. An fp32 GEMM on the same bf16 inputs computes that too: a product of two
bf16 numbers (8-bit significands) is exact in fp32 (24 bits), so only the order of the fp32 sums
differs, as it does between two native kernels that block the matrices differently.

`EmulatedBf16Linear` is a TorchFunctionMode: inside torch.autocast(bfloat16) it runs each F.linear
(every nn.Linear: all of BERT's matrix products but attention's own) as an fp32 GEMM on bf16-rounded
input, weight and bias, and rounds the result to bf16, which is what autocast hands on. Autograd goes
through the roundings, so the backward GEMMs get bf16 gradients and give bf16-rounded results, as under
autocast. Every other operation is autocast's own, in the dtypes autocast gives it.

`self_check()` measures the claim on one GEMM of MiniLM's shape: the share of outputs that differ from
the correctly rounded result (float64, then bf16), for this emulation and for torch's own bf16 kernel.
Timings taken under the emulation are not bf16 timings: only accuracies are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _bf16_rounded(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.bfloat16).float()


class EmulatedBf16Linear(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            x, weight, *rest = args
            bias = rest[0] if rest else kwargs.get("bias")
            with torch.autocast("cpu", enabled=False):
                out = F.linear(_bf16_rounded(x), _bf16_rounded(weight), _bf16_rounded(bias))
            return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def self_check(seed: int = 0) -> dict:
    """Share of outputs of an (826 x 384) @ (384 x 1536) bf16 GEMM, and of its weight-gradient GEMM,
    that are not the correctly rounded result: this emulation against torch's own bf16 kernel."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(826, 384, generator=g).bfloat16(), torch.randn(1536, 384, generator=g).bfloat16()
    grad = torch.randn(826, 1536, generator=g).bfloat16()
    result = {}
    for name, a, b in (("forward", x, w.T), ("weight gradient", grad.T, x)):
        exact = (a.double() @ b.double()).bfloat16()
        result[name] = {"torch_bf16_mismatch_share": float((a @ b != exact).float().mean()),
                        "emulation_mismatch_share": float(((a.float() @ b.float()).bfloat16() != exact).float().mean())}
    return result
