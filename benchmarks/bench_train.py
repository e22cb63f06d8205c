"""Training-step throughput: gptneox against HF transformers' GPTNeoXForCausalLM, same weights, batch and optimizer.

One step = forward + backward + fused AdamW, bf16 autocast over fp32 master weights (train.py's recipe), random
tokens, Pythia shapes at sequence 2048. Reported: median step time, tokens/s and MFU, where
    FLOPs per token = 6 N + 6 L C T   (N parameters without the input embedding; docs/performance.md)
    MFU = tokens/s x FLOPs per token / peak (989 TFLOP/s dense bf16 on H100 / H200).
Target P6 (docs/performance.md): pythia-1.4b >= 50% MFU and >= 1.5x HF. Weights are random (real ones cannot be
downloaded on the GPU machines); numerics do not change speed.

    python benchmarks/bench_train.py                                   # pythia-410m and 1.4b, T 2048, GPU
    python benchmarks/bench_train.py --shapes pythia-14m --seq-len 128 --batch-size 2 --device cpu --dtype fp32
"""

import argparse
import json
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from gptneox.config import Config
from gptneox.model import GPTNeoX, causal_lm_loss

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s per GPU (docs/performance.md)


def hf_twin(ours: GPTNeoX):
    """HF's model (sdpa attention) with our weights."""
    warnings.filterwarnings("ignore", module="transformers")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**ours.config.to_hf_config(), attn_implementation="sdpa"))
    head = "lm_head.weight" if "lm_head.weight" in hf.state_dict() else "embed_out.weight"  # 5.x / 4.x name
    hf.load_state_dict({(head if k == "embed_out.weight" else k): v for k, v in ours.state_dict().items()})
    return hf.to(ours.embed_out.weight.device).train()


def step_fn(model, is_hf, optimizer, autocast):
    def step(ids):
        with autocast:
            logits = model(ids).logits if is_hf else model(ids)  # [B, T, V]
        causal_lm_loss(logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step, ids, warmup, iters, device):
    for _ in range(warmup):
        step(ids)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(shape, *, seq_len, batch_size, device, dtype, warmup, iters, compile):
    config = Config.from_name(shape)
    torch.manual_seed(0)
    ours = GPTNeoX(config).to(device)
    ours.init_weights()
    ids = torch.randint(0, 50277, (batch_size, seq_len), device=device)  # never zeros
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    peak = next((v for k, v in PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = []
    for name in ("gptneox", "hf"):
        model = ours if name == "gptneox" else hf_twin(ours)
        if compile and name == "gptneox":
            for block in model.gpt_neox.layers:
                block.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        t = timed(step_fn(model, name == "hf", optimizer, autocast), ids, warmup, iters, device)
        tok_s = batch_size * seq_len / t
        mfu = tok_s * config.flops_per_token(seq_len) / peak if peak else None
        rows.append(dict(model=name, shape=shape, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                         step_s=t, tokens_per_s=tok_s, mfu=mfu,
                         peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None))
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    rows[0]["speedup_vs_hf"] = rows[1]["step_s"] / rows[0]["step_s"]
    return rows


def main(*, shapes, seq_len, batch_size, device, dtype, warmup, iters, compile, out):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import transformers
    print(f"# {gpu}, torch {torch.__version__}, transformers {transformers.__version__}, {dtype}, "
          f"T={seq_len}, B={batch_size}, fused AdamW, compile={compile}")
    print("| shape | model | step s | tokens/s | MFU | peak GB | speedup vs HF |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for shape in shapes:
        for r in bench(shape, seq_len=seq_len, batch_size=batch_size, device=device, dtype=dtype, warmup=warmup,
                       iters=iters, compile=compile):
            results.append({**r, "device": gpu, "torch": torch.__version__})
            mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
            mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] else "-"
            speed = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""
            print(f"| {shape} | {r['model']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {mfu} | {mem} | {speed} |",
                  flush=True)
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["pythia-410m", "pythia-1.4b"], help="preset names to time")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (one micro-batch)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast over fp32 weights, or fp32")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--iters", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile our blocks (as train.py --compile)")
    p.add_argument("--out", help="also write the results as JSON here")
    sys.exit(main(**vars(p.parse_args())))
