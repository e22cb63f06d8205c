"""gptneox: GPT-NeoX (Pythia, Dolly v2) from scratch in PyTorch. `pip install -e .[test]` for development."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="gptneox",
    version="0.1.0",
    description="GPT-NeoX (Pythia, Dolly v2) from scratch in PyTorch, exact against Hugging Face, with Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ is a top-level folder of the repo but installs as gptneox.kernels, a namespace package (no __init__.py):
    # it never shadows the PyPI distribution `kernels`, even from the repository root (README, "Install")
    packages=[*find_packages(include=["gptneox", "gptneox.*"]), "gptneox.kernels"],
    package_dir={"gptneox": "gptneox", "gptneox.kernels": "kernels"},
    package_data={"gptneox.quant": ["cpu_quant.c"], "gptneox.ops": ["cpu_linear.c", "cpu_attention.c"]},  # C kernels, built on first use
    install_requires=[
        "torch>=2.1",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.15",
    ],  # triton is an extra: CUDA builds of torch bring their own, and a CPU-only machine has no use for it
    extras_require={
        "triton": ["triton; platform_system == 'Linux'"],  # backend="triton" on a GPU (torch's CUDA builds have it)
        # everything the test suite uses, so `pip install -e ".[test]" && python -m pytest -q` passes as written;
        # triton's interpreter (TRITON_INTERPRET=1) runs the kernels' tests on the CPU
        "test": ["pytest", "hypothesis", "triton; platform_system == 'Linux'", "transformers>=4.40", "tqdm",
                 "matplotlib", "pyyaml", "transformer-lens", "lm_eval", "peft", "fastapi>=0.110", "uvicorn>=0.29",
                 "openai>=1.0", "httpx", "import-linter>=2.1", "prometheus_client>=0.20", "pytest-xdist>=3.5"],
        "eval": ["lm_eval>=0.4.13"],  # gptneox.eval: the lm-evaluation-harness model "gptneox"
        # python -m gptneox.serve: the OpenAI-compatible server (docs/serving.md)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],  # /metrics
        "tools": ["tqdm", "matplotlib", "huggingface_hub", "pyyaml"],
    },
)
