"""Shared by the kernel benchmarks: the header every published figure needs, timing, rooflines and table printing.

Timing runs on CUDA (triton.testing.do_bench: CUDA events, L2 flushed) and, for the tiny smoke runs of
benchmarks/gpu_check.py --tiny, on CPU under the Triton interpreter (wall clock, median of a few calls).
"""

import datetime
import shlex
import statistics
import sys
import time

import torch
import triton


def header() -> str:
    """Device, versions, date and the command, as docs/benchmarks.md rows need them."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return (f"device: {name} | torch {torch.__version__} | triton {triton.__version__} | "
            f"CUDA {torch.version.cuda} | {datetime.date.today().isoformat()}\n"
            f"command: python {shlex.join(sys.argv)}")


def require_cuda():
    if not torch.cuda.is_available():
        raise SystemExit("these benchmarks time GPU kernels: run them on a CUDA machine")


def _cpu_ms(fn, grad_to_none=None, repeats: int = 3) -> float:
    """Median wall-clock milliseconds of `repeats` calls after one warm-up call (CPU: no events, no L2 flush)."""
    times = []
    for i in range(repeats + 1):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_ms(fn, grad_to_none=None, device="cuda") -> float:
    """Median milliseconds per call (CUDA: triton.testing.do_bench, warm-up first, L2 flushed between calls)."""
    try:
        if torch.device(device).type != "cuda":
            return _cpu_ms(fn, grad_to_none)
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    except Exception as e:  # a provider that does not support the shape (e.g. cuDNN) gets a blank cell
        print(f"  ({getattr(fn, '__name__', 'provider')} failed: {type(e).__name__}: {str(e)[:120]})")
        return float("nan")


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device="cuda") -> float:
    """Measured device copy bandwidth (read + write), GB/s, the ceiling for memory-bound kernels."""
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device).fill_(1.0)  # never time on fresh pages
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device=device)
    return 2 * nbytes / ms / 1e6


def gemm_tflops(n: int = 8192, dtype=torch.bfloat16, device="cuda") -> float:
    """Measured dense GEMM rate, TFLOP/s, of an n x n x n product (2 n^3 FLOPs): the practical compute ceiling."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device=device)
    return 2 * n**3 / ms / 1e9


def print_table(columns: list[str], rows: list[list]) -> None:
    """A markdown table, ready to paste into docs/benchmarks.md."""
    cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
