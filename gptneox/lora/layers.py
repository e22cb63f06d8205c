"""LoRA (Hu et al. 2021, arXiv:2106.09685) on a finished GPTNeoX: low-rank adapters beside frozen base layers.

    y = base(x) + (alpha / r) * B(A(dropout(x)))      A [r, in] random, B [out, r] zero: a fresh adapter changes nothing

A transform, as gpt-fast's quantize.py: add_lora(model, config) replaces each targeted layer by a LoRALinear that
holds the layer as `base_layer` (PEFT's name) and freezes every other parameter; model.py knows nothing of it.

query_key_value is fused, per head [q | k | v] (rows h * 3 * hs + {0, hs, 2 hs} + i), so the targets "query",
"key" and "value" are separate rank-r adapters on exactly those rows of every head. PEFT can only put one adapter
on the whole fused layer: save_adapter writes a subset of q, k, v as that fused adapter, A stacked [n r, C], B
block-diagonal with zero rows where there is no adapter, rank n r and alpha n alpha, so the product is identical.

The base may be any module with in_features, out_features and forward(x) (a quantized linear for QLoRA); only
merge_lora needs a float nn.Linear weight. Adapters on disk, in PEFT's format: adapter.py. Guide: docs/training.md,
"LoRA and QLoRA".
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

QKV = ("query", "key", "value")  # slot 0, 1, 2 of each head's rows in query_key_value
LAYER_TARGETS = {"query": "attention.query_key_value", "key": "attention.query_key_value",
                 "value": "attention.query_key_value", "dense": "attention.dense",
                 "dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"}
TARGETS = (*LAYER_TARGETS, "embed_out")
FULL = "all"  # the name of an adapter on every row of its layer (every target but q, k, v; PEFT's fused qkv)


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


def check_no_adapters(model):
    attached = lora_modules(model)
    if attached:
        raise ValueError(f"the model already has LoRA adapters ({len(attached)} layers, e.g. {next(iter(attached))});"
                         " attach adapters once: load_adapter / add_lora on a model without any")


def wrap_layer(model, path: str, dropout: float) -> LoRALinear:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    base = getattr(owner, leaf)
    wrapper = LoRALinear(base, model.config.num_attention_heads, dropout).train(base.training)  # eval stays eval
    setattr(owner, leaf, wrapper)
    return wrapper


def add_lora(model, config: LoRAConfig, *, dtype: torch.dtype | None = None):
    """Attach fresh adapters to config.targets of every layer, freeze every other parameter; returns model.
    dtype: the adapters' (default: each base weight's float dtype, else fp32), e.g. fp32 beside a bf16 base."""
    check_no_adapters(model)
    if "embed_out" in config.targets and model.config.tie_word_embeddings:
        raise ValueError("LoRA target embed_out: this model ties embed_out to embed_in; choose other targets")
    for p in model.parameters():
        p.requires_grad_(False)
    for path, targets in target_paths(model, config.targets).items():
        wrapper = wrap_layer(model, path, config.dropout)
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
