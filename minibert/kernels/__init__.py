"""Fused GPU kernels for minibert, written in Triton (optional: pip install 'minibert[kernels]').

`triton_available()` says whether they can run here without importing triton, so a caller can
choose another attention backend up front; asking for a kernel without triton installed raises an
ImportError that says how to install it.
"""

import importlib.util
import os

import torch

NO_DEVICE_MESSAGE = (
    "the triton attention backend needs a CUDA GPU, or TRITON_INTERPRET=1 to run on the CPU through "
    "Triton's interpreter (slow); use attn_impl='sdpa' otherwise"
)
NO_TRITON_MESSAGE = "the triton attention backend needs triton: pip install 'minibert[kernels]'"


def triton_available() -> tuple[bool, str]:
    """(True, where the kernels will run) or (False, why they cannot run here)."""
    if importlib.util.find_spec("triton") is None:
        return False, NO_TRITON_MESSAGE
    if torch.cuda.is_available():
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "Triton's CPU interpreter (TRITON_INTERPRET=1), slow"
    return False, NO_DEVICE_MESSAGE


if importlib.util.find_spec("triton") is not None:
    # imported after the messages above, which the kernel module uses
    from minibert.kernels.flash_attention import dropout_mask_for_testing, flash_attention


def __getattr__(name):
    """Reached only for names not defined above: the kernels when triton is missing."""
    if name in ("flash_attention", "dropout_mask_for_testing"):
        raise ImportError(NO_TRITON_MESSAGE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NO_DEVICE_MESSAGE", "NO_TRITON_MESSAGE", "dropout_mask_for_testing", "flash_attention", "triton_available"]
