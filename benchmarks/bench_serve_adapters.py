"""Many LoRA adapters in one batch: python -m gptneox.serve with an AdapterBank, under 8 concurrent streaming clients.

    python benchmarks/bench_serve_adapters.py --tokenizer path/to/pythia/tokenizer.json --threads 1

A randomly initialised model of the preset's shape (numerics do not change speed) is saved with the tokenizer, and
--adapters LoRA adapters (r --rank on query, key, value and dense, random nonzero A and B, so none is a no-op) are
saved beside it in PEFT's format. One real server process serves the base and the adapters (--adapter NAME=DIR each);
its clients (httpx, asyncio, loopback) run two cases, alternating --rounds times (base, mixed, base, mixed, ...):

  base   --clients clients, every request naming the base
  mixed  the same clients spread over the adapters (client i asks adapter i mod --adapters)

Each client sends streaming /v1/completions back to back (a prompt of --prompt-tokens random ids, --new-tokens greedy
tokens, usage counted by the server). Reported: generated tokens/s of each round, the medians and mixed / base (the
issue's target: >= 0.75x). Then memory: the server's VmRSS (/proc/PID/status) after a warm-up request to the base
and to every adapter, with 1 adapter (--allow-runtime-adapters, so the bank holds it instead of merging it) and with
--memory-adapters adapters, beside the bytes an adapter's tensors take in the bank (summed from an AdapterBank built
here) and in its file.

Prediction (docs/benchmarks.md, "Many LoRA adapters in one batch (serving)", written before the first measurement):
mixed 0.85-0.95x base; 32 adapters about 31 x 4.1 MB more RSS than 1.
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import build, free_port, one_request, percentile, wait_healthy  # noqa: E402

from gptneox import GPTNeoX, LoRAConfig, add_lora, save_adapter  # noqa: E402
from gptneox.lora import AdapterBank  # noqa: E402

BASE_NAME = "bench"
TARGETS = ("query", "key", "value", "dense")


def make_adapters(ckpt: Path, out: Path, n: int, rank: int) -> list[Path]:
    """n adapters of one LoRA shape, each with its own random nonzero A and B, saved as PEFT does."""
    model = add_lora(GPTNeoX.from_pretrained(ckpt, dtype=torch.float32), LoRAConfig(r=rank, alpha=2 * rank,
                                                                                    targets=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for p in params:  # B starts at zero: a fresh adapter changes nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter(model, out / f"tune{i}")
        paths.append(out / f"tune{i}")
    return paths


def bank_bytes(ckpt: Path, adapter: Path) -> int:
    """Bytes one adapter's tensors take in an AdapterBank (fp32 base: fp32 tunes)."""
    model = GPTNeoX.from_pretrained(ckpt, dtype=torch.float32)
    bank = AdapterBank(model)
    slot = bank.add("a", adapter)
    return sum(A.nbytes + B.nbytes for layer in bank.layers.values() if slot in layer.tunes
               for A, B in [layer.tunes[slot]])


def file_bytes(adapter: Path) -> int:
    from safetensors import safe_open
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())


async def run_case(url, models, prompts, new_tokens, per_client):
    """len(models) clients, client i asking models[i], each sending per_client requests back to back."""
    import httpx
    results = []

    async def client(i, http):
        for k in range(per_client):
            results.append(await one_request(http, prompts[(i * per_client + k) % len(prompts)], new_tokens,
                                             model=models[i]))
    limits = httpx.Limits(max_connections=len(models) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(len(models))))
        wall = time.perf_counter() - t0
    ttft, latency, tokens = zip(*results)
    return dict(requests=len(results), wall_s=wall, tok_s=sum(tokens) / wall, tokens=sum(tokens),
                ttft_p50=percentile(ttft, 50), lat_p50=percentile(latency, 50), lat_p99=percentile(latency, 99))


def serve(ckpt, adapters, args, port, log, runtime=False):
    cmd = [sys.executable, "-m", "gptneox.serve", "--ckpt", str(ckpt), "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--max-batch-size", str(args.clients), "--max-model-len",
           str(args.prompt_tokens + args.new_tokens), "--model-name", BASE_NAME, "--log-level", "warning"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    if runtime:
        cmd.append("--allow-runtime-adapters")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.threads:  # torch reads these at start-up
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), " ".join(cmd[1:])


def rss(pid: int) -> int:
    """VmRSS of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def warm_up(url, models, clients, requests, prompts, new_tokens):
    """`requests` completions cycling over models, `clients` at a time (the same load whatever the models)."""
    import httpx
    seq = [models[i % len(models)] for i in range(requests)]
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        async def client(i):
            for k, model in enumerate(seq[i::clients]):
                await one_request(http, prompts[(i + k * clients) % len(prompts)], new_tokens, model=model)
        await asyncio.gather(*(client(i) for i in range(clients)))


def memory_point(ckpt, adapters, args, prompts, tmp, runtime):
    """The server's VmRSS after the same warm-up whatever the adapters: --memory-adapters + 1 requests rounded up
    to a multiple of --clients, --clients at a time, cycling over the base and every adapter (each used at least
    once). The same request count matters: batched decoding grows the heap's high-water mark."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    requests = -(-(args.memory_adapters + 1) // args.clients) * args.clients
    with open(Path(tmp) / f"server-mem{len(adapters)}.log", "w") as log:
        proc, _ = serve(ckpt, adapters, args, port, log, runtime=runtime)
        try:
            wait_healthy(url, proc)
            asyncio.run(warm_up(url, [BASE_NAME, *adapters], args.clients, requests, prompts, args.new_tokens))
            time.sleep(1)
            return rss(proc.pid)
        finally:
            proc.kill()
            proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a Pythia tokenizer.json (or a directory holding one)")
    p.add_argument("--model", default="pythia-160m", help="preset whose shape to serve (default pythia-160m)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of each case (default 8)")
    p.add_argument("--adapters", type=int, default=4, help="adapters the mixed case spreads its clients over")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in a round")
    p.add_argument("--rounds", type=int, default=3, help="base, mixed pairs, alternating (default 3)")
    p.add_argument("--memory-adapters", type=int, default=32, help="adapters of the large memory point (0: skip "
                   "the memory points)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the server's torch (default: torch's "
                   "choice; 1 on a machine whose cores other work keeps busy)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 50000, (args.prompt_tokens,), generator=g).tolist() for _ in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build(args.model, args.tokenizer, tmp)
        paths = make_adapters(ckpt, tmp, max(args.adapters, args.memory_adapters, 1), args.rank)
        names = [f"tune{i}" for i in range(len(paths))]
        served = dict(zip(names[:args.adapters], paths[:args.adapters]))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(tmp / "server.log", "w") as log:
            proc, cmd = serve(ckpt, served, args, port, log)
            try:
                wait_healthy(url, proc)
                asyncio.run(run_case(url, [BASE_NAME, *served], prompts, 4, 1))  # warm-up, every tune once
                cases = {"base": [BASE_NAME] * args.clients,
                         "mixed": [names[i % args.adapters] for i in range(args.clients)]}
                rows = []
                for r in range(args.rounds):
                    for case, models in cases.items():
                        row = asyncio.run(run_case(url, models, prompts, args.new_tokens, args.requests_per_client))
                        rows.append(dict(row, case=case, round=r + 1))
                        print(f"round {r + 1} {case}: {row['tok_s']:.1f} tok/s", flush=True)
            finally:
                proc.kill()
                proc.wait()
        mem = None
        if args.memory_adapters:
            one = memory_point(ckpt, dict(zip(names[:1], paths[:1])), args, prompts, tmp, runtime=True)
            many = memory_point(ckpt, dict(zip(names[:args.memory_adapters], paths[:args.memory_adapters])), args,
                                prompts, tmp, runtime=False)
            mem = one, many, bank_bytes(ckpt, paths[0]), file_bytes(paths[0])
    print(f"\n{args.model} shape, {args.dtype}, {args.device}, {args.clients} clients, prompt {args.prompt_tokens} + "
          f"{args.new_tokens} new tokens, {args.adapters} adapters r {args.rank} on {','.join(TARGETS)}, torch "
          f"{torch.__version__}, server threads {args.threads or torch.get_num_threads()}")
    print(f"server: python {cmd.replace(str(ckpt), 'CKPT').replace(str(tmp), 'TMP')}")
    print("| round | case | requests | wall s | generated tok/s | TTFT p50 s | latency p50 / p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['round']} | {r['case']} | {r['requests']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50']:.2f} | {r['lat_p50']:.2f} / {r['lat_p99']:.2f} |")
    med = {c: statistics.median(r["tok_s"] for r in rows if r["case"] == c) for c in cases}
    print(f"median tok/s: base {med['base']:.1f}, mixed {med['mixed']:.1f}, mixed / base "
          f"{med['mixed'] / med['base']:.2f}x (target >= 0.75x)")
    if mem:
        one, many, per_bank, per_file = mem
        k = args.memory_adapters
        print(f"RSS: 1 adapter (bank, --allow-runtime-adapters) {one / 2**20:.1f} MiB, {k} adapters "
              f"{many / 2**20:.1f} MiB; difference {(many - one) / 2**20:.1f} MiB = {(many - one) / (k - 1) / 1e6:.2f} "
              f"MB per extra adapter; expected from the bank's tensors {per_bank / 1e6:.2f} MB per adapter "
              f"({(k - 1) * per_bank / 2**20:.1f} MiB for {k - 1}), its file's tensors {per_file / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
