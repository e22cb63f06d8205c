"""benchmarks/gpu_check.py, the one-command GPU check, in its CPU smoke mode (--tiny): every section runs under
Triton's interpreter and reports ok, every number is finite, and the JSON and markdown reports are written."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["roofline", "tests", "correctness", "kernels", "decode", "compile", "train"]
FLAGS = ["--out", "--tiny", "--device", "--sections", "--autotune", "--budget_s", "--section"]


def numbers(value):
    """Every int, float and None inside a JSON value (the records write a NaN or infinity as null)."""
    if isinstance(value, bool):
        return
    if value is None or isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow  # a minute: every section of the GPU check on the CPU, in fresh processes
def test_gpu_check_tiny_runs_every_section_and_reports(tmp_path):
    out = run("--tiny", "--device", "cpu", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    table = (tmp_path / "gpu_check.md").read_text()
    assert [s["name"] for s in report["sections"]] == SECTIONS
    for key in ("device", "date", "command", "seconds"):
        assert report[key], key
    assert report["versions"]["torch"] and report["versions"]["triton"]
    for section in report["sections"]:
        what = f"{section['name']}: {section['status']}\n{section.get('error', '')}"
        assert section["status"] == "ok", what  # nothing here is CUDA-only: --tiny runs every section on CPU
        assert section["items"] and section["seconds"] >= 0, what
        assert all(item["status"] == "ok" for item in section["items"]), what
        assert all(x is not None and math.isfinite(x) for x in numbers(section["items"])), what
        assert f"| {section['name']} | ok |" in table
        assert all(f"| {section['name']} | {item['case']} |" in table for item in section["items"])
    assert "[gpu_check] correctness: ok" in out.stdout  # progress lines as it goes


def test_gpu_check_help_explains_every_flag():
    out = run("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in FLAGS:
        assert flag in out.stdout, flag
    assert "PYTHONPATH=. python benchmarks/gpu_check.py --out" in out.stdout  # the exact command, from the docstring


def test_gpu_check_refuses_the_full_check_on_cpu(tmp_path):
    out = run("--device", "cpu", "--out", str(tmp_path), timeout=120)
    assert out.returncode != 0 and "use --tiny on CPU" in out.stderr
