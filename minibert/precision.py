"""Which number format a model runs in on a device, and why: one decision for prediction and training.

    precision = resolve_precision("auto", torch.device("cpu"))   # Precision("bf16", "auto: this CPU has AMX tiles, ...")
    with autocast(precision.name, device):
        logits = model(**batch).logits

The formats:
    fp32  full precision; the reference the others are measured against.
    bf16  bfloat16 matrix multiplies under torch.autocast (LayerNorm, softmax and the loss stay fp32).
          Fast where the hardware multiplies bf16 matrices natively: CUDA GPUs from Ampere on, and CPUs
          with AMX tiles (Intel Xeon from Sapphire Rapids on). AVX512-BF16 alone (Cooper Lake, some
          Xeons without AMX, AMD Zen 4) is native but no faster: on such a Xeon, torch 2.13's oneDNN ran
          2048x2048 bf16 matmuls at about 160 GFLOP/s against fp32's 280 (2 threads). Without either,
          torch emulates bf16, slower still.
    fp16  float16 under autocast, CUDA only (training also needs loss scaling, which the Trainer adds).
    int8  prediction only, on the CPU: 8-bit weights and activations for the matrix multiplies (ONNX
          Runtime's dynamic quantization, minibert/inference.py). For CPUs without native bf16.

"auto" picks bf16 where the device multiplies it faster than fp32 (a GPU with bf16 tensor cores, a CPU
with AMX) and fp32 elsewhere, and says which and why.
Training passes cpu_auto_bf16 (minibert.training.CPU_AUTO_BF16): whether its auto takes bf16 on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # one of PRECISIONS
    reason: str  # why, in words a log line can show


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AMX tiles (Sapphire Rapids and later) or
    AVX512-BF16 (Cooper Lake, Zen 4). Without either, oneDNN converts bf16 to fp32 and back, and bf16
    runs slower than fp32. (torch has no public API for this; these two private probes are what its
    own CPU tests use, and have been stable since torch 2.0.)"""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def _bf16_pays(device: torch.device) -> tuple[bool, str]:
    """Whether bf16 matrix products run faster than fp32 on `device`, and why (a log line's words)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"the GPU ({torch.cuda.get_device_name(device)}) has bf16 tensor cores"
        return False, f"the GPU ({torch.cuda.get_device_name(device)}) has no native bf16"
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return True, "this CPU has AMX tiles, which multiply bf16 matrices several times faster than fp32"
        if torch.cpu._is_avx512_bf16_supported():
            # native, but measured slower than fp32 (the module docstring): only AMX makes bf16 pay on a CPU
            return False, "this CPU has AVX512-BF16 but no AMX, and multiplies bf16 matrices no faster than fp32"
        return False, "this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated (slower than fp32)"
    return False, f"bf16 speed on {device.type} is unknown"


def resolve_precision(requested: str, device: torch.device, *, choices: tuple[str, ...] = PRECISIONS,
                      cpu_auto_bf16: bool = True) -> Precision:
    """A concrete precision for `requested` ("auto" or one of `choices`) on `device`, with the reason.

    "auto" is bf16 where the device multiplies bf16 faster than fp32 (a GPU with bf16 tensor cores; with
    cpu_auto_bf16, a CPU with AMX), else fp32. Training passes its CPU_AUTO_BF16 (False:
    bf16 fine-tuning on the CPU has not been shown to keep fp32's accuracy yet), while bf16 prediction
    agrees with fp32 on over 98% of examples (tests/test_inference.py). A precision the device cannot
    run is a one-line error that names the one to use."""
    if requested not in ("auto", *choices):
        raise ValueError(f"precision {requested!r} is unknown; choose auto or one of {', '.join(choices)}")
    if requested == "auto":
        faster, why = _bf16_pays(device)
        if device.type == "cpu" and not cpu_auto_bf16:
            return Precision("fp32", "auto: fp32 for training on the CPU (bf16 training is not the CPU default yet)")
        return Precision("bf16", f"auto: {why}") if faster else Precision("fp32", f"auto: fp32, as {why}")
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if requested == "int8" and device.type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only; on {device.type} use bf16 (or fp16), or pass device='cpu'")
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 support; use fp16 or fp32")
    return Precision(requested, "as requested")


def autocast(precision: str, device: torch.device):
    """The autocast context for `precision`: bf16/fp16 matrix multiplies, or nothing for fp32 and int8
    (int8 models carry their precision in their quantized layers)."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()
