"""The sections of benchmarks/gpu_check.py, one function each (correctness lives in gpu_check_correctness.py).

Each section records items as it goes (DIR/sections/<name>.json is rewritten after every item, so a timeout keeps
what was measured). gpu_check.py runs each in its own process with a time budget; run(name, ...) is that process's
entry point. Units and formulas (docs/performance.md, "Limits" and "How to measure"): bandwidth counts read +
write; attention FLOPs are FlashAttention's; decode at batch 1 reads every weight but the input embedding once per
token; training FLOPs per token are 6 N + 6 L C T with N the parameters without the input embedding; MFU is
against 989 TFLOP/s dense bf16.
"""

import gc
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "kernels" / "benchmarks"), str(ROOT / "tests")]  # bench_*.py, tolerances.py
PEAK_BF16_TFLOPS = 989  # H100 / H200 dense bf16, the only MFU denominator (docs/performance.md, "Limits")
KERNEL_TESTS = ["tests/kernels/test_attention.py", "tests/kernels/test_rotary.py",
                "tests/kernels/test_decode_attention.py", "tests/kernels/test_triton_backend.py",
                "tests/kernels/test_custom_ops.py"]
OUTCOME = re.compile(r"(?:(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)|"
                     r"(?:\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+))")  # -v, with or without xdist
SUMMARY = re.compile(r"^(?:FAILED|ERROR) (tests/\S+) - (.*)$")  # -rfE: the short failure reason


def g(x: float) -> str:
    """Three significant digits: the same cell format for an H100's 600 TFLOP/s and the interpreter's 2e-05."""
    return f"{x:.3g}"


def finite_or_none(value):
    """value with every NaN or infinity (a provider that failed, a zero time) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class Record:
    """One section's record, rewritten after every item: a killed section still leaves the items so far."""

    def __init__(self, name: str, out_dir: Path):
        self.path = out_dir / "sections" / f"{name}.json"
        self.data = {"name": name, "status": "running", "items": []}
        self.t0 = time.perf_counter()
        self.save()

    def add(self, case: str, dtype: str, result: str, vs: str = "", status: str = "ok", **numbers):
        self.data["items"].append(dict(case=case, dtype=dtype, result=result, vs=vs, status=status, **numbers))
        print(f"  [{self.data['name']} {time.perf_counter() - self.t0:.0f} s] {case}: {result}"
              f"{' | ' + vs if vs else ''}{'' if status == 'ok' else ' | ' + status}", flush=True)
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(finite_or_none(self.data), indent=1, default=str))  # strict JSON: no NaN
        tmp.replace(self.path)


class Context:
    """What every section needs: device, working dtype, toy or real shapes, and the roofline measured first."""

    def __init__(self, out_dir: Path, tiny: bool, device: str):
        self.out_dir, self.tiny, self.device = out_dir, tiny, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # no bf16 kernels in the CPU interpreter
        self.dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]
        self._roofline = None

    def roofline(self, key: str) -> float:
        """copy_gbs or gemm_tflops from the roofline section's record, or measured now if it did not run."""
        if self._roofline is None:
            path = self.out_dir / "sections" / "roofline.json"
            items = json.loads(path.read_text())["items"] if path.exists() else []
            self._roofline = {k: v for item in items for k, v in item.items()
                              if k in ("copy_gbs", "gemm_tflops") and v is not None}  # None: NaN in the record
        if key not in self._roofline:
            self._roofline.update(measure_roofline(self))
        return self._roofline[key]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def measure_roofline(ctx: Context) -> dict:
    from _common import copy_bandwidth_gbs, gemm_tflops
    nbytes, n = (1 << 24, 512) if ctx.tiny else (1 << 30, 8192)  # 1 GiB and 8192^3: far past L2
    return {"copy_gbs": copy_bandwidth_gbs(nbytes, ctx.device), "gemm_tflops": gemm_tflops(n, ctx.dtype, ctx.device),
            "gemm_n": n}


# ---------------------------------------------------------------------------------------------------- sections
def roofline(rec: Record, ctx: Context):
    """Copy bandwidth and a large GEMM, measured once: every later figure is also a fraction of them."""
    r = measure_roofline(ctx)
    if ctx.cuda:
        from triton.runtime import driver
        props = driver.active.utils.get_device_properties(ctx.device.index or 0)
        rec.data["device"] = dict(name=torch.cuda.get_device_name(ctx.device), cuda=torch.version.cuda,
                                  sms=props["multiprocessor_count"], max_shared_mem=props["max_shared_mem"])
    rec.add("copy bandwidth (read + write)", "-", f"{g(r['copy_gbs'])} GB/s", copy_gbs=r["copy_gbs"])
    vs = f"{g(100 * r['gemm_tflops'] / PEAK_BF16_TFLOPS)}% of {PEAK_BF16_TFLOPS} dense bf16" if ctx.cuda else ""
    rec.add(f"GEMM {r['gemm_n']}^3", ctx.dtype_name, f"{g(r['gemm_tflops'])} TFLOP/s", vs, gemm_tflops=r["gemm_tflops"])


def _summary(outcomes: dict) -> dict:
    counts = {k: list(outcomes.values()).count(k.upper()) for k in ("passed", "failed", "error", "skipped")}
    return dict(result=f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                       f"{counts['skipped']} skipped", **counts)


def tests(rec: Record, ctx: Context):
    """pytest in a subprocess: the gpu-marked (bf16) cases of the kernel tests; with --tiny a quick fp32 subset.
    The summary item is rewritten after every test, so a timeout still reports the counts so far."""
    if ctx.tiny:
        args = ["tests/kernels/test_rotary.py", "-k", "every_pythia_head and float32"]
    else:
        args = ["-m", "gpu", *KERNEL_TESTS]
        if importlib.util.find_spec("xdist"):
            args += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]  # compile in parallel
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", *args]
    env = {k: v for k, v in os.environ.items() if k != "GPTNEOX_AUTOTUNE"}  # tests/kernels/conftest.py sets 0
    rec.add(f"pytest {' '.join(args)}", "fp32" if ctx.tiny else "bf16", "starting", status="running")
    summary, outcomes, reasons, tail = rec.data["items"][0], {}, {}, []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if m := SUMMARY.match(line.strip()):
            reasons[m[1]] = m[2][:300]
        elif m := OUTCOME.search(line):
            outcomes[m[1] or m[4]] = m[2] or m[3]
            summary.update(_summary(outcomes))
            rec.save()
    rc = proc.wait()
    bad = {t: o for t, o in outcomes.items() if o in ("FAILED", "ERROR")}
    rec.data["output_tail"] = tail
    summary.update(_summary(outcomes), returncode=rc, status="ok" if rc == 0 and not bad else f"fail: exit code {rc}")
    rec.save()
    for test, outcome in bad.items():
        rec.add(test, "", outcome, status=f"fail: {reasons.get(test, 'see output_tail')}")


def fields(columns: list[str], row: list) -> dict:
    """A benchmark table row as JSON fields: "triton % of copy" -> triton_pct_of_copy."""
    key = lambda c: c.replace(" / ", "_per_").replace("%", "pct").replace("/", "_per_").replace(" ", "_")  # noqa
    return {key(c): v for c, v in zip(columns, row)}


def bench_attention(rec: Record, ctx: Context):
    """TFLOP/s fwd and bwd against SDPA (flash, cuDNN) at S = 2048, B * S = 16k, every Pythia head size."""
    import bench_attention as bench
    if ctx.cuda:
        shapes = dict(head_dims=[64, 80, 128, 256], seqlens=[2048], tokens=16384,
                      providers=["triton", "sdpa-flash", "sdpa-cudnn"])
    else:
        shapes = dict(head_dims=[32, 80], seqlens=[32], tokens=32, providers=["triton", "sdpa"], heads=2)
    p0, p1 = shapes["providers"][:2]
    for hd in shapes.pop("head_dims"):  # one call per shape, so a timeout keeps the rows measured so far
        cols, rows = bench.measure_rows(**shapes, head_dims=[hd], dtype=ctx.dtype_name, modes=["fwd", "bwd"],
                                        causal=True, device=ctx.device, log=lambda line: None)
        for row in rows:
            r = dict(zip(cols, row))
            rec.add(f"attention {r['mode']} causal hd {hd} B {r['B']} nh {r['nh']} S {r['S']}", ctx.dtype_name,
                    f"{g(r[p0])} TFLOP/s ({g(100 * r[p0] / ctx.roofline('gemm_tflops'))}% of GEMM)",
                    f"{p1} {g(r[p1])} ({g(row[-2])}x)", **fields(cols, row))


def bench_rotary(rec: Record, ctx: Context):
    """GB/s of the fused rotary, fwd and bwd, against the torch path and HF's eager rotary, as % of copy."""
    import bench_rotary as bench
    if ctx.cuda:
        shapes = dict(presets=["pythia-1.4b", "pythia-2.8b"], tokens=16384, seqlen=2048)
    else:
        shapes = dict(presets=["pythia-14m"], tokens=16, seqlen=16, providers=["triton", "torch"])
    for preset in shapes.pop("presets"):
        cols, rows = bench.measure_rows(**shapes, presets=[preset], dtype=ctx.dtype_name, modes=["fwd", "bwd"],
                                        copy_gbs=ctx.roofline("copy_gbs"), device=ctx.device, log=lambda line: None)
        for row in rows:
            r = dict(zip(cols, row))
            rec.add(f"rotary {r['mode']} {preset} B*T {shapes['tokens']}", ctx.dtype_name,
                    f"{g(r['triton'])} GB/s ({g(r['triton % of copy'])}% of copy)", f"{cols[-1]} {g(row[-1])}x",
                    **fields(cols, row))


def bench_decode(rec: Record, ctx: Context):
    """One decode step's attention over a KV cache, microseconds and GB/s, against SDPA."""
    import bench_decode as bench
    if ctx.cuda:
        shapes = dict(presets=["pythia-1.4b", "pythia-2.8b"], batches=[1], cache_lens=[2048, 8192])
    else:
        shapes = dict(presets=["pythia-14m"], batches=[1], cache_lens=[64])
    for preset in shapes.pop("presets"):
        cols, rows = bench.measure_rows(**shapes, presets=[preset], dtype=ctx.dtype_name, num_splits=None,
                                        copy_gbs=ctx.roofline("copy_gbs"), device=ctx.device, log=lambda line: None)
        for row in rows:
            r = dict(zip(cols, row))
            rec.add(f"decode attention {preset} B {r['B']} L {r['L']}", ctx.dtype_name,
                    f"{g(r['triton us'])} us, {g(r['triton GB/s'])} GB/s ({g(r['% of copy'])}% of copy)",
                    f"sdpa {g(r['sdpa us'])} us ({g(r['speedup'])}x)", **fields(cols, row))


def kernel_benchmarks(rec: Record, ctx: Context):
    """kernels/benchmarks/bench_*.py at a few shapes, each figure also a fraction of the roofline."""
    for bench in (bench_attention, bench_rotary, bench_decode):
        bench(rec, ctx)


def _build(config, ctx: Context, dtype):
    """A randomly initialised GPTNeoX of config's shape, allocated on the device in dtype directly (a 12b model in
    fp32 on the host first would take 48 GB and minutes)."""
    from gptneox import GPTNeoX
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(ctx.device):
            model = GPTNeoX(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to(device=ctx.device, dtype=dtype)
    model.init_weights()
    return model


def _seconds(fn, ctx: Context, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        ctx.sync()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _decode_rate(rec: Record, ctx: Context, name: str, short: int, long: int):
    from gptneox import Config
    config = Config.from_name(name)
    model = _build(config, ctx, ctx.dtype).eval()
    prompt = torch.randint(0, config.vocab_size, (16,)).tolist()
    gen = lambda n: model.generate([prompt], max_new_tokens=n, temperature=0, eos_token_id=[])  # noqa: E731
    out = gen(4)  # warm-up: kernels compile, autotune, allocator
    assert tuple(out.shape) == (1, 4), f"generate returned shape {tuple(out.shape)}, expected (1, 4)"
    seconds = _seconds(lambda: gen(long), ctx) - _seconds(lambda: gen(short), ctx)
    tokens_per_s = (long - short) / seconds
    weight_bytes = (config.num_parameters - config.vocab_size * config.hidden_size) * ctx.dtype.itemsize
    ceiling = ctx.roofline("copy_gbs") * 1e9 / weight_bytes
    rec.add(f"greedy decode {name}, batch 1, prompt 16, {long - short} tokens timed", ctx.dtype_name,
            f"{g(tokens_per_s)} tokens/s ({g(100 * tokens_per_s / ceiling)}% of ceiling)",
            f"ceiling {g(ceiling)} tokens/s = copy / {g(weight_bytes / 1e9)} GB per token",
            tokens_per_s=tokens_per_s, ceiling_tokens_per_s=ceiling, bytes_per_token=weight_bytes,
            backend=model.backend)


def decode(rec: Record, ctx: Context):
    """Greedy decode tokens/s at batch 1 against the bandwidth ceiling: copy bandwidth / bytes of weights (all but
    the input embedding, read once per token). The difference of a long and a short run cancels the prefill."""
    short, long = (16, 144) if ctx.cuda else (4, 12)  # new tokens
    for name in ["pythia-1.4b", "dolly-v2-12b"] if ctx.cuda else ["pythia-14m"]:
        _decode_rate(rec, ctx, name, short, long)
        gc.collect()  # the model (24 GB for 12b) goes when _decode_rate returns, cycles included
        if ctx.cuda:
            torch.cuda.empty_cache()


def compiled_decode(rec: Record, ctx: Context):
    """Generator(compile=True) with backend "triton": the kernels are custom ops (gptneox/ops/custom.py), so the
    compiled decode step (CUDA graphs on GPU, mode reduce-overhead) keeps flash-decoding over the filled cache.
    Its greedy tokens must equal eager's; tokens/s compiled against eager, both at batch 1 over a full-window cache."""
    from gptneox import Config, Generator
    from gptneox.ops.runtime import kernels
    config = Config.from_name("pythia-410m") if ctx.cuda else Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64)
    model = _build(config, ctx, ctx.dtype).eval()
    model.backend = "triton"
    prompt = torch.randint(0, config.vocab_size, (16,)).tolist()
    new = 64 if ctx.cuda else 4
    calls = []
    real = kernels().decode_attention
    kernels().decode_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        eager, compiled = Generator(model), Generator(model, compile=True)
        settings = dict(max_new_tokens=new, temperature=0, eos_token_id=[])
        want = eager.generate([prompt], **settings)
        got = compiled.generate([prompt], **settings)  # compiles (and captures the CUDA graph)
        compiled.generate([prompt], **settings)  # cudagraph trees record on a later call
        calls.clear()
        seconds = {name: _seconds(lambda gen=gen: gen.generate([prompt], **settings), ctx)
                   for name, gen in (("eager", eager), ("compiled", compiled))}
    finally:
        kernels().decode_attention = real
    same = torch.equal(got, want)
    rate = {name: new / t for name, t in seconds.items()}
    rec.add(f"compiled greedy decode {'pythia-410m' if ctx.cuda else 'tiny'}, batch 1, {new} tokens, backend triton",
            ctx.dtype_name, f"{g(rate['compiled'])} tokens/s compiled, {g(rate['eager'])} eager",
            f"{g(rate['compiled'] / rate['eager'])}x; tokens {'equal' if same else 'DIFFER'}; decode kernel calls "
            f"{len(calls)}", status="ok" if same and calls else "fail: compiled tokens differ from eager" if not same
            else "fail: the compiled step never called the decode kernel",
            compiled_tokens_per_s=rate["compiled"], eager_tokens_per_s=rate["eager"], decode_kernel_calls=len(calls))


def train(rec: Record, ctx: Context):
    """One training step's MFU: bf16 autocast over fp32 weights, fused AdamW, the causal LM loss."""
    from gptneox import Config, causal_lm_loss
    name, B, T = ("pythia-1.4b", 4, 2048) if ctx.cuda else ("pythia-14m", 2, 64)
    config = Config.from_name(name)
    model = _build(config, ctx, torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=ctx.cuda)
    ids = torch.randint(0, config.vocab_size, (B, T), device=ctx.device)
    losses = []

    def step():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            loss = causal_lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for _ in range(2):  # warm-up: kernels, autotune, allocator, optimizer state
        step()
    seconds = _seconds(step, ctx)
    tflops = config.flops_per_token(T) * B * T / seconds / 1e12  # 6 N + 6 L C T per token
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
        backend = model.backend  # the one the step ran: under bf16 autocast on CUDA, triton
    ok = all(math.isfinite(x) for x in losses)
    peak = f"MFU {g(100 * tflops / PEAK_BF16_TFLOPS)}% of {PEAK_BF16_TFLOPS}, " if ctx.cuda else ""
    rec.add(f"train step {name}, B {B} x T {T}, AdamW fused={ctx.cuda}", "bf16 autocast" if ctx.cuda else "fp32",
            f"{g(tflops)} TFLOP/s, {g(B * T / seconds)} tokens/s",
            f"{peak}{g(100 * tflops / ctx.roofline('gemm_tflops'))}% of GEMM",
            status="ok" if ok else f"fail: non-finite loss {losses}", seconds_per_step=seconds, tflops=tflops,
            mfu=tflops / PEAK_BF16_TFLOPS, tokens_per_s=B * T / seconds, loss=losses[-1], backend=backend,
            peak_memory_gb=torch.cuda.max_memory_allocated(ctx.device) / 1e9 if ctx.cuda else 0.0)


def correctness(rec: Record, ctx: Context):
    from gpu_check_correctness import run_all
    run_all(rec, ctx)


SECTIONS = {"roofline": roofline, "tests": tests, "correctness": correctness, "kernels": kernel_benchmarks,
            "decode": decode, "compile": compiled_decode, "train": train}


def run(name: str, *, out_dir: Path, tiny: bool, device: str) -> None:
    """One section in this process; its status: ok, fail: <failed items>, or error: <exception> (with traceback)."""
    rec = Record(name, out_dir)
    try:
        torch.manual_seed(0)
        SECTIONS[name](rec, Context(out_dir, tiny, device))
        failed = [item["case"] for item in rec.data["items"] if item["status"] != "ok"]
        rec.data["status"] = f"fail: {', '.join(failed)}"[:500] if failed else "ok"
    except Exception as e:  # recorded, and the runner goes on to the next section
        rec.data["status"] = f"error: {type(e).__name__}: {e}"[:500]
        rec.data["error"] = traceback.format_exc()[-4000:]
        print(rec.data["error"], file=sys.stderr, flush=True)
    rec.save()
