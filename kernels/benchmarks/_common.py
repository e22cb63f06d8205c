"""Shared by the kernel benchmarks: the header every published figure needs, timing, and table printing."""

import datetime
import shlex
import sys

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


def time_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds per call (triton.testing.do_bench: warm-up first, L2 flushed between calls)."""
    try:
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    except Exception as e:  # a provider that does not support the shape (e.g. cuDNN) gets a blank cell
        print(f"  ({getattr(fn, '__name__', 'provider')} failed: {type(e).__name__}: {str(e)[:120]})")
        return float("nan")


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth (read + write), GB/s, the ceiling for memory-bound kernels."""
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6


def print_table(columns: list[str], rows: list[list]) -> None:
    """A markdown table, ready to paste into docs/benchmarks.md."""
    cell = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
