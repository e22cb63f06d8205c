"""gptneox: GPT-NeoX (Pythia, Dolly v2) from scratch in PyTorch, numerically equal to Hugging Face's GPTNeoX."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from . import _moved


def _mount_kernels() -> None:
    """The repository's kernels/ folder as the namespace package gptneox.kernels, where no installer put it there.

    kernels/ has no __init__.py, so that it never shadows PyPI's `kernels` (README, "Install"). A wheel installs it
    as gptneox/kernels/, which Python finds by itself; setuptools' editable finder cannot map a namespace package
    nested in a regular one, and an uninstalled checkout has no mapping at all: both get the folder here (no import
    of Triton happens until gptneox.kernels.api is imported)."""
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if importlib.util.find_spec(__name__ + ".kernels") is None and (folder / "api.py").is_file():
        spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)


_mount_kernels()
_moved.install()  # the flat layout's module paths keep working

from .checkpoint import CheckpointError
from .config import PRESETS, Config
from .generation import GenerationConfig, Generator, generate, stream
from .hub import pythia_steps, resolve_checkpoint
from .loading import load
from .lora import AdapterBank, LoRAConfig, add_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from .model import GPTNeoX, KVCache, causal_lm_loss
from .prompts.dolly import extract_response, format_prompt
from .quant import QuantizedLinear, quantize
from .tokenizer import Tokenizer

__all__ = ["Config", "PRESETS", "GPTNeoX", "KVCache", "causal_lm_loss", "Tokenizer", "CheckpointError",
           "GenerationConfig", "Generator", "generate", "stream", "format_prompt", "extract_response",
           "resolve_checkpoint", "pythia_steps", "LoRAConfig", "add_lora", "merge_lora", "unmerge_lora",
           "save_adapter", "load_adapter", "AdapterBank", "quantize", "QuantizedLinear", "load"]
__version__ = "0.1.0"
