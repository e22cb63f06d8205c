"""@triton.jit helpers shared by the attention kernels (attention_fwd.py, attention_bwd.py): the mask, the keys a
row or a query block sees, and block reads.

Every block is read through a tensor descriptor (tl.make_tensor_descriptor: TMA on Hopper, plain loads elsewhere),
whose bounds give the zero padding; keys past a row's last visible slot are outside its bounds. The head dim is read
as a power-of-two block D0 plus a remainder block D1 (80 = 64 + 16, 96 = 64 + 32; _utils.split_head_dim).
A query block walks its keys in three stretches (_key_stretches): masked blocks before and after, and between them
blocks that every query of the block sees whole, which skip the mask arithmetic.
"""

import triton
import triton.language as tl


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
