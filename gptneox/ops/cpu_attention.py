"""A decode step's attention on the CPU in one or two calls of cpu_attention.c instead of ~40 small torch operations.

    q, k, v = qkv_rotary_cache(qkv, nh, cos, sin, cache, input_pos)   # split, rotate, write the cache
    y = attention(q, k, v, mask)                                      # softmax(q k^T / sqrt(hs)) v under a bool mask

Both compute what ops/reference.py computes (the rotation bit for bit; attention within fp32 rounding of SDPA). They
apply where dispatch.py routes them: fp32 CPU inference (no gradient, not under torch.compile or autocast) of at most
MAX_T new tokens against a KVCache, the torch backend ("sdpa"), no hooks on the points they fuse. Everything else,
and any machine where the C build fails, runs the torch path as before.
"""

import ctypes
import functools
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("cpu_attention.c")
MAX_T = 16  # new tokens per forward taken here: a decode step, a speculative verify (prompts stay on SDPA)
_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {
    "gptneox_qkv_rotary_cache": ([_p, _i64, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _p, _p, _p, _i64, _i32], None),
    "gptneox_attention": ([_p, _p, _p, _i64, _i64, _i64, _i64, _i64, _i64, _p, _i64, _p, _i32], _i32),
}


@functools.cache
def library(isa: str | None = None) -> ctypes.CDLL | None:
    return native.load(SOURCE, isa, SIGNATURES, "decode attention on the CPU uses torch's operations",
                       extra=["-ffp-contract=off"])


def applies(x: torch.Tensor, T: int) -> bool:
    """Whether this forward's attention can run here (the module docstring), before the library is asked."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and T <= MAX_T and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and x.requires_grad) and not torch.is_autocast_enabled("cpu")
            and library() is not None)


def qkv_rotary_cache(qkv, nh: int, cos, sin, cache, input_pos, lib=None):
    """q [B, nh, T, hs] and the cache's k, v [B, nh, L, hs] after writing this step's keys and values at input_pos
    [T]; qkv [B, T, nh * 3 * hs]; cos, sin [B or 1, 1, T, rot] fp32 (reference.rotary_cos_sin). lib: a library()."""
    B, T, width = qkv.shape
    hs, rot = width // (3 * nh), cos.shape[-1]
    k_cache, v_cache = cache.k_cache, cache.v_cache
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    pos = input_pos.to(torch.int64).contiguous()
    q = torch.empty(B, nh, T, hs, dtype=torch.float32)  # [B, nh, T, hs]
    lib = lib or library()
    lib.gptneox_qkv_rotary_cache(qkv.data_ptr(), B, T, nh, hs, rot, cos.data_ptr(), sin.data_ptr(),
                                 T * rot if cos.shape[0] > 1 else 0, pos.data_ptr(), q.data_ptr(), k_cache.data_ptr(),
                                 v_cache.data_ptr(), k_cache.shape[2], torch.get_num_threads())
    return q, k_cache, v_cache


def attention(q, k, v, mask, lib=None) -> torch.Tensor:
    """y [B, nh, T, hs] for q [B, nh, T, hs] against a cache's k, v [B, nh, L, hs] (contiguous) under the bool mask
    [B or 1, 1, T, S] (S = L: every slot, the mask keeping the ones each query sees)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"cpu_attention: the mask must be bool [B or 1, 1, T, S], got {mask.dtype}")
    B, nh, T, hs = q.shape
    L = k.shape[2]
    q, m = q.contiguous(), mask.contiguous()  # [B or 1, 1, T, S] bool: one byte, 0 or 1, as the C reads it
    y = torch.empty(B, nh, T, hs, dtype=torch.float32)
    if (lib or library()).gptneox_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), B, nh, T, m.shape[-1], L, hs,
                                            m.data_ptr(), T * m.shape[-1] if m.shape[0] > 1 else 0, y.data_ptr(),
                                            torch.get_num_threads()):
        raise MemoryError(f"cpu_attention: no memory for {m.shape[-1]} scores")
    return y
