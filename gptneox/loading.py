"""gptneox.load: open a checkpoint for use, the one path of sample.py, the server, lm-eval's model and train.py.

    model, tokenizer = gptneox.load("dolly-v2-3b", dtype="bf16", device="cuda", quantize="int4", adapter="my-lora")

In a fixed order, every rule once: resolve the name (a directory, or a hub name found locally or fetched: hub.py);
check the device and dtype (devices.py's spellings, "auto" included); check the adapter and the quantization asked
against the checkpoint's own; build the model on the meta device, quantize it, stream the weights in (checkpoint.py);
attach the adapter (QLoRA's order: on the quantized base, the embeddings resized to its vocabulary); pick the
tokenizer (the one given, else the adapter's own tokenizer.json, which a Dolly-style run writes, else the
checkpoint's). plan() runs every check and reads no weight, so a script can refuse bad input before loading.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_pretrained, quantization_settings, requested_quantization, weight_files
from .cli import UsageError
from .config import Config
from .devices import auto_dtype, resolve_device, resolve_dtype, shown
from .hub import resolve_checkpoint
from .lora.adapter import ADAPTER_CONFIG, load_adapter
from .model import GPTNeoX
from .quant.schemes import check_settings
from .quant.transform import describe, weight_bytes
from .quant.transform import quantize as quantize_model
from .tokenizer import Tokenizer

NAMES = {k: k for k in ("ckpt", "revision", "adapter", "quantize", "group_size", "dtype", "device", "tokenizer")}


class LoadError(UsageError, ValueError):
    """Arguments that cannot load: the message names the argument (a script's flag, given its names) in one line.
    A ValueError for Python callers, a usage error (exit 2) for the scripts."""


@dataclass(frozen=True)
class LoadPlan:
    """A checked checkpoint, before any weight is read: what load() will build, for a script's own checks."""
    path: Path
    config: Config
    files: list[Path]
    quantization: dict | None  # what the model will hold: the checkpoint's own, or the one asked for
    dtype: torch.dtype | None  # None: the checkpoint's own
    device: torch.device
    backend: str | None
    adapter: Path | None
    tokenizer: Tokenizer | None  # None: asked for none (tokenizer=False)


def plan(ckpt, *, revision=None, adapter=None, quantize=None, group_size=128, dtype=None, device=None, backend=None,
         tokenizer=None, names: dict | None = None) -> LoadPlan:
    """Every check of load(), no weight read. names: how the caller spells each argument in messages (a script's
    flags, e.g. {"ckpt": "--ckpt"}); dtype "auto" means devices.auto_dtype of the device; tokenizer: a Tokenizer, a
    tokenizer.json or a directory holding one, None for the rule above, or False for none (token data needs none)."""
    names = {**NAMES, **(names or {})}
    device = resolve_device("cpu" if device is None else device, name=names["device"])  # the cheap checks first:
    dtype = auto_dtype(device) if isinstance(dtype, str) and dtype == "auto" else resolve_dtype(dtype,
                                                                                               name=names["dtype"])
    if adapter is not None and not (Path(adapter) / ADAPTER_CONFIG).is_file():  # a typo is said before a download
        raise LoadError(f"{shown(names['adapter'], adapter)}: no {ADAPTER_CONFIG} there (a LoRA adapter directory, "
                        "ours or PEFT's)")
    if quantize is not None:
        try:
            check_settings(quantize, group_size)
        except ValueError as e:
            raise LoadError(f"{shown(names['quantize'], quantize)}: {e}") from None
    try:
        path = resolve_checkpoint(str(ckpt), revision=revision)
    except (ValueError, FileNotFoundError) as e:
        raise LoadError(str(e) if str(ckpt) in str(e) else f"{shown(names['ckpt'], ckpt)}: {e}") from None
    config, files = Config.from_hf_config(path), weight_files(path)  # a broken checkpoint: CheckpointError
    try:
        settings = requested_quantization(path, quantization_settings(path), quantize, group_size)
    except ValueError as e:
        raise LoadError(f"{shown(names['quantize'], quantize)}: {e}") from None
    return LoadPlan(path, config, files, settings, dtype, device, backend, None if adapter is None else Path(adapter),
                    _tokenizer(tokenizer, adapter, path))


def _tokenizer(tokenizer, adapter, path: Path) -> Tokenizer | None:
    """path is the resolved checkpoint directory (a revision's own snapshot), so no revision applies here."""
    if tokenizer is False or isinstance(tokenizer, Tokenizer):
        return tokenizer or None
    if tokenizer is None and adapter is not None and (Path(adapter) / "tokenizer.json").is_file():
        tokenizer = Path(adapter) / "tokenizer.json"  # a run that resized the vocabulary carries its tokenizer
    return Tokenizer.from_pretrained(path if tokenizer is None else tokenizer)


def load(ckpt, *, revision=None, adapter=None, quantize=None, group_size=128, dtype=None, device=None, backend=None,
         tokenizer=None, progress: bool = False, names: dict | None = None) -> tuple[GPTNeoX, Tokenizer]:
    """(model, tokenizer) of ckpt, in eval mode: see the module docstring. ckpt may also be a LoadPlan from plan()
    (then give no other argument but progress). quantize "int8" / "int4" (group_size for int4): weight-only, while
    the weights stream in; a quantized checkpoint loads quantized by itself. dtype None keeps the checkpoint's."""
    if isinstance(ckpt, LoadPlan):
        given = dict(revision=revision, adapter=adapter, quantize=quantize, dtype=dtype, device=device,
                     backend=backend, tokenizer=tokenizer, names=names)
        if any(v is not None for v in given.values()) or group_size != 128:
            raise TypeError("load(plan) takes no other argument but progress: the plan holds the settings")
        p = ckpt
    else:
        p = plan(ckpt, revision=revision, adapter=adapter, quantize=quantize, group_size=group_size, dtype=dtype,
                 device=device, backend=backend, tokenizer=tokenizer, names=names)
    q = p.quantization or {}
    try:
        model = load_pretrained(GPTNeoX, p.path, device=p.device, dtype=p.dtype, backend=p.backend, progress=progress,
                                quantize=q.get("mode"), group_size=q.get("group_size") or 128)
    except torch.OutOfMemoryError:
        raise MemoryError(f"{p.path} does not fit on {p.device} in {describe(p.quantization, p.dtype)} "
                          f"({model_bytes(p.config, p.dtype or torch.float32, p.quantization) / 1e9:.1f} GB of "
                          "weights)") from None
    if p.adapter is not None:
        load_adapter(model, p.adapter, resize_embeddings=True)
    return model, p.tokenizer


def model_bytes(config: Config, dtype: torch.dtype, settings: dict | None = None) -> int:
    """Bytes of all weights of a model of this config in dtype, quantized with settings (None: not), input
    embedding included; computed on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = GPTNeoX(config).to(dtype)
        if settings is not None:
            quantize_model(model, settings["mode"], group_size=settings.get("group_size") or 128)
    embed = model.gpt_neox.embed_in.weight
    return weight_bytes(model) + embed.numel() * embed.element_size()


__all__ = ["LoadError", "LoadPlan", "CheckpointError", "load", "model_bytes", "plan"]
