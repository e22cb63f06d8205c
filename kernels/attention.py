"""Flash attention for GPT-NeoX: the launchers attention_fwd / attention_bwd, the autograd function and attention().

Math: o = softmax(q k^T * sm_scale + mask) v per (batch, head), with q [B, nh, T, hs] and k, v [B, nh, S, hs].
The mask is described by two [B] integer vectors rather than a dense [T, S] tensor:
    q_offset[b]  absolute slot of query 0 in row b (queries sit at q_offset + 0..T-1; cached prefix, chunked
                 prefill, per-row cache lengths); causal: query i sees keys j <= q_offset[b] + i;
    k_start[b]   first real key of row b (left padding): keys j < k_start[b] are hidden.
A causal query that would see no key (a left-padding position) sees its own slot instead, exactly like
the rule of gptneox.ops.Mask, so no row is empty and nothing is NaN. Non-causal rows with nothing visible give 0.
A causal row reads no key past its last query's slot (q_offset[b] + T - 1): the rest of a static KV cache is
never touched, and a split forward (flash-decoding) divides only each row's own filled keys among its splits.
The output is written straight into a [B, T, nh, hs] buffer, returned as its [B, nh, T, hs] view, so the model's
transpose(1, 2).reshape(B, T, C) is free.
Head sizes 16..256 with rows of a multiple of 16 bytes (what a tensor descriptor needs: hs a multiple of 8 in
fp16/bf16, of 4 in fp32). T and S need not be multiples of the blocks; S may exceed T. fp16, bf16 (GPU) and fp32
(exact "ieee" dots).

The kernels: attention_fwd.py (forward, split combine), attention_bwd.py (delta, dk/dv, dq), their shared
@triton.jit helpers attention_common.py, and their launch configs and autotuning attention_configs.py.
Reference: gptneox.ops.eager_attention and ops.sdpa_attention (the torch path) with the model's dense mask.
"""

import math
import os
import sys

import torch
import triton

from ._utils import (autotune_mode, check_device, check_dtype, check_shape, dot_precision, interpreting,
                     on_tensor_device, split_head_dim)
from .attention_bwd import _attn_bwd_delta_kernel, _attn_bwd_dkdv_tuned, _attn_bwd_dq_tuned
from .attention_configs import _DELTA_BLOCK_M, _PRUNE, seq_bucket
from .attention_fwd import _attn_combine_kernel, _attn_fwd_kernel, _attn_fwd_tuned

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))

_TUNED = {"fwd": _attn_fwd_tuned, "bwd_dkdv": _attn_bwd_dkdv_tuned, "bwd_dq": _attn_bwd_dq_tuned}
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
