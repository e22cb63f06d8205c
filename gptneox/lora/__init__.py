"""lora: low-rank adapters on a finished GPTNeoX (LoRA, and QLoRA over a quantized base).

    layers.py   LoRAConfig, LoRALinear and the transforms: add_lora, merge_lora, unmerge_lora, state dicts
    adapter.py  adapters on disk in PEFT's format, both ways: save_adapter, load_adapter
    bank.py     AdapterBank: many adapters ("tunes") on one base, one per row of a batch
"""

from .adapter import (ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, AdapterError, adapter_vocab_size,
                      load_adapter, read_adapter, save_adapter)
from .bank import AdapterBank, BankLinear, grouped_lora
from .layers import (FULL, QKV, TARGETS, LoRAConfig, LoRALinear, add_lora, base_state_dict, check_no_adapters,
                     lora_modules, lora_state_dict, merge_lora, target_paths, unmerge_lora)

__all__ = ["AdapterBank", "BankLinear", "grouped_lora", "ADAPTER_BIN", "ADAPTER_CONFIG", "ADAPTER_FILES",
           "ADAPTER_WEIGHTS", "AdapterError", "adapter_vocab_size", "load_adapter", "read_adapter", "save_adapter",
           "FULL", "QKV", "TARGETS", "LoRAConfig", "LoRALinear", "add_lora", "base_state_dict", "check_no_adapters",
           "lora_modules", "lora_state_dict", "merge_lora", "target_paths", "unmerge_lora"]
