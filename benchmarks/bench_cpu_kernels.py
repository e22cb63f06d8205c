"""The CPU kernels alone: one sweep over every linear layer of a model's shape at a few rows, against a streaming read.

    python benchmarks/bench_cpu_kernels.py                        # pythia-410m shape, 2 threads, 1 row
    python benchmarks/bench_cpu_kernels.py --threads 1 --rows 8 --modes int8 int4-a8

Each layer of the preset's blocks (query_key_value, dense, dense_h_to_4h, dense_4h_to_h, per layer) and embed_out
gets its own random weight, and one sweep calls every layer once, in order: a weight is read from memory, not from
a cache, as in a decode step (the 410m shape's 1.4 GB of fp32 weights dwarf the 32 MB L3). fp32 runs
ops/cpu_linear.c; int8 / int4 (g128) run quant/cpu_quant.c, weight-only or with int8 activations ("-a8",
quantize_activations). Reported: the bytes a sweep reads over the median time of --repeats sweeps, and that rate as
a share of a streaming read (a torch sum over 1 GiB, benchmarks/bench_generate.py) measured right after, at the same
thread count. The whole-model decode rows, with everything between the layers, are bench_quantize.py's.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import streaming_read  # noqa: E402

from gptneox.config import PRESETS  # noqa: E402
from gptneox.ops import cpu_linear  # noqa: E402
from gptneox.quant import cpu  # noqa: E402
from gptneox.quant.schemes import quantize_weight  # noqa: E402

MODES = ("fp32", "int8", "int4", "int8-a8", "int4-a8")


def layers(shapes, mode: str, group_size: int):
    """[(call of x, in_features, bytes read)] for each [N, K] of shapes, in this mode."""
    quant, acts = mode.removesuffix("-a8"), "int8" if mode.endswith("-a8") else None
    out = []
    for N, K in shapes:
        w = torch.randn(N, K)
        if quant == "fp32":
            out.append((lambda x, w=w: cpu_linear.small(x, w, None), K, N * K * 4))
            continue
        t = quantize_weight(w, quant, group_size)
        matmul = cpu.QuantMatmul(cpu.library(), quant, K, t["weight"], t["scales"], t.get("zeros"), None,
                                 group_size, acts)
        out.append((matmul, K, sum(v.numel() * v.element_size() for v in t.values())))
    return out


def main(*, model, threads, rows, modes, repeats, group_size):
    torch.set_num_threads(threads)
    c = PRESETS[model]
    C, L, F = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    shapes = [(3 * C, C), (C, C), (F, C), (C, F)] * L + [(c["vocab_size"], C)]
    xs = {K: torch.randn(rows, K) for K in (C, F)}
    print(f"{model} shape, {len(shapes)} layers, {rows} row(s), {threads} thread(s), int4 g{group_size}, "
          f"variant {cpu.native.cpu_isa()}, torch {torch.__version__}")
    for mode in modes:
        sweep = layers(shapes, mode, group_size)
        nbytes = sum(b for _, _, b in sweep)

        def once():
            t0 = time.perf_counter()
            for call, K, _ in sweep:
                call(xs[K])
            return time.perf_counter() - t0
        once()  # warm-up (builds, first-call allocations)
        seconds = statistics.median(once() for _ in range(repeats))
        read = streaming_read()
        print(f"  {mode:8s} {nbytes / 1e6:7.0f} MB in {seconds * 1e3:7.2f} ms = {nbytes / seconds / 1e9:5.1f} GB/s, "
              f"{nbytes / seconds / read:4.0%} of a streaming read ({read / 1e9:.1f} GB/s)")
        del sweep


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-410m", help="preset whose layer shapes to sweep (default pythia-410m)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--rows", type=int, default=1, help="rows of x per call: 1 is a decode step (default 1)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="weight formats to sweep (default all; -a8: with int8 activations)")
    p.add_argument("--repeats", type=int, default=5, help="timed sweeps; the median is reported (default 5)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group (default 128)")
    main(**vars(p.parse_args()))
