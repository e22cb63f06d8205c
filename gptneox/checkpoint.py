"""Checkpoint I/O in the Hugging Face layout: config.json plus safetensors or pytorch_model.bin, single or sharded.

Loading builds the model on the meta device and streams tensors in one at a time (mmap, then assign), so the
weights are never held twice. Saving writes safetensors shards into a temporary directory and renames it into
place, so a crash never leaves a half checkpoint that looks whole. Formats: docs/architecture.md, "Checkpoint files".
"""

import json
import re
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import progress as progress_bars
from .atomic import atomic_dir, follow_umask
from .config import Config
from .devices import resolve_device, resolve_dtype
from .hub import LAYOUTS, checkpoint_path
from .lora.layers import base_state_dict, lora_modules
from .quant.linear import QuantizedLinear
from .quant.schemes import quantize_weight
from .quant.schemes import settings as quant_settings
from .quant.transform import config_entries, describe, quantize, settings_of

# (index file, single file) pairs, most preferred first: safetensors over pickles, as transformers
# buffers old transformers saved that carry no information: causal mask, its fill value, rotary inv_freq
# (docs/architecture.md, "Checkpoint files")
STALE_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")
# the entries of a directory that are its checkpoint: save_pretrained replaces them (and tokenizer.json when it writes
# one); any other file there is a user's and carries over
CHECKPOINT_FILE = re.compile(r"(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?"
                             r"\.(safetensors|bin)(\.index\.json)?)$")
TOKENIZER_FILE = "tokenizer.json"


def replaced_by_save(name: str, *, tokenizer: bool = True) -> bool:
    """Whether save_pretrained (with a tokenizer or not) replaces the entry `name` of the directory it writes."""
    return bool(CHECKPOINT_FILE.fullmatch(name)) or (tokenizer and name == TOKENIZER_FILE)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file and the tensor or field."""


# ------------------------------------------------------------------------------------------------------ reading
def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory, in load order, after checking that they all exist."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found" if not path.exists()
                                else f"{path}: expected a checkpoint directory, found a file")
    for index_name, single_name in LAYOUTS:
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e!r})") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: names shard(s) that do not exist: {', '.join(missing)}")
            return files
        if (path / single_name).exists():
            return [path / single_name]
    found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise FileNotFoundError(f"{path}: no model.safetensors, pytorch_model.bin or shard index (found: {found})")


def read_tensors(file: Path):
    """Yield (name, tensor) from one weight file, lazily: safetensors by mmap, .bin by torch.load(mmap=True)."""
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="pt") as f:
                names = list(f.keys())
            for name in names:  # one mapping per tensor: a converted tensor's file pages are released at once
                with safe_open(file, framework="pt") as f:
                    tensor = f.get_tensor(name)
                yield name, tensor
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        return
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # zipfile, pickle and unpickler errors all mean the same thing here
        raise CheckpointError(f"{file}: corrupt or truncated PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict of tensors, found {type(state).__name__}")
    yield from state.items()


def checkpoint_name(name: str) -> str | None:
    """Our parameter name for a checkpoint key, or None for a stale buffer to skip."""
    if name.endswith(STALE_SUFFIXES):
        return None
    if name == "lm_head.weight":  # transformers 5.x name
        return "embed_out.weight"
    if name.startswith(("embed_in.", "layers.", "final_layer_norm.")):  # a bare GPTNeoXModel checkpoint
        return "gpt_neox." + name
    return name


def quantization_settings(path: Path) -> dict | None:
    """config.json's "quantization" ({"mode": "int8"} or {"mode": "int4", "group_size": g}), validated; None if the
    checkpoint is not quantized."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None  # nothing to read: the loader reports the missing config its own way
    try:
        settings = json.loads(file.read_text()).get("quantization")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # Config.from_hf_config names what is wrong with the file
    if settings is None:
        return None
    try:
        return quant_settings(settings["mode"], settings.get("group_size"))  # canonical order (json sorts keys)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: field 'quantization' is {settings!r}: {e}") from None


def requested_quantization(path: Path, saved: dict | None, mode: str | None, group_size: int) -> dict | None:
    """The settings the loaded model gets: the checkpoint's own, or those asked for (a float checkpoint); asking a
    quantized checkpoint for other settings is a ValueError."""
    if mode is None:
        return saved
    asked = quant_settings(mode, group_size)
    if saved is not None and saved != asked:
        raise ValueError(f"{path} is already quantized ({describe(saved, None)}); it cannot be requantized to "
                         f"{describe(asked, None)} (the errors would compound): load it as it is, without a "
                         "quantization setting, or quantize the unquantized checkpoint")
    return asked


def load_pretrained(cls, name_or_path, *, revision=None, device=None, dtype=None, backend=None, progress=False,
                    quantize=None, group_size=128):
    """cls built on the meta device, its tensors streamed in from a checkpoint directory, or from a model name (and
    revision) found or fetched by hub.resolve_checkpoint. Holds no reference to the model once it is returned.
    quantize ("int8" / "int4", gptneox/quant/): each linear weight is quantized on `device` as it arrives, so
    no more than one float weight is ever held; a quantized checkpoint (config.json "quantization") loads as it is."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)  # "cuda" without CUDA, "bf16": checked first
    path = checkpoint_path(name_or_path, revision=revision)
    files = weight_files(path)
    config = Config.from_hf_config(path)
    saved = quantization_settings(path)
    settings = requested_quantization(path, saved, quantize, group_size)
    with torch.device("meta"):
        model = cls(config) if backend is None else cls(config, backend=backend)
    if settings is not None:
        _quantize_module(model, settings)
    expected = {name: (p.shape, p.dtype) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("embed_out.weight")
    # float weights to quantize on arrival: name -> the float shape [out, in] the checkpoint holds
    fresh = {} if saved is not None or settings is None else _float_shapes(model)
    state = {}
    what = "config.json implies" if saved is None else f"config.json with quantization {saved} implies"
    for file, name, tensor in progress_bars.bar(_stream(files), total=len(expected), desc="loading", unit="tensor",
                                                enabled=progress):
        ours = checkpoint_name(name)
        if ours is None or (tensor.dtype in (torch.bool, torch.uint8) and ours not in expected):
            continue
        if ours == "embed_out.weight" and config.tie_word_embeddings:
            continue  # a tied head saved anyway (older .bin files): embed_in is the one that counts, as in HF
        if ours not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name!r}, not part of the model that {path}/config.json "
                                  f"describes ({config.num_hidden_layers} layers, attention_bias="
                                  f"{config.attention_bias}, tie_word_embeddings={config.tie_word_embeddings}, "
                                  f"quantization={saved})")
        shape, want = fresh[ours] if ours in fresh else expected[ours]
        integer = not want.is_floating_point
        if tensor.is_floating_point() == integer or (integer and tensor.dtype != want):
            raise CheckpointError(f"{file}: tensor {name!r} is {str(tensor.dtype)[6:]} {list(tensor.shape)}, but "
                                  f"{what} {str(want)[6:] if integer else 'float'} {list(shape)}")
        if tensor.shape != shape:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(tensor.shape)}, but {what} {list(shape)}")
        if not tensor.is_floating_point():
            state[ours] = tensor.to(device=device)
            continue
        # one dtype for the whole model: the caller's, else the checkpoint's first float tensor's (fp16 Pythia)
        dtype = dtype or tensor.dtype
        if ours in fresh:
            prefix = ours.removesuffix("weight")
            w = tensor.to(device=device, dtype=dtype)
            state.update({prefix + k: t for k, t in quantize_weight(w, settings["mode"],
                                                                     settings.get("group_size")).items()})
            del w
        else:
            state[ours] = tensor.to(device=device, dtype=dtype)
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
    if config.tie_word_embeddings:
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign made two Parameters: share one again
        model.embed_out.weight = model.gpt_neox.embed_in.weight
    return model.eval()


def _quantize_module(model, settings: dict) -> None:
    quantize(model, settings["mode"], group_size=settings.get("group_size") or 128)


def _float_shapes(model) -> dict:
    """{name.weight: (float shape [out, in], a float dtype)} of every QuantizedLinear: what a float checkpoint holds."""
    return {f"{n}.weight": (torch.Size([m.out_features, m.in_features]), torch.float32)
            for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _stream(files):
    for file in files:
        for name, tensor in read_tensors(file):
            yield file, name, tensor


# ------------------------------------------------------------------------------------------------------ writing
def parse_size(size, name: str = "max_shard_size") -> int:
    """Bytes in "5GB" (10^9, as HF), "500MiB" (2^20), or an int; at least one. name: what the messages call it."""
    what = f"{name} {size!r}" if name else repr(size)
    if isinstance(size, int):
        nbytes = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"{what} is not a size like '5GB' or '500MiB'")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        nbytes = int(float(m.group(1)) * scale)
    if nbytes < 1:
        raise ValueError(f"{what} is not a positive size (a shard holds at least one byte)")
    return nbytes


class ShardWriter:
    """Collects tensors into safetensors shards of at most max_bytes (a bigger tensor gets a shard of its own).

    Each shard is written as soon as it is full, so only one shard is ever held; close() names the shards as
    transformers does and writes the index.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending, self.size, self.parts, self.total = {}, 0, [], 0

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self):
        part = self.folder / f"part-{len(self.parts):05d}.tmp"
        save_file(self.pending, part, metadata={"format": "pt"})
        follow_umask(part)  # save_file creates it 0600
        self.parts.append((part, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> list[str]:
        """Rename the shards model.safetensors or model-0000i-of-0000n.safetensors; returns the file names."""
        if self.pending or not self.parts:
            self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (part, _), name in zip(self.parts, names):
            part.rename(self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: name for (_, keys), name in zip(self.parts, names) for k in keys}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _base_state(model) -> dict:
    """The tensors of a checkpoint under HF's names; with LoRA adapters merged (gptneox.lora), the merged weights."""
    modules = lora_modules(model)
    if not modules:
        return model.state_dict()
    if any(m.unmerged is None for m in modules.values()):
        raise ValueError("the model has LoRA adapters that are not merged: save_adapter(model, dir) writes the "
                         "adapter, or merge_lora(model) first for a merged checkpoint that transformers loads")
    return base_state_dict(model)


def save_pretrained(model, path, *, max_shard_size="5GB", tokenizer=None, progress=False, force=False) -> None:
    """Write the checkpoint (and tokenizer.json if a Tokenizer is given) into directory path, atomically. A checkpoint
    already there is replaced only with force, and only if gptneox wrote it (atomic.atomic_dir); other files stay."""
    state = _base_state(model)
    if model.config.tie_word_embeddings:
        state.pop("embed_out.weight")  # tied to embed_in; safetensors refuses shared tensors
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    quantization = settings_of(model)  # int8 / int4 tensors (weight, scales, zeros): gptneox/quant/
    max_bytes = parse_size(max_shard_size)
    replaces = partial(replaced_by_save, tokenizer=tokenizer is not None)
    with atomic_dir(path, writer="save_pretrained", replaces=replaces, force=force) as tmp:
        config = {**model.config.to_hf_config(), "torch_dtype": str(dtype).removeprefix("torch.")}
        if quantization is not None:
            config.update(config_entries(quantization))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        writer = ShardWriter(tmp, max_bytes)
        for name, t in progress_bars.bar(state.items(), total=len(state), desc="saving", unit="tensor",
                                         enabled=progress):
            writer.add(name, t.detach().cpu())
        writer.close()
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
