"""Quantizing a finished model: a transform of it, not branches in model.py (gpt-fast's int8 / int4 handlers).

Decoding one token reads every weight once, so it runs at memory bandwidth: fewer bytes per weight are more tokens
per second. quantize() swaps every nn.Linear of the blocks and embed_out for a QuantizedLinear; the input embedding
stays as it is (a lookup reads one row per token, not the table). Also here: what config.json records of it, and how
reports name and size it.
"""

import torch
import torch.nn as nn

from .linear import LORA_POINTER, QuantizedLinear
from .schemes import check_settings, scheme, settings


def targets(model) -> list[str]:
    """Names of the modules quantize() replaces: every nn.Linear of the blocks, and embed_out unless it is tied to
    the input embedding (then it is the embedding table, which stays float)."""
    names = [f"gpt_neox.layers.{n}" for n, m in model.gpt_neox.layers.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear))]
    return names + ([] if model.config.tie_word_embeddings else ["embed_out"])


def settings_of(model) -> dict | None:
    """{"mode", "group_size"} of a quantized model (config.json's "quantization"), None if it is not quantized."""
    found = {(m.mode, m.group_size) for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not found:
        return None
    assert len(found) == 1, f"mixed quantization settings {found}"
    return settings(*found.pop())


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize(model, mode: str, *, group_size: int = 128):
    """Quantize model in place (and return it): every target() linear becomes a QuantizedLinear. A model on the
    meta device gets empty quantized modules of the right shapes (checkpoint.py then streams the tensors in)."""
    check_settings(mode, group_size)
    done = settings_of(model)
    if done is not None:
        raise ValueError(f"the model is already quantized ({done}); quantizing twice compounds the error: load the "
                         "unquantized checkpoint again and quantize that")
    for name in targets(model):
        linear = model.get_submodule(name)
        if linear.weight.is_meta:
            module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, mode,
                                     group_size, dtype=linear.weight.dtype, device="meta")
        else:
            module = QuantizedLinear.from_linear(linear, mode, group_size)
        _replace(model, name, module)
    return model


ACTIVATIONS = (None, "int8")


def quantize_activations(model, activations: str | None = "int8"):
    """Opt in (or back out, with None) to quantized activations for a quantized model's decode steps on the CPU:
    each row of x in blocks of 32 columns to int8 (scale max |x| / 127), integer dot products against the int8 / int4
    weights, as llama.cpp's Q8_0 / Q4_0 compute. Faster where the CPU has AVX-512 VNNI, and less exact: its error is
    that of rounding x to 8 bits (docs/quantization.md, "Quantized activations", measures it). Steps of more than
    cpu.PROMPT_ROWS rows (prompts), and other devices, stay weight-only. A runtime choice: files do not record it."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError("quantize_activations needs a quantized model: quantize(model, 'int8' or 'int4') first")
    for m in layers:
        m.activations = activations
    return model


def config_entries(settings: dict) -> dict:
    """What config.json gets for a quantized model: "quantization" (ours, read back by checkpoint.py) and a
    "quantization_config" naming an unknown quant_method, so that transformers, which would otherwise cast int8
    weights to float without a word, at least warns that it skips a quantization (docs/quantization.md, "Files")."""
    return {"quantization": settings,
            "quantization_config": {"quant_method": "gptneox", **settings,
                                    "note": "weight-only quantization of the gptneox package: load the directory "
                                            "with gptneox.GPTNeoX.from_pretrained, not transformers"}}


def refuse_training(model) -> None:
    """A ValueError pointing to LoRA if model holds quantized (frozen) weights: train.py calls it before training."""
    settings = settings_of(model)
    if settings is not None:
        raise ValueError(f"the model is quantized ({settings}): {LORA_POINTER}")


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer except the input embedding (one row per token)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if "embed_in" not in n)


def describe(quantization: dict | None, dtype: torch.dtype) -> str:
    """"int4 g128", "int8", or the float dtype's name ("bfloat16"): how a report names the weights."""
    if quantization is None:
        return str(dtype).removeprefix("torch.")
    return scheme(quantization["mode"]).label(quantization.get("group_size"))
