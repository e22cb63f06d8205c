"""Weight-only quantized matmul: y = x W^T with W held as int8 (one scale per output row) or int4 (groups of g
along K with a scale and a zero each), dequantized in registers and never written out.

    int8  W[n, k] = q[n, k] * scales[n]                          q int8 [N, K]
    int4  W[n, k] = (q[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]    q two per byte, uint8 [N, ceil(K / 2)]

Both kernels walk K in pairs of columns (k even, k + 1): an int4 byte holds exactly such a pair (low nibble even),
so no interleave is needed, and int8 uses the same loop with two strided loads. The last group may be shorter
than g (K % g != 0) and K may be odd. x is fp32, fp16 or bf16 [M, K] (any M); accumulation is fp32; the output
takes x's dtype. Two shapes of launch:
    decode   M <= DECODE_MAX_M: one program per (row, block of N), a dot product by tl.sum: decoding reads each
             weight byte once per step, so the kernel is a stream over W (gpt-fast's int8 / int4 decode).
    prefill  tl.dot tiles [BLOCK_M, BLOCK_N], the dequantized weight tile cast to x's dtype (fp32: "ieee").
Inference only, no autograd: gptneox/quant/linear.py's QuantizedLinear computes the input gradient from dequantize().
Reference: dequantize-then-matmul, gptneox.quant.dequantize_weight (named here, not imported).
Credits: gpt-fast's WeightOnlyInt8Linear / WeightOnlyInt4Linear (the schemes), tinygemm's zero-point form.
"""

import torch
import triton
import triton.language as tl

from ._utils import (autotune_configs, autotune_mode, check_device, check_dtype, check_shape, configs_for_mode,
                     dot_precision, interpreting, max_shared_memory, on_tensor_device)

DECODE_MAX_M = 16  # rows at most that take the decode kernel (a decode step of a small batch)


# ------------------------------------------------------------------------------------------------------ configs
# Autotuned on a GPU like the attention kernels (GPTNEOX_AUTOTUNE: full search, quick, 0 = the default), keyed on the
# weight's shape, the scheme and (prefill) a bucket of M; the interpreter runs the small default. The search spaces
# are starting points (gpt-fast's decode blocks, Triton's matmul tutorial tiles), not yet tuned on a GPU.
def _decode_config(n, j, w, s):  # BLOCK_N outputs per program, BLOCK_J column pairs per step (2 BLOCK_J columns)
    return triton.Config({"BLOCK_N": n, "BLOCK_J": j}, num_warps=w, num_stages=s)


def _prefill_config(m, n, j, w, s):  # tl.dot needs every block >= 16
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_J": j}, num_warps=w, num_stages=s)


DECODE_DEFAULT = _decode_config(64, 64, 4, 3)
DECODE_CONFIGS = [_decode_config(n, j, w, s) for n in (32, 64, 128) for j in (32, 64, 128) for w in (2, 4, 8)
                  for s in (2, 3)]
# quick: none of these spills on sm_90 (ptxas; 128 x 64 over 4 warps spilled 600 bytes, 64 x 128 / 4 warps 592)
DECODE_QUICK = [_decode_config(128, 64, 8, 3), _decode_config(32, 128, 4, 3), DECODE_DEFAULT]
PREFILL_DEFAULT = _prefill_config(32, 64, 32, 4, 3)
PREFILL_CONFIGS = [_prefill_config(m, n, j, w, s) for m in (32, 64, 128) for n in (64, 128) for j in (16, 32, 64)
                   for w in (4, 8) for s in (2, 3, 4) if not (m == 128 and n == 128 and w == 4)]
PREFILL_QUICK = [_prefill_config(128, 128, 32, 8, 3), _prefill_config(64, 128, 32, 8, 3), PREFILL_DEFAULT]


def _smem_prefill(c, e: int) -> int:
    """Shared memory upper bound for prefill: s buffers of the x tiles [M, 2J] (element size e) and of the weight
    bytes [N, 2J], the dequantized tile [N, 2J] in x's dtype, and barriers."""
    M, N, J, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_J"], c.num_stages
    return s * 2 * J * (e * M + N) + e * 2 * J * N + 2048


def _prune(configs, default, quick, smem):
    """early_config_prune: the candidates of GPTNEOX_AUTOTUNE whose shared memory fits (fp32: the default alone,
    its exact dots compile slowly). Reads x_ptr, positional in Triton 2.x, 3.6 and 3.9 alike."""
    def prune(_every, named_args, **kwargs):
        x = named_args["x_ptr"]
        if x.dtype == torch.float32:
            return [default]
        limit = max_shared_memory(x.device.index)
        return [c for c in configs_for_mode(configs, default, quick) if smem(c, x.element_size()) <= limit] or [
            default]
    return prune


def m_bucket(M: int) -> int:
    """The prefill autotune key of M: its power of two, clamped to 16..4096."""
    return min(max(triton.next_power_of_2(max(M, 1)), 16), 4096)


@triton.jit
def _load_pairs(w_ptr,  # int8 [N, K] or uint8 [N, ceil(K / 2)]
                s_ptr,  # int4: [N, G] scales (int8: unused here, applied per row after the sum)
                z_ptr,  # int4: [N, G] zeros
                offs_n, offs_j, k0, N, K, stride_w_n, stride_s_n, GROUP: tl.constexpr, INT4: tl.constexpr):
    """(w_even, w_odd) fp32 [BLOCK_N, BLOCK_J]: columns k0 + 2j and k0 + 2j + 1 of W (int8: before its scale); 0
    outside [N, K]."""
    k_even = k0 + 2 * offs_j  # [BLOCK_J]
    row = offs_n.to(tl.int64)[:, None]  # [BLOCK_N, 1]
    mask_e = (offs_n[:, None] < N) & (k_even[None, :] < K)  # [BLOCK_N, BLOCK_J]
    mask_o = (offs_n[:, None] < N) & (k_even[None, :] + 1 < K)
    if INT4:
        byte = tl.load(w_ptr + row * stride_w_n + (k0 // 2 + offs_j)[None, :], mask=mask_e, other=0)
        group = (k_even // GROUP)[None, :]  # k and k + 1 share a group: GROUP is even
        s = tl.load(s_ptr + row * stride_s_n + group, mask=mask_e, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * stride_s_n + group, mask=mask_e, other=0.0).to(tl.float32)
        w_e = ((byte & 15).to(tl.float32) - 8.0) * s + z
        w_o = ((byte >> 4).to(tl.float32) - 8.0) * s + z
        return tl.where(mask_e, w_e, 0.0), tl.where(mask_o, w_o, 0.0)
    w_e = tl.load(w_ptr + row * stride_w_n + k_even[None, :], mask=mask_e, other=0).to(tl.float32)
    w_o = tl.load(w_ptr + row * stride_w_n + k_even[None, :] + 1, mask=mask_o, other=0).to(tl.float32)
    return w_e, w_o


@triton.jit
def _quant_matmul_decode_kernel(x_ptr,  # [M, K]
                                w_ptr, s_ptr, z_ptr,  # the quantized W (see _load_pairs); int8 scales [N]
                                y_ptr,  # [M, N]
                                N, K, stride_x_m, stride_w_n, stride_s_n, stride_y_m,
                                GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_J: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_j = tl.arange(0, BLOCK_J)  # [BLOCK_J]
    x_row = x_ptr + pid_m.to(tl.int64) * stride_x_m
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, 2 * BLOCK_J):
        k_even = k0 + 2 * offs_j
        x_e = tl.load(x_row + k_even, mask=k_even < K, other=0.0).to(tl.float32)  # [BLOCK_J]
        x_o = tl.load(x_row + k_even + 1, mask=k_even + 1 < K, other=0.0).to(tl.float32)
        w_e, w_o = _load_pairs(w_ptr, s_ptr, z_ptr, offs_n, offs_j, k0, N, K, stride_w_n, stride_s_n, GROUP, INT4)
        acc += tl.sum(w_e * x_e[None, :] + w_o * x_o[None, :], axis=1)  # [BLOCK_N]
    if not INT4:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = y_ptr + pid_m.to(tl.int64) * stride_y_m + offs_n
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _quant_matmul_prefill_kernel(x_ptr,  # [M, K]
                                 w_ptr, s_ptr, z_ptr,  # the quantized W (see _load_pairs); int8 scales [N]
                                 y_ptr,  # [M, N]
                                 M, N, K, M_BUCKET,  # M_BUCKET = m_bucket(M): autotune key only
                                 stride_x_m, stride_w_n, stride_s_n, stride_y_m,
                                 GROUP: tl.constexpr, INT4: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_j = tl.arange(0, BLOCK_J)  # [BLOCK_J]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, 2 * BLOCK_J):
        k_even = (k0 + 2 * offs_j)[None, :]  # [1, BLOCK_J]
        x_e = tl.load(x_rows + k_even, mask=(offs_m[:, None] < M) & (k_even < K), other=0.0)  # [BLOCK_M, BLOCK_J]
        x_o = tl.load(x_rows + k_even + 1, mask=(offs_m[:, None] < M) & (k_even + 1 < K), other=0.0)
        w_e, w_o = _load_pairs(w_ptr, s_ptr, z_ptr, offs_n, offs_j, k0, N, K, stride_w_n, stride_s_n, GROUP, INT4)
        acc = tl.dot(x_e, tl.trans(w_e.to(x_e.dtype)), acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        acc = tl.dot(x_o, tl.trans(w_o.to(x_o.dtype)), acc, input_precision=PRECISION)
    if not INT4:
        acc *= tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y_m + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_INTERPRET_DECODE, _INTERPRET_PREFILL = DECODE_DEFAULT, PREFILL_DEFAULT  # the interpreter runs one config
_decode_tuned = triton.autotune(
    autotune_configs(DECODE_CONFIGS, _INTERPRET_DECODE, DECODE_DEFAULT, DECODE_QUICK), key=["N", "K", "GROUP", "INT4"],
    prune_configs_by={"early_config_prune": _prune(DECODE_CONFIGS, DECODE_DEFAULT, DECODE_QUICK,
                                                   lambda c, e: 2048)})(_quant_matmul_decode_kernel)
_prefill_tuned = triton.autotune(
    autotune_configs(PREFILL_CONFIGS, _INTERPRET_PREFILL, PREFILL_DEFAULT, PREFILL_QUICK),
    key=["N", "K", "M_BUCKET", "GROUP", "INT4"],
    prune_configs_by={"early_config_prune": _prune(PREFILL_CONFIGS, PREFILL_DEFAULT, PREFILL_QUICK,
                                                   _smem_prefill)})(_quant_matmul_prefill_kernel)


def _check(x, weight, scales, zeros, group_size):
    check_device(x, weight, scales)
    check_dtype("x", x)
    check_dtype("scales", scales)
    M, K = x.shape
    N = weight.shape[0]
    if weight.dtype == torch.int8:
        check_shape("weight (int8)", weight, (N, K))
        check_shape("scales (int8)", scales, (N,))
        return N, K, False
    if weight.dtype != torch.uint8 or zeros is None or group_size is None or group_size % 2:
        raise ValueError(f"weight must be int8 [N, K], or uint8 [N, ceil(K/2)] (int4) with zeros and an even "
                         f"group_size; got {weight.dtype}, zeros={'given' if zeros is not None else None}, "
                         f"group_size={group_size}")
    G = -(-K // group_size)
    check_shape("weight (int4)", weight, (N, (K + 1) // 2))
    check_shape("scales (int4)", scales, (N, G))
    check_shape("zeros (int4)", zeros, (N, G))
    return N, K, True


@on_tensor_device
def quant_matmul_fwd(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                     group_size: int | None = None, *, kernel: str = "auto",
                     config: "triton.Config | None" = None) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype. kernel: "decode", "prefill", or "auto" (decode for M <= DECODE_MAX_M).
    config (a triton.Config of that kernel's blocks) skips autotuning: tests and benchmarks."""
    if kernel not in ("auto", "decode", "prefill"):
        raise ValueError(f"kernel {kernel!r}: use 'auto', 'decode' or 'prefill'")
    N, K, int4 = _check(x, weight, scales, zeros, group_size)
    M = x.shape[0]
    x, weight, scales = x.contiguous(), weight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if int4 else scales  # int8: a placeholder the kernel never reads
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    common = dict(GROUP=group_size if int4 else 2, INT4=int4)
    stride_s = scales.stride(0)
    decode = kernel == "decode" or (kernel == "auto" and M <= DECODE_MAX_M)
    if config is None and not interpreting() and (autotune_mode() == "0" or x.dtype == torch.float32):
        config = DECODE_DEFAULT if decode else PREFILL_DEFAULT  # one candidate: Triton 3.6 would still time it
    launch = {} if config is None else dict(**config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if decode:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)  # noqa: E731
        fn = _decode_tuned if config is None else _quant_matmul_decode_kernel
        fn[grid](x, weight, scales, zeros, y, N, K, x.stride(0), weight.stride(0), stride_s, y.stride(0), **common,
                 **launch)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
        fn = _prefill_tuned if config is None else _quant_matmul_prefill_kernel
        fn[grid](x, weight, scales, zeros, y, M, N, K, m_bucket(M), x.stride(0), weight.stride(0), stride_s,
                 y.stride(0), PRECISION=dot_precision(x.dtype), **common, **launch)
    return y


def quant_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                 group_size: int | None = None) -> torch.Tensor:
    """x [M, K] times the quantized W^T (module docstring) -> [M, N]; inference only (no autograd)."""
    return quant_matmul_fwd(x, weight, scales, zeros, group_size)
