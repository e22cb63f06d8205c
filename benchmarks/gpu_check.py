"""The one-command GPU check: GPU tests, large-shape kernel correctness, kernel benchmarks, decode, training MFU.

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT/gpu_check          # one H100 / H200: <= 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check   # CPU smoke run (CI): toy shapes

Writes DIR/gpu_check.json (every number; device, versions, date, the exact command; per section its status,
errors and seconds) and DIR/gpu_check.md (one table whose rows go to docs/benchmarks.md). Sections, in order of
value: roofline (copy bandwidth, bf16 GEMM: every later figure is also given as a fraction of them), tests
(pytest -m gpu on the kernel tests), correctness (attention fwd/bwd at B=2, nh=16, T=S=2048, hd 64/80/128/256 in
bf16 within 2x of SDPA's error against fp32; a left-padded cached case; tensors past 2**31 elements), kernels
(bench_attention / bench_rotary / bench_decode at a few shapes), decode (greedy tokens/s at batch 1 against the
bandwidth ceiling, pythia-1.4b and dolly-v2-12b shapes), train (one step's MFU, pythia-1.4b shape at T=2048).

Each section runs in its own subprocess under a time budget: a crash (a CUDA fault poisons its process) or a stall
is recorded and the next section still runs; what a section measured before a timeout is kept. The kernels
autotune with GPTNEOX_AUTOTUNE=quick (a few likely configs, docs/kernels.md) and Triton's disk cache serves a
binary compiled in one section to the next, so compilation fits the budget. Models are randomly initialised at the
real shapes (weights cannot be downloaded).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> seconds allowed on one H100 / H200 (compilation included), and with --tiny (each takes 3-10 s on 2 free CPU
# cores; the caps leave room for a loaded CI machine)
BUDGETS = {"roofline": (30, 60), "tests": (150, 120), "correctness": (130, 120), "kernels": (70, 120),
           "decode": (60, 120), "compile": (70, 120), "train": (60, 120)}
TOTAL_BUDGET_S = (470, 480)  # the whole run: 8 minutes less start-up on GPU; --tiny usually ends within a minute
COLUMNS = ["section", "case", "dtype", "result", "vs", "status"]


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for package in ("torch", "triton", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def child_env(args) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env["GPTNEOX_AUTOTUNE"] = args.autotune  # each section tunes at its own shapes; Triton's disk cache keeps binaries
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # before anything imports the kernels (tests/conftest.py does the same)
    return env


def run_section(name: str, args, seconds: float) -> dict:
    """Run one section in a subprocess; its record (DIR/sections/<name>.json) with status and seconds."""
    record_path = Path(args.out) / "sections" / f"{name}.json"
    record_path.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--section", name, "--out", args.out, "--device", args.device,
           *(["--tiny"] if args.tiny else [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(args), cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the section and what it started (pytest), nothing else
        proc.wait()
        rc = "timeout"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"name": name, "items": []}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    if rc == "timeout":
        record["status"] = f"timeout after {seconds:.0f} s (items so far kept)"
    elif rc != 0 and record.get("status") in (None, "running"):
        record["status"] = f"error: exit code {rc}"
    return record


def device_name(device: str) -> str:
    import torch
    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"


def markdown(report: dict) -> str:
    v = report["versions"]
    lines = [f"device: {report['device']} | torch {v['torch']} | triton {v['triton']} | "
             f"transformers {v['transformers']} | {report['date']}", f"command: `{report['command']}`", "",
             "| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    for s in report["sections"]:
        for item in s["items"]:
            lines.append("| " + " | ".join(str(item.get(c, "")) if c != "section" else s["name"] for c in COLUMNS)
                         + " |")
    lines += ["", "| section | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in report["sections"]]
    return "\n".join(lines) + "\n"


def write(report: dict, out: str) -> None:
    """Both reports, rewritten after every section: a run cut short still leaves what it measured."""
    Path(out, "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    Path(out, "gpu_check.md").write_text(markdown(report))


def main(*, out, tiny, device, sections, autotune, budget_s, section):
    args = argparse.Namespace(out=out, tiny=tiny, device=device, autotune=autotune)
    if section:  # the child: one section, in this process
        from gpu_check_sections import run
        return run(section, out_dir=Path(out), tiny=tiny, device=device)
    if device == "cpu" and not tiny:
        raise SystemExit("the full check times GPU kernels at large shapes: use --tiny on CPU")
    Path(out, "sections").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + (budget_s or TOTAL_BUDGET_S[tiny])
    report = {"command": shlex.join([sys.executable, *sys.argv]), "cwd": os.getcwd(), "device": device,
              "date": datetime.datetime.now().isoformat(), "versions": versions(), "tiny": tiny, "autotune": autotune,
              "seconds": 0.0, "sections": []}
    for name in sections:
        left = max(0.0, deadline - time.perf_counter())
        print(f"[gpu_check] {name}: start (budget {min(BUDGETS[name][tiny], left):.0f} s)", flush=True)
        if left < 5:
            record = {"name": name, "status": "skipped: out of time", "seconds": 0, "items": []}
        else:
            record = run_section(name, args, min(BUDGETS[name][tiny], left))
        report["sections"].append(record)
        report["seconds"] = round(time.perf_counter() - start, 1)
        write(report, out)
        print(f"[gpu_check] {name}: {record['status']} in {record['seconds']} s", flush=True)
    report["device"] = device_name(device)
    write(report, out)
    print(markdown(report))
    print(f"[gpu_check] wrote {out}/gpu_check.json and gpu_check.md in {report['seconds']} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json, gpu_check.md and the "
                                                     "per-section records (sections/<name>.json)")
    parser.add_argument("--tiny", action="store_true",
                        help="toy shapes, tiny models, a quick pytest subset: the CPU smoke run of CI")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="where to run (default: cuda when available, else cpu; cpu needs --tiny and runs the "
                             "kernels in Triton's interpreter in fp32/fp16)")
    parser.add_argument("--sections", nargs="+", choices=list(BUDGETS), default=list(BUDGETS),
                        help="sections to run, in the given order (default: all, in order of value)")
    parser.add_argument("--autotune", choices=["quick", "1", "0"], default="quick",
                        help="GPTNEOX_AUTOTUNE for the kernels: quick = a few likely configs (default), "
                             "1 = the full pruned search, 0 = the default config alone")
    parser.add_argument("--budget_s", type=float, default=None,
                        help=f"seconds for the whole run (default {TOTAL_BUDGET_S[0]} on GPU, {TOTAL_BUDGET_S[1]} "
                             "with --tiny); each section also has its own cap (BUDGETS)")
    parser.add_argument("--section", choices=list(BUDGETS), default=None,
                        help="internal: run this one section in this process (what the runner starts)")
    parsed = parser.parse_args()
    if parsed.device is None:
        import torch
        parsed.device = "cuda" if torch.cuda.is_available() else "cpu"
    main(**vars(parsed))
