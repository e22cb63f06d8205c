"""LoRA adapters on disk in PEFT's format: adapter_config.json + adapter_model.safetensors, both ways.

PEFT (huggingface/peft) names a GPT-NeoX adapter's tensors base_model.model.<module>.lora_A.weight [r, in] and
.lora_B.weight [out, r], one adapter per module, scale lora_alpha / r (rank_pattern / alpha_pattern per module).
It can adapt only the whole fused query_key_value, so our q / k / v adapters (layers.py) are written as that one
adapter: A stacked [n r, C], B block-diagonal [3 C, n r] with zero rows where there is no adapter, rank n r and
alpha n alpha, the product identical. Safetensors metadata (which PEFT ignores) records that layout, so our own
adapters load back as they were, and the vocabulary they were trained with.
"""

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_dir, follow_umask
from .layers import FULL, QKV, TARGETS, LoRALinear, check_no_adapters, lora_modules, target_paths, wrap_layer

ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN)  # what save_adapter replaces (+ tokenizer.json if given)
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
# whole embedding matrices PEFT saves beside the adapter when a target is an embedding layer (save_embedding_layers)
EMBEDDING_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>gpt_neox\.embed_in|embed_out|lm_head)"
                           r"(?:\.base_layer)?\.weight")
META_LAYOUT, META_VOCAB = "gptneox.lora", "gptneox.vocab_size"  # our safetensors metadata (PEFT ignores it)
# our embed_out is transformers 5's lm_head (4.x called it embed_out): adapters are written with the name of the
# transformers this project tests against, and read with either
HF_NAMES = {"embed_out": "lm_head"}


class AdapterError(ValueError):
    """An adapter that cannot be attached as it is: the message names the file and the tensor or field."""


# ---------------------------------------------------------------------------------------------------- writing
def _fused(m: LoRALinear, state: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(A, B, r, alpha) of a layer as ONE adapter on all its rows, PEFT's form: per-slot adapters stacked, A [n r, in],
    B [out, n r] block-diagonal by slot (zero rows where there is no adapter), rank n r and alpha n alpha, so
    that (alpha' / r') B' A' is the sum of the slots' (alpha / r) B A exactly."""
    names = list(m.lora_A)
    A = [state.get(f"{prefix}lora_A.{n}", m.lora_A[n]).detach().cpu() for n in names]
    B = [state.get(f"{prefix}lora_B.{n}", m.lora_B[n]).detach().cpu() for n in names]
    if names == [FULL]:
        return A[0], B[0], A[0].shape[0], m.alpha[FULL]
    scalings = {m.scaling(n) for n in names}
    assert len(scalings) == 1, f"{prefix}: q, k, v adapters of different scales cannot be one PEFT adapter"
    r = [a.shape[0] for a in A]
    fused_B = torch.zeros(m.num_heads, 3, m.out_features // 3 // m.num_heads, sum(r), dtype=B[0].dtype)
    for j, (name, b) in enumerate(zip(names, B)):
        cols = slice(sum(r[:j]), sum(r[:j + 1]))
        fused_B[:, m.slot[name], :, cols] = b.view(m.num_heads, -1, r[j])  # [nh, hs, r_j] into its slot's rows
    alpha = m.scaling(names[0]) * sum(r) if len(set(r)) > 1 else m.alpha[names[0]] * len(names)
    return torch.cat(A), fused_B.flatten(0, 2), sum(r), alpha


def _kind(path: str) -> str:
    return path.rpartition(".")[2]


def _hf_name(path: str) -> str:
    return HF_NAMES.get(path, path)


def _patterns(shapes: dict) -> dict:
    """PEFT's rank_pattern / alpha_pattern keys for {module: (rank, alpha)}: the kind of layer ("query_key_value")
    where all of its kind agree, else the module's own path (a regex, escaped)."""
    kinds = {}
    for name, shape in shapes.items():
        kinds.setdefault(_kind(name), set()).add(shape)
    return {**{kind: next(iter(s)) for kind, s in kinds.items() if len(s) == 1},
            **{re.escape(name): shape for name, shape in shapes.items() if len(kinds[_kind(name)]) > 1}}


def save_adapter(model, path, *, state: dict | None = None, tokenizer=None, base_model_name_or_path=None,
                 force=False) -> None:
    """Write the adapters as PEFT does: adapter_config.json and adapter_model.safetensors, which
    peft.PeftModel.from_pretrained(GPTNeoXForCausalLM..., path) loads with the same logits; and tokenizer.json if a
    Tokenizer is given. state: the adapters' tensors by model.state_dict() name, if not the model's own (gathered
    from FSDP shards). Atomic: the directory is replaced whole, its other files kept. An adapter already there is
    replaced only with force=True, and only if gptneox wrote it and it is unchanged since (atomic.atomic_dir)."""
    modules, state = lora_modules(model), state or {}
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora or load_adapter first)")
    tensors, shapes, layout = {}, {}, {}  # shapes: HF module name -> (rank, alpha)
    for path_, m in modules.items():
        A, B, r, alpha = _fused(m, state, f"{path_}.")
        name = _hf_name(path_)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
        shapes[name] = (r, alpha)
        layout[path_] = {n: m.lora_A[n].shape[0] for n in m.lora_A}  # how to split the fused form back
    dropout = next(iter(modules.values())).lora_dropout
    r0, a0 = next(iter(shapes.values()))
    patterns = _patterns(shapes)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path,
                  r=r0, lora_alpha=a0, lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                  target_modules=sorted({_kind(n) for n in shapes}), bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, modules_to_save=None, init_lora_weights=True, inference_mode=True,
                  rank_pattern={k: r for k, (r, _) in patterns.items() if r != r0},
                  alpha_pattern={k: a for k, (_, a) in patterns.items() if a != a0})
    metadata = {"format": "pt", META_LAYOUT: json.dumps(layout), META_VOCAB: str(model.config.vocab_size)}
    replaces = set(ADAPTER_FILES) | ({"tokenizer.json"} if tokenizer is not None else set())
    with atomic_dir(Path(path), writer="save_adapter", replaces=replaces.__contains__, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata=metadata)
        follow_umask(tmp / ADAPTER_WEIGHTS)  # save_file creates it 0600
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------- reading
def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(adapter_config.json, tensors by PEFT name, safetensors metadata) of an adapter directory."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG} (not a PEFT / gptneox adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    file = path / ADAPTER_WEIGHTS
    if file.is_file():
        try:
            with safe_open(file, framework="pt") as f:
                return config, {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    if (path / ADAPTER_BIN).is_file():
        try:
            return config, torch.load(path / ADAPTER_BIN, map_location="cpu", weights_only=True), {}
        except Exception as e:
            raise AdapterError(f"{path / ADAPTER_BIN}: unreadable ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} or {ADAPTER_BIN}")


def adapter_vocab_size(path) -> int | None:
    """The vocabulary (embedding rows) the adapter was trained with, if it says (ours do; PEFT's do not)."""
    vocab = read_adapter(path)[2].get(META_VOCAB)
    return int(vocab) if vocab else None


def _check_config(config: dict, file: Path):
    checks = [("peft_type", "LORA", config.get("peft_type")), ("use_dora", False, bool(config.get("use_dora"))),
              ("bias", "none", config.get("bias", "none")),
              ("fan_in_fan_out", False, bool(config.get("fan_in_fan_out"))),
              ("modules_to_save", None, config.get("modules_to_save") or None),
              ("lora_bias", False, bool(config.get("lora_bias")))]
    for field, wanted, got in checks:
        if got != wanted:
            raise AdapterError(f"{file}: {field} {got!r} is not supported (only plain LoRA on linear layers: "
                               f"{field} {wanted!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise AdapterError(f"{file}: field {field!r} must be a positive number, got {config.get(field)!r}")


def _pattern(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key): a key matching the path's end."""
    key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)
    return patterns[key] if key is not None else default


def _split(fused_A, fused_B, alpha, layout: dict, m_heads: int, where: str):
    """Our per-slot adapters back from the fused PEFT form save_adapter wrote (layout: {target: rank})."""
    R = fused_A.shape[0]
    B = fused_B.view(m_heads, 3, -1, R)  # [nh, 3, hs, R]
    parts, start, rebuilt = [], 0, torch.zeros_like(B)
    for name, r in layout.items():
        cols, slot = slice(start, start + r), QKV.index(name)
        rebuilt[:, slot, :, cols] = B[:, slot, :, cols]
        parts.append((name, fused_A[cols], B[:, slot, :, cols].flatten(0, 1), alpha * r / R, slot))
        start += r
    if start != R or not torch.equal(rebuilt, B):
        raise AdapterError(f"{where}: not the block layout of q / k / v adapters that its metadata describes")
    return parts


def _plan(model, config: dict, tensors: dict, metadata: dict, file: Path) -> list:
    """[(module path, [(adapter name, A, B, alpha, slot), ...])] after checking every tensor against the model."""
    layout = json.loads(metadata.get(META_LAYOUT, "{}"))
    pairs, embeddings, params = {}, {}, dict(model.named_parameters())
    for key, t in tensors.items():
        match = PEFT_KEY.fullmatch(key)
        embedding = EMBEDDING_KEY.fullmatch(key)
        if embedding:
            name = {"lm_head": "embed_out"}.get(embedding["module"], embedding["module"]) + ".weight"
            if t.shape != params[name].shape:
                raise AdapterError(f"{file}: tensor {key!r} has shape {list(t.shape)}, but the model's {name} has "
                                   f"{list(params[name].shape)}")
            embeddings[name] = t
            continue
        if not match:
            raise AdapterError(f"{file}: tensor {key!r} is not a LoRA A or B matrix (only plain LoRA on linear "
                               "layers is supported)")
        module = {v: k for k, v in HF_NAMES.items()}.get(match["module"], match["module"])
        pairs.setdefault(module, {})[match["ab"]] = (key, t)
    allowed, plan = target_paths(model, TARGETS), []
    for path, ab in pairs.items():
        key = next(iter(ab.values()))[0]
        if path not in allowed:
            raise AdapterError(f"{file}: tensor {key!r} adapts {path!r}, which is not a layer of this model that "
                               f"LoRA can adapt ({model.config.num_hidden_layers} layers; "
                               f"{', '.join(sorted({_kind(p) for p in allowed}))})")
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{file}: tensor {key!r} has no lora_{'B' if 'A' in ab else 'A'} partner")
        (key_a, A), (key_b, B) = ab["A"], ab["B"]
        base = model.get_submodule(path)
        r = A.shape[0] if A.ndim == 2 else -1
        for k, t, want in ((key_a, A, [r, base.in_features]), (key_b, B, [base.out_features, r])):
            if list(t.shape) != want:
                raise AdapterError(f"{file}: tensor {k!r} has shape {list(t.shape)}, but the model's {path} "
                                   f"({base.out_features} x {base.in_features}) needs {want}")
        rank, alpha = (_pattern(config.get(field) or {}, _hf_name(path),
                                _pattern(config.get(field) or {}, path, config[default]))
                       for field, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")))
        if rank != r:
            raise AdapterError(f"{file}: {ADAPTER_CONFIG} gives {path} rank {rank}, but tensor {key_a!r} has rank {r}")
        if config.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # rsLoRA's scale alpha / sqrt(r), as alpha' / r
        parts = (_split(A, B, alpha, layout[path], model.config.num_attention_heads, f"{file}: {path}")
                 if path in layout and FULL not in layout[path] else [(FULL, A, B, alpha, None)])
        plan.append((path, parts))
    if not plan:
        raise AdapterError(f"{file}: holds no LoRA tensors")
    return plan, embeddings


def _resized_shapes(model, vocab: int):
    """model's shapes with `vocab` embedding rows, on the meta device (no memory)."""
    with torch.device("meta"):
        return type(model)(model.config.replace(vocab_size=vocab))


def load_adapter(model, path, *, resize_embeddings: bool = False):
    """Attach the adapter in directory path (ours, or one PEFT trained on a GPT-NeoX model) and freeze the base;
    returns model. Every tensor is checked (name, shape, rank) before the model is touched. resize_embeddings: if
    the adapter was trained on a resized vocabulary (train.py's Dolly runs: 50280 rows), resize the model to it
    first; otherwise a different vocabulary is an error."""
    check_no_adapters(model)
    path = Path(path)
    config, tensors, metadata = read_adapter(path)
    _check_config(config, path / ADAPTER_CONFIG)
    file = path / (ADAPTER_WEIGHTS if (path / ADAPTER_WEIGHTS).is_file() else ADAPTER_BIN)
    vocab = int(metadata.get(META_VOCAB, model.config.vocab_size))
    if vocab != model.config.vocab_size and not resize_embeddings:
        raise AdapterError(f"{file}: the adapter was trained with a vocabulary of {vocab} rows, the model has "
                           f"{model.config.vocab_size}: model.resize_token_embeddings({vocab}) first "
                           "(GPTNeoX.from_pretrained(base, adapter=...) and sample.py --adapter do)")
    if vocab != model.config.vocab_size:
        _plan(_resized_shapes(model, vocab), config, tensors, metadata, file)  # every check before the resize
        model.resize_token_embeddings(vocab)
    plan, embeddings = _plan(model, config, tensors, metadata, file)
    dropout = float(config.get("lora_dropout") or 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for name, t in embeddings.items():  # PEFT's saved embedding matrices replace the base's
            model.get_parameter(name).copy_(t)
        for module_path, parts in plan:
            wrapper = wrap_layer(model, module_path, dropout)
            for name, A, B, alpha, slot in parts:
                wrapper.add(name, A.shape[0], alpha, slot)
                wrapper.lora_A[name].copy_(A)
                wrapper.lora_B[name].copy_(B)
    return model
