"""Hook points (performance.md P11): the plain forward before and after them, run_with_cache against TransformerLens,
and the memory of caching one layer. pythia-160m shape, random init (numerics do not change speed), fp32, CPU.

    PYTHONPATH=. python benchmarks/bench_hooks.py --repeats 15

a. Our forward with no hook attached, now vs --before (default c5f0a15, the commit before hooks), checked out into a
   temporary `git worktree` (removed at the end). Both sides are the same small worker, each in its own subprocess
   (PYTHONPATH: that tree or this one), loading one saved state dict and input; the parent asks each for one timed
   forward in turn, alternating which goes first, after a warm-up. Their logits must be bitwise equal. A process's
   own speed varies by a few percent, so --pairs fresh pairs are timed and the ratio is the median of theirs.
b. run_with_cache of every hook point: ours vs TransformerLens 4.x's TransformerBridge around transformers'
   GPTNeoXForCausalLM holding the same weights (raw: no LayerNorm folding, no centering). Values are compared first:
   logits and every hook point both fill, within tests/tolerances.py's FP32_LOGITS_REL. TransformerLens is timed
   twice: caching our names only, and caching all of its own (its default). All sides alternate in one process.
c. The memory of caching one layer's residual stream (names_filter="blocks.5.hook_resid_post"): the peak of torch's
   CPU allocations during the call above what was live before it (the model, the input), from the PyTorch profiler's
   allocation events (profile_memory=True; Python objects and allocator slack are not counted), against the plain
   forward's peak and against the size asked for, B * T * C * 4 bytes.
All timings and profiles run under torch.no_grad().

Prediction (written before measuring). (a) Unchanged, ratio 1.00 +- 0.02: with no hook attached the forward differs
only by one `hook is None` test per layer in qkv_rotary and in attention, against ~130 GFLOP of matmuls. (b) Far from
2x: at 4 x 128 tokens both sides are bound by the same matmuls (TransformerLens splits the fused qkv into three
matmuls of the same total size), and both run attention eagerly in fp32 once scores and pattern are hooked. What
TransformerLens adds is elementwise and Python: ~125 HookPoint modules, a second LayerNorm pass to fill hook_scale and
hook_normalized, rotary by concatenation. Expect ours 1.1x to 1.4x faster, and caching every hook to cost ours
5-20% over the plain forward (eager attention in every layer, the stored z and pattern). (c) Caching one layer adds
what is asked for, 1.57 MB, give or take nothing: the hook keeps a reference to a tensor the forward allocates anyway.
The plain forward's own peak is dominated by the logits (4 x 128 x 50304 x 4 bytes = 103 MB).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import gptneox
from gptneox import Config, GPTNeoX

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def seconds(fn) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - t0


def worker(tree: str, state_path: str, logits_path: str, threads: int):
    """Part (a)'s timing worker, in its own process: the forward of the gptneox found in `tree` (its PYTHONPATH) on
    the saved weights and input; logits to logits_path, then one JSON list of seconds per line "n" read on stdin."""
    torch.set_num_threads(threads)
    if not Path(gptneox.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"worker for {tree} imported gptneox from {gptneox.__file__}")
    saved = torch.load(state_path)
    model = GPTNeoX(Config.from_name(saved["model_name"]), backend="sdpa")
    model.load_state_dict(saved["state"], strict=True)
    model.eval()
    x = saved["x"]
    with torch.no_grad():
        torch.save(model(x), logits_path)
    print(json.dumps({"gptneox": gptneox.__file__, "has_hooks": hasattr(model, "run_with_cache")}), flush=True)
    for line in sys.stdin:
        print(json.dumps([seconds(lambda: model(x)) for _ in range(int(line))]), flush=True)


class Worker:
    """A running worker() for one tree."""

    def __init__(self, tree: Path, state_path: Path, logits_path: Path, threads: int):
        code = f"import sys; sys.path.insert(1, {str(ROOT / 'benchmarks')!r}); from bench_hooks import worker; " \
               f"worker({str(tree)!r}, {str(state_path)!r}, {str(logits_path)!r}, {threads})"
        # cwd and PYTHONPATH both `tree`: `python -c` puts the working directory first on sys.path
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {tree} exited before it was ready (its error is above)")
        self.info = json.loads(line)
        self.logits = torch.load(logits_path)

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def git(*args) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def alternate(sides: dict, repeats: int, warmup: int) -> dict:
    """name -> seconds per call, sides called in turn (the first one rotating each round) after `warmup` rounds."""
    names, times = list(sides), {name: [] for name in sides}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = sides[name]()
            if r >= warmup:
                times[name].append(t)
    return times


def part_a(model, model_name: str, x, before: str, pairs: int, repeats: int, warmup: int, threads: int):
    """(per-pair ratios now / before, before's times, now's times, short revision) of the plain forward, over `pairs`
    pairs of fresh workers (a process's own speed varies by a few percent: an A/A pair on one tree measured 0.98x to
    1.05x here), which one starts first alternating; the logits are checked bitwise equal."""
    rev = git("rev-parse", "--short", before)
    ratios, before_times, now_times = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"model_name": model_name, "state": model.state_dict(), "x": x}, tmp / "state.pt")
        git("worktree", "add", "--detach", str(tmp / "before"), rev)
        try:
            for p in range(pairs):
                times = time_pair({"before": tmp / "before", "now": ROOT}, tmp, p % 2 == 1, repeats, warmup, threads)
                ratios.append(statistics.median(times["now"]) / statistics.median(times["before"]))
                before_times += times["before"]
                now_times += times["now"]
        finally:
            git("worktree", "remove", "--force", str(tmp / "before"))
    return ratios, before_times, now_times, rev


def time_pair(trees: dict, tmp: Path, swap: bool, repeats: int, warmup: int, threads: int) -> dict:
    """name -> seconds of one forward, from one fresh worker per tree, alternating (started in reverse if swap)."""
    workers = {}
    try:
        for name in (reversed(trees) if swap else trees):
            workers[name] = Worker(trees[name], tmp / "state.pt", tmp / f"{name}.pt", threads)
        assert not workers["before"].info["has_hooks"] and workers["now"].info["has_hooks"], workers
        assert torch.equal(workers["before"].logits, workers["now"].logits), "plain forward changed its logits"
        return alternate({k: (lambda w=w: w.time(1)[0]) for k, w in workers.items()}, repeats, warmup)
    finally:
        for w in workers.values():
            w.close()


def bridge_twin(model: GPTNeoX):
    """TransformerLens' TransformerBridge around transformers' GPTNeoXForCausalLM holding exactly our weights, raw."""
    warnings.filterwarnings("ignore")
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    hf = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(model.config.to_hf_config()))
    hf.config._attn_implementation = "eager"
    hf.load_state_dict({("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in model.state_dict().items()},
                       strict=True)
    return build_bridge_from_module(hf.eval(), "GPTNeoXForCausalLM", hf_config=hf.config)


def check_values(model, bridge, x) -> str:
    """Raise unless logits and every hook point both fill agree."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tolerances import FP32_LOGITS_REL, rel_err
    with torch.no_grad():
        logits, cache = model.run_with_cache(x)
        tl_logits, tl_cache = bridge.run_with_cache(x)
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()  # scores: compare the unmasked entries only
        errs = {"logits": rel_err(logits, tl_logits)}
        for name in (n for n in model.hook_names() if n in tl_cache):
            ours, ref = cache[name], tl_cache[name]
            errs[name] = (rel_err(ours[..., causal], ref[..., causal]) if name.endswith("hook_attn_scores")
                          else rel_err(ours, ref))
    bad = {n: e for n, e in errs.items() if e > FP32_LOGITS_REL}
    if bad:
        raise AssertionError(f"ours and TransformerLens differ: {bad}")
    unfired = sorted({n.split(".", 2)[-1] for n in model.hook_names() if n not in tl_cache})
    return (f"logits and {len(errs) - 1} hook points equal within {FP32_LOGITS_REL:g} relative (max "
            f"{max(errs.values()):.2g}); not filled by TransformerLens: {', '.join(unfired)}")


def peak_bytes(fn) -> tuple[int, int]:
    """(peak, still held at the end) of torch's CPU allocations during fn(), above what was live before it."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn()  # warm-up: one-time allocations stay out
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del out
    return peak, live


def header(args) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "transformer-lens"))
    return (f"device: cpu ({cpu}, {torch.get_num_threads()} threads); {versions}; Python {platform.python_version()}\n"
            f"date: {datetime.date.today()}; command: PYTHONPATH=. python benchmarks/bench_hooks.py "
            f"{' '.join(sys.argv[1:])}\n{args.model_name} shape, random init, fp32, B={args.batch_size} "
            f"T={args.seq_len}, medians of {args.repeats} after {args.warmup} warm-up rounds ((a): per worker pair, "
            f"{args.pairs} pairs)")


def main(*, before: str, pairs: int, model_name: str, batch_size: int, seq_len: int, repeats: int, warmup: int,
         threads: int | None, layer: int, seed: int):
    if not Path(gptneox.__file__).resolve().is_relative_to(ROOT):
        raise SystemExit(f"gptneox is imported from {gptneox.__file__}, not {ROOT}: run PYTHONPATH=. python {__file__}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPTNeoX(Config.from_name(model_name), backend="sdpa").eval()
    model.init_weights()
    x = torch.randint(0, model.config.vocab_size, (batch_size, seq_len))
    med, rows = statistics.median, []

    ratios, t_before, t_now, rev = part_a(model, model_name, x, before, pairs, repeats, warmup, torch.get_num_threads())
    per_pair = ", ".join(f"{r:.3f}" for r in ratios)
    rows += [("a", f"forward, no hooks, before ({rev}, worktree)", f"{med(t_before):.3f} s", "", ""),
             ("a", "forward, no hooks, now", f"{med(t_now):.3f} s",
              f"{med(ratios):.3f}x before (median of {pairs} worker pairs: {per_pair})", "<= 1.03x")]

    bridge = bridge_twin(model)
    values = check_values(model, bridge, x)
    names, tl_all = model.hook_names(), len(bridge.hook_dict)
    sides = {"gptneox forward, no hooks": lambda: seconds(lambda: model(x)),
             f"gptneox run_with_cache, all {len(names)} hook points": lambda: seconds(lambda: model.run_with_cache(x)),
             "TransformerLens run_with_cache, the same names":
                 lambda: seconds(lambda: bridge.run_with_cache(x, names_filter=names)),
             f"TransformerLens run_with_cache, all its {tl_all} hook points":
                 lambda: seconds(lambda: bridge.run_with_cache(x))}
    times = {k: med(v) for k, v in alternate(sides, repeats, warmup).items()}
    ours_all = times[f"gptneox run_with_cache, all {len(names)} hook points"]
    for name, t in times.items():
        ratio = (f"{t / ours_all:.2f}x ours" if name.startswith("TransformerLens") else
                 f"{t / times['gptneox forward, no hooks']:.2f}x the plain forward")
        rows.append(("b", name, f"{t:.3f} s", ratio, ">= 2x ours" if name.startswith("TransformerLens") else ""))

    point = f"blocks.{layer}.hook_resid_post"
    asked = batch_size * seq_len * model.config.hidden_size * 4
    plain, _ = peak_bytes(lambda: model(x))
    for who, fn in (("gptneox", lambda: model.run_with_cache(x, names_filter=point)),
                    ("TransformerLens", lambda: bridge.run_with_cache(x, names_filter=point))):
        peak, held = peak_bytes(fn)
        rows.append(("c", f"{who} run_with_cache({point!r}): peak above the model", f"{peak / MB:.1f} MB",
                     f"+{(peak - plain) / MB:.2f} MB over the plain forward's {plain / MB:.1f} MB = "
                     f"{(peak - plain) / asked:.2f}x asked ({asked / MB:.2f} MB); held after: {held / MB:.1f} MB",
                     "~1x asked"))

    print(header(argparse.Namespace(model_name=model_name, batch_size=batch_size, seq_len=seq_len, repeats=repeats,
                                    warmup=warmup, pairs=pairs)))
    print(f"(a) worktree gptneox vs this tree: logits bitwise equal. (b) values: {values}\n")
    print("| part | measurement | median / peak | ratio | target |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="c5f0a15", help="git revision timed as 'before' in part (a), checked out "
                        "into a temporary worktree (default c5f0a15, the commit before hooks)")
    parser.add_argument("--pairs", type=int, default=5, help="part (a): pairs of fresh worker processes, before "
                        "and now, each timed --repeats times; the ratio is the median of theirs (default 5)")
    parser.add_argument("--model-name", default="pythia-160m", help="preset whose shape to use (default pythia-160m)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per side, per part (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds of every side first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, for every side and worker "
                        "(default: torch's choice)")
    parser.add_argument("--layer", type=int, default=5, help="part (c) caches blocks.LAYER.hook_resid_post (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default 0)")
    main(**vars(parser.parse_args()))
