"""Load benchmark of python -m gptneox.serve: 1, 8 and 32 concurrent streaming clients on loopback.

    python benchmarks/bench_serve.py --tokenizer path/to/pythia/tokenizer.json          # pythia-160m shape, fp32, CPU
    python benchmarks/bench_serve.py --tokenizer T --model pythia-1.4b --device cuda --dtype bf16 --clients 1 8 32 64

A randomly initialised model of the preset's shape (numerics do not change speed) is saved with the given tokenizer
and served by a real server process (--max-batch-size = the largest client count). Each level runs that many clients,
each sending streaming /v1/completions requests back to back (a prompt of --prompt-tokens random ids, --new-tokens
greedy tokens, usage counted by the server) until --requests-per-client are done or --seconds pass. The 1-client level
is one request at a time: the baseline of the same run. Reported per level: requests/s, generated tokens/s (and x the
baseline), time to first token and end-to-end latency, p50 and p99. Loopback only; the server binds 127.0.0.1.

Prediction (written before the first measurement, pythia-160m shape, fp32, 2 shared CPU cores): a decode step costs
~230 ms at 1 row and ~300 ms at 8 rows (measured alone: 650 MB of weights read per step either way), so 8 clients
should make 4-6x the baseline's generated tokens/s (target >= 3x), and 32 clients 8-12x; prefills run one request at
a time between decode steps, so time to first token grows with the clients that arrive together (several seconds at
32) while end-to-end latency grows far less than the client count.
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptneox import Config, GPTNeoX, Tokenizer  # noqa: E402


def build(model: str, tokenizer: str, out: Path) -> Path:
    """A random model of the preset's shape, saved with the tokenizer; the directory is what --ckpt takes."""
    torch.manual_seed(0)
    m = GPTNeoX(Config.from_name(model))
    m.init_weights()
    m.save_pretrained(out / model, tokenizer=Tokenizer.from_pretrained(tokenizer))
    return out / model


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def one_request(http, prompt, new_tokens, model: str = "bench"):
    """(ttft_s, latency_s, completion_tokens) of one streamed completion of `model` (an adapter's name, or the base)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, time.perf_counter() - t0, tokens


async def level(url, clients, prompts, new_tokens, per_client, seconds):
    """Run `clients` clients, each sending requests back to back; returns the level's measurements."""
    import httpx
    results, stop_at = [], time.perf_counter() + seconds

    async def client(i, http):
        for k in range(per_client):
            if k and time.perf_counter() > stop_at:
                return
            results.append(await one_request(http, prompts[(i * per_client + k) % len(prompts)], new_tokens))
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft, latency, tokens = zip(*results)
    return dict(clients=clients, requests=len(results), wall_s=wall, req_s=len(results) / wall,
                tok_s=sum(tokens) / wall, tokens=sum(tokens), ttft_p50=percentile(ttft, 50),
                ttft_p99=percentile(ttft, 99), lat_p50=percentile(latency, 50), lat_p99=percentile(latency, 99))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(ckpt, args, port, log):
    cmd = [sys.executable, "-m", "gptneox.serve", "--ckpt", str(ckpt), "--port", str(port), "--device", args.device,
           "--dtype", args.dtype, "--max-batch-size", str(max(args.clients)), "--max-model-len",
           str(args.prompt_tokens + args.new_tokens), "--model-name", "bench", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.threads:  # torch reads these at start-up
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(url, proc, timeout=600):
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"the server did not come up within {timeout} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a Pythia tokenizer.json (or a directory holding one)")
    p.add_argument("--model", default="pythia-160m", help="preset whose shape to serve (default pythia-160m)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="levels (default 1 8 32); 1 first")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=3, help="at most this many requests per client")
    p.add_argument("--seconds", type=float, default=90, help="a level's clients start no new request after this")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the server's torch (default: torch's "
                   "choice); 1 on a machine whose cores other work keeps busy (OpenMP's spinning threads then wait "
                   "for each other: 4x slower decode steps measured on 2 shared cores)")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 50000, (args.prompt_tokens,), generator=g).tolist() for _ in range(256)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build(args.model, args.tokenizer, Path(tmp))
        port, log = free_port(), open(Path(tmp) / "server.log", "w")
        url = f"http://127.0.0.1:{port}"
        proc = serve(ckpt, args, port, log)
        try:
            wait_healthy(url, proc)
            asyncio.run(level(url, 1, prompts, args.new_tokens, 1, 1e9))  # warm-up
            rows = [asyncio.run(level(url, c, prompts, args.new_tokens, args.requests_per_client, args.seconds))
                    for c in args.clients]
        finally:
            proc.kill()
            proc.wait()
    base = rows[0]["tok_s"]
    print(f"{args.model} shape, {args.dtype}, {args.device}, prompt {args.prompt_tokens} + {args.new_tokens} new "
          f"tokens, max-batch-size {max(args.clients)}, torch {torch.__version__}, server threads "
          f"{args.threads or torch.get_num_threads()}")
    print("| clients | requests | wall s | requests/s | generated tok/s | x 1 client | TTFT p50 / p99 s | "
          "latency p50 / p99 s |")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | "
              f"{r['lat_p50']:.2f} / {r['lat_p99']:.2f} |")


if __name__ == "__main__":
    main()
