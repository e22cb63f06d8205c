"""Flash attention for GPT-NeoX: forward (optionally split over keys, for decode), backward (dq, dk, dv).

Math: o = softmax(q k^T * sm_scale + mask) v per (batch, head), with q [B, nh, T, hs] and k, v [B, nh, S, hs].
The mask is described by two [B] integer vectors rather than a dense [T, S] tensor:
    q_offset[b]  absolute slot of query 0 in row b (queries sit at q_offset + 0..T-1; cached prefix, chunked
                 prefill, per-row cache lengths); causal: query i sees keys j <= q_offset[b] + i;
    k_start[b]   first real key of row b (left padding): keys j < k_start[b] are hidden.
A causal query that would see no key (a left-padding position) sees its own slot instead, exactly like
the rule of gptneox.ops.Mask, so no row is empty and nothing is NaN. Non-causal rows with nothing visible give 0.

Online softmax (FlashAttention-2) in base 2 with fp32 max, sum and accumulators; the logsumexp of every row is
saved (log2 units of the scaled scores) for backward. Head sizes 16..256: the head dim is split into a
power-of-two block D0 and a remainder block D1 (80 = 64 + 16, 96 = 64 + 32), so hd 80 does not pay for 128.
T and S need not be multiples of the blocks; S may exceed T. fp16, bf16 (GPU) and fp32 (exact "ieee" dots).
Forward can split the keys into NUM_SPLITS chunks with a combine pass (flash-decoding; see decode.py).
Backward follows FlashAttention-2: delta = rowsum(o * do), one pass over key blocks for dk, dv and one over
query blocks for dq; no atomics, so it is deterministic by construction.

Reference: gptneox.ops.eager_attention and ops.sdpa_attention (the torch path) with the model's dense mask.
Credits: Dao, "FlashAttention-2" (2023); Tri Dao's and the Triton tutorial 06 kernels (read for the algorithm, not
copied).
"""

import math

import torch
import triton
import triton.language as tl

from ._utils import (autotune_configs, check_device, check_dtype, check_shape, configs_for_mode, dot_precision,
                     max_shared_memory, split_head_dim)

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))

# ------------------------------------------------------------------------------------------------------ configs
# GPU search space (H100 starting points from tutorial 06 and FA2). Keyed on the head split and causality (Triton
# adds the argument dtypes), so new sequence lengths do not retune. For each new key, _prune first drops the configs
# whose shared memory cannot fit the device (Triton would compile them in full before the launch fails) and gives
# fp32 its own tiny list (exact "ieee" dots are FMA loops: 25-67 s to compile per kernel for sm_90).
def _config(m, n, s, w):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_stages=s, num_warps=w)


_FWD_CONFIGS = [_config(m, n, s, w) for m in (64, 128) for n in (32, 64, 128) for s in (2, 3, 4) for w in (4, 8)]


def _keep_fwd(c):
    return not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4) and c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"]


_BWD_CONFIGS = [_config(m, n, s, w) for m in (32, 64, 128) for n in (32, 64, 128) for s in (2, 3) for w in (4, 8)]


def _keep_dkdv(c):  # FA2: a block of keys stays resident while query blocks stream past, so BLOCK_M <= BLOCK_N
    return c.kwargs["BLOCK_M"] <= c.kwargs["BLOCK_N"]


def _keep_dq(c):  # and the other way round for dq
    return c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"]


_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_stages=1, num_warps=4)  # small: numpy runs it
_DEFAULT_CONFIG = _config(64, 32, 2, 4)  # 16-bit: fits every head size on sm_90 (test_compile.py)
# fp32 searches this one config in every mode: smaller blocks over 8 warps give each thread a quarter of the unrolled
# FMA dot, so the hd 256 forward compiles for sm_90 in 6 s instead of 61 s (64 x 32, 4 warps; Triton 3.6, 2 CPU
# cores); SDPA is the model's fp32 path anyway
_FP32_CONFIGS = [_config(32, 32, 2, 8)]
# GPTNEOX_AUTOTUNE=quick: the likely H100 / H200 winners (tutorial 06's Hopper choices; FA2's block shapes), plus
# the default config, which the tests compile too (Triton's disk cache then serves it)
_QUICK_FWD = [_config(128, 64, 3, 8), _config(64, 64, 3, 4), _DEFAULT_CONFIG]
_QUICK_DKDV = [_config(32, 128, 2, 8), _config(64, 64, 2, 8), _DEFAULT_CONFIG]
_QUICK_DQ = [_config(128, 32, 2, 8), _config(64, 64, 2, 4), _DEFAULT_CONFIG]
_KEY = ["D0", "D1", "CAUSAL"]


# Shared memory per program in bytes, for element size e, head blocks D = D0 + D1 and s = num_stages: upper bounds
# of what Triton 3.6 and 3.9 allocate for sm_90 when a real launch specialises the strides (divisible by 16), so
# that the loads are pipelined into s buffers; test_compile.py checks them against the compiler's metadata.shared.
# Forward: the q block [M, D] and s buffers of the k and v blocks [N, D]. dq: q and do, s buffers of k and v.
# dk/dv: k and v [N, D], s buffers of q and do [M, D], and p^T, ds^T [N, M].
_SMEM_SLACK = 2048  # barriers


def _smem_fwd(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (M + 2 * s * N) + _SMEM_SLACK


def _smem_dkdv(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (2 * N + 2 * s * M) + 2 * e * M * N + _SMEM_SLACK


def _smem_dq(c, e, D):
    M, N, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    return e * D * (2 * M + 2 * s * N) + _SMEM_SLACK


def _prune(smem, configs, quick):
    """early_config_prune for triton.autotune: the candidates of GPTNEOX_AUTOTUNE (fp32: _FP32_CONFIGS) whose
    estimated shared memory fits this device, or the default config when none does.

    Triton 3.6 and 3.9 call it as prune(configs, named_args, **kwargs), named_args being the positional arguments
    and kwargs the keyword ones (our constexprs); Triton 2.x passed named_args alone. So everything comes from q_ptr,
    positional in every version: its dtype (element size), head size (D0 + D1) and device (the limit)."""
    def prune(_every, named_args, **kwargs):
        q = named_args["q_ptr"]
        e, D = q.element_size(), sum(split_head_dim(q.shape[-1]))
        fp32 = q.dtype == torch.float32
        candidates = _FP32_CONFIGS if fp32 else configs_for_mode(configs, _DEFAULT_CONFIG, quick)
        limit = max_shared_memory(q.device.index)
        return [c for c in candidates if smem(c, e, D) <= limit] or [_FP32_CONFIGS[0] if fp32 else _DEFAULT_CONFIG]
    return prune


def _autotune(kernel, configs, quick, smem):
    """kernel under triton.autotune; the interpreter sees one config (autotune_configs), a GPU goes through _prune."""
    every = autotune_configs([*configs, *_FP32_CONFIGS], _INTERPRET_CONFIG, _DEFAULT_CONFIG, quick)
    return triton.autotune(every, key=_KEY, prune_configs_by={"early_config_prune": _prune(smem, configs, quick)})(
        kernel)


# ------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _visible(qpos, offs_n, lo, hi, start, CAUSAL: tl.constexpr):
    """bool [M, N]: may query at absolute slot qpos [M] see key slot offs_n [N] (keys in [lo, hi) only)."""
    in_range = (offs_n >= lo) & (offs_n < hi)  # [N]
    keep = (offs_n >= start)[None, :] & in_range[None, :]  # [1, N]
    if CAUSAL:
        own = offs_n[None, :] == qpos[:, None]  # a left-padding query sees itself (ops.Mask)
        keep = (keep & (offs_n[None, :] <= qpos[:, None])) | (own & in_range[None, :])  # [M, N]
    return keep


@triton.jit
def _key_range(pid_m, q_off, start, split_lo, split_hi, T,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys a block of queries can see, and lo rounded down to a block boundary for the loop."""
    if CAUSAL:
        hi = tl.minimum(split_hi, q_off + tl.minimum((pid_m + 1) * BLOCK_M, T))  # last query's slot + 1
        lo = tl.maximum(split_lo, tl.minimum(start, q_off + pid_m * BLOCK_M))  # padding queries see their own slot
    else:
        hi = split_hi
        lo = tl.maximum(split_lo, start)
    return lo, hi, (lo // BLOCK_N) * BLOCK_N


@triton.jit
def _attn_fwd_inner(acc0, acc1, l_i, m_i,  # running state: [M, D0], [M, D1B], [M], [M] fp32
                    q0, q1,  # [M, D0], [M, D1B]
                    k_base, v_base, stride_k_t, stride_v_t,  # this (batch, head)'s keys and values
                    qpos, lo, hi, start,  # [M] query slots; the visible key range and the row's first real key
                    n_lo, n_hi,  # the keys this loop walks, block aligned at n_lo
                    scale_log2e, offs_d0, offs_d1, mask_d1,
                    D1: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Online softmax over keys [n_lo, n_hi); MASKED=False only where every query sees every key."""
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)  # [N] key slot
        mask_n = offs_n < hi
        k_rows = offs_n[:, None].to(tl.int64) * stride_k_t  # [N, 1]
        v_rows = offs_n[:, None].to(tl.int64) * stride_v_t
        k0 = tl.load(k_base + k_rows + offs_d0[None, :], mask=mask_n[:, None], other=0.0)  # [N, D0]
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # [M, N] fp32
        if D1 > 0:
            k1 = tl.load(k_base + k_rows + offs_d1[None, :], mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        if MASKED:
            s = tl.where(_visible(qpos, offs_n, lo, hi, start, CAUSAL), s * scale_log2e, float("-inf"))
        else:
            s = s * scale_log2e
        m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at 0
        p = tl.exp2(s - m_safe[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_safe)  # [M]
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(v_base + v_rows + offs_d0[None, :], mask=mask_n[:, None], other=0.0)  # [N, D0]
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=DOT_PRECISION)
        if D1 > 0:
            v1 = tl.load(v_base + v_rows + offs_d1[None, :], mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # [B, nh, T, hs]
    k_ptr,  # [B, nh, S, hs]
    v_ptr,  # [B, nh, S, hs]
    o_ptr,  # [SPLITS, B, nh, T, hs]: the output (q's dtype) when SPLITS == 1, fp32 partials otherwise
    lse_ptr,  # [SPLITS, B, nh, T] fp32, log2 units of the scaled scores
    q_off_ptr,  # [B] int32, slot of query 0 per row
    k_start_ptr,  # [B] int32, first real key per row
    scale_log2e,  # sm_scale * log2(e)
    T, S, nh, keys_per_split,  # keys_per_split: a multiple of BLOCK_N (S when not split)
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    stride_o_s, stride_o_b, stride_o_h, stride_o_t,
    stride_lse_s, stride_lse_b, stride_lse_h,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] query index
    mask_m = offs_m < T
    qpos = q_off + offs_m  # [M] absolute slot
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1B)  # D1B = D1, or a dummy block of 16 (never loaded) when D1 = 0
    mask_d1 = offs_d1 < HS
    q_base = q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None].to(tl.int64) * stride_q_t  # [M, 1]
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    q0 = tl.load(q_base + offs_d0[None, :], mask=mask_m[:, None], other=0.0)  # [M, D0]
    q1 = tl.load(q_base + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)  # [M, D1]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1B], tl.float32)
    split_lo = pid_s * keys_per_split
    split_hi = tl.minimum(S, split_lo + keys_per_split)
    lo, hi, lo_block = _key_range(pid_m, q_off, start, split_lo, split_hi, T, CAUSAL, BLOCK_M, BLOCK_N)
    # three stretches of keys: masked blocks before and after, and between them blocks every query of this block
    # fully sees (after k_start, at or before the first query's slot), which skip the mask arithmetic
    full_lo = tl.cdiv(tl.maximum(lo, start), BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(hi, q_off + pid_m * BLOCK_M + 1) if CAUSAL else hi
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    has_full = full_hi > full_lo
    first_end = tl.where(has_full, full_lo, hi)  # without a full stretch, one masked loop covers everything
    last_lo = tl.where(has_full, full_hi, hi)
    full_lo, full_hi = tl.where(has_full, full_lo, hi), tl.where(has_full, full_hi, hi)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_k_t, stride_v_t,
                                           qpos, lo, hi, start, lo_block, first_end, scale_log2e, offs_d0, offs_d1,
                                           mask_d1, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_k_t, stride_v_t,
                                           qpos, lo, hi, start, full_lo, full_hi, scale_log2e, offs_d0, offs_d1,
                                           mask_d1, D1, CAUSAL, False, DOT_PRECISION, BLOCK_N)
    acc0, acc1, l_i, m_i = _attn_fwd_inner(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, stride_k_t, stride_v_t,
                                           qpos, lo, hi, start, last_lo, hi, scale_log2e, offs_d0, offs_d1,
                                           mask_d1, D1, CAUSAL, True, DOT_PRECISION, BLOCK_N)
    empty = l_i == 0.0  # no visible key (non-causal padding, or an empty split)
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = o_ptr + pid_s * stride_o_s + b * stride_o_b + h * stride_o_h + offs_m[:, None].to(tl.int64) * stride_o_t
    tl.store(o_base + offs_d0[None, :], (acc0 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=mask_m[:, None])
    if D1 > 0:
        tl.store(o_base + offs_d1[None, :], (acc1 * inv_l[:, None]).to(o_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d1[None, :])
    tl.store(lse_ptr + pid_s * stride_lse_s + b * stride_lse_b + h * stride_lse_h + offs_m, lse, mask=mask_m)


_attn_fwd_tuned = _autotune(_attn_fwd_kernel, [c for c in _FWD_CONFIGS if _keep_fwd(c)], _QUICK_FWD, _smem_fwd)


@triton.jit
def _attn_combine_kernel(
    o_part_ptr,  # [SPLITS, B * nh * T, hs] fp32
    lse_part_ptr,  # [SPLITS, B * nh * T] fp32
    o_ptr,  # [B, nh, T, hs]
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


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, do_ptr,  # [B, nh, T, hs] each
    k_ptr, v_ptr,  # [B, nh, S, hs] each
    lse_ptr, delta_ptr,  # [B, nh, T] fp32 contiguous each
    dk_ptr, dv_ptr,  # [B, nh, S, hs] contiguous each
    q_off_ptr, k_start_ptr,  # [B] int32 each
    sm_scale, scale_log2e, T, S, nh,
    stride_q_b, stride_q_h, stride_q_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [N] key slot
    mask_n = offs_n < S
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1B)
    mask_d1 = offs_d1 < HS
    kv_mask1 = mask_n[:, None] & mask_d1[None, :]
    k_base = k_ptr + b * stride_k_b + h * stride_k_h + offs_n[:, None].to(tl.int64) * stride_k_t  # [N, 1]
    v_base = v_ptr + b * stride_v_b + h * stride_v_h + offs_n[:, None].to(tl.int64) * stride_v_t
    k0 = tl.load(k_base + offs_d0[None, :], mask=mask_n[:, None], other=0.0)  # [N, D0]
    v0 = tl.load(v_base + offs_d0[None, :], mask=mask_n[:, None], other=0.0)
    k1 = tl.load(k_base + offs_d1[None, :], mask=kv_mask1, other=0.0)  # [N, D1]
    v1 = tl.load(v_base + offs_d1[None, :], mask=kv_mask1, other=0.0)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1B], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1B], tl.float32)
    q_base = q_ptr + b * stride_q_b + h * stride_q_h
    do_base = do_ptr + b * stride_do_b + h * stride_do_h
    row_base = pid_bh.to(tl.int64) * T  # lse / delta row of query 0
    m_lo = 0
    if CAUSAL:  # queries before this key block cannot see it, except left-padding queries' own slots (also later)
        m_lo = (tl.maximum(pid_n * BLOCK_N - q_off, 0) // BLOCK_M) * BLOCK_M
    for m in range(m_lo, T, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)  # [M]
        mask_m = offs_m < T
        q_rows = offs_m[:, None].to(tl.int64) * stride_q_t
        do_rows = offs_m[:, None].to(tl.int64) * stride_do_t
        q0 = tl.load(q_base + q_rows + offs_d0[None, :], mask=mask_m[:, None], other=0.0)  # [M, D0]
        do0 = tl.load(do_base + do_rows + offs_d0[None, :], mask=mask_m[:, None], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # [M, N]
        if D1 > 0:
            q1 = tl.load(q_base + q_rows + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=mask_m, other=0.0)  # [M]
        delta = tl.load(delta_ptr + row_base + offs_m, mask=mask_m, other=0.0)
        keep = _visible(q_off + offs_m, offs_n, 0, S, start, CAUSAL) & mask_m[:, None]
        p = tl.where(keep, tl.exp2(s * scale_log2e - lse[:, None]), 0.0)  # [M, N] probabilities
        dv0 += tl.dot(tl.trans(p).to(do0.dtype), do0, input_precision=DOT_PRECISION)  # [N, D0]
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)  # [M, N]
        if D1 > 0:
            do1 = tl.load(do_base + do_rows + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
            dv1 += tl.dot(tl.trans(p).to(do1.dtype), do1, input_precision=DOT_PRECISION)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])  # [M, N] d(scores), before the scale
        dk0 += tl.dot(tl.trans(ds).to(q0.dtype), q0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dk1 += tl.dot(tl.trans(ds).to(q1.dtype), q1, input_precision=DOT_PRECISION)
    dk_base = dk_ptr + (pid_bh.to(tl.int64) * S + offs_n[:, None]) * HS  # [N, 1], contiguous outputs
    dv_base = dv_ptr + (pid_bh.to(tl.int64) * S + offs_n[:, None]) * HS
    ty = dk_ptr.dtype.element_ty
    tl.store(dk_base + offs_d0[None, :], (dk0 * sm_scale).to(ty), mask=mask_n[:, None])
    tl.store(dv_base + offs_d0[None, :], dv0.to(ty), mask=mask_n[:, None])
    if D1 > 0:
        tl.store(dk_base + offs_d1[None, :], (dk1 * sm_scale).to(ty), mask=kv_mask1)
        tl.store(dv_base + offs_d1[None, :], dv1.to(ty), mask=kv_mask1)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, do_ptr,  # [B, nh, T, hs] each
    k_ptr, v_ptr,  # [B, nh, S, hs] each
    lse_ptr, delta_ptr,  # [B, nh, T] fp32 contiguous each
    dq_ptr,  # [B, nh, T, hs] contiguous
    q_off_ptr, k_start_ptr,  # [B] int32 each
    sm_scale, scale_log2e, T, S, nh,
    stride_q_b, stride_q_h, stride_q_t,
    stride_do_b, stride_do_h, stride_do_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,  # head size = D0 + D1 (D1B: D1 or 16)
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    q_off, start = tl.load(q_off_ptr + b), tl.load(k_start_ptr + b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    qpos = q_off + offs_m
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1B)
    mask_d1 = offs_d1 < HS
    q_base = q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None].to(tl.int64) * stride_q_t  # [M, 1]
    do_base = do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None].to(tl.int64) * stride_do_t
    q0 = tl.load(q_base + offs_d0[None, :], mask=mask_m[:, None], other=0.0)  # [M, D0]
    do0 = tl.load(do_base + offs_d0[None, :], mask=mask_m[:, None], other=0.0)
    q1 = tl.load(q_base + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)  # [M, D1]
    do1 = tl.load(do_base + offs_d1[None, :], mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)  # [M]
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T + offs_m, mask=mask_m, other=0.0)
    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1B], tl.float32)
    k_base = k_ptr + b * stride_k_b + h * stride_k_h
    v_base = v_ptr + b * stride_v_b + h * stride_v_h
    lo, hi, lo_block = _key_range(pid_m, q_off, start, 0, S, T, CAUSAL, BLOCK_M, BLOCK_N)
    for n in range(lo_block, hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k_rows = offs_n[:, None].to(tl.int64) * stride_k_t  # [N, 1]
        v_rows = offs_n[:, None].to(tl.int64) * stride_v_t
        k0 = tl.load(k_base + k_rows + offs_d0[None, :], mask=mask_n[:, None], other=0.0)  # [N, D0]
        v0 = tl.load(v_base + v_rows + offs_d0[None, :], mask=mask_n[:, None], other=0.0)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)  # [M, N]
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PRECISION)
        if D1 > 0:
            k1 = tl.load(k_base + k_rows + offs_d1[None, :], mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            v1 = tl.load(v_base + v_rows + offs_d1[None, :], mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PRECISION)
        keep = _visible(qpos, offs_n, lo, hi, start, CAUSAL) & mask_m[:, None]
        p = tl.where(keep, tl.exp2(s * scale_log2e - lse[:, None]), 0.0)  # [M, N]
        ds = (p * (dp - delta[:, None])).to(k0.dtype)  # [M, N]
        dq0 += tl.dot(ds, k0, input_precision=DOT_PRECISION)
        if D1 > 0:
            dq1 += tl.dot(ds, k1, input_precision=DOT_PRECISION)
    dq_base = dq_ptr + (pid_bh.to(tl.int64) * T + offs_m[:, None]) * HS  # [M, 1], contiguous output
    tl.store(dq_base + offs_d0[None, :], (dq0 * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_m[:, None])
    if D1 > 0:
        tl.store(dq_base + offs_d1[None, :], (dq1 * sm_scale).to(dq_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d1[None, :])


_attn_bwd_dkdv_tuned = _autotune(_attn_bwd_dkdv_kernel, [c for c in _BWD_CONFIGS if _keep_dkdv(c)], _QUICK_DKDV,
                                 _smem_dkdv)
_attn_bwd_dq_tuned = _autotune(_attn_bwd_dq_kernel, [c for c in _BWD_CONFIGS if _keep_dq(c)], _QUICK_DQ, _smem_dq)


def best_configs() -> dict:
    """The launch config each autotuned attention kernel last ran with (None before its first launch): for reports
    such as benchmarks/gpu_check.py."""
    tuned = {"fwd": _attn_fwd_tuned, "bwd_dkdv": _attn_bwd_dkdv_tuned, "bwd_dq": _attn_bwd_dq_tuned}
    return {name: str(getattr(t, "best_config", None)) for name, t in tuned.items()}


# ----------------------------------------------------------------------------------------------------- launchers
def _row_vector(name: str, x, B: int, default: int, device) -> torch.Tensor:
    """An int or [B] integer tensor as a contiguous int32 [B] tensor on device."""
    if x is None:
        x = default
    if isinstance(x, int):
        return torch.full((B,), x, dtype=torch.int32, device=device)
    if x.dim() == 0:
        x = x.expand(B)
    check_shape(name, x, (B,))
    return x.to(device=device, dtype=torch.int32).contiguous()


def _check_qkv(q, k, v):
    check_device(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the head dim must be contiguous (stride 1), got strides {t.stride()}")
    B, nh, T, hs = q.shape
    check_shape("k", k, (B, nh, None, hs))
    check_shape("v", v, k.shape)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if hs > 256:
        raise ValueError(f"head size {hs} is above 256, the largest this kernel supports")
    return B, nh, T, k.shape[2], hs


def _mask_args(q, k, q_offset, k_start):
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    return _row_vector("q_offset", q_offset, B, S - T, q.device), _row_vector("k_start", k_start, B, 0, q.device)


def attention_fwd(q, k, v, *, causal=True, q_offset=None, k_start=None, sm_scale=None, num_splits=1,
                  block_n=64):
    """o [B, nh, T, hs] and lse [B, nh, T] (fp32, log2 units of the scaled scores) for q [B, nh, T, hs] and
    k, v [B, nh, S, hs]. q_offset (default S - T, bottom-right causal) and k_start (default 0): int or [B].
    num_splits > 1 splits the keys into that many chunks of a multiple of block_n keys (flash-decoding)."""
    B, nh, T, S, hs = _check_qkv(q, k, v)
    q_off, start = _mask_args(q, k, q_offset, k_start)
    D0, D1 = split_head_dim(hs)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(hs)
    o = torch.empty_like(q)
    lse = torch.empty(B, nh, T, dtype=torch.float32, device=q.device)
    common = dict(HS=hs, D0=D0, D1=D1, D1B=D1 or 16, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype))
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    if num_splits == 1:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * nh, 1)  # noqa: E731
        _attn_fwd_tuned[grid](q, k, v, o, lse, q_off, start, scale * LOG2E, T, S, nh, S, *strides,
                              0, *o.stride()[:3], 0, *lse.stride()[:2], **common)
        return o, lse
    keys_per_split = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    splits = triton.cdiv(S, keys_per_split)
    o_part = torch.empty(splits, B, nh, T, hs, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(splits, B, nh, T, dtype=torch.float32, device=q.device)
    block_m = max(16, triton.next_power_of_2(T)) if T <= 64 else 64
    grid = (triton.cdiv(T, block_m), B * nh, splits)
    _attn_fwd_kernel[grid](q, k, v, o_part, lse_part, q_off, start, scale * LOG2E, T, S, nh, keys_per_split,
                           *strides, *o_part.stride()[:4], *lse_part.stride()[:3], **common,
                           BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    _attn_combine_kernel[(B * nh * T,)](o_part, lse_part, o, lse, T, nh, B * nh * T, splits, *o.stride()[:3],
                                        HS=hs, BLOCK_S=max(2, triton.next_power_of_2(splits)),
                                        BLOCK_D=triton.next_power_of_2(hs))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, *, causal=True, q_offset=None, k_start=None, sm_scale=None):
    """dq, dk, dv (shapes of q, k, v) from the output gradient do [B, nh, T, hs] and forward's o and lse."""
    B, nh, T, S, hs = _check_qkv(q, k, v)
    do = do if do.stride(-1) == 1 else do.contiguous()
    q_off, start = _mask_args(q, k, q_offset, k_start)
    D0, D1 = split_head_dim(hs)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(hs)
    delta = (o.float() * do.float()).sum(-1).contiguous()  # [B, nh, T] rowsum(o * do), FlashAttention-2 eq. (4)
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    args = (q, do, k, v, lse, delta)
    tail = (q_off, start, scale, scale * LOG2E, T, S, nh,
            *q.stride()[:3], *do.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    common = dict(HS=hs, D0=D0, D1=D1, D1B=D1 or 16, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype))
    _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * nh)](*args, dk, dv, *tail, **common)
    _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * nh)](*args, dq, *tail, **common)
    return dq, dk, dv


# ------------------------------------------------------------------------------------------------------ autograd
class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, q_offset, k_start, sm_scale):
        o, lse = attention_fwd(q, k, v, causal=causal, q_offset=q_offset, k_start=k_start, sm_scale=sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask = (causal, q_offset, k_start, sm_scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        causal, q_offset, k_start, sm_scale = ctx.mask
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, causal=causal, q_offset=q_offset, k_start=k_start,
                                   sm_scale=sm_scale)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              q_offset: int | torch.Tensor | None = None, k_start: int | torch.Tensor | None = None,
              sm_scale: float | None = None) -> torch.Tensor:
    """Flash attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs]; differentiable in q, k, v.

    causal: query i of row b sees keys j <= q_offset[b] + i (q_offset defaults to S - T); k_start [B] hides each
    row's left padding (a causal padding query sees its own slot). sm_scale defaults to 1 / sqrt(hs).
    """
    return AttentionFunction.apply(q, k, v, causal, q_offset, k_start, sm_scale)
