"""Flash attention backward kernels (FlashAttention-2): delta = rowsum(o * do), then dk/dv and dq.

A fused kernel computes delta; the dk/dv kernel holds a key block and computes in the transposed layout
(s^T = k q^T, so p^T and ds^T feed dv and dk with no transpose of a computed block); the dq kernel holds a query
block. Both recompute the probabilities from the forward's saved logsumexp, with q scaled and rounded exactly as the
forward's, and skip the mask arithmetic on blocks every query sees whole, as the forward does. Separate autotuned
tiles; no atomics, so it is deterministic by construction.
Credits: Dao, "FlashAttention-2" (2023).
"""

import triton
import triton.language as tl

from .attention_common import _descriptor, _key_stretches, _load_rows, _row_keys, _visible, _visible_t
from .attention_configs import (_BWD_CONFIGS, _DEFAULT_DKDV, _QUICK_DKDV, _QUICK_DQ, _autotune, _keep_dkdv, _keep_dq,
                                _smem_dkdv, _smem_dq)


@triton.jit
def _attn_bwd_delta_kernel(
    o_ptr, do_ptr,  # [B, nh, T, hs] strided each
    delta_ptr,  # [B, nh, T] fp32 contiguous
    T, nh,
    stride_o_b, stride_o_h, stride_o_t,
    stride_do_b, stride_do_h, stride_do_t,
    HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(o * do) in fp32 (FlashAttention-2 eq. (4)), read once in the inputs' dtype."""
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)  # B * nh on the x axis (y stops at 65535)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HS)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + rows * stride_o_t + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + rows * stride_do_t + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [M]
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1,  # [N, D0], [N, D1B] fp32 each
                         k0, k1, v0, v1,  # this program's key block [N, D0], [N, D1B]
                         q0_desc, q1_desc, do0_desc, do1_desc, lse_row, delta_row,  # lse, delta: this row's [T]
                         offs_n, q_off, hi, start, scale_log2e, T, m_lo, m_hi,
                         D0: tl.constexpr, D1: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate over query blocks [m_lo, m_hi), in the transposed layout: s^T = k q^T [N, M]."""
    for m in range(m_lo, m_hi, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)  # [M]
        q0 = q0_desc.load([m, 0])  # [M, D0]
        q0s = (q0.to(tl.float32) * scale_log2e).to(q0.dtype)  # scaled and rounded exactly as the forward's q
        s_t = tl.dot(k0, tl.trans(q0s), input_precision=DOT_PRECISION)  # [N, M], log2 units
        if D1 > 0:
            q1 = q1_desc.load([m, D0])
            q1s = (q1.to(tl.float32) * scale_log2e).to(q1.dtype)
            s_t += tl.dot(k1, tl.trans(q1s), input_precision=DOT_PRECISION)
        lse = tl.load(lse_row + offs_m, mask=offs_m < T, other=0.0)  # [M]
        delta = tl.load(delta_row + offs_m, mask=offs_m < T, other=0.0)
        p_t = tl.exp2(s_t - lse[None, :])  # [N, M] probabilities, consistent with the forward's lse
        if MASKED:
            keep = _visible_t(offs_n, q_off + offs_m, hi, start, CAUSAL) & (offs_m < T)[None, :]
            p_t = tl.where(keep, p_t, 0.0)
        do0 = do0_desc.load([m, 0])  # [M, D0]
        dv0 += tl.dot(p_t.to(do0.dtype), do0, input_precision=DOT_PRECISION)  # [N, D0]
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PRECISION)  # [N, M]
        if D1 > 0:
            do1 = do1_desc.load([m, D0])
            dv1 += tl.dot(p_t.to(do1.dtype), do1, input_precision=DOT_PRECISION)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # [N, M] d(scores)^T, before the scale
        dk0 += tl.dot(ds_t.to(q0.dtype), q0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dk1 += tl.dot(ds_t.to(q1.dtype), q1, input_precision=DOT_PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, do_ptr,  # [B, nh, T, hs] strided each
    k_ptr, v_ptr,  # [B, nh, S, hs] strided each
    lse_ptr, delta_ptr,  # [B, nh, T] fp32 contiguous each
    dk_ptr, dv_ptr,  # [B, nh, S, hs] contiguous each
    q_off_ptr, k_start_ptr,  # [B] int32 each
    sm_scale, scale_log2e, T, S, nh, T_BUCKET, S_BUCKET,
    stride_q_b, stride_q_h, stride_q_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)  # the first key blocks (most queries) run first
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    _, row_hi = _row_keys(q_off, start, S, T, CAUSAL, BLOCK_N)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)  # [N] key slot
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    k0, k1 = _load_rows(k_base, row_hi, stride_k_t, n0, HS, D0, D1, D1B, BLOCK_N)  # [N, D0], [N, D1B]
    v0, v1 = _load_rows(v_base, row_hi, stride_v_t, n0, HS, D0, D1, D1B, BLOCK_N)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1B], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1B], tl.float32)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    q0_desc = _descriptor(q_base, T, stride_q_t, HS, BLOCK_M, D0)
    q1_desc = _descriptor(q_base, T, stride_q_t, HS, BLOCK_M, D1B)
    do0_desc = _descriptor(do_base, T, stride_do_t, HS, BLOCK_M, D0)
    do1_desc = _descriptor(do_base, T, stride_do_t, HS, BLOCK_M, D1B)
    lse_row = lse_ptr + pid_bh.to(tl.int64) * T
    delta_row = delta_ptr + pid_bh.to(tl.int64) * T
    # query blocks: masked [m_lo, f0), unmasked [f0, f1) (every query sees every key of this block: the block is
    # after k_start, within the row's keys, and at or before the block's first query), masked [f1, T)
    m_lo = 0
    first_full = 0
    if CAUSAL:  # queries before this key block cannot see it, except left-padding queries' own slots (also later)
        m_lo = (tl.maximum(n0 - q_off, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - q_off, 0), BLOCK_M) * BLOCK_M
    full_lo = tl.maximum(first_full, m_lo)
    full_hi = (T // BLOCK_M) * BLOCK_M
    has_full = (n0 >= start) & (n0 + BLOCK_N <= row_hi) & (full_hi > full_lo)
    f0 = tl.where(has_full, full_lo, T)
    f1 = tl.where(has_full, full_hi, T)
    args = (k0, k1, v0, v1, q0_desc, q1_desc, do0_desc, do1_desc, lse_row, delta_row, offs_n, q_off, row_hi, start,
            scale_log2e, T)
    dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, *args, m_lo, f0,
                                              D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_M)
    dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, *args, f0, f1,
                                              D0, D1, CAUSAL, False, DOT_PRECISION, BLOCK_M)
    dk0, dk1, dv0, dv1 = _attn_bwd_dkdv_inner(dk0, dk1, dv0, dv1, *args, f1, T,
                                              D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_M)
    dk_base = dk_ptr + pid_bh.to(tl.int64) * S * HS  # contiguous outputs
    dv_base = dv_ptr + pid_bh.to(tl.int64) * S * HS
    ty = dk_ptr.dtype.element_ty
    _descriptor(dk_base, S, HS, HS, BLOCK_N, D0).store([n0, 0], (dk0 * sm_scale).to(ty))
    _descriptor(dv_base, S, HS, HS, BLOCK_N, D0).store([n0, 0], dv0.to(ty))
    if D1 > 0:
        _descriptor(dk_base, S, HS, HS, BLOCK_N, D1B).store([n0, D0], (dk1 * sm_scale).to(ty))
        _descriptor(dv_base, S, HS, HS, BLOCK_N, D1B).store([n0, D0], dv1.to(ty))


@triton.jit
def _attn_bwd_dq_inner(dq0, dq1,  # [M, D0], [M, D1B] fp32
                       q0, q1, do0, do1, lse, delta,  # this program's query block and its rows' statistics
                       k0_desc, k1_desc, v0_desc, v1_desc,
                       qpos, lo, hi, start, n_lo, n_hi,
                       D0: tl.constexpr, D1: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dq over key blocks [n_lo, n_hi); q0, q1 come scaled by sm_scale * log2(e) (scores in log2 units)."""
    for n in range(n_lo, n_hi, BLOCK_N):
        k0 = k0_desc.load([n, 0])  # [N, D0]
        v0 = v0_desc.load([n, 0])
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # [M, N]
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
        if D1 > 0:
            k1 = k1_desc.load([n, D0])
            v1 = v1_desc.load([n, D0])
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PRECISION)
        p = tl.exp2(s - lse[:, None])  # [M, N]; q came scaled, as in the forward
        if MASKED:
            p = tl.where(_visible(qpos, n + tl.arange(0, BLOCK_N), lo, hi, start, CAUSAL), p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)  # [M, N]
        dq0 += tl.dot(ds, k0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=DOT_PRECISION)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, do_ptr,  # [B, nh, T, hs] strided each
    k_ptr, v_ptr,  # [B, nh, S, hs] strided each
    lse_ptr, delta_ptr,  # [B, nh, T] fp32 contiguous each
    dq_ptr,  # [B, nh, T, hs] contiguous
    q_off_ptr, k_start_ptr,  # [B] int32 each
    sm_scale, scale_log2e, T, S, nh, T_BUCKET, S_BUCKET,
    stride_q_b, stride_q_h, stride_q_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(1)  # heaviest first
    else:
        pid_m = tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    row_lo, row_hi = _row_keys(q_off, start, S, T, CAUSAL, BLOCK_N)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    q0, q1 = _load_rows(q_base, T, stride_q_t, m0, HS, D0, D1, D1B, BLOCK_M)  # [M, D0], [M, D1B]
    # q scaled and rounded exactly as the forward's, so that the saved lse normalises these scores to probabilities
    # that sum to 1 (unscaled scores times the scale differ by q's rounding: 3x the 2x rule's budget in fp16)
    q0 = (q0.to(tl.float32) * scale_log2e).to(q0.dtype)
    q1 = (q1.to(tl.float32) * scale_log2e).to(q1.dtype)
    do0, do1 = _load_rows(do_base, T, stride_do_t, m0, HS, D0, D1, D1B, BLOCK_M)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)  # [M]
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    k0_desc = _descriptor(k_base, row_hi, stride_k_t, HS, BLOCK_N, D0)
    k1_desc = _descriptor(k_base, row_hi, stride_k_t, HS, BLOCK_N, D1B)
    v0_desc = _descriptor(v_base, row_hi, stride_v_t, HS, BLOCK_N, D0)
    v1_desc = _descriptor(v_base, row_hi, stride_v_t, HS, BLOCK_N, D1B)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1B], tl.float32)
    lo, hi, a, f0, f1 = _key_stretches(pid_m, q_off, start, row_lo, row_hi, T, CAUSAL, BLOCK_M, BLOCK_N)
    args = (q0, q1, do0, do1, lse, delta, k0_desc, k1_desc, v0_desc, v1_desc, q_off + offs_m, lo, hi, start)
    dq0, dq1 = _attn_bwd_dq_inner(dq0, dq1, *args, a, f0, D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    dq0, dq1 = _attn_bwd_dq_inner(dq0, dq1, *args, f0, f1, D0, D1, CAUSAL, False, DOT_PRECISION, BLOCK_N)
    dq0, dq1 = _attn_bwd_dq_inner(dq0, dq1, *args, f1, hi, D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    dq_base = dq_ptr + pid_bh.to(tl.int64) * T * HS  # contiguous output
    ty = dq_ptr.dtype.element_ty
    _descriptor(dq_base, T, HS, HS, BLOCK_M, D0).store([m0, 0], (dq0 * sm_scale).to(ty))
    if D1 > 0:
        _descriptor(dq_base, T, HS, HS, BLOCK_M, D1B).store([m0, D0], (dq1 * sm_scale).to(ty))


_attn_bwd_dkdv_tuned = _autotune(_attn_bwd_dkdv_kernel, [c for c in _BWD_CONFIGS if _keep_dkdv(c)], _QUICK_DKDV,
                                 _smem_dkdv, _DEFAULT_DKDV)
_attn_bwd_dq_tuned = _autotune(_attn_bwd_dq_kernel, [c for c in _BWD_CONFIGS if _keep_dq(c)], _QUICK_DQ, _smem_dq)
