"""Packaging: kernels/ installs as gptneox.kernels, so gptneox and the PyPI `kernels` distribution never collide."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, pythonpath: str = "") -> str:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_packaging_kernels_resolve_to_our_tree(tmp_path):
    out = run_python("import gptneox.kernels as k; print(k.__file__)", cwd=tmp_path)
    assert Path(out).resolve() == ROOT / "kernels" / "__init__.py"


def test_packaging_coexists_with_pypi_kernels(tmp_path):
    """A top-level `kernels` package (as PyPI's, which transformers probes for) stays theirs, ours stays ours."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'pypi'\n")
    out = run_python("import kernels, gptneox.kernels as ours; import gptneox; print(kernels.WHO, ours.__file__)",
                     cwd=tmp_path, pythonpath=str(tmp_path / "site"))
    who, ours = out.split()
    assert who == "pypi" and Path(ours).resolve() == ROOT / "kernels" / "__init__.py"


def test_packaging_wheel_has_no_top_level_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gptneox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gptneox/kernels/__init__.py" in names and "gptneox/model.py" in names
    assert "gptneox/cpu_quant.c" in names  # compiled on the user's machine on first use
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names), names
    top = next(n for n in names if n.endswith("top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top).decode().split() == ["gptneox"]
