"""oneDNN's linear against F.linear's BLAS on the CPU: every linear layer of one forward of a preset's shape (the four
per block and embed_out), at M tokens a forward, both paths side by side in one run.

    python benchmarks/bench_onednn.py                          # pythia-160m shape, fp32, one thread, M = 1 8 32 128
    python benchmarks/bench_onednn.py --model pythia-410m --threads 2 --tokens 1 16

Prediction (written before the first measurement, 2-core AMD EPYC with AVX-512, one thread): at M = 1 both read the
same 650 MB of fp32 weights, so within 10% of each other; at M = 8 and more BLAS (MKL, which this CPU's vendor does not
get its AVX-512 paths for) should fall behind oneDNN's AVX-512 kernels by 1.5-2x. Reported: the median of --repeats
timings of the whole set of layers, ms, and the ratio.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from gptneox import Config


def shapes(c: Config):
    C, F4 = c.hidden_size, c.intermediate_size
    return [(3 * C, C), (C, C), (F4, C), (C, F4)] * c.num_hidden_layers + [(c.vocab_size, C)]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", help="a preset name (gptneox.Config.from_name)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128], help="M: tokens per forward")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeats", type=int, default=9, help="timings per measurement; the median is reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(o, i) for o, i in shapes(Config.from_name(args.model))]
    print(f"{args.model} shape, fp32, {args.threads} thread(s), torch {torch.__version__}")
    print("| tokens M | F.linear (BLAS) ms | oneDNN ms | BLAS / oneDNN |")
    print("| --- | --- | --- | --- |")
    with torch.no_grad():
        for M in args.tokens:
            xs = {i: torch.randn(1, M, i) for i in {w.shape[1] for w in weights}}
            blas = median_ms(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], args.repeats)
            onednn = median_ms(lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], w, None, "none", [], "")
                                        for w in weights], args.repeats)
            print(f"| {M} | {blas:.1f} | {onednn:.1f} | {blas / onednn:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
