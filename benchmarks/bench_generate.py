"""Greedy generation tokens/s: gptneox's generate against transformers' generate, same weights, same process.

    python benchmarks/bench_generate.py                                   # P8: pythia-160m shape, fp32, CPU, batch 1
    python benchmarks/bench_generate.py --model pythia-1.4b --device cuda --dtype bfloat16 --compile   # P4

Both sides run the same randomly initialised model of a real shape (numerics do not change speed), alternating,
after a warm-up; the median of --repeats runs is reported with the ratio ours / HF. The outputs are compared first:
greedy tokens must be identical in fp32. On GPU the decode rate is also set against the bandwidth ceiling: every
weight except the input embedding is read once per token, so tokens/s <= bandwidth / bytes_per_token
(docs/performance.md, "Limits"). Needs transformers (the test extra).
"""

import argparse
import statistics
import sys
import time
import warnings

import torch

from gptneox import Config, GPTNeoX
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(name: str, device, dtype):
    """A random HF GPTNeoXForCausalLM of the preset's shape and ours holding the very same tensors."""
    warnings.filterwarnings("ignore")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    config = Config.from_name(name)
    hf_config = GPTNeoXConfig(**{**config.to_hf_config(), "eos_token_id": None, "pad_token_id": 0})
    hf_config._attn_implementation = "sdpa"  # transformers' default where torch has SDPA
    with torch.device(device):
        hf = GPTNeoXForCausalLM(hf_config).to(dtype).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ours = GPTNeoX(config).to(device=device, dtype=dtype).eval()
    state = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def streaming_read(device=None) -> float:
    """Bytes/s of a plain streaming read at torch's current thread count: a sum over a 1 GiB fp32 tensor, far larger
    than any cache. The honest ceiling of a decode step on the CPU (issue 29): it does not depend on how well any
    matrix-vector kernel streams."""
    x = torch.ones(2**28)
    seconds = statistics.median(timed(lambda: x.sum(), torch.device("cpu")) for _ in range(7))
    return x.numel() * 4 / seconds


def measured_bandwidth(device) -> float:
    """Bytes/s that streaming weights can reach here, measured now: on GPU a 1 GiB device copy (read + write, as
    docs/performance.md counts it), on CPU an fp32 matrix-vector product over 512 MB (what a decode step does)."""
    if device.type == "cuda":
        x = torch.empty(2**30, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        seconds = statistics.median(timed(lambda: y.copy_(x), device) for _ in range(10))
        return 2 * x.numel() / seconds
    w, v = torch.randn(2**27 // 768, 768), torch.randn(768)
    seconds = statistics.median(timed(lambda: w @ v, device) for _ in range(7))
    return w.numel() * 4 / seconds


def main(*, model, prompt_len, new_tokens, batch, repeats, device, dtype, compile, threads):
    dev, dt = torch.device(device), DTYPES[dtype]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf, ours = build(model, dev, dt)
    ids = torch.randint(0, 50000, (batch, prompt_len), device=dev)

    gen = Generator(ours, compile=compile)  # one cache and one compiled step for every run, as sample.py holds it
    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0, eos_token_id=[])

    def run_ours():
        return gen.generate(ids, config)

    def run_hf():
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)[:, prompt_len:]

    # correct first: identical greedy tokens (fp32), or the agreeing prefix (half precision)
    a, b = run_ours(), run_hf()
    same = int((a == b).all(0).long().cumprod(0).sum())
    print(f"greedy tokens identical for the first {same} of {new_tokens}", file=sys.stderr)
    if dt == torch.float32 and same != new_tokens:
        raise SystemExit("fp32 greedy tokens differ from transformers: fix that before timing anything")
    times = {"ours": [], "hf": []}
    for _ in range(repeats):  # alternate, so drifting machine load hits both sides alike
        times["ours"].append(timed(run_ours, dev))
        times["hf"].append(timed(run_hf, dev))
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    rate = {k: batch * new_tokens / v for k, v in (("ours", ours_s), ("hf", hf_s))}
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{model} {dtype} batch {batch} prompt {prompt_len} + {new_tokens} new tokens on {where}, "
          f"torch {torch.__version__}, median of {repeats}{', compiled' if compile else ''}")
    print(f"  ours {rate['ours']:8.1f} tokens/s  ({ours_s:.3f} s)")
    print(f"  HF   {rate['hf']:8.1f} tokens/s  ({hf_s:.3f} s)")
    print(f"  ratio ours / HF = {rate['ours'] / rate['hf']:.2f}x")
    weight_bytes = sum(p.numel() * p.element_size() for n, p in ours.named_parameters() if "embed_in" not in n)
    bw = measured_bandwidth(dev)  # every weight but embed_in is read once per decode step
    ceiling = bw / weight_bytes
    print(f"  ceiling {ceiling:.1f} tokens/s per row ({weight_bytes / 1e9:.2f} GB per token at a measured "
          f"{bw / 1e9:.1f} GB/s): ours at {rate['ours'] / batch / ceiling:.0%}, HF at {rate['hf'] / batch / ceiling:.0%}"
          " (rates include prefill)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pythia-160m", help="preset whose shape to use (default pythia-160m)")
    p.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row (default 32)")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported (default 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations (default fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step (CUDA graphs on GPU)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); 1 is steadier on a "
                   "CPU shared with other jobs, where threads wait on each other at every parallel op")
    main(**vars(p.parse_args()))
