"""The CPU operators an int8 weight could run through, at batch 1, one layer at a time: are any fast enough?

    python benchmarks/bench_cpu_int8_ops.py                 # pythia-160m's layer shapes, 2 threads

Rows per layer shape [N, K] (x [1, K] fp32, W int8 per output channel, what gptneox.quantize's "int8" stores):
  fp32 F.linear                   MKL's GEMV on the dequantized weight: the speed to beat (2x is issue 13's target)
  gptneox cpu_quant int8          weight-only, exact: gptneox/quant/cpu_quant.c, what QuantizedLinear runs on CPU
  gptneox cpu_quant int4 g128     the same kernel's int4 (error against its own int4 weight, dequantized)
  aten._weight_int8pack_mm        weight-only, exact: torch's packed operator, QuantizedLinear's fallback
  fbgemm linear_dynamic           W8A8: x quantized per tensor to 7 bits (reduce_range, x86) - not weight-only
  fbgemm, two levels              x = x1 + r, x1 on a grid fbgemm reproduces exactly, r quantized again: the W8A8 error
                                  falls to ~1e-4 of weight-only's result, at the price of two calls and the split
Each with its time (median of --repeats batches of --calls) and its error against x @ dequantized(W)^T (max
relative). Prints device facts, versions, the date and the command, then a markdown table. One layer is timed
over and over, so the smaller ones stay in the 32 MB L3 cache: fp32 reads them at 25-40 GB/s here, above the
~12 GB/s of memory; bench_quantize.py's whole-model decode is the honest figure.
"""

import argparse
import datetime
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gptneox.quant import cpu as cpu_quant
from gptneox.quant.schemes import dequantize_weight, quantize_weight

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50304, 768)]  # pythia-160m: qkv, dense, fc, proj, out


def timed(fn, calls: int, repeats: int) -> float:
    """Median milliseconds per call."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def rel_err(y, ref) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


def exact_grid(x):
    """x1 on the grid fbgemm's dynamic quantization picks for x1 itself (range [min, max] including 0, 127 steps,
    an integer zero point), so that its quantization of x1 is exact; r = x - x1 is what is left."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (hi - lo).clamp_min(1e-12) / 127
    zero = torch.round(-lo / scale)
    x1 = (torch.clamp(torch.round(x / scale) + zero, 0, 127) - zero) * scale
    return x1, x - x1


def layer_rows(N, K, calls, repeats):
    w = torch.randn(N, K)
    scales = w.abs().amax(1) / 127
    w8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    wd = w8.float() * scales[:, None]  # what the int8 model means
    x = torch.randn(1, K)
    ref = x @ wd.t()
    qweight = torch._make_per_channel_quantized_tensor(w8, scales.double(), torch.zeros(N, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(qweight, None)

    def dynamic(v):
        return torch.ops.quantized.linear_dynamic(v, packed, True)

    def two_levels(v):
        x1, r = exact_grid(v)
        return dynamic(x1) + dynamic(r)

    lib = cpu_quant.library()
    ours8 = cpu_quant.QuantMatmul(lib, "int8", K, w8, scales)
    t4 = quantize_weight(w, "int4", 128)
    ours4 = cpu_quant.QuantMatmul(lib, "int4", K, t4["weight"], t4["scales"], t4["zeros"], None, 128)
    ref4 = x @ dequantize_weight(t4["weight"], t4["scales"], t4["zeros"], K, "int4", 128).t()
    fns = {"fp32 F.linear": (lambda: F.linear(x, wd), ref),
           "gptneox cpu_quant int8": (lambda: ours8(x), ref),
           "gptneox cpu_quant int4 g128": (lambda: ours4(x), ref4),
           "aten._weight_int8pack_mm": (lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scales), ref),
           "fbgemm linear_dynamic (W8A8)": (lambda: dynamic(x), ref),
           "fbgemm, two levels": (lambda: two_levels(x), ref)}
    base = None
    for name, (fn, expected) in fns.items():
        ms = timed(fn, calls, repeats)
        base = base or ms
        yield [f"{N} x {K}", name, f"{ms:.3f}", f"{base / ms:.2f}x", f"{rel_err(fn(), expected):.1e}"]


def main(threads, calls, repeats):
    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "fbgemm"
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {threads} threads, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python {' '.join(sys.argv)}\n")
    print("| layer [N, K] | operator | ms per call | speed vs fp32 | max rel. error vs weight-only |")
    print("| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for N, K in SHAPES:
            for row in layer_rows(N, K, calls, repeats):
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--calls", type=int, default=50, help="calls per timed batch (default 50)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches; the median is reported (default 5)")
    main(**vars(parser.parse_args()))
