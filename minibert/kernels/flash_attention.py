"""FlashAttention in Triton for BERT's bidirectional (non-causal) self-attention, forward and backward.

For each block of queries the forward pass streams over the blocks of keys and values of the same
sequence and keeps, per query row, a running maximum m, a running sum l of exp(s - m) and an
unnormalised output acc; when a new block raises the maximum, l and acc are rescaled by
exp(m_old - m_new). The (seqlen x seqlen) score matrix never reaches memory. The forward pass saves
only the output and the row log-sum-exp; the backward pass recomputes the probabilities from them,
block by block, with delta = rowsum(dO * O) standing in for rowsum(P * dP):

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)        dQ = dS K        dK = dS^T Q

Two backward kernels avoid atomics: one owns a block of keys and loops over the queries (dK, dV),
the other owns a block of queries and loops over the keys (dQ).

Layouts. The kernels work on the varlen ("unpadded") layout: tokens of all sequences packed into
(total_tokens, heads, head_dim) with cu_seqlens (batch + 1,) giving where each sequence starts. The
padded layout (batch, seqlen, heads, head_dim) is the special case of equal lengths, plus a
per-token flag that removes padding keys.

Dropout drops entries of the normalised probabilities (scaled by 1 / (1 - p), as torch does). The
keep/drop decision for entry (head, query token, key) comes from Philox, a counter-based generator:
one seed per call, drawn from torch's generator, and the entry's index as counter. The backward pass
recomputes the same decisions instead of storing a mask. With dropout, the P of dV = P^T dO is the
dropped and rescaled one, dP is dropped and rescaled the same way, and delta = rowsum(dO * O) holds.

Credits: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning"
(2023) and his flash_attn_triton.py; the Triton tutorial 06-fused-attention.py (Tillet et al.).

Limitations:
- self-attention only: queries and keys share the sequence lengths; no causal mask, no additive
  attention bias, no grouped-query attention (q, k, v have the same number of heads).
- head_dim 32, 64 or 128; dtypes float16, bfloat16, float32 (float32 dot products run in IEEE
  float32, not TF32: accurate but several times slower than the 16-bit path).
- cu_seqlens and max_seqlen are trusted, not checked against the tensors (that needs a device
  sync): cu_seqlens[-1] must equal total_tokens and max_seqlen must be at least every length.
- Triton's CPU interpreter (TRITON_INTERPRET=1) computes bfloat16 dot products wrongly, so bfloat16
  is refused there; it is also slow, for tests only.
- one fixed block configuration per (head_dim, dtype), after the tutorial's choices for Hopper-class
  GPUs, not autotuned (autotuning fails in the interpreter).
- the padded layout merges (batch, seqlen) into tokens: a view for the usual layouts, a copy when
  q, k, v are strided so that the two dimensions cannot merge (e.g. transposed from (B, nh, S, hs)).
"""

import contextlib
import math
import os

import torch

from minibert.kernels.availability import NO_DEVICE_MESSAGE, NO_TRITON_MESSAGE

try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError(NO_TRITON_MESSAGE) from error

# Triton reads TRITON_INTERPRET once, when @triton.jit decorates the kernels below; setting it later
# does not turn the interpreter on, so remember what these kernels were built for.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are pre-multiplied by log2(e)


# Integers that change from call to call (the batch's token count and longest sequence, a fresh dropout seed):
# Triton would otherwise compile a kernel variant for each "equals 1 / divisible by 16" pattern they show,
# several seconds each, in the middle of a run.
_PER_CALL_INTS = ["total_tokens", "max_seqlen", "seed"]


@triton.jit
def _keep_entry(seed, head, tokens, cols, total_tokens, max_seqlen, dropout_p):
    """Dropout keep-flags of one head for a tile, tokens and cols broadcasting to its shape.

    tokens are global query-token indices, cols key positions inside the sequence; the Philox
    counter (head, token, col) is unique per attention entry, in int64 because it can pass 2**31.
    Passing (rows[:, None], cols[None, :]) or the transpose gives the same flags, transposed.
    """
    row = head.to(tl.int64) * total_tokens + tokens.to(tl.int64)
    return tl.rand(seed, row * max_seqlen + cols) >= dropout_p


@triton.jit
def _sequence(CU_SEQLENS, batch):
    """(first token, length) of packed sequence `batch`."""
    seq_start = tl.load(CU_SEQLENS + batch)
    return seq_start, tl.load(CU_SEQLENS + batch + 1) - seq_start


@triton.jit
def _at(X, seq_start, head, stride_t, stride_h):
    """X moved to the first token of a sequence in one head. int64: total_tokens * stride can pass 2**31
    on long packed batches."""
    return X + seq_start.to(tl.int64) * stride_t + head * stride_h


@triton.jit
def _key_valid(KEY_VALID, seq_start, cols, seqlen, HAS_KEY_MASK: tl.constexpr):
    """(len(cols),) True for keys that exist and are not padding."""
    valid = cols < seqlen
    if HAS_KEY_MASK:
        valid &= tl.load(KEY_VALID + seq_start + cols, mask=valid, other=0) != 0
    return valid


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _forward_kernel(
    Q, K, V, O, LSE, CU_SEQLENS, KEY_VALID,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    total_tokens, max_seqlen, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M queries of one (sequence, head). Grid (query blocks, batch, heads)."""
    block_m = tl.program_id(0)
    batch = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _sequence(CU_SEQLENS, batch)
    if block_m * BLOCK_M >= seqlen:  # the grid is sized for the longest sequence
        return

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_in_block = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_valid = rows < seqlen
    Q = _at(Q, seq_start, head, stride_qt, stride_qh)
    K = _at(K, seq_start, head, stride_kt, stride_kh)
    V = _at(V, seq_start, head, stride_vt, stride_vh)
    q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=row_valid[:, None], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + cols_in_block
        col_valid = _key_valid(KEY_VALID, seq_start, cols, seqlen, HAS_KEY_MASK)
        k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=(cols < seqlen)[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=(cols < seqlen)[:, None], other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        # a row that has seen only masked keys keeps max -inf; shift by 0 there so that
        # exp2(-inf - -inf) never makes a NaN (its p and rescale factor are then exactly 0)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(scores - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)  # normalise with every key, dropped or not
        if HAS_DROPOUT:
            keep = _keep_entry(seed, head, seq_start + rows[:, None], cols[None, :],
                               total_tokens, max_seqlen, dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    # a row with no valid key at all (an all-padding sequence) gets output 0 and lse +inf, so the
    # backward pass recomputes p = exp2(s - inf) = 0 for it
    no_keys = row_sum == 0.0
    row_sum = tl.where(no_keys, 1.0, row_sum)
    out = acc / row_sum[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(no_keys, float("inf"), row_max + tl.math.log2(row_sum))  # in log2 units of scaled scores

    O = _at(O, seq_start, head, stride_ot, stride_oh)
    tl.store(O + rows[:, None] * stride_ot + dims[None, :], out.to(O.dtype.element_ty), mask=row_valid[:, None])
    tl.store(LSE + head.to(tl.int64) * total_tokens + seq_start + rows, lse, mask=row_valid)


@triton.jit(do_not_specialize=["total_tokens"])
def _backward_preprocess_kernel(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, total_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[head, token] = sum_d dO * O, which equals rowsum(P * dP). Grid (token blocks, heads)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    valid = (tokens < total_tokens)[:, None]
    tokens_64 = tokens[:, None].to(tl.int64)
    o = tl.load(O + tokens_64 * stride_ot + head * stride_oh + dims[None, :], mask=valid, other=0.0)
    do = tl.load(DO + tokens_64 * stride_dot + head * stride_doh + dims[None, :], mask=valid, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head.to(tl.int64) * total_tokens + tokens, delta, mask=tokens < total_tokens)


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _backward_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_VALID,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    total_tokens, max_seqlen, sm_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dK, dV for BLOCK_N keys of one (sequence, head), looping over all its queries.

    Works on the transposed tile (keys x queries) so that dV and dK come out of one dot each.
    Grid (key blocks, batch, heads).
    """
    block_n = tl.program_id(0)
    batch = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _sequence(CU_SEQLENS, batch)
    if block_n * BLOCK_N >= seqlen:
        return

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in_block = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    col_in_seq = (cols < seqlen)[:, None]
    col_valid = _key_valid(KEY_VALID, seq_start, cols, seqlen, HAS_KEY_MASK)
    Q = _at(Q, seq_start, head, stride_qt, stride_qh)
    K = _at(K, seq_start, head, stride_kt, stride_kh)
    V = _at(V, seq_start, head, stride_vt, stride_vh)
    DO = _at(DO, seq_start, head, stride_dot, stride_doh)
    LSE += head.to(tl.int64) * total_tokens + seq_start
    DELTA += head.to(tl.int64) * total_tokens + seq_start
    k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=col_in_seq, other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=col_in_seq, other=0.0)

    keep_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        rows = start_m + rows_in_block
        row_in_seq = rows < seqlen
        q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=row_in_seq[:, None], other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + dims[None, :], mask=row_in_seq[:, None], other=0.0)
        # rows outside the sequence: lse +inf makes their p exactly 0
        lse = tl.load(LSE + rows, mask=row_in_seq, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=row_in_seq, other=0.0)

        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        # where after exp2, not -inf before: a padding key's score is finite and may overflow exp2,
        # which where() then discards
        p_t = tl.where(col_valid[:, None], tl.math.exp2(scores_t - lse[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dO V^T, transposed
        if HAS_DROPOUT:
            keep_t = _keep_entry(seed, head, seq_start + rows[None, :], cols[:, None],
                                 total_tokens, max_seqlen, dropout_p)
            p_dropped_t = tl.where(keep_t, p_t * keep_scale, 0.0)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            p_dropped_t = p_t
        dv += tl.dot(p_dropped_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= sm_scale  # scores were q.k * sm_scale
    DK = _at(DK, seq_start, head, stride_dkt, stride_dkh)
    DV = _at(DV, seq_start, head, stride_dvt, stride_dvh)
    tl.store(DK + cols[:, None] * stride_dkt + dims[None, :], dk.to(DK.dtype.element_ty), mask=col_in_seq)
    tl.store(DV + cols[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=col_in_seq)


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def _backward_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS, KEY_VALID,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    total_tokens, max_seqlen, sm_scale, qk_scale, dropout_p, seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dQ for BLOCK_M queries of one (sequence, head), looping over all its keys.

    Grid (query blocks, batch, heads).
    """
    block_m = tl.program_id(0)
    batch = tl.program_id(1)
    head = tl.program_id(2)
    seq_start, seqlen = _sequence(CU_SEQLENS, batch)
    if block_m * BLOCK_M >= seqlen:
        return

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_in_block = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_in_seq = rows < seqlen
    Q = _at(Q, seq_start, head, stride_qt, stride_qh)
    K = _at(K, seq_start, head, stride_kt, stride_kh)
    V = _at(V, seq_start, head, stride_vt, stride_vh)
    DO = _at(DO, seq_start, head, stride_dot, stride_doh)
    q = tl.load(Q + rows[:, None] * stride_qt + dims[None, :], mask=row_in_seq[:, None], other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + dims[None, :], mask=row_in_seq[:, None], other=0.0)
    LSE += head.to(tl.int64) * total_tokens + seq_start
    DELTA += head.to(tl.int64) * total_tokens + seq_start
    lse = tl.load(LSE + rows, mask=row_in_seq, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=row_in_seq, other=0.0)

    keep_scale = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        cols = start_n + cols_in_block
        col_valid = _key_valid(KEY_VALID, seq_start, cols, seqlen, HAS_KEY_MASK)
        k = tl.load(K + cols[:, None] * stride_kt + dims[None, :], mask=(cols < seqlen)[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + dims[None, :], mask=(cols < seqlen)[:, None], other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.where(col_valid[None, :], tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _keep_entry(seed, head, seq_start + rows[:, None], cols[None, :],
                               total_tokens, max_seqlen, dropout_p)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq *= sm_scale
    DQ = _at(DQ, seq_start, head, stride_dqt, stride_dqh)
    tl.store(DQ + rows[:, None] * stride_dqt + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_in_seq[:, None])


# ----------------------------------------------------------------------------------------------
# launchers


def _forward_config(head_dim, dtype):
    """Block sizes for the forward kernel. 16-bit: the tutorial's Hopper choice (128 x 64 tiles);
    float32 tiles take twice the shared memory and registers, so they are halved."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=3)


def _backward_config(head_dim, dtype):
    """Block sizes for both backward kernels: they hold more tiles live (q, k, v, dO, two
    accumulators), so smaller tiles than the forward pass."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _dot_precision(dtype):
    # float32 dot defaults to TF32 (10-bit mantissa) on NVIDIA GPUs; ask for real float32
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_unpadded(q, k, v, cu_seqlens, max_seqlen, key_valid):
    """The preconditions every launcher relies on; flash_attention() checks them with friendlier
    messages, these guard direct use of the launchers."""
    assert q.dim() == 3 and q.shape == k.shape == v.shape, "q, k, v must be (total_tokens, heads, head_dim)"
    assert q.dtype == k.dtype == v.dtype and q.dtype in SUPPORTED_DTYPES
    assert q.shape[-1] in SUPPORTED_HEAD_DIMS
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "the kernels assume contiguous head_dim"
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
    assert all(t.device == q.device for t in (k, v, cu_seqlens))
    assert max_seqlen >= 1
    assert key_valid is None or (key_valid.shape == q.shape[:1] and key_valid.dtype == torch.uint8)


def _on_tensors_device(q):
    """Triton launches on the current CUDA device, which must be the tensors' device."""
    return torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()


def _attention_forward(q, k, v, cu_seqlens, max_seqlen, key_valid, dropout_p, softmax_scale, seed):
    """q, k, v: (total_tokens, heads, head_dim). Returns out (same shape) and lse (heads, total_tokens)
    in float32, in log2 units of the scaled scores."""
    _check_unpadded(q, k, v, cu_seqlens, max_seqlen, key_valid)
    total_tokens, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((heads, total_tokens), device=q.device, dtype=torch.float32)
    config = _forward_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_seqlen, config["BLOCK_M"]), batch, heads)
    with _on_tensors_device(q):
        _forward_kernel[grid](
            q, k, v, out, lse, cu_seqlens, key_valid,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            total_tokens, max_seqlen, softmax_scale * _LOG2E, dropout_p, seed,
            HEAD_DIM=head_dim, HAS_KEY_MASK=key_valid is not None, HAS_DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=_dot_precision(q.dtype), **config,
        )
    return out, lse


def _attention_backward(do, q, k, v, out, lse, cu_seqlens, max_seqlen, key_valid, dropout_p, softmax_scale,
                        seed):
    """Returns dq, dk, dv, each (total_tokens, heads, head_dim) in q's dtype."""
    _check_unpadded(q, k, v, cu_seqlens, max_seqlen, key_valid)
    assert do.shape == q.shape and do.dtype == q.dtype and do.stride(-1) == 1
    total_tokens, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)  # (heads, total_tokens)
    config = _backward_config(head_dim, q.dtype)
    common = dict(
        HEAD_DIM=head_dim, HAS_KEY_MASK=key_valid is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype), **config,
    )
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
    )
    scalars = (total_tokens, max_seqlen, softmax_scale, softmax_scale * _LOG2E, dropout_p, seed)
    block_t = 64
    with _on_tensors_device(q):
        _backward_preprocess_kernel[(triton.cdiv(total_tokens, block_t), heads)](
            out, do, delta, out.stride(0), out.stride(1), do.stride(0), do.stride(1), total_tokens,
            HEAD_DIM=head_dim, BLOCK_T=block_t,
        )
        _backward_dkdv_kernel[(triton.cdiv(max_seqlen, config["BLOCK_N"]), batch, heads)](
            q, k, v, do, dk, dv, lse, delta, cu_seqlens, key_valid,
            *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scalars, **common,
        )
        _backward_dq_kernel[(triton.cdiv(max_seqlen, config["BLOCK_M"]), batch, heads)](
            q, k, v, do, dq, lse, delta, cu_seqlens, key_valid,
            *strides, dq.stride(0), dq.stride(1), *scalars, **common,
        )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Autograd over the varlen layout; flash_attention() maps the padded layout onto it."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, key_valid, dropout_p, softmax_scale, seed):
        out, lse = _attention_forward(q, k, v, cu_seqlens, max_seqlen, key_valid, dropout_p, softmax_scale, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, key_valid)
        ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale, ctx.seed = max_seqlen, dropout_p, softmax_scale, seed
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_seqlens, key_valid = ctx.saved_tensors
        if do.stride(-1) != 1:  # e.g. the expanded gradient of out.sum() has stride 0
            do = do.contiguous()
        dq, dk, dv = _attention_backward(
            do, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, key_valid,
            ctx.dropout_p, ctx.softmax_scale, ctx.seed,
        )
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# public API


def _draw_seed(dropout_p, generator):
    """One Philox seed per call from torch's generator, so torch.manual_seed reproduces the mask."""
    if dropout_p == 0.0:
        return 0  # no draw: like torch's dropout, p = 0 leaves the generator's state alone
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**31 - 1, (), generator=generator, device=device))


def _to_unpadded(q, k, v, cu_seqlens, max_seqlen, key_padding_mask):
    """Validates the inputs and maps either layout to the varlen one the kernels use.

    Returns q, k, v as (total_tokens, heads, head_dim), cu_seqlens (batch + 1,) int32, max_seqlen,
    and key_valid: None or (total_tokens,) uint8, 1 for a real key.
    """
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("q, k, v must be torch tensors")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; the triton attention supports {SUPPORTED_DTYPES}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"unsupported head_dim {q.shape[-1]}; the triton attention supports {SUPPORTED_HEAD_DIMS}")
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "key_padding_mask": key_padding_mask}
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if q.device.type == "cpu" and not _INTERPRETED:
        if os.environ.get("TRITON_INTERPRET") == "1":  # set now, but not when the kernels were built (see above)
            raise RuntimeError("TRITON_INTERPRET=1 was set after minibert's Triton kernels were imported, and Triton "
                               "reads it only then: set it before Python starts (TRITON_INTERPRET=1 python ...)")
        raise RuntimeError(NO_DEVICE_MESSAGE)
    if q.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton attention runs on CUDA devices, got {q.device}")
    if _INTERPRETED and q.dtype == torch.bfloat16:
        raise ValueError(
            "bfloat16 gives wrong results in Triton's interpreter (TRITON_INTERPRET=1); use float16 or float32"
        )

    if cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(
                f"with cu_seqlens, q, k, v must be (total_tokens, heads, head_dim), got {tuple(q.shape)}"
            )
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask is for the padded layout; the varlen layout has no padding")
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be int32 of shape (batch + 1,), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a device sync; pass it to avoid
        return q, k, v, cu_seqlens, max_seqlen, None

    if q.dim() != 4:
        raise ValueError(
            "q, k, v must be (batch, seqlen, heads, head_dim), or (total_tokens, heads, head_dim) with "
            f"cu_seqlens; got {tuple(q.shape)}"
        )
    if max_seqlen is not None:
        raise ValueError("max_seqlen is for the varlen layout (with cu_seqlens); the padded layout has seqlen")
    batch, seqlen, heads, head_dim = q.shape
    # equal-length sequences, one after the other: the varlen layout with cu_seqlens 0, S, 2S, ...
    cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=q.device)  # (batch + 1,)
    q, k, v = (t.reshape(batch * seqlen, heads, head_dim) for t in (q, k, v))  # (B*S, nh, hs), a view if possible
    key_valid = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (batch, seqlen) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be bool of shape (batch, seqlen) = {(batch, seqlen)}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        key_valid = key_padding_mask.reshape(batch * seqlen).contiguous().view(torch.uint8)  # (B*S,), no copy
    return q, k, v, cu_seqlens, seqlen, key_valid


def flash_attention(q, k, v, *, cu_seqlens=None, max_seqlen=None, key_padding_mask=None,
                    dropout_p=0.0, softmax_scale=None, generator=None):
    """Bidirectional softmax(q k^T * scale) v, fused, differentiable in q, k, v.

    Varlen layout: q, k, v (total_tokens, heads, head_dim) with cu_seqlens int32 (batch + 1,), the
    start of each sequence (e.g. [0, 3, 5]), and max_seqlen the longest length (computed with a
    device sync if omitted). Each sequence attends only within itself.
    Padded layout: q, k, v (batch, seqlen, heads, head_dim) and an optional key_padding_mask bool
    (batch, seqlen), True for a real token; padding keys get no weight. Output rows at padding
    queries are finite but meaningless.

    dropout_p drops attention probabilities (kept ones scaled by 1 / (1 - p)) with a seed drawn from
    generator, or torch's default generator. softmax_scale defaults to 1 / sqrt(head_dim).
    Returns a tensor of q's shape and dtype.
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    shape = q.shape
    q, k, v, cu_seqlens, max_seqlen, key_valid = _to_unpadded(q, k, v, cu_seqlens, max_seqlen, key_padding_mask)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    seed = _draw_seed(dropout_p, generator)
    out = _FlashAttention.apply(
        q, k, v, cu_seqlens, max_seqlen, key_valid, float(dropout_p), float(softmax_scale), seed
    )
    return out.view(shape)  # back to the caller's layout
