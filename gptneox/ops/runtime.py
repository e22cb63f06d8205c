"""Which backend runs, and the Triton kernels' loader: the one place that knows whether triton and the kernels exist.

gptneox.kernels (the repository's kernels/ folder, installed or mounted by gptneox/__init__.py) is imported on first
use, never at import time, so that a machine without triton loads and runs every torch path.
"""

import importlib
import importlib.util

import torch

BACKENDS = ("eager", "sdpa", "triton")
TRITON_MISSING = ("backend='triton' needs the triton package, which CUDA builds of torch bring on Linux (else pip "
                  "install triton, or the gptneox[triton] extra); use backend='sdpa' or 'eager'")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def compiling() -> bool:
    """Inside torch.compile (Dynamo tracing). Rotary and attention keep their kernels there (custom ops), and the
    mask check becomes a device-side assert; QuantizedLinear, whose kernel is a plain launcher, runs torch."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def check_backend(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ValueError(TRITON_MISSING)


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """"triton" for fp16 / bf16 activations (autocast's dtype when it is on) on CUDA with Triton installed, else
    "sdpa". fp32 stays on SDPA: our exact-fp32 kernels are no faster there and take tens of seconds each to compile."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return "triton" if fast and triton_available() else "sdpa"


def kernels():
    """gptneox.kernels.api (the Triton kernels' public functions), imported on first use. The repository's kernels/
    folder is the namespace package gptneox.kernels, installed or mounted by gptneox/__init__.py."""
    if not triton_available():
        raise ValueError(TRITON_MISSING)
    try:
        return importlib.import_module("gptneox.kernels.api")
    except ModuleNotFoundError as e:
        if e.name not in ("gptneox.kernels", "gptneox.kernels.api"):
            raise
        raise ValueError("backend='triton': the Triton kernels (gptneox.kernels) are not installed; reinstall "
                         "gptneox, or use backend='sdpa' or 'eager'") from None


def on_kernels(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on t's device: CUDA, or CPU under the interpreter (TRITON_INTERPRET=1)."""
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and triton_available() and kernels().interpreting()


def direct(t: torch.Tensor) -> bool:
    """Eager, on a device the kernels run on: call the launchers directly. A custom op's dispatch costs tens of
    microseconds of Python per call (docs/benchmarks.md, "Custom-op dispatch"), which an eager decode step, bound by
    launches, would feel; under torch.compile the custom ops (custom.py) are what keeps the kernels in the graph."""
    return not compiling() and on_kernels(t)
