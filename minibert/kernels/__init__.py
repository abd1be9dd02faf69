"""Fused GPU kernels for minibert, written in Triton (optional: pip install 'minibert[kernels]').

`triton_available()` says whether they can run here without importing triton, so a caller can
choose another attention backend up front; asking for a kernel without triton installed raises an
ImportError that says how to install it.
"""

import importlib.util

from minibert.kernels.availability import NO_DEVICE_MESSAGE, NO_TRITON_MESSAGE, triton_available

if importlib.util.find_spec("triton") is not None:
    from minibert.kernels.flash_attention import flash_attention


def __getattr__(name):
    """Reached only for names not defined above: the kernels when triton is missing."""
    if name == "flash_attention":
        raise ImportError(NO_TRITON_MESSAGE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NO_DEVICE_MESSAGE", "NO_TRITON_MESSAGE", "flash_attention", "triton_available"]
