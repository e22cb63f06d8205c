"""Peak memory and step time of one training step: full fine-tuning against LoRA (and QLoRA), side by side.

One step = forward + backward + AdamW (torch's default, foreach) + zero_grad on random tokens, as train.py does
it. Each mode runs in a fresh child process, so its peak is its own: on CPU the peak resident set of the steps
(VmHWM, reset once the model is built, so that QLoRA's fp32 build before quantizing does not count) minus the
resident set before the model was built; on CUDA torch.cuda.max_memory_allocated. Reported beside the
prediction from the shapes (predicted_bytes, the same formulas as docs/training.md, "LoRA and QLoRA").
Targets (issue 14): LoRA <= 40% of full fine-tuning's peak, QLoRA int4 <= 20%, LoRA's step no slower.

    python benchmarks/bench_lora.py                                     # pythia-410m shape, fp32, CPU, T 256
    python benchmarks/bench_lora.py --device cuda --dtype bf16 --shape pythia-2.8b --seq-len 512 --grad-checkpointing \\
        --modes lora                                                    # GPU: LoRA on a pythia-2.8b shape
    python benchmarks/bench_lora.py --device cuda --dtype bf16 --shape pythia-12b --seq-len 512 --grad-checkpointing \\
        --modes qlora-int4                                              # GPU: QLoRA on a pythia-12b shape
    python benchmarks/bench_lora.py --table                             # docs/training.md's table, computed
"""

import argparse
import gc
import importlib.util
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from gptneox.config import Config
from gptneox.lora.layers import LoRAConfig, add_lora
from gptneox.model import GPTNeoX, causal_lm_loss

MODES = ("full", "lora", "qlora-int4")
LORA = LoRAConfig(r=8, alpha=16, targets="query,key,value")
INT4_BYTES = 0.5 + 2 / 128  # per weight: 4 bits + one bf16 scale per group of 128 (gptneox.quantize, group_size 128)


# ------------------------------------------------------------------------------------------------- prediction
def lora_params(c: Config, lora: LoRAConfig = LORA) -> int:
    """Adapter parameters: per layer and q / k / v target, A [r, C] and B [C, r]."""
    per_target = {"query": 2 * c.hidden_size, "key": 2 * c.hidden_size, "value": 2 * c.hidden_size,
                  "dense": 2 * c.hidden_size, "dense_h_to_4h": c.hidden_size + c.intermediate_size,
                  "dense_4h_to_h": c.intermediate_size + c.hidden_size}
    return c.num_hidden_layers * lora.r * sum(per_target[t] for t in lora.targets if t in per_target) + \
        (lora.r * (c.hidden_size + c.vocab_size) if "embed_out" in lora.targets else 0)


def activation_bytes(c: Config, T: int, B: int, act: int, checkpointing: bool) -> int:
    """What backward keeps: per layer ~ (LN outs 2C, qkv 3C, attention out C, MLP in 4I/C and GELU 2 x I, the
    residual adds 2C) per token, in the activations' dtype (act bytes); with checkpointing one residual per layer
    plus one layer recomputed. The head: logits, their fp32 copy and its gradient (T x V each)."""
    C, I = c.hidden_size, c.intermediate_size
    per_layer = B * T * (8 * C + 2 * I) * act
    layers = (c.num_hidden_layers * B * T * C * act + per_layer) if checkpointing else c.num_hidden_layers * per_layer
    return layers + B * T * c.vocab_size * (act + 8)


def predicted_bytes(c: Config, mode: str, T: int, B: int, dtype: str, checkpointing: bool) -> dict:
    """Bytes of {weights, trainable states (grads + AdamW's two moments), activations} for one step."""
    N, act = c.num_parameters, 2 if dtype == "bf16" else 4
    embed_in = c.vocab_size * c.hidden_size
    if mode == "full":  # fp32 master weights (bf16 comes from autocast), grads, two moments
        weights, states = 4 * N, 12 * N
    else:
        base = (2 if dtype == "bf16" else 4)  # train.py holds a frozen bf16 base in bf16
        weights = base * N if mode == "lora" else INT4_BYTES * (N - embed_in) + base * embed_in
        weights, states = weights + 4 * lora_params(c), 12 * lora_params(c)
    return dict(weights=weights, states=states, activations=activation_bytes(c, T, B, act, checkpointing))


# -------------------------------------------------------------------------------------------------- measuring
def build(mode: str, config: Config, device, dtype: str):
    """The model as train.py holds it: fp32 for full fine-tuning; for LoRA a frozen base (bf16 in a bf16 run, built
    in bf16 directly so a 12b shape never exists in fp32), quantized for QLoRA, and fp32 adapters."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPTNeoX(config)
    base_dtype = torch.bfloat16 if mode != "full" and dtype == "bf16" else torch.float32
    model.to(base_dtype).to_empty(device=device)
    model.init_weights()  # random; the values do not change time or memory
    if mode != "full":
        if mode == "qlora-int4":
            from gptneox.quant.transform import quantize  # the quantization issue's module
            quantize(model, "int4", group_size=128)
        add_lora(model, LORA, dtype=torch.float32)
    return model.train()


def reset_peak_rss() -> bool:
    """Restart the kernel's count of this process's peak resident set (Linux >= 4.0: 5 > /proc/self/clear_refs), so
    that QLoRA's peak is its step's, not that of building the fp32 model it quantizes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: VmHWM (the peak since the last reset) where /proc has it, else ru_maxrss."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> dict:
    """One mode in this process: build, warm up, time; the peak memory of the steps (the model included)."""
    device = torch.device(args.device)
    config = Config.from_name(args.shape)
    rss0 = peak_rss()
    model = build(args.mode, config, device, args.dtype)
    gc.collect()
    reset_peak_rss()
    model.gradient_checkpointing = args.grad_checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the step's peak, the model's weights included
    times = []
    for i in range(args.warmup + args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            logits = model(ids)  # [B, T, V]
        causal_lm_loss(logits, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss() - rss0
    step = statistics.median(times)
    return dict(mode=args.mode, peak_gb=peak / 1e9, step_s=step, tokens_per_s=args.batch_size * args.seq_len / step,
                times=times, trainable=sum(p.numel() for p in params),
                device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor())


def run_mode(args, mode) -> dict:
    """mode in a fresh child process (its peak memory is its own)."""
    if mode == "qlora-int4" and importlib.util.find_spec("gptneox.quant") is None:
        return dict(mode=mode, missing="gptneox.quant is not in this tree (the quantization issue's branch)")
    argv = [sys.executable, __file__, "--child", "--mode", mode, "--shape", args.shape, "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype, "--warmup",
            str(args.warmup), "--iters", str(args.iters)]
    argv += ["--grad-checkpointing"] if args.grad_checkpointing else []
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        return dict(mode=mode, error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(args, rows):
    c = Config.from_name(args.shape)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    print(f"# {args.shape} shape, {args.dtype}, {args.device}, batch {args.batch_size} x seq {args.seq_len}, "
          f"checkpointing {'on' if args.grad_checkpointing else 'off'}; {versions}; "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    print("| mode | trainable params | predicted GB (weights + states + activations) | measured peak GB | "
          "vs full | step s (median) | vs full | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    full = next((r for r in rows if r["mode"] == "full" and "peak_gb" in r), None)
    for r in rows:
        p = predicted_bytes(c, r["mode"], args.seq_len, args.batch_size, args.dtype, args.grad_checkpointing)
        pred = f"{sum(p.values()) / 1e9:.2f} ({' + '.join(f'{v / 1e9:.2f}' for v in p.values())})"
        if "peak_gb" not in r:
            print(f"| {r['mode']} | | {pred} | not measured: {r.get('missing') or r.get('error')} | | | | |")
            continue
        mem = f"{r['peak_gb'] / full['peak_gb']:.0%}" if full else ""
        speed = f"{r['step_s'] / full['step_s']:.2f}x" if full else ""
        print(f"| {r['mode']} | {r['trainable']:,} | {pred} | {r['peak_gb']:.2f} | {mem} | {r['step_s']:.2f} | "
              f"{speed} | {r['tokens_per_s']:.0f} |")


def table(T=2048, B=1):
    """docs/training.md's table: GB per pythia / Dolly size, bf16 compute, micro-batch B, sequence T, checkpointing."""
    print("| model | full (16 B/param) | LoRA r=8 q,k,v (bf16 base) | QLoRA int4 |")
    print("| --- | --- | --- | --- |")
    for name in ("pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b", "pythia-6.9b", "pythia-12b"):
        c = Config.from_name(name)
        cells = [sum(predicted_bytes(c, m, T, B, "bf16", True).values()) / 1e9 for m in MODES]
        print(f"| {name} | {cells[0]:.1f} GB | {cells[1]:.1f} GB | {cells[2]:.1f} GB |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="pythia-410m")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--warmup", type=int, default=1, help="steps before timing (the first allocates AdamW's state)")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--table", action="store_true", help="print docs/training.md's computed table and exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.table:
        return table()
    if args.child:
        return print(json.dumps(child(args)))
    report(args, [run_mode(args, m) for m in args.modes.split(",")])


if __name__ == "__main__":
    main()
