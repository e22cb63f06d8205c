"""Flash attention forward kernels: the online-softmax forward (optionally split over keys: flash-decoding) and the
combine of the splits.

The layout of Triton's fused-attention tutorial and FlashAttention-2/3, read, not copied:
  - the softmax scale and log2(e) are folded into q once per program; the online softmax runs in base 2 with fp32
    max, sum and accumulators; the logsumexp of every row is saved (log2 units of the scaled scores) for backward;
  - each query block walks its keys in three stretches (attention_common._key_stretches): masked, unmasked, masked;
  - causal programs run heaviest first: the last query blocks (which see the most keys) of every head lead;
  - split over keys (num_splits > 1): each row's own filled keys are divided among its splits, each writing an fp32
    partial output and its logsumexp; _attn_combine_kernel merges them.
Credits: Dao, "FlashAttention-2" (2023); Shah et al., "FlashAttention-3" (2024); Triton tutorial 06.
"""

import triton
import triton.language as tl

from .attention_common import _descriptor, _key_stretches, _load_rows, _row_keys, _visible
from .attention_configs import _FWD_CONFIGS, _QUICK_FWD, _autotune, _keep_fwd, _smem_fwd


@triton.jit
def _attn_fwd_inner(acc0, acc1, l_i, m_i,  # running state: [M, D0], [M, D1B], [M], [M] fp32
                    q0, q1,  # [M, D0], [M, D1B], already scaled by sm_scale * log2(e)
                    k0_desc, k1_desc, v0_desc, v1_desc,
                    qpos, lo, hi, start,  # [M] query slots; the visible key range and the row's first real key
                    n_lo, n_hi,  # the keys this loop walks, block aligned at n_lo
                    D0: tl.constexpr, D1: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over keys [n_lo, n_hi); MASKED=False only where every query sees every key."""
    for n in range(n_lo, n_hi, BLOCK_N):
        k0 = k0_desc.load([n, 0])  # [N, D0]
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # [M, N] fp32, log2 units
        if D1 > 0:
            k1 = k1_desc.load([n, D0])
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        if MASKED:
            s = tl.where(_visible(qpos, n + tl.arange(0, BLOCK_N), lo, hi, start, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        p = tl.exp2(s - m_safe[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_safe)  # [M]
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = v0_desc.load([n, 0])  # [N, D0]
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PRECISION)
        if D1 > 0:
            v1 = v1_desc.load([n, D0])
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # [B, nh, T, hs]
    k_ptr,  # [B, nh, S, hs]
    v_ptr,  # [B, nh, S, hs]
    o_ptr,  # [SPLITS, B, nh, T, hs] strided: the output (q's dtype) when SPLITS == 1, fp32 partials otherwise
    lse_ptr,  # [SPLITS, B, nh, T] fp32, log2 units of the scaled scores
    q_off_ptr,  # [B] int32, slot of query 0 per row
    k_start_ptr,  # [B] int32, first real key per row
    scale_log2e,  # sm_scale * log2(e)
    T, S, nh, num_splits,  # num_splits: each row's visible keys are divided among this many programs
    T_BUCKET, S_BUCKET,  # seq_bucket(T), seq_bucket(S): autotune key only
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_o_s, stride_o_b, stride_o_h, stride_o_t,
    stride_lse_s, stride_lse_b, stride_lse_h,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh, pid_s = tl.program_id(0), tl.program_id(2)  # heads vary fastest: a wave holds one block of every head
    if CAUSAL:
        pid_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(1)  # heaviest first: the last queries see the most keys
    else:
        pid_m = tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    row_lo, row_hi = _row_keys(q_off, start, S, T, CAUSAL, BLOCK_N)
    keys_per_split = tl.cdiv(tl.cdiv(tl.maximum(row_hi - row_lo, 0), num_splits), BLOCK_N) * BLOCK_N
    split_lo = row_lo + pid_s * keys_per_split
    split_hi = tl.minimum(row_hi, split_lo + keys_per_split)
    m0 = pid_m * BLOCK_M
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    q0, q1 = _load_rows(q_base, T, stride_q_t, m0, HS, D0, D1, D1B, BLOCK_M)  # [M, D0], [M, D1B]
    q0 = (q0.to(tl.float32) * scale_log2e).to(q0.dtype)  # the scale, folded into q once
    q1 = (q1.to(tl.float32) * scale_log2e).to(q1.dtype)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    k0_desc = _descriptor(k_base, row_hi, stride_k_t, HS, BLOCK_N, D0)  # rows past the row's last key read as 0
    k1_desc = _descriptor(k_base, row_hi, stride_k_t, HS, BLOCK_N, D1B)
    v0_desc = _descriptor(v_base, row_hi, stride_v_t, HS, BLOCK_N, D0)
    v1_desc = _descriptor(v_base, row_hi, stride_v_t, HS, BLOCK_N, D1B)
    qpos = q_off + m0 + tl.arange(0, BLOCK_M)  # [M] absolute slot
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1B], tl.float32)
    lo, hi, a, f0, f1 = _key_stretches(pid_m, q_off, start, split_lo, split_hi, T, CAUSAL, BLOCK_M, BLOCK_N)
    args = (q0, q1, k0_desc, k1_desc, v0_desc, v1_desc, qpos, lo, hi, start)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, *args, a, f0,
                                           D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, *args, f0, f1,
                                           D0, D1, CAUSAL, False, DOT_PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, *args, f1, hi,
                                           D0, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    empty = l_i == 0.0  # no visible key (non-causal padding, or an empty split)
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = o_ptr + pid_s * stride_o_s + b * stride_o_b + h * stride_o_h
    ty = o_ptr.dtype.element_ty
    _descriptor(o_base, T, stride_o_t, HS, BLOCK_M, D0).store([m0, 0], (acc0 * inv_l[:, None]).to(ty))
    if D1 > 0:
        _descriptor(o_base, T, stride_o_t, HS, BLOCK_M, D1B).store([m0, D0], (acc1 * inv_l[:, None]).to(ty))
    offs_m = m0 + tl.arange(0, BLOCK_M)
    tl.store(lse_ptr + pid_s * stride_lse_s + b * stride_lse_b + h * stride_lse_h + offs_m, lse, mask=offs_m < T)


_attn_fwd_tuned = _autotune(_attn_fwd_kernel, [c for c in _FWD_CONFIGS if _keep_fwd(c)], _QUICK_FWD, _smem_fwd)


@triton.jit
def _attn_combine_kernel(
    o_part_ptr,  # [SPLITS, B * nh * T, hs] fp32
    lse_part_ptr,  # [SPLITS, B * nh * T] fp32
    o_ptr,  # [B, nh, T, hs] strided
    lse_ptr,  # [B, nh, T] fp32 contiguous
    T, nh, rows, SPLITS,  # rows = B * nh * T
    stride_o_b, stride_o_h, stride_o_t,
    HS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * nh + h) * T + t
    b, h, t = row // (nh * T), (row // T) % nh, row % T
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < SPLITS
    lse_s = tl.load(lse_part_ptr + offs_s * rows + row, mask=mask_s, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)  # [BLOCK_S], 0 for empty splits
    total = tl.sum(w, 0)
    o_s = tl.load(o_part_ptr + (offs_s[:, None] * rows + row) * HS + offs_d[None, :],
                  mask=mask_s[:, None] & (offs_d < HS)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(total == 0.0, 1.0, total)  # [BLOCK_D]
    tl.store(o_ptr + b * stride_o_b + h * stride_o_h + t * stride_o_t + offs_d, o.to(o_ptr.dtype.element_ty),
             mask=offs_d < HS)
    tl.store(lse_ptr + row, tl.where(total == 0.0, float("-inf"), m_safe + tl.log2(tl.where(total == 0.0, 1.0, total))))
