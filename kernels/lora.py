"""Grouped LoRA for many tunes in one batch, each row reading its own adapter by index (Punica's BGMV: shrink, then
expand):

    h[m]  = A[idx[m]] x[m]            shrink   x [M, in], A [T, R, in]  -> h [M, R] fp32
    y[m] += B[idx[m]] h[m]            expand   h [M, R],  B [T, out, R] -> y [M, out], in place

T tunes stacked and zero-padded to one rank R (the bank's largest on that layer; a padded column of A and row of B
add exact zeros), the scale folded into B. idx [M] int: the tune of each row, -1 for none, such a row's programs
return after one load and a branch. Rows may share a tune in any order (no sorting or segments needed). Both
kernels are matrix-vector products reduced with tl.sum, one row per program (BGMV, shaped for decode steps); a
long prefill of one tune re-reads its A and B for every token (from L2), where Punica's SGMV (segments of rows,
tl.dot tiles) would read them once per tile: not written yet. fp32 accumulation, and h stays fp32 between the two
launches so that the rank dimension is never rounded; y is read and written in its own dtype. x, A, B and y may
have different float dtypes.
Inference only, no autograd. Reference: the torch path, gptneox/lora/bank.py's grouped_lora (named, not imported).
Credits: Punica (Chen et al., 2023), its BGMV shrink / expand kernels; S-LoRA's and vLLM's Triton ports of them.
"""

import torch
import triton
import triton.language as tl

from ._utils import check_device, check_dtype, check_shape, interpreting, on_tensor_device

# Fixed blocks, not autotuned (starting points, untuned on a GPU). The interpreter uses 16-wide ones, so that small
# test shapes still loop over several blocks with a masked tail.
SHRINK_BLOCK_K, EXPAND_BLOCK_N, NUM_WARPS = 128, 128, 4
INTERPRET_BLOCK = 16


@triton.jit
def _lora_shrink_kernel(x_ptr,  # [M, K]
                        a_ptr,  # [T, R, K]
                        idx_ptr,  # [M] int
                        h_ptr,  # [M, R] fp32
                        K, R, stride_x_m, stride_a_t, stride_a_r, stride_h_m,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    t = tl.load(idx_ptr + pid_m)
    if t >= 0:
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        x_row = x_ptr + pid_m.to(tl.int64) * stride_x_m
        a_rows = a_ptr + t.to(tl.int64) * stride_a_t + offs_r.to(tl.int64)[:, None] * stride_a_r  # [BLOCK_R, 1]
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)  # [BLOCK_K]
            a = tl.load(a_rows + k[None, :], mask=(offs_r[:, None] < R) & (k[None, :] < K), other=0.0)
            acc += tl.sum(a.to(tl.float32) * xk[None, :], axis=1)  # [BLOCK_R]
        tl.store(h_ptr + pid_m.to(tl.int64) * stride_h_m + offs_r, acc, mask=offs_r < R)


@triton.jit
def _lora_expand_kernel(h_ptr,  # [M, R] fp32
                        b_ptr,  # [T, N, R]
                        idx_ptr,  # [M] int
                        y_ptr,  # [M, N], read and written
                        N, R, stride_h_m, stride_b_t, stride_b_n, stride_y_m,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    t = tl.load(idx_ptr + pid_m)
    if t >= 0:
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        h = tl.load(h_ptr + pid_m.to(tl.int64) * stride_h_m + offs_r, mask=offs_r < R, other=0.0)  # [BLOCK_R]
        b = tl.load(b_ptr + t.to(tl.int64) * stride_b_t + offs_n.to(tl.int64)[:, None] * stride_b_n
                    + offs_r[None, :], mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        d = tl.sum(b.to(tl.float32) * h[None, :], axis=1)  # [BLOCK_N]
        y = y_ptr + pid_m.to(tl.int64) * stride_y_m + offs_n
        old = tl.load(y, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(y, (old + d).to(y_ptr.dtype.element_ty), mask=offs_n < N)


def _check(x, A, B, idx, y=None):
    check_device(x, A, B, idx, *(() if y is None else (y,)))
    for name, t in (("x", x), ("A", A), ("B", B), *(() if y is None else (("y", y),))):
        check_dtype(name, t)
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx: dtype {idx.dtype} is not supported; use torch.int32 or torch.int64")
    M, K = x.shape
    T, R, _ = A.shape
    check_shape("A", A, (T, R, K))
    check_shape("idx", idx, (M,))
    if y is not None:
        N = y.shape[-1]
        check_shape("y", y, (M, N))
        check_shape("B", B, (T, N, R))


def _blocks(R: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_N): the rank padded to a power of two, and the K / N blocks."""
    block = INTERPRET_BLOCK if interpreting() else None
    return triton.next_power_of_2(max(R, 1)), block or SHRINK_BLOCK_K, block or EXPAND_BLOCK_N


@on_tensor_device
def lora_shrink(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h [M, R] fp32: row m is A[idx[m]] x[m] (x [M, in], A [T, R, in]); rows with idx -1 are left as zeros."""
    _check(x, A, A, idx)
    M, R = x.shape[0], A.shape[1]
    x, A, idx = x.contiguous(), A.contiguous(), idx.contiguous()
    h = torch.zeros(M, R, dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return h
    BLOCK_R, BLOCK_K, _ = _blocks(R)
    _lora_shrink_kernel[(M,)](x, A, idx, h, x.shape[1], R, x.stride(0), A.stride(0), A.stride(1), h.stride(0),
                              BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return h


@on_tensor_device
def lora_expand(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[m] += B[idx[m]] h[m] in place (y [M, out] contiguous, h [M, R], B [T, out, R]); returns y. Rows with idx
    -1 are not touched."""
    M, N = y.shape
    T, _, R = B.shape
    check_device(y, h, B, idx)
    check_dtype("y", y)
    check_dtype("B", B)
    check_shape("h", h, (M, R))
    check_shape("B", B, (T, N, R))
    check_shape("idx", idx, (M,))
    if not y.is_contiguous():
        raise ValueError("lora_expand writes y in place: y must be contiguous")
    if M == 0 or N == 0 or R == 0:
        return y
    h, B, idx = h.float().contiguous(), B.contiguous(), idx.contiguous()
    BLOCK_R, _, BLOCK_N = _blocks(R)
    _lora_expand_kernel[(M, triton.cdiv(N, BLOCK_N))](h, B, idx, y, N, R, h.stride(0), B.stride(0), B.stride(1),
                                                      y.stride(0), BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N,
                                                      num_warps=NUM_WARPS)
    return y


def grouped_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[m] += B[idx[m]] (A[idx[m]] x[m]) for every row with idx[m] >= 0, in place: y [M, out] contiguous, x [M, in],
    A [T, R, in], B [T, out, R], idx [M] int (-1: the row is left as it is). Returns y. Inference only."""
    _check(x, A, B, idx, y)
    return lora_expand(y, lora_shrink(x, A, idx), B, idx)
