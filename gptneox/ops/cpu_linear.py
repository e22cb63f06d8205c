"""The model's linear layers for CPU inference: few rows through our own kernel (cpu_linear.c), more through oneDNN.

    cpu_linears(model)        # every nn.Linear of the model, from now on; returns how many
    linear(x, weight, bias)   # the same choice for one call

A decode step multiplies one row (a batched step a few) by every weight matrix, so its cost is reading the weights:
cpu_linear.c reads each weight once per call for up to SMALL_M rows, in the best instruction-set variant this CPU
runs (ops/native.py). More rows are compute-bound, and oneDNN's GEMM (onednn.py) is the fast one there. The layer
stays an nn.Linear with its own weight (state dicts, adapters and hooks see nothing new), and every call that is not
fp32 inference on the CPU (a gradient, another device or dtype, autocast, a failed build, torch.compile tracing)
goes to F.linear as before. Results
differ from F.linear's by rounding alone (about 1e-7 relative). docs/benchmarks.md, "CPU decoding at the bandwidth limit", has
the measurements behind SMALL_M.
"""

import ctypes
import functools
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native, onednn

SOURCE = Path(__file__).with_name("cpu_linear.c")
SMALL_M = 2  # rows of x up to which cpu_linear.c runs (measured against oneDNN: docs/benchmarks.md)
SIGNATURES = {"gptneox_f32_linear": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], None)}


@functools.cache
def library(isa: str | None = None) -> ctypes.CDLL | None:
    """cpu_linear.c built for this variant (a key of native.ISAS; None: the best this CPU runs), or None."""
    return native.load(SOURCE, isa, SIGNATURES, "fp32 decoding on the CPU uses torch's matmul")


def small(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lib=None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T + bias [N] by cpu_linear.c (lib: a library() to use); fp32 CPU tensors."""
    lib = lib or library()
    K, N = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    w, b = weight.contiguous(), bias.contiguous() if bias is not None else None
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)  # [M, N]
    if x2.shape[0]:
        lib.gptneox_f32_linear(x2.data_ptr(), x2.shape[0], K, w.data_ptr(), b.data_ptr() if b is not None else None,
                               y.data_ptr(), N, torch.get_num_threads())
    return y.reshape(*x.shape[:-1], N)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for inference, by the fastest path this call can take (the module docstring)."""
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or weight.device.type != "cpu"
            or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.dtype == torch.float32 and rows <= SMALL_M and (bias is None or bias.dtype == torch.float32)
            and library() is not None):
        return small(x, weight, bias)
    if x.dtype in onednn.DTYPES and onednn.available():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def cpu_linears(model: nn.Module) -> int:
    """Route every nn.Linear of model through linear() (the module docstring); how many."""
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    return len(layers)
