"""The speed of two checkouts side by side: forward, greedy generation and int8 / int4 decode, same shapes, same
machine, alternating runs (each in its own process, so neither inherits the other's caches).

    python benchmarks/bench_checkouts.py --before d49b15b                 # this checkout against an earlier commit
    python benchmarks/bench_checkouts.py --before d49b15b --model pythia-160m --repeats 7

The earlier commit is checked out with `git worktree` into a temporary folder and removed after. Each case reports
the median of --repeats runs per checkout and the ratio after / before; a refactor that changes no math should stay
within the machine's noise of 1.00 (docs/benchmarks.md, "Before and after the layered package").
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# one process = one case: build a random model of the preset's shape, warm up, time `iters` calls, print seconds/call
CASE = r"""
import json, sys, time, torch
import gptneox
from gptneox import Config, GPTNeoX
case, name, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert gptneox.__file__.startswith(sys.argv[4]), (gptneox.__file__, sys.argv[4])  # this checkout's package
torch.set_num_threads(threads)
torch.manual_seed(0)
model = GPTNeoX(Config.from_name(name)).eval()
if case in ("int8", "int4"):
    gptneox.quantize(model, case, group_size=128)
ids = torch.randint(0, 50000, (1, 128))
with torch.no_grad():
    if case == "forward":
        call = lambda: model(ids)
    else:
        call = lambda: gptneox.generate(model, ids, max_new_tokens=32, temperature=0)
    call()
    t0, n = time.perf_counter(), 0
    while n < 3 or time.perf_counter() - t0 < 2.0:
        call(); n += 1
print(json.dumps({"s": (time.perf_counter() - t0) / n}))
"""
CASES = {"forward": "1 x 128 tokens, fp32", "generate": "greedy, 128 prompt + 32 new tokens, fp32",
         "int8": "int8 weights, 128 + 32 tokens", "int4": "int4 g128 weights, 128 + 32 tokens"}


def run(checkout: Path, case: str, model: str, threads: int) -> float:
    argv = [sys.executable, "-c", CASE, case, model, str(threads), str(checkout)]
    done = subprocess.run(argv, cwd=checkout, check=True, capture_output=True, text=True, env={"PYTHONPATH": str(checkout), "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])["s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    p.add_argument("--model", default="pythia-70m", help="a preset whose shape is timed (default pythia-70m)")
    p.add_argument("--repeats", type=int, default=5, help="runs per case and checkout (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a busy machine)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            print(f"{args.model}, CPU, {args.threads} thread(s), median of {args.repeats}; seconds per call")
            print(f"| case | before ({args.before}) | after (this checkout) | after / before |")
            print("| --- | --- | --- | --- |")
            for case, what in CASES.items():
                times = {"before": [], "after": []}
                for _ in range(args.repeats):  # alternating, so drift in the machine's load hits both sides
                    times["before"].append(run(before, case, args.model, args.threads))
                    times["after"].append(run(ROOT, case, args.model, args.threads))
                b, a = statistics.median(times["before"]), statistics.median(times["after"])
                print(f"| {case} ({what}) | {b * 1e3:.1f} ms | {a * 1e3:.1f} ms | {a / b:.3f} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
