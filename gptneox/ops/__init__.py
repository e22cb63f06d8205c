"""ops: how rotary and attention run, behind the two calls the model makes (dispatch.py).

    runtime.py    which backend, and the Triton kernels' loader (kernels(), imported on first use)
    reference.py  the torch path, written as the equations: the reference every kernel is tested against
    custom.py     the kernels as torch.library custom ops (torch.ops.gptneox.*) for torch.compile and CUDA graphs
    native.py     C kernels built on the user's machine: the compiler, the instruction-set variants, the cache
    onednn.py     oneDNN's matrix products for CPU inference
    cpu_linear.py the model's linears for CPU inference: few rows by cpu_linear.c, more by oneDNN
    ragged.py     packed sequences at their own cache rows and columns (the serving engine's forwards)
    dispatch.py   Rotary, Mask, qkv_rotary and attention: the backend table the model calls
"""

from . import custom  # registers torch.ops.gptneox.*
from .dispatch import (ATTENTION, ATTENTION_POINTS, DECODE_MAX_T, ROTARY_POINTS, SPANS_ERROR, Mask, Rotary, attention,
                       qkv_rotary)
from .ragged import Ragged
from .reference import (ACT2FN, apply_rotary, eager_attention, gelu_fast, gelu_new, gelu_tanh, rotary_cos_sin,
                        rotate_half, sdpa_attention, spans_to_dense)
from .runtime import BACKENDS, TRITON_MISSING, check_backend, compiling, default_backend, kernels, triton_available

__all__ = ["custom", "ATTENTION", "ATTENTION_POINTS", "DECODE_MAX_T", "ROTARY_POINTS", "SPANS_ERROR", "Mask",
           "Rotary", "attention", "qkv_rotary", "Ragged", "ACT2FN", "apply_rotary", "eager_attention", "gelu_fast", "gelu_new",
           "gelu_tanh", "rotary_cos_sin", "rotate_half", "sdpa_attention", "spans_to_dense", "BACKENDS",
           "TRITON_MISSING", "check_backend", "compiling", "default_backend", "kernels", "triton_available"]
