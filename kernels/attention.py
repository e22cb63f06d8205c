"""Flash attention for GPT-NeoX: forward (optionally split over keys, for decode), backward (delta, dk dv, dq).

Math: o = softmax(q k^T * sm_scale + mask) v per (batch, head), with q [B, nh, T, hs] and k, v [B, nh, S, hs].
The mask is described by two [B] integer vectors rather than a dense [T, S] tensor:
    q_offset[b]  absolute slot of query 0 in row b (queries sit at q_offset + 0..T-1; cached prefix, chunked
                 prefill, per-row cache lengths); causal: query i sees keys j <= q_offset[b] + i;
    k_start[b]   first real key of row b (left padding): keys j < k_start[b] are hidden.
A causal query that would see no key (a left-padding position) sees its own slot instead, exactly like
the rule of gptneox.ops.Mask, so no row is empty and nothing is NaN. Non-causal rows with nothing visible give 0.
A causal row reads no key past its last query's slot (q_offset[b] + T - 1): the rest of a static KV cache is
never touched, and a split forward (flash-decoding) divides only each row's own filled keys among its splits.

How it runs (the layout of Triton's fused-attention tutorial and FlashAttention-2/3, read, not copied):
  - every block is read through a tensor descriptor (tl.make_tensor_descriptor: TMA on Hopper, plain loads
    elsewhere), whose bounds give the zero padding; keys past a row's last visible slot are outside its bounds;
  - the softmax scale and log2(e) are folded into q once per program; the online softmax runs in base 2 with fp32
    max, sum and accumulators; the logsumexp of every row is saved (log2 units of the scaled scores) for backward;
  - each query block walks its keys in three stretches: masked blocks before and after, and between them blocks
    that every query of the block sees whole, which skip the mask arithmetic (backward does the same per block);
  - causal programs run heaviest first: the last query blocks (which see the most keys) of every head lead;
  - the output is written straight into a [B, T, nh, hs] buffer, returned as its [B, nh, T, hs] view, so the
    model's transpose(1, 2).reshape(B, T, C) is free;
  - backward: a fused kernel for delta = rowsum(o * do); the dk/dv kernel holds a key block and computes in the
    transposed layout (s^T = k q^T, so p^T and ds^T feed dv and dk with no transpose of a computed block); the dq
    kernel holds a query block. Separate autotuned tiles; no atomics, so it is deterministic by construction.
Head sizes 16..256 with rows of a multiple of 16 bytes (what a descriptor needs: hs a multiple of 8 in fp16/bf16,
of 4 in fp32): the head dim is a power-of-two block D0 plus a remainder block D1 (80 = 64 + 16, 96 = 64 + 32).
T and S need not be multiples of the blocks; S may exceed T. fp16, bf16 (GPU) and fp32 (exact "ieee" dots).

Reference: gptneox.ops.eager_attention and ops.sdpa_attention (the torch path) with the model's dense mask.
Credits: Dao, "FlashAttention-2" (2023); Shah et al., "FlashAttention-3" (2024); Triton tutorial 06.
"""

import math
import os
import sys

import torch
import triton
import triton.language as tl

from ._utils import (autotune_configs, autotune_mode, check_device, check_dtype, check_shape, configs_for_mode,
                     dot_precision, interpreting, max_shared_memory, on_tensor_device, split_head_dim)

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))


# ------------------------------------------------------------------------------------------------------ configs
# GPU search space (H100 starting points from tutorial 06 and FA2). Keyed on the head split, causality, the argument
# dtypes (Triton adds them) and a power-of-two bucket of each sequence length (seq_bucket), so a new length retunes
# only when it changes bucket. For each new key, _prune first drops the configs whose shared memory cannot fit the
# device (Triton would compile them in full before the launch fails) and gives fp32 its own tiny list (exact "ieee"
# dots are FMA loops: 25-67 s to compile per kernel for sm_90).
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
_DEFAULT_CONFIG = _config(64, 32, 2, 4)  # 16-bit fwd and dq: fits every head size on sm_90 (test_compile.py)
# dk/dv holds two [N, D] fp32 accumulators and the k, v blocks: at hd 128, 64 x 32 over 4 warps spills 700 bytes per
# thread (ptxas, sm_90, Triton 3.9), 32 x 64 over 8 warps none (188 registers)
_DEFAULT_DKDV = _config(32, 64, 2, 8)
# fp32 searches this one config in every mode: smaller blocks over 8 warps give each thread a quarter of the unrolled
# FMA dot, so the hd 256 forward compiles for sm_90 in 6 s instead of 61 s (64 x 32, 4 warps; Triton 3.6, 2 CPU
# cores); SDPA is the model's fp32 path anyway
_FP32_CONFIGS = [_config(32, 32, 2, 8)]
# GPTNEOX_AUTOTUNE=quick: the likely H100 / H200 winners (tutorial 06's Hopper choices; FA2's block shapes), plus
# the default config, which the tests compile too (Triton's disk cache then serves it)
_QUICK_FWD = [_config(128, 64, 3, 8), _config(64, 64, 3, 4), _DEFAULT_CONFIG]
_QUICK_DKDV = [_config(32, 128, 2, 8), _config(64, 64, 2, 8), _DEFAULT_DKDV]
_QUICK_DQ = [_config(128, 32, 2, 8), _config(64, 64, 2, 4), _DEFAULT_CONFIG]
_KEY = ["D0", "D1", "CAUSAL", "T_BUCKET", "S_BUCKET"]
_DELTA_BLOCK_M = 64  # rows per program of the delta kernel (a streaming reduction: no tuning)


def seq_bucket(n: int) -> int:
    """The autotune key of a sequence length: its power of two, clamped to 128..16384 (block choices change with the
    number of blocks, not with every length)."""
    return min(max(triton.next_power_of_2(max(n, 1)), 128), 16384)


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


def _prune(smem, configs, quick, default=_DEFAULT_CONFIG):
    """early_config_prune for triton.autotune: the candidates of GPTNEOX_AUTOTUNE (fp32: _FP32_CONFIGS) whose
    estimated shared memory fits this device, or the kernel's default config when none does.

    Triton 3.6 and 3.9 call it as prune(configs, named_args, **kwargs), named_args being the positional arguments
    and kwargs the keyword ones (our constexprs); Triton 2.x passed named_args alone. So everything comes from q_ptr,
    positional in every version: its dtype (element size), head size (D0 + D1) and device (the limit)."""
    def prune(_every, named_args, **kwargs):
        q = named_args["q_ptr"]
        e, D = q.element_size(), sum(split_head_dim(q.shape[-1]))
        fp32 = q.dtype == torch.float32
        candidates = _FP32_CONFIGS if fp32 else configs_for_mode(configs, default, quick)
        limit = max_shared_memory(q.device.index)
        return [c for c in candidates if smem(c, e, D) <= limit] or [_FP32_CONFIGS[0] if fp32 else default]
    return prune


def _autotune(kernel, configs, quick, smem, default=_DEFAULT_CONFIG):
    """kernel under triton.autotune; the interpreter sees one config (autotune_configs), a GPU goes through _prune."""
    every = autotune_configs([*configs, *_FP32_CONFIGS], _INTERPRET_CONFIG, default, quick)
    prune = _prune(smem, configs, quick, default)
    return triton.autotune(every, key=_KEY, prune_configs_by={"early_config_prune": prune})(kernel)


# ------------------------------------------------------------------------------------------------ mask helpers
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
def _visible_t(offs_n, qpos, hi, start, CAUSAL: tl.constexpr):
    """bool [N, M], the transpose of _visible (keys in [0, hi)): the dk/dv kernel's layout."""
    in_range = offs_n < hi  # [N]
    keep = ((offs_n >= start) & in_range)[:, None]  # [N, 1]
    if CAUSAL:
        own = offs_n[:, None] == qpos[None, :]
        keep = (keep & (offs_n[:, None] <= qpos[None, :])) | (own & in_range[:, None])  # [N, M]
    return keep


@triton.jit
def _row_keys(q_off, start, S, T, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys some query of this row can see (lo rounded down to a block): a causal row ends at its
    last query's slot, and a left-padding query sees its own slot (< start)."""
    if CAUSAL:
        hi = tl.minimum(S, q_off + T)
        lo = tl.minimum(start, q_off)
    else:
        hi = S
        lo = start
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _key_stretches(pid_m, q_off, start, split_lo, split_hi, T,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys query block pid_m walks within [split_lo, split_hi), as three stretches of whole blocks:
    masked [a, f0), unmasked [f0, f1) (every query of the block sees every key: after k_start, at or before the
    first query's slot), masked [f1, hi). Returns lo, hi (the visible range) and a, f0, f1."""
    if CAUSAL:
        hi = tl.minimum(split_hi, q_off + tl.minimum((pid_m + 1) * BLOCK_M, T))  # last query's slot + 1
        lo = tl.maximum(split_lo, tl.minimum(start, q_off + pid_m * BLOCK_M))  # padding queries see their own slot
        full_hi = tl.minimum(hi, q_off + pid_m * BLOCK_M + 1)
    else:
        hi = split_hi
        lo = tl.maximum(split_lo, start)
        full_hi = hi
    a = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(tl.maximum(lo, start), BLOCK_N) * BLOCK_N
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    has_full = full_hi > full_lo  # without a full stretch, the first masked loop covers everything
    f0 = tl.where(has_full, full_lo, hi)
    f1 = tl.where(has_full, full_hi, hi)
    return lo, hi, a, f0, f1


@triton.jit
def _descriptor(base, rows, stride, HS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Blocks [BLOCK_R, BLOCK_D] of one (batch, head)'s [rows, HS] matrix; out of bounds reads as 0."""
    return tl.make_tensor_descriptor(base, shape=[rows, HS], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_D])


@triton.jit
def _load_rows(base, rows, stride, r0, HS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1B: tl.constexpr,
               BLOCK_R: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of one (batch, head)'s [rows, HS] matrix as the head split: [BLOCK_R, D0] and
    [BLOCK_R, D1B] (zeros, never read, when D1 = 0)."""
    x0 = _descriptor(base, rows, stride, HS, BLOCK_R, D0).load([r0, 0])
    if D1 > 0:
        x1 = _descriptor(base, rows, stride, HS, BLOCK_R, D1B).load([r0, D0])
    else:
        x1 = tl.zeros([BLOCK_R, D1B], x0.dtype)
    return x0, x1


# ------------------------------------------------------------------------------------------------------ forward
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


# ----------------------------------------------------------------------------------------------------- backward
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
_TUNED = {"fwd": _attn_fwd_tuned, "bwd_dkdv": _attn_bwd_dkdv_tuned, "bwd_dq": _attn_bwd_dq_tuned}
_PRUNE = {"fwd": _prune(_smem_fwd, [], _QUICK_FWD), "bwd_dkdv": _prune(_smem_dkdv, [], _QUICK_DKDV, _DEFAULT_DKDV),
          "bwd_dq": _prune(_smem_dq, [], _QUICK_DQ)}  # mode 0 and fp32 only: the default / fp32 config


_LAST = dict.fromkeys(_TUNED)  # name -> the config of its last launch


def best_configs() -> dict:
    """The launch config each autotuned attention kernel last ran with (None before its first launch): for reports
    such as benchmarks/gpu_check.py."""
    return {name: str(config) for name, config in _LAST.items()}


# ----------------------------------------------------------------------------------------------------- launchers
_reported = set()


def _launch(name: str, grid, args: tuple, consts: dict, config: "triton.Config | None", buckets: tuple):
    """Run kernel `name` ("fwd", "bwd_dkdv", "bwd_dq"): autotuned, or with the given config (tests, benchmarks).
    GPTNEOX_AUTOTUNE_VERBOSE=1 prints the config picked for each new autotune key to stderr."""
    tuned = _TUNED[name]
    if config is None and not interpreting() and (autotune_mode() == "0" or args[0].dtype == torch.float32):
        config = _PRUNE[name](None, {"q_ptr": args[0]})[0]  # one candidate: Triton 3.6 would still time it
    if config is None:
        tuned[grid](*args, **consts)
        chosen = tuned.best_config
    else:
        tuned.fn[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        chosen = config
    _LAST[name] = chosen
    if os.environ.get("GPTNEOX_AUTOTUNE_VERBOSE", "0") not in ("", "0"):
        key = (name, consts["HS"], consts["CAUSAL"], args[0].dtype, buckets, str(chosen))
        if key not in _reported:
            _reported.add(key)
            print(f"gptneox.kernels attention {name}: hs={consts['HS']} causal={consts['CAUSAL']} {args[0].dtype} "
                  f"T~{buckets[0]} S~{buckets[1]}: {chosen}", file=sys.stderr, flush=True)


def _set_allocator(device: torch.device) -> None:
    """On a GPU, device-side tensor descriptors live in a small global scratch buffer that Triton asks its
    allocator for at launch; give it torch's (caching, CUDA-graph safe) allocator unless the user set one."""
    if device.type != "cuda":
        return
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        unset = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a Triton without the ContextVar: set ours
        unset = True
    if unset:  # "cuda": the current device at launch time, the one Triton launches on (on_tensor_device sets it)
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


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


def _check_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """t with what a tensor descriptor needs: a contiguous head dim, a 16-byte aligned base and 16-byte strides
    (a copy when only the strides are off; a clear error when the head size itself cannot be)."""
    e = t.element_size()
    if t.shape[-1] * e % 16:
        raise ValueError(f"{name}: head size {t.shape[-1]} in {t.dtype} makes rows of {t.shape[-1] * e} bytes; the "
                         f"kernels read rows through tensor descriptors, which need a multiple of 16 bytes")
    if any(n == 1 and s * e % 16 for n, s in zip(t.shape, t.stride())):  # a size-1 dim's stride is arbitrary
        t = t.as_strided(t.shape, [t.stride(i) if n > 1 else math.prod(t.shape[i + 1:]) for i, n in
                                   enumerate(t.shape)])  # the same elements, strides a descriptor accepts
    if t.data_ptr() % 16 or any(s * e % 16 for s in t.stride()[:-1]) or (t.shape[-2] > 1 and t.stride(-2) == 0):
        t = t.contiguous()  # (a descriptor's row stride must not be 0: an expanded T)
    return t


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
    split_head_dim(hs)  # below 16: a clear error
    q, k, v = (_check_rows(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
    _set_allocator(q.device)
    return q, k, v, (B, nh, T, k.shape[2], hs)


def _mask_args(q, k, q_offset, k_start):
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    return _row_vector("q_offset", q_offset, B, S - T, q.device), _row_vector("k_start", k_start, B, 0, q.device)


def _consts(q, hs, causal):
    D0, D1 = split_head_dim(hs)
    return dict(HS=hs, D0=D0, D1=D1, D1B=D1 or 16, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype))


def empty_heads_last(B: int, nh: int, T: int, hs: int, like: torch.Tensor) -> torch.Tensor:
    """[B, nh, T, hs], the view of a [B, T, nh, hs] buffer: the attention output's layout, so that the model's
    transpose(1, 2).reshape(B, T, nh * hs) is a view."""
    return torch.empty(B, T, nh, hs, dtype=like.dtype, device=like.device).transpose(1, 2)


@on_tensor_device
def attention_fwd(q, k, v, *, causal=True, q_offset=None, k_start=None, sm_scale=None, num_splits=1,
                  block_n=64, config=None):
    """o [B, nh, T, hs] (a view of [B, T, nh, hs]) and lse [B, nh, T] (fp32, log2 units of the scaled scores) for
    q [B, nh, T, hs] and k, v [B, nh, S, hs]. q_offset (default S - T, bottom-right causal) and k_start (default
    0): int or [B]. num_splits > 1 divides each row's visible keys among that many programs (blocks of block_n
    keys) and merges them (flash-decoding). config (a triton.Config) skips autotuning."""
    q, k, v, (B, nh, T, S, hs) = _check_qkv(q, k, v)
    q_off, start = _mask_args(q, k, q_offset, k_start)
    consts = _consts(q, hs, causal)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(hs)
    o = empty_heads_last(B, nh, T, hs, q)
    lse = torch.empty(B, nh, T, dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    head = (q, k, v)
    if num_splits == 1:
        grid = lambda meta: (B * nh, triton.cdiv(T, meta["BLOCK_M"]), 1)  # noqa: E731
        args = (*head, o, lse, q_off, start, scale * LOG2E, T, S, nh, 1, seq_bucket(T), seq_bucket(S), *strides,
                0, *o.stride()[:3], 0, *lse.stride()[:2])
        _launch("fwd", grid, args, consts, config, (seq_bucket(T), seq_bucket(S)))
        return o, lse
    o_part = torch.empty(num_splits, B, nh, T, hs, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(num_splits, B, nh, T, dtype=torch.float32, device=q.device)
    block_m = max(16, triton.next_power_of_2(T)) if T <= 64 else 64
    grid = (B * nh, triton.cdiv(T, block_m), num_splits)
    _attn_fwd_kernel[grid](*head, o_part, lse_part, q_off, start, scale * LOG2E, T, S, nh, num_splits,
                           seq_bucket(T), seq_bucket(S), *strides, *o_part.stride()[:4], *lse_part.stride()[:3],
                           **consts, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=2)
    _attn_combine_kernel[(B * nh * T,)](o_part, lse_part, o, lse, T, nh, B * nh * T, num_splits, *o.stride()[:3],
                                        HS=hs, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
                                        BLOCK_D=triton.next_power_of_2(hs))
    return o, lse


@on_tensor_device
def attention_bwd(do, q, k, v, o, lse, *, causal=True, q_offset=None, k_start=None, sm_scale=None, configs=None):
    """dq, dk, dv (shapes of q, k, v, contiguous) from the output gradient do [B, nh, T, hs] and forward's o and
    lse. configs: (dk/dv config, dq config) to skip autotuning."""
    q, k, v, (B, nh, T, S, hs) = _check_qkv(q, k, v)
    check_shape("do", do, q.shape)
    do = _check_rows("do", do if do.stride(-1) == 1 else do.contiguous())
    q_off, start = _mask_args(q, k, q_offset, k_start)
    consts = _consts(q, hs, causal)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(hs)
    delta = torch.empty(B, nh, T, dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(B * nh, triton.cdiv(T, _DELTA_BLOCK_M))](
        o, do, delta, T, nh, *o.stride()[:3], *do.stride()[:3],
        HS=hs, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=triton.next_power_of_2(hs))
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
    head = (q, do, k, v, lse, delta)
    tail = (q_off, start, scale, scale * LOG2E, T, S, nh, seq_bucket(T), seq_bucket(S),
            *q.stride()[:3], *do.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    dkdv_config, dq_config = configs or (None, None)
    _launch("bwd_dkdv", lambda meta: (B * nh, triton.cdiv(S, meta["BLOCK_N"])), (*head, dk, dv, *tail), consts,
            dkdv_config, tail[7:9])
    _launch("bwd_dq", lambda meta: (B * nh, triton.cdiv(T, meta["BLOCK_M"])), (*head, dq, *tail), consts, dq_config,
            tail[7:9])
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
    """Flash attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs] (a view of [B, T, nh, hs]);
    differentiable in q, k, v.

    causal: query i of row b sees keys j <= q_offset[b] + i (q_offset defaults to S - T); k_start [B] hides each
    row's left padding (a causal padding query sees its own slot). sm_scale defaults to 1 / sqrt(hs).
    """
    return AttentionFunction.apply(q, k, v, causal, q_offset, k_start, sm_scale)
