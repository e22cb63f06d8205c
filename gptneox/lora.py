"""LoRA (Hu et al. 2021, arXiv:2106.09685) on a finished GPTNeoX: low-rank adapters beside frozen base layers.

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A [r, in] random, B [out, r] zero: a fresh adapter changes nothing

A transform, as gpt-fast's quantize.py: add_lora(model, config) replaces each targeted layer by a LoRALinear that
holds the layer as `base_layer` (PEFT's name) and freezes every other parameter; model.py knows nothing of it.

query_key_value is fused, per head [q | k | v] (rows h * 3 * hs + {0, hs, 2 hs} + i), so the targets "query",
"key" and "value" are separate rank-r adapters on exactly those rows of every head. PEFT can only put one adapter
on the whole fused layer: save_adapter writes a subset of q, k, v as that fused adapter, A stacked [n r, C], B
block-diagonal with zero rows where there is no adapter, rank n r and alpha n alpha, so the product is identical.

The base may be any module with in_features, out_features and forward(x) (a quantized linear for QLoRA); only
merge_lora needs a float nn.Linear weight. Guide: docs/training.md, "LoRA and QLoRA".
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir

QKV = ("query", "key", "value")  # slot 0, 1, 2 of each head's rows in query_key_value
LAYER_TARGETS = {"query": "attention.query_key_value", "key": "attention.query_key_value",
                 "value": "attention.query_key_value", "dense": "attention.dense",
                 "dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"}
TARGETS = (*LAYER_TARGETS, "embed_out")
FULL = "all"  # the name of an adapter on every row of its layer (every target but q, k, v; PEFT's fused qkv)
ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
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


@dataclass(frozen=True)
class LoRAConfig:
    """r: rank of every adapter; alpha: scale alpha / r; dropout on the adapters' input; targets: any of TARGETS
    (a tuple, or a comma-separated string such as "query,value")."""
    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = QKV

    def __post_init__(self):
        targets = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        object.__setattr__(self, "targets", tuple(t.strip() for t in targets))  # normalise the spelling only
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) < len(self.targets):
            problem = f"unknown {', '.join(unknown)}" if unknown else "empty or repeated"
            raise ValueError(f"LoRA targets {','.join(self.targets)!r}: {problem}; choose from {', '.join(TARGETS)}")


class LoRALinear(nn.Module):
    """base_layer(x) plus, for each adapter, scale * B(A(dropout(x))) on its rows: all of them, or slot j (q, k or
    v) of every head of a fused query_key_value. One dropout mask per call is shared by the adapters (as PEFT's one
    fused adapter sees one)."""

    def __init__(self, base: nn.Module, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_heads = num_heads
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # name -> [r, in], [rows, r]
        self.alpha, self.slot = {}, {}  # name -> alpha; name -> None (every row) or 0 / 1 / 2 (q / k / v rows)
        self.unmerged = None  # while merged: the base weight as it was (merge_lora / unmerge_lora)

    def add(self, name: str, r: int, alpha: float, slot: int | None = None, dtype: torch.dtype | None = None):
        """A fresh adapter (A kaiming-uniform as nn.Linear and PEFT, B zero), in dtype (default: the base weight's
        float dtype, else fp32)."""
        rows = self.out_features if slot is None else self.out_features // 3
        like = _float_tensor(self.base_layer)
        dtype = dtype or (like.dtype if like is not None else torch.float32)
        kw = dict(dtype=dtype, device=_device(self.base_layer))
        self.lora_A[name] = nn.Parameter(torch.empty(r, self.in_features, **kw))  # [r, in]
        self.lora_B[name] = nn.Parameter(torch.zeros(rows, r, **kw))  # [rows, r]
        nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
        self.alpha[name], self.slot[name] = alpha, slot

    def scaling(self, name: str) -> float:
        return self.alpha[name] / self.lora_A[name].shape[0]

    @property
    def weight(self):
        """The base layer's weight (code that reads model.embed_out.weight for a device or dtype keeps working)."""
        return self.base_layer.weight

    def delta(self, name: str) -> torch.Tensor:
        """scale * B A, [rows, in]: what the adapter adds to its rows of the weight."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling(name)

    def forward(self, x):  # x [..., in] -> [..., out]
        y = self.base_layer(x)
        if self.unmerged is not None or not self.lora_A:
            return y
        h = self.lora_dropout(x)
        per_slot = [None, None, None]
        for name, A in self.lora_A.items():
            d = F.linear(F.linear(h.to(A.dtype), A), self.lora_B[name]) * self.scaling(name)  # [..., rows]
            if self.slot[name] is None:
                y = y + d.to(y.dtype)
            else:
                per_slot[self.slot[name]] = d.unflatten(-1, (self.num_heads, -1))  # [..., nh, hs]
        if any(d is not None for d in per_slot):
            like = next(d for d in per_slot if d is not None)
            d = torch.stack([like.new_zeros(()).expand_as(like) if s is None else s for s in per_slot], -2)
            y = y + d.flatten(-3).to(y.dtype)  # [..., nh, 3, hs] -> [..., 3 C], per head [q | k | v]
        return y


def _float_tensor(module: nn.Module):
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None


def _device(module: nn.Module):
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return t.device if t is not None else None


# -------------------------------------------------------------------------------------------------- attaching
def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: LoRALinear} of the adapters attached to model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_paths(model, targets) -> dict[str, list[str]]:
    """{module path: the targets it takes}, in model order; query, key and value share query_key_value."""
    paths = {}
    for i in range(model.config.num_hidden_layers):
        for t in targets:
            if t in LAYER_TARGETS:
                paths.setdefault(f"gpt_neox.layers.{i}.{LAYER_TARGETS[t]}", []).append(t)
    if "embed_out" in targets:
        paths["embed_out"] = ["embed_out"]
    return paths


def _refuse_attached(model):
    attached = lora_modules(model)
    if attached:
        raise ValueError(f"the model already has LoRA adapters ({len(attached)} layers, e.g. {next(iter(attached))});"
                         " attach adapters once: load_adapter / add_lora on a model without any")


def _wrap(model, path: str, dropout: float) -> LoRALinear:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    base = getattr(owner, leaf)
    wrapper = LoRALinear(base, model.config.num_attention_heads, dropout).train(base.training)  # eval stays eval
    setattr(owner, leaf, wrapper)
    return wrapper


def add_lora(model, config: LoRAConfig, *, dtype: torch.dtype | None = None):
    """Attach fresh adapters to config.targets of every layer, freeze every other parameter; returns model.
    dtype: the adapters' (default: each base weight's float dtype, else fp32), e.g. fp32 beside a bf16 base."""
    _refuse_attached(model)
    if "embed_out" in config.targets and model.config.tie_word_embeddings:
        raise ValueError("LoRA target embed_out: this model ties embed_out to embed_in; choose other targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for path, targets in target_paths(model, config.targets).items():
        wrapper = _wrap(model, path, config.dropout)
        for t in targets:
            wrapper.add(t if t in QKV else FULL, config.r, config.alpha, QKV.index(t) if t in QKV else None, dtype)
    return model


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapters' parameters under their names in model.state_dict() (what training updates)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """model's state dict without the adapters, under the base model's (HF) names: after merge_lora, the merged
    model that save_pretrained writes and transformers loads."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".lora_A." not in k and ".lora_B." not in k}


# ---------------------------------------------------------------------------------------------- merge, unmerge
def merge_lora(model) -> None:
    """Fold every adapter into its base weight (W[rows] += scale B A); the forward then runs the base layers alone.
    The weights as they were are kept, so unmerge_lora restores them bit for bit."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("merge_lora: the model has no LoRA adapters")
    for path, m in modules.items():  # every check before any change: nothing half-merged
        if m.unmerged is not None:
            raise ValueError(f"merge_lora: {path} is already merged")
        if not isinstance(m.base_layer, nn.Linear) or _float_tensor(m.base_layer) is None:
            raise ValueError(f"merging into a quantized base: {path} is a {type(m.base_layer).__name__} without a "
                             "float weight to fold the adapter into; merge into the unquantized base instead "
                             "(load it in bf16 or fp32, load_adapter, merge_lora)")
    with torch.no_grad():
        for m in modules.values():
            w = m.base_layer.weight  # [out, in]
            merged = w.detach().clone()
            for name in m.lora_A:
                d = m.delta(name).to(w.dtype)  # [rows, in]
                if m.slot[name] is None:
                    merged += d
                else:
                    merged.view(m.num_heads, 3, -1, m.in_features)[:, m.slot[name]] += d.view(m.num_heads, -1,
                                                                                              m.in_features)
            m.unmerged, w.data = w.data, merged


def unmerge_lora(model) -> None:
    """Undo merge_lora: the base weights as they were, bit for bit, and the adapters active again."""
    modules = lora_modules(model)
    if not modules or any(m.unmerged is None for m in modules.values()):
        raise ValueError("unmerge_lora: the model's adapters are not merged (merge_lora first)")
    for m in modules.values():
        m.base_layer.weight.data, m.unmerged = m.unmerged, None


# ------------------------------------------------------------------------------------------ PEFT's file format
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


def save_adapter(model, path, *, state: dict | None = None, tokenizer=None, base_model_name_or_path=None) -> None:
    """Write the adapters as PEFT does: adapter_config.json and adapter_model.safetensors, which
    peft.PeftModel.from_pretrained(GPTNeoXForCausalLM..., path) loads with the same logits; and tokenizer.json if a
    Tokenizer is given. state: the adapters' tensors by model.state_dict() name, if not the model's own (gathered
    from FSDP shards). Atomic: the directory is replaced whole, its other files kept."""
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
    with atomic_dir(Path(path), keep=lambda name: name != ADAPTER_BIN) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata=metadata)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")


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
    _refuse_attached(model)
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
            wrapper = _wrap(model, module_path, dropout)
            for name, A, B, alpha, slot in parts:
                wrapper.add(name, A.shape[0], alpha, slot)
                wrapper.lora_A[name].copy_(A)
                wrapper.lora_B[name].copy_(B)
    return model
