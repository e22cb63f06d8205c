"""oneDNN's matrix products for CPU inference: torch.ops.mkldnn._linear_pointwise (the operator torch.compile's CPU
backend emits) instead of the BLAS that F.linear calls; cpu_linear.py routes the model's layers to it.

On the CPUs measured (docs/benchmarks.md, "oneDNN's linear on the CPU") it reads the weights as fast at one token and
runs several tokens at once much faster than F.linear's BLAS path, which is what a serving step of many requests is.
The layer stays an nn.Linear with its own weight (state dicts, adapters and hooks see nothing new); its forward falls
back to F.linear whenever the fast path does not apply: a tensor that needs a gradient, a device other than the
CPU, a dtype other than fp32 / bf16, or a torch without the operator. Results differ from F.linear's by rounding
alone (about 1e-7 relative in fp32).
"""

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
