"""Packaging: kernels/ is the namespace package gptneox.kernels, never a top-level `kernels`, so gptneox and the PyPI
distribution `kernels` (which transformers >= 5.25 requires and imports with GPTNeoXForCausalLM) coexist from every
working directory, the repository root included (where `python -m pytest` and `python -c` put it on sys.path)."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAT_LAYOUT = {"ops.py", "kernel_ops.py", "quantize.py", "cpu_quant.py", "cpu_quant.c", "lora.py", "adapter.py",
               "generation.py", "sampling.py", "speculative.py", "serve.py", "eval.py", "convert.py", "neox.py"}


def run_python(code: str, cwd: Path, pythonpath: str = "", env: dict | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "TRITON_INTERPRET": "1", "HOME": str(cwd), **(env or {})}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def fake_pypi_kernels(tmp_path: Path) -> Path:
    """A site folder holding a regular package `kernels`, as PyPI's distribution installs it."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'pypi'\n")
    return site


def test_packaging_kernels_resolve_to_our_tree(tmp_path):
    out = run_python("import gptneox.kernels.api as k; print(k.__file__)", cwd=tmp_path)
    assert Path(out).resolve() == ROOT / "kernels" / "api.py"


def test_packaging_kernels_folder_is_not_a_regular_package():
    """A regular package (kernels/__init__.py) at the root would win over PyPI's `kernels` from the root."""
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_packaging_pypi_kernels_wins_from_any_directory(tmp_path, cwd):
    """A top-level `kernels` package (as PyPI's) stays theirs, from the repository root too; ours stays ours."""
    site = fake_pypi_kernels(tmp_path)
    out = run_python("import kernels, gptneox.kernels.api as ours; print(kernels.WHO, ours.__file__)",
                     cwd=ROOT if cwd == "root" else tmp_path, pythonpath=str(site))
    who, ours = out.split()
    assert who == "pypi" and Path(ours).resolve() == ROOT / "kernels" / "api.py"


def test_packaging_transformers_imports_pypi_kernels_from_the_root():
    """The README's test command as a new user runs it: from the repository root, transformers' GPTNeoX (which
    imports PyPI's `kernels` when that is installed, as transformers >= 5.25 requires) and gptneox load together."""
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s and s.origin else '')"], cwd="/", capture_output=True, text=True)
    if not where.stdout.strip():
        pytest.skip("PyPI's `kernels` is not installed here (CI installs it in both of its environments)")
    code = ("import kernels, gptneox, gptneox.kernels.api; from transformers import GPTNeoXForCausalLM; "
            "print(kernels.__file__)")
    out = run_python(code, cwd=ROOT, env={"PATH": os.environ["PATH"]})
    assert Path(out).resolve() == Path(where.stdout.strip()).resolve()
    assert ROOT not in Path(out).resolve().parents


def test_packaging_wheel_installs_kernels_as_gptneox_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gptneox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptneox/kernels/api.py" in names and "gptneox/model.py" in names
    assert "gptneox/kernels/__init__.py" not in names
    assert {"gptneox/quant/cpu_quant.c", "gptneox/ops/cpu_linear.c"} <= set(names)  # compiled on first use
    assert {"gptneox/generation/run.py", "gptneox/serve/__main__.py", "gptneox/eval/__main__.py"} <= set(names)
    flat = [n for n in names if n.count("/") == 1 and n.removeprefix("gptneox/") in FLAT_LAYOUT]
    assert not flat, f"modules of the flat layout in the wheel (a stale build/ folder?): {flat}"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), names
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["gptneox"]
    requires = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    triton = [line for line in requires.splitlines() if line.startswith("Requires-Dist: triton")]
    assert triton and all("extra ==" in line for line in triton), triton  # an extra: CPU-only machines skip it
    # installed from the wheel, beside a PyPI-style `kernels`: each import finds its own
    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    site = fake_pypi_kernels(tmp_path)
    out = run_python("import kernels, gptneox.kernels.api as ours; print(kernels.WHO, ours.__file__)", cwd=tmp_path,
                     pythonpath=os.pathsep.join([str(target), str(site)]))
    who, ours = out.split()
    assert who == "pypi" and Path(ours).resolve() == target / "gptneox" / "kernels" / "api.py"


def test_packaging_triton_backend_without_triton_says_how_to_get_it(monkeypatch):
    from gptneox import GPTNeoX, ops
    from gptneox.config import Config
    monkeypatch.setattr(ops.runtime, "triton_available", lambda: False)  # as on a machine without triton
    with pytest.raises(ValueError, match=r"backend='triton' needs the triton package.*use backend='sdpa'"):
        GPTNeoX(Config.from_name("pythia-14m"), backend="triton")
