"""gptneox: GPT-NeoX (Pythia, Dolly v2) from scratch in PyTorch, numerically equal to Hugging Face's GPTNeoX."""

from .checkpoint import CheckpointError
from .config import PRESETS, Config
from .dolly import extract_response, format_prompt
from .generation import GenerationConfig, Generator, generate, stream
from .hub import pythia_steps, resolve_checkpoint
from .lora import LoRAConfig, add_lora, load_adapter, merge_lora, save_adapter, unmerge_lora
from .model import GPTNeoX, KVCache, causal_lm_loss
from .quantize import QuantizedLinear, quantize
from .tokenizer import Tokenizer

__all__ = ["Config", "PRESETS", "GPTNeoX", "KVCache", "causal_lm_loss", "Tokenizer", "CheckpointError",
           "GenerationConfig", "Generator", "generate", "stream", "format_prompt", "extract_response",
           "resolve_checkpoint", "pythia_steps", "LoRAConfig", "add_lora", "merge_lora", "unmerge_lora",
           "save_adapter", "load_adapter", "quantize", "QuantizedLinear"]
__version__ = "0.1.0"
