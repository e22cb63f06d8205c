"""The package's layers are enforced, not hoped for: import-linter's contracts (pyproject.toml) hold, no module of
gptneox imports one of its own inside a function (which would hide an edge from that graph), the kernels import
nothing of gptneox, and every public name and documented import path still works."""

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# optional third-party packages a function may import when it needs them; gptneox.kernels needs the optional triton
LAZY_OK = ("gptneox.kernels",)


def own_imports_in_functions(path: Path) -> list[str]:
    """`file:line: import` for every import of gptneox's own modules below module level."""
    found = []
    tree = ast.parse(path.read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    for node in {n for f in functions for n in ast.walk(f)}:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["gptneox (relative)"]
        else:
            names = [a.name for a in node.names]
        if any(n.startswith("gptneox") and not n.startswith(LAZY_OK) for n in names):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_no_module_of_gptneox_imports_its_own_modules_inside_a_function():
    found = [hit for p in sorted((ROOT / "gptneox").rglob("*.py")) for hit in own_imports_in_functions(p)]
    assert not found, "function-level imports of gptneox's own modules:\n" + "\n".join(found)


def test_the_check_finds_a_function_level_import(tmp_path):
    bad = ROOT / "gptneox" / "_probe_for_test.py"
    bad.write_text("try:\n    from .model import GPTNeoX\nexcept ImportError:\n    pass\n"  # module level: allowed
                   "def f():\n    from .model import GPTNeoX\n    import gptneox.hub\n    import yaml\n")
    try:
        assert len(own_imports_in_functions(bad)) == 2
    finally:
        bad.unlink()


def test_the_kernels_import_nothing_of_gptneox():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("gptneox"), f"{path.name}:{node.lineno}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("gptneox") for a in node.names), f"{path.name}:{node.lineno}"


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter, a test extra: pip install -e .[test]")
def test_import_linter_contracts_are_kept():
    done = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_import_linter_sees_a_broken_layer(tmp_path):
    """The contract is live: a module low in the stack importing the model breaks it."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is a test extra")
    bad = ROOT / "gptneox" / "ops" / "_probe_for_test.py"
    bad.write_text("from ..model import GPTNeoX\n")
    try:
        done = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True)
    finally:
        bad.unlink()
    assert done.returncode != 0 and "gptneox.ops._probe_for_test -> gptneox.model" in done.stdout


def test_every_public_name_and_documented_path_imports():
    import gptneox
    for name in gptneox.__all__:
        assert getattr(gptneox, name) is not None, name
    for path, names in DOCUMENTED.items():
        module = importlib.import_module(path)
        for name in names:
            assert hasattr(module, name), f"{path}.{name}"


DOCUMENTED = {  # import paths the README and docs/ show users
    "gptneox": ["GPTNeoX", "Config", "Tokenizer", "load", "quantize", "causal_lm_loss", "pythia_steps"],
    "gptneox.lora": ["LoRAConfig", "add_lora", "merge_lora", "unmerge_lora", "save_adapter", "load_adapter",
                     "AdapterError", "lora_modules", "AdapterBank"],
    "gptneox.loading": ["load", "plan", "LoadPlan", "LoadError", "model_bytes"],
    "gptneox.generation": ["GenerationConfig", "Generator", "generate", "stream", "Run", "stop_ids"],
    "gptneox.generation.streaming": ["completion_text", "TextStream"],
    "gptneox.generation.speculative": ["predicted_speedup", "Stats"],
    "gptneox.prompts.dolly": ["format_prompt", "extract_response"],
    "gptneox.hub": ["resolve_checkpoint"],
    "gptneox.quant": ["QuantizedLinear", "quantize", "quantize_weight", "dequantize_weight", "SCHEMES"],
    "gptneox.quant.cpu": ["own_cpu_kernels", "cpu_kernels"],
    "gptneox.train.config": ["TrainConfig"],
    "gptneox.train.data": ["tokenize_records"],
    "gptneox.eval": ["GPTNeoXLM", "main"],
    "gptneox.kernels.api": [],
}


@pytest.mark.parametrize("module", ["gptneox.serve", "gptneox.eval"])
def test_python_dash_m_entry_points_answer_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"python -m {module}" in done.stdout


def test_the_flat_layouts_module_paths_import_with_a_deprecation_warning():
    """Code written against wave 2's flat layout keeps running: gptneox.streaming is gptneox.generation.streaming."""
    code = ("import importlib, sys, warnings\n"
            "from gptneox._moved import MOVED\n"
            "for old, new in MOVED.items():\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        warnings.simplefilter('always')\n"
            "        module = importlib.import_module(old)\n"
            "    assert module is importlib.import_module(new), old\n"
            "    assert any(new in str(w.message) and w.category is DeprecationWarning for w in caught), old\n"
            "    assert module.__spec__.name == new and module.__name__ == new, old  # it keeps its own name\n"
            "from gptneox.streaming import completion_text\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from gptneox.quantize import QuantizedLinear, own_cpu_kernels, model_bytes, quantize\n"
            "    from gptneox.kernel_ops import quant_matmul, rotary\n"
            "assert len(caught) == 6 and all(w.category is DeprecationWarning for w in caught)\n"
            "import gptneox, gptneox.quantize, gptneox.quant\n"
            "assert QuantizedLinear is gptneox.quant.QuantizedLinear and quantize is gptneox.quantize\n"
            "assert callable(gptneox.quantize) and gptneox.quantize.__module__ == 'gptneox.quant.transform'\n"
            "print(len(MOVED))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 16
