"""quant: weight-only int8 / int4 quantization, and opt-in int8 activations on the CPU (docs/quantization.md).

    schemes.py    the schemes, a registry: float matrix -> integers and back, and torch's CPU operator for each
    cpu.py        our CPU matmul (cpu_quant.c, built on first use) and which CPU kernel a layer runs
    linear.py     QuantizedLinear and its matmul as the custom op torch.ops.gptneox.quant_matmul
    transform.py  quantize(model): the transform of a finished model, its config entries and reports
"""

from .linear import LORA_POINTER, QuantizedLinear
from .schemes import GROUP_SIZES, MODES, SCHEMES, check_settings, dequantize_weight, quantize_weight
from .transform import (config_entries, describe, quantize, quantize_activations, refuse_training, settings_of,
                        targets, weight_bytes)

__all__ = ["LORA_POINTER", "QuantizedLinear", "GROUP_SIZES", "MODES", "SCHEMES", "check_settings",
           "dequantize_weight", "quantize_weight", "config_entries", "describe", "quantize", "quantize_activations",
           "refuse_training",
           "settings_of", "targets", "weight_bytes"]
