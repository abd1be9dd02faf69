"""Tests of the Triton FlashAttention kernels against a plain PyTorch attention.

On a machine without a GPU they run through Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported), which is slow: shapes stay tiny. Accuracy follows FlashAttention's convention:
measured against a float64 reference, the kernel's error in a dtype may be at most twice that of a
plain PyTorch attention computed in the same dtype (plus a tiny absolute epsilon for float32, whose
plain error can be ~1e-7).

    TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py -q
"""

import math
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minibert.kernels import NO_DEVICE_MESSAGE, flash_attention, triton_available  # noqa: E402
from minibert.kernels.flash_attention import (  # noqa: E402
    _PER_CALL_INTS,
    _draw_seed,
    _keep_entry,
    _on_tensors_device,
    _sequence,
    _to_unpadded,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# absolute slack on top of the 2x budget, by dtype
BUDGET_ATOL = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# ----------------------------------------------------------------------------- the dropout mask, for the tests
# The kernels draw their dropout decisions from _keep_entry (Philox on the entry's index) and never store
# them; this kernel writes the same decisions out, so that a test can apply them in a plain attention.


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _dropout_mask_kernel(
    KEEP, CU_SEQLENS, stride_kb, stride_kh, stride_km, total_tokens, max_seqlen, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the keep-flags the attention kernels use. Grid (query blocks, batch, heads)."""
    batch = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _sequence(CU_SEQLENS, batch)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    KEEP += batch.to(tl.int64) * stride_kb + head * stride_kh
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _keep_entry(seed, head, seq_start + rows[:, None], cols[None, :], total_tokens, max_seqlen, dropout_p)
        inside = (rows < seqlen)[:, None] & (cols < seqlen)[None, :]
        tl.store(KEEP + rows[:, None] * stride_km + cols[None, :], keep.to(tl.int8), mask=inside)


def dropout_keep_mask(q, *, cu_seqlens=None, max_seqlen=None, dropout_p, generator=None):
    """The keep-mask flash_attention(q, ..., dropout_p=dropout_p) uses when called with the
    generator in the same state (draw the mask, reset the seed, call the attention).

    q as for flash_attention (only its shape and device are used). Returns bool
    (batch, heads, max_seqlen, max_seqlen), True where an attention probability is kept; entry
    [b, h, i, j] is query i and key j of sequence b, False outside the sequence.
    """
    if not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in (0, 1), got {dropout_p}")
    q, _, _, cu_seqlens, max_seqlen, _ = _to_unpadded(q, q, q, cu_seqlens, max_seqlen, None)  # q: (total, nh, hs)
    total_tokens, heads, _ = q.shape
    batch = cu_seqlens.numel() - 1
    keep = torch.zeros((batch, heads, max_seqlen, max_seqlen), dtype=torch.int8, device=q.device)
    seed = _draw_seed(dropout_p, generator)
    block = 32
    with _on_tensors_device(q):
        _dropout_mask_kernel[(triton.cdiv(max_seqlen, block), batch, heads)](
            keep, cu_seqlens, keep.stride(0), keep.stride(1), keep.stride(2), total_tokens, max_seqlen,
            float(dropout_p), seed, BLOCK_M=block, BLOCK_N=block,
        )
    return keep.bool()


def attention_reference(q, k, v, cu_seqlens=None, key_padding_mask=None, dropout_mask=None, dropout_p=0.0,
                        softmax_scale=None):
    """Plain attention in q's dtype, one matmul / softmax / matmul, in either layout.

    dropout_mask: bool (batch, heads, max_seqlen, max_seqlen), True where a probability is kept;
    kept ones are scaled by 1 / (1 - dropout_p).
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def one_batch(q, k, v, key_mask, keep):  # q, k, v: (B, S, nh, hs)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, nh, S, S)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        if keep is not None:
            probs = probs * keep / (1.0 - dropout_p)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, S, nh, hs)

    if cu_seqlens is None:
        keep = None if dropout_mask is None else dropout_mask.to(q.dtype)
        return one_batch(q, k, v, key_padding_mask, keep)
    outs = []
    for b, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        n = end - start
        keep = None if dropout_mask is None else dropout_mask[b : b + 1, :, :n, :n].to(q.dtype)
        outs.append(one_batch(q[None, start:end], k[None, start:end], v[None, start:end], None, keep)[0])
    return torch.cat(outs)  # (total_tokens, nh, hs)


def random_qkv(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def assert_within_budget(what, kernel, plain, exact):
    """kernel's error vs float64 at most 2x plain PyTorch's error in the same dtype."""
    kernel_error = (kernel.double() - exact).abs().max().item()
    plain_error = (plain.double() - exact).abs().max().item()
    budget = 2 * plain_error + BUDGET_ATOL[kernel.dtype]
    assert kernel_error <= budget, (
        f"{what}: kernel error {kernel_error:.3g} > budget {budget:.3g} (plain PyTorch {plain_error:.3g})"
    )


def check_forward_backward(q, k, v, dropout_mask=None, dropout_p=0.0, **layout):
    """Compares output and q, k, v gradients of the kernel (already run with the mask drawn from
    the seed) with the plain attention in q's dtype and in float64."""
    torch.manual_seed(1234)
    out = flash_attention(q, k, v, dropout_p=dropout_p, **layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    reference_layout = {name: layout[name] for name in ("cu_seqlens", "key_padding_mask") if name in layout}
    plain = attention_reference(q, k, v, dropout_mask=dropout_mask, dropout_p=dropout_p, **reference_layout)
    plain_grads = torch.autograd.grad(plain, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = attention_reference(q64, k64, v64, dropout_mask=dropout_mask, dropout_p=dropout_p, **reference_layout)
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), grad_out.double())

    assert_within_budget("out", out, plain, exact)
    for name, grad, plain_grad, exact_grad in zip("qkv", grads, plain_grads, exact_grads):
        assert_within_budget(f"d{name}", grad, plain_grad, exact_grad)


# ----------------------------------------------------------------------------------------------
# correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_varlen_matches_reference(dtype, head_dim):
    cu_seqlens = torch.tensor([0, 13, 14, 21], dtype=torch.int32, device=DEVICE)  # lengths 13, 1, 7
    q, k, v = random_qkv((21, 2, head_dim), dtype)
    check_forward_backward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_with_random_padding(dtype):
    batch, seqlen = 3, 11
    generator = torch.Generator().manual_seed(3)
    key_padding_mask = torch.rand(batch, seqlen, generator=generator) > 0.3  # holes anywhere, not only at the end
    key_padding_mask[:, 0] = True  # every row keeps a key: the plain reference would give NaN otherwise
    key_padding_mask[1, 1:] = False  # one sequence of a single real token
    q, k, v = random_qkv((batch, seqlen, 2, 32), dtype)
    check_forward_backward(q, k, v, key_padding_mask=key_padding_mask.to(DEVICE))


def test_padded_without_mask_and_batch_of_one():
    q, k, v = random_qkv((1, 9, 2, 32), torch.float32)
    check_forward_backward(q, k, v)


def test_single_token_sequences():
    q, k, v = random_qkv((3, 2, 32), torch.float32)
    cu_seqlens = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    check_forward_backward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=1)
    # with one key the output is exactly v
    torch.testing.assert_close(flash_attention(q, k, v, cu_seqlens=cu_seqlens), v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dim_128(dtype):
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    q, k, v = random_qkv((12, 1, 128), dtype)
    check_forward_backward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=7)


def test_custom_softmax_scale():
    q, k, v = random_qkv((1, 6, 2, 32), torch.float32)
    out = flash_attention(q, k, v, softmax_scale=0.3)
    expected = attention_reference(q, k, v, softmax_scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_strided_inputs_and_stride_zero_gradient():
    """q, k, v sliced out of one packed qkv projection, and the expanded gradient of out.sum()."""
    qkv = torch.randn(10, 3, 2, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
    q, k, v = qkv.unbind(1)  # each (10, nh, hs) with token stride 3 * nh * hs
    cu_seqlens = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    flash_attention(q, k, v, cu_seqlens=cu_seqlens).sum().backward()
    qkv_ref = qkv.detach().double().requires_grad_()
    attention_reference(*qkv_ref.unbind(1), cu_seqlens=cu_seqlens).sum().backward()
    torch.testing.assert_close(qkv.grad.double(), qkv_ref.grad, rtol=1e-5, atol=1e-5)


def test_sequence_of_only_padding_is_finite():
    """A batch element with no real key: finite output and gradients, the others unaffected."""
    key_padding_mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    key_padding_mask[1] = False
    q, k, v = random_qkv((2, 5, 2, 32), torch.float32)
    out = flash_attention(q, k, v, key_padding_mask=key_padding_mask)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    expected = attention_reference(q[:1], k[:1], v[:1])
    torch.testing.assert_close(out[:1], expected, rtol=1e-5, atol=1e-6)
    assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()  # padding keys and values get no gradient


# ----------------------------------------------------------------------------------------------
# dropout


def test_dropout_forward_and_backward_use_the_regenerated_mask():
    """The mask drawn for a seed explains both the output and all three gradients, so forward and
    backward drew the same mask."""
    cu_seqlens = torch.tensor([0, 13, 14, 21], dtype=torch.int32, device=DEVICE)
    q, k, v = random_qkv((21, 2, 32), torch.float32)
    torch.manual_seed(1234)  # the seed check_forward_backward runs the kernel with
    keep = dropout_keep_mask(q, cu_seqlens=cu_seqlens, max_seqlen=13, dropout_p=0.3)
    assert keep.shape == (3, 2, 13, 13)
    assert not keep[1, :, 1:].any() and not keep[1, :, :, 1:].any()  # nothing outside the 1-token sequence
    check_forward_backward(q, k, v, dropout_mask=keep, dropout_p=0.3, cu_seqlens=cu_seqlens, max_seqlen=13)


def test_dropout_padded_layout_uses_the_regenerated_mask():
    key_padding_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3], device=DEVICE)
    q, k, v = random_qkv((2, 7, 2, 32), torch.float16)
    torch.manual_seed(1234)
    keep = dropout_keep_mask(q, dropout_p=0.2)
    check_forward_backward(q, k, v, dropout_mask=keep, dropout_p=0.2, key_padding_mask=key_padding_mask)


def test_dropout_is_reproducible_from_the_torch_seed():
    q, k, v = random_qkv((2, 8, 2, 32), torch.float32)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(flash_attention(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # an explicit generator is used instead of the global one, and gives the same stream
    state = torch.get_rng_state()
    out_generator = flash_attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out_generator, outs[0])


def test_dropout_kept_fraction():
    q = torch.empty(2, 64, 2, 32, device=DEVICE)
    keep = dropout_keep_mask(q, dropout_p=0.25)  # (2, 2, 64, 64): 16384 draws, std of the mean 0.0034
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    assert not torch.equal(keep[:, 0], keep[:, 1])  # heads draw different masks
    assert abs(keep[..., 0::2].float().mean().item() - keep[..., 1::2].float().mean().item()) < 0.03


def test_no_dropout_leaves_the_generator_alone():
    q, k, v = random_qkv((1, 4, 1, 32), torch.float32)
    state = torch.get_rng_state()
    flash_attention(q, k, v)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------------------------
# errors


def test_unsupported_head_dim():
    q = torch.zeros(1, 4, 2, 48, device=DEVICE)
    with pytest.raises(ValueError, match=r"head_dim 48.*\(32, 64, 128\)"):
        flash_attention(q, q, q)


def test_unsupported_dtype():
    q = torch.zeros(1, 4, 2, 32, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="unsupported dtype torch.float64"):
        flash_attention(q, q, q)


def test_shape_and_layout_errors():
    q = torch.zeros(1, 4, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, q, q[:, :3])
    with pytest.raises(ValueError, match="same dtype"):
        flash_attention(q, q, q.half())
    with pytest.raises(ValueError, match="key_padding_mask must be bool of shape"):
        flash_attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        flash_attention(q[0], q[0], q[0])
    cu_seqlens = torch.tensor([0, 4], device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        flash_attention(q[0], q[0], q[0], cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, q, q, dropout_p=1.0)


def test_tensors_on_different_devices():
    q = torch.zeros(1, 4, 2, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, q, q.to("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_clear_error_without_gpu_or_interpreter(monkeypatch):
    # sys.modules: the package attribute minibert.kernels.flash_attention is the function
    monkeypatch.setattr(sys.modules["minibert.kernels.flash_attention"], "_INTERPRETED", False)
    q = torch.zeros(1, 4, 2, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set, but after the kernels were built without it
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 was set after minibert's Triton kernels were imported"):
        flash_attention(q, q, q)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        flash_attention(q, q, q)
    assert triton_available() == (False, NO_DEVICE_MESSAGE)
    assert "attn_impl='sdpa'" in NO_DEVICE_MESSAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU here")
def test_bfloat16_refused_in_the_interpreter():
    q = torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 gives wrong results"):
        flash_attention(q, q, q)


def test_triton_available_names_where_the_kernels_can_run(monkeypatch):
    """Each branch, whatever this machine has: a GPU, else the interpreter when TRITON_INTERPRET=1, else
    no (with the message that names the fix); without triton installed, no (naming the install)."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    available, reason = triton_available()
    assert available and "interpreter" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_available() == (False, NO_DEVICE_MESSAGE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "NVIDIA H200")
    assert triton_available() == (True, "CUDA device NVIDIA H200")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "triton" else find_spec(name, *args))
    available, reason = triton_available()
    assert not available and "pip install" in reason and reason != NO_DEVICE_MESSAGE


# ----------------------------------------------------------------------------------------------
# GPU only: bfloat16 and realistic shapes


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_varlen_odd_lengths(dtype, head_dim):
    cu_seqlens = torch.tensor([0, 113, 316, 317, 829], dtype=torch.int32, device=DEVICE)  # 113, 203, 1, 512
    q, k, v = random_qkv((829, 4, head_dim), dtype)
    check_forward_backward(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=512)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_padded_with_dropout(dtype):
    key_padding_mask = torch.arange(128, device=DEVICE)[None, :] < torch.tensor([[128], [77], [3]], device=DEVICE)
    q, k, v = random_qkv((3, 128, 12, 64), dtype)
    torch.manual_seed(1234)
    keep = dropout_keep_mask(q, dropout_p=0.1)
    check_forward_backward(q, k, v, dropout_mask=keep, dropout_p=0.1, key_padding_mask=key_padding_mask)
