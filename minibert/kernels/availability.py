"""Whether the Triton kernels can run here, told without importing triton, and the messages that say why not.

A module of its own so that the kernels (which need triton) and the package's `__init__` (which must
import without it) both read the messages from below, without importing each other.
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
