"""Greedy decode tokens/s of weight-only int8 / int4 against fp32, ours and transformers', in one run.

    python benchmarks/bench_quantize.py                      # pythia-160m shape, CPU, batch 1, 2 threads
    python benchmarks/bench_quantize.py --device cuda --dtype bfloat16 --model pythia-1.4b

Rows: ours fp32 (or --dtype), ours int8, ours int4 (--group-size), transformers in the same dtype, and transformers
with torchao's int8 weight-only where `torchao` imports (torchao 0.18.0 declares no torch requirement:
`pip install --no-deps torchao==0.18.0` leaves torch as it is; on a CPU-only torch it warns that its CUDA extensions
do not load, and its int8 weight-only still runs). Every model holds the same random weights of a real shape
(numerics do not change speed). Decoding reads every weight except the input embedding once per token, so
tokens/s <= bandwidth / bytes_per_token; on the CPU the bandwidth is a plain streaming read measured in the same run at
the same thread count (bench_generate.py's streaming_read; torch's GEMV rate is printed beside it), and each row is
set against its own ceiling. --step-rows times a decode step of several rows against one of one row. Weight bytes
are also given for bf16 weights (what the 0.55x / 0.32x targets of docs/quantization.md are stated against). Two
rates per row, medians of --repeats: end to end (the whole generate, its prefill of --prompt-len tokens included) and
decode (the tokens after the first, timed as generate(n) - generate(1): the per-token phase that bandwidth bounds
and the targets are about).
"""

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DTYPES, build, measured_bandwidth, streaming_read, timed  # noqa: E402

from gptneox import GPTNeoX, quantize  # noqa: E402
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator  # noqa: E402
from gptneox.quant.transform import quantize_activations, weight_bytes  # noqa: E402


def bf16_bytes(config, mode, group_size) -> int:
    """weight_bytes of the model in bf16, quantized as asked (None: not), built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPTNeoX(config).to(torch.bfloat16)
        if mode:
            quantize(model, mode, group_size=group_size)
    return weight_bytes(model)


def torchao_int8(hf):
    """transformers' model with torchao's int8 weight-only linears, or None where torchao does not import."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    model = copy.deepcopy(hf)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def rows(hf, ours, group_size, skip_hf=False, a8=False):
    """(name, decode function, model bytes per token or None) for each row."""
    def ours_fn(model):
        gen = Generator(model)
        return lambda ids, n: gen.generate(ids, GenerationConfig(max_new_tokens=n, temperature=0, eos_token_id=[]))

    def hf_fn(model):
        def run(ids, n):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[:, ids.shape[1]:]
        return run
    out = [("ours fp", ours_fn(ours), weight_bytes(ours))]
    for mode in ("int8", "int4"):
        q = quantize(copy.deepcopy(ours), mode, group_size=group_size)
        out.append((f"ours {mode}" + (f" g{group_size}" if mode == "int4" else ""), ours_fn(q), weight_bytes(q)))
        if a8:  # the opt-in: activations rounded to int8 too (llama.cpp's Q8_0 / Q4_0 products)
            q8 = quantize_activations(quantize(copy.deepcopy(ours), mode, group_size=group_size), "int8")
            out.append((out[-1][0] + " a8", ours_fn(q8), weight_bytes(q8)))
    if skip_hf:
        return out
    out.append(("transformers fp", hf_fn(hf), weight_bytes(ours)))
    ao = torchao_int8(hf)
    out.append(("transformers + torchao int8", hf_fn(ao) if ao is not None else None, None))
    return out


def main(*, model, prompt_len, new_tokens, repeats, device, dtype, group_size, threads, skip_hf, step_rows, a8):
    dev, dt = torch.device(device), DTYPES[dtype]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf, ours = build(model, dev, dt)
    ids = torch.randint(0, 50000, (1, prompt_len), device=dev)
    table = rows(hf, ours, group_size, skip_hf, a8 and dev.type == "cpu")
    if skip_hf:
        del hf
    for name, fn, _ in table:  # warm-up: packing, first-call allocations, kernel compiles
        if fn is not None:
            fn(ids, 4)
    times = {name: [] for name, fn, _ in table if fn is not None}  # (prompt + new_tokens, prompt + 1 token)
    for _ in range(repeats):  # interleaved, so drifting machine load hits every row alike
        for name, fn, _ in table:
            if fn is not None:
                times[name].append((timed(lambda: fn(ids, new_tokens), dev), timed(lambda: fn(ids, 1), dev)))
    bw = streaming_read() if dev.type == "cpu" else measured_bandwidth(dev)
    gemv = measured_bandwidth(dev) if dev.type == "cpu" else bw
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    ceiling = (f"a streaming read (sum over 1 GiB) {bw / 1e9:.1f} GB/s (torch's fp32 GEMV over 512 MB: "
               f"{gemv / 1e9:.1f} GB/s)" if dev.type == "cpu" else f"measured bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{model} {dtype} batch 1, prompt {prompt_len} + {new_tokens} new tokens on {where}, torch "
          f"{torch.__version__}, median of {repeats}; ceiling: {ceiling}")
    print("  end to end: new tokens / time of the whole generate (prefill included); decode: the new tokens after the "
          "first / (that time - the time of generating 1 token), the rate bandwidth bounds")

    def rates(name):  # (end-to-end, decode) tokens/s, medians over the repeats
        whole = statistics.median(t for t, _ in times[name])
        decode = statistics.median(t - t1 for t, t1 in times[name])
        return new_tokens / whole, (new_tokens - 1) / decode

    base = rates("ours fp")
    for name, fn, nbytes in table:
        if fn is None:
            print(f"  {name:30s} not run: torchao does not import here")
            continue
        (e2e, decode), ceiling = rates(name), (bw / nbytes if nbytes else float("nan"))
        share = f", {decode / ceiling:4.0%} of its ceiling {ceiling:7.1f}" if nbytes else ""
        print(f"  {name:30s} end to end {e2e:7.1f} tokens/s {e2e / base[0]:5.2f}x | decode {decode:7.1f} tokens/s "
              f"{decode / base[1]:5.2f}x ours fp{share}" + (f"  ({nbytes / 1e6:.0f} MB/token)" if nbytes else ""))
    if step_rows > 1:  # one decode step of step_rows rows against one of 1 row (batched serving, speculative verify)
        wide = ids.repeat(step_rows, 1)  # [R, prompt]
        for name, fn, _ in table:
            if fn is None or not name.startswith("ours"):
                continue
            steps = {}
            for rows_, x in ((1, ids), (step_rows, wide)):
                spans = [timed(lambda: fn(x, new_tokens), dev) - timed(lambda: fn(x, 1), dev) for _ in range(repeats)]
                steps[rows_] = statistics.median(spans) / (new_tokens - 1)
            print(f"  {name:30s} decode step: 1 row {steps[1] * 1e3:6.2f} ms, {step_rows} rows "
                  f"{steps[step_rows] * 1e3:6.2f} ms = {steps[step_rows] / steps[1]:4.2f}x")
    config = ours.config
    bf16 = bf16_bytes(config, None, None)
    for mode in ("int8", "int4"):
        print(f"  weight bytes in bf16: {mode} {bf16_bytes(config, mode, group_size) / bf16:.3f}x of bf16 "
              f"({bf16 / 1e6:.0f} MB)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", help="preset whose shape to use (default pythia-160m)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="activations and scales (default fp32)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    p.add_argument("--skip-hf", action="store_true", help="only our rows (the GPU shapes of 6.9b / 12b: less memory)")
    p.add_argument("--a8", action="store_true",
                   help="CPU: also the int8 / int4 rows with quantize_activations (int8 activations, opt-in)")
    p.add_argument("--step-rows", type=int, default=8,
                   help="also time one decode step of this many rows against one of 1 row, for our rows (1: skip; "
                        "default 8)")
    main(**vars(p.parse_args()))
