"""Many LoRA tunes of one base in one batch: an AdapterBank of K adapters, each row of a forward picking its own.

    bank = AdapterBank(model)              # wraps every layer a tune may adapt, once; model.adapter_bank is bank
    bank.add("sql", "runs/sql-adapter")    # an adapter directory, ours or PEFT's (adapter.py reads it)
    with bank.rows(["sql", None, "chat"]): # one tune per row of the batch (None or -1: the base alone)
        logits = model(ids, attention_mask=mask)
    gptneox.generate(model, prompts, adapters=["sql", None, "chat"])   # the same, through generation
    bank.remove("sql"); bank.names; bank.close()                       # close: the plain layers back

Each targeted layer becomes a BankLinear holding the layer as base_layer (untouched, bit for bit) and, per tune,
A [R, in] and B [out, R] with the scale folded into B: a tune on a subset of q / k / v of the fused
query_key_value is one adapter on its rows, B zero on the others (adapter.py's fused form), so every (tune, layer)
is a single pair of small matrices whatever its ranks, alpha, rsLoRA or targets. Tunes differ freely in those.

Why a context on the bank and not an argument of forward: model.py stays unchanged, and the per-row choice reaches
every wrapped layer (attention, MLP, embed_out) without threading it through the blocks. rows() groups the batch
by tune once; each BankLinear then adds, per tune present in the batch and on this layer,

    y[rows_k] += (x[rows_k] A_k^T) B_k^T        x [B, T, in], y [B, T, out]; rows of the base cost nothing

in grouped_lora(), the torch reference path. On CUDA with Triton (use_kernel), the layer instead stacks its tunes
once, A [T, R, in] and B [T, out, R] zero-padded to its largest rank R, and runs the grouped kernel
(kernels/lora.py, Punica's shrink / expand: each token reads its own tune's A and B by index, -1 for the base) in
two launches whatever the number of tunes; CPU, autograd and torch.compile keep the torch path. Adding or
removing a tune changes only the bank's tensors: no layer is rebuilt, no base weight written. Inference only (no
dropout, no gradients to the tunes; generation's adapters= runs uncompiled, without a draft model). Refused for now:
adapters on a resized vocabulary (Dolly's added tokens) and whole embedding matrices other than the base's own
(PEFT saves lm_head's when it is a target). Call add / remove between forwards, not during one.
"""

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.runtime import compiling, kernels, triton_available
from .adapter import (ADAPTER_BIN, ADAPTER_CONFIG, ADAPTER_WEIGHTS, EMBEDDING_KEY, META_VOCAB, AdapterError,
                      _check_config, _plan, read_adapter)
from .layers import TARGETS, _device, _float_tensor, target_paths

BASE = -1  # the index of a row that runs the base alone
_LOADS = itertools.count(1)  # every add() of every bank gets its own serial


def grouped_lora(y: torch.Tensor, x: torch.Tensor, groups) -> torch.Tensor:
    """y plus each group's low-rank product on its rows: groups [(rows [n] or None for every row, A [R, in],
    B [out, R])]; x [B, ..., in], y [B, ..., out]. The torch reference path (BankLinear runs the Triton kernel
    instead where use_kernel says so)."""
    for rows, A, B in groups:
        xs = x if rows is None else x.index_select(0, rows)
        d = F.linear(F.linear(xs.to(A.dtype), A), B).to(y.dtype)  # [n, ..., out]
        y = y + d if rows is None else y.index_add(0, rows, d)
    return y


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def use_kernel(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether a BankLinear runs the grouped Triton kernel: CUDA tensors, Triton installed, eager, no gradient to
    x or y (the kernel adds into y in place and has no backward). Tests force it on CPU under the interpreter."""
    return (x.is_cuda and y.is_cuda and x.dtype in KERNEL_DTYPES and y.dtype in KERNEL_DTYPES
            and triton_available() and not compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)))


class _Active:
    """What the wrapped layers read during a forward: the batch size and [(slot, rows [n] or None)]."""

    def __init__(self):
        self.selection = None


class BankLinear(nn.Module):
    """base_layer(x) plus, for each row, its tune's low-rank product (if it has one on this layer)."""

    def __init__(self, base: nn.Module, active: _Active):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.active = active
        self.tunes = {}  # slot -> (A [R, in], B [out, R] scaled); plain tensors, moved by _apply
        self._stack = None  # the kernel's stacked tunes: (what they were built from, A, B, {slot: index})
        self._idx = None  # the kernel's row indices: (selection, tokens per row, idx [rows x tokens])

    @property
    def weight(self):
        """The base layer's weight (code reading model.embed_out.weight for a device or dtype keeps working)."""
        return self.base_layer.weight

    def _apply(self, fn, *args, **kwargs):  # model.to(...) moves the tunes with the base
        super()._apply(fn, *args, **kwargs)
        self.tunes = {k: (fn(A), fn(B)) for k, (A, B) in self.tunes.items()}
        self._stack = self._idx = None
        return self

    def forward(self, x):  # x [B, ..., in] -> [B, ..., out]
        y = self.base_layer(x)
        selection = self.active.selection
        if selection is None or not self.tunes:
            return y
        batch, groups, per_token = selection
        if per_token:  # a packed forward: the rows are its tokens
            return self._flat(x, y, selection).view(y.shape)
        if x.shape[0] != batch:
            raise ValueError(f"the adapter rows name {batch} rows, the forward has a batch of {x.shape[0]}")
        if not any(slot in self.tunes for slot, _ in groups):
            return y
        if use_kernel(x, y):
            return self._kernel_forward(y, x, selection)
        return grouped_lora(y, x, [(rows, *self.tunes[slot]) for slot, rows in groups if slot in self.tunes])

    def _flat(self, x, y, selection):
        """forward for a selection over tokens: x [..., in] as [tokens, in], y as [tokens, out]. A layer after
        logits_to_keep (embed_out) sees the kept tokens only: the selection's second part names theirs."""
        x, y = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)
        kept = selection[2]
        if x.shape[0] != selection[0] and isinstance(kept, tuple) and x.shape[0] == kept[0]:
            selection = kept
        if x.shape[0] != selection[0]:
            raise ValueError(f"the adapter rows name {selection[0]} tokens, the forward has {x.shape[0]}")
        if not any(slot in self.tunes for slot, _ in selection[1]):
            return y
        if use_kernel(x, y):
            return self._kernel_forward(y, x, selection)
        return grouped_lora(y, x, [(rows, *self.tunes[slot]) for slot, rows in selection[1] if slot in self.tunes])

    def _stacked(self):
        """(A [T, R, in], B [T, out, R], {slot: index}): the tunes zero-padded to the largest rank, rebuilt only
        when the tunes change (add / remove put new tensors in self.tunes)."""
        items = [(slot, *self.tunes[slot]) for slot in sorted(self.tunes)]
        if self._stack is not None and len(self._stack[0]) == len(items) and all(
                s == s2 and A is A2 and B is B2 for (s, A, B), (s2, A2, B2) in zip(items, self._stack[0])):
            return self._stack[1:]
        R = max(A.shape[0] for _, A, _ in items)
        like = items[0][1]
        A_stack = like.new_zeros(len(items), R, self.in_features)
        B_stack = like.new_zeros(len(items), self.out_features, R)
        for i, (_, A, B) in enumerate(items):
            A_stack[i, :A.shape[0]] = A
            B_stack[i, :, :A.shape[0]] = B
        self._stack = (items, A_stack, B_stack, {slot: i for i, (slot, _, _) in enumerate(items)})
        self._idx = None
        return self._stack[1:]

    def _kernel_forward(self, y, x, selection):
        """grouped_lora's sum by the Triton kernel: every token of batch row b takes its tune's index (-1: none on
        this layer), and the kernel adds into y, the base layer's fresh output, in place."""
        A, B, index = self._stacked()
        batch, groups, _ = selection
        tokens = x[0].numel() // self.in_features if batch else 0  # tokens per batch row
        if self._idx is None or self._idx[0] is not selection or self._idx[1] != tokens:
            idx = torch.full((batch,), BASE, dtype=torch.int32, device=x.device)
            for slot, rows in groups:
                if slot in index:
                    idx[slice(None) if rows is None else rows] = index[slot]
            self._idx = (selection, tokens, idx.repeat_interleave(tokens))
        flat = y.reshape(-1, self.out_features)
        flat = flat if flat.is_contiguous() else flat.contiguous()
        kernels().grouped_lora(flat, x.reshape(-1, self.in_features), A, B, self._idx[2])
        return flat.view(y.shape)


class Rows:
    """A reusable context manager: while inside, every forward of the bank's model gives row b tune slots[b]
    (per_token: token b of a packed forward, whatever its shape; a Rows for the tokens whose logits are kept, when
    it is one, names those of the layers that see only them)."""

    def __init__(self, bank: "AdapterBank", slots: list[int], device, per_token=False):
        self.bank, self.slots, self._outer = bank, slots, []
        groups = []
        for slot in sorted(set(slots) - {BASE}):
            rows = [b for b, s in enumerate(slots) if s == slot]
            groups.append((slot, None if len(rows) == len(slots) else torch.tensor(rows, device=device)))
        self.selection = (len(slots), groups, per_token.selection if isinstance(per_token, Rows) else per_token)

    def __enter__(self):
        self._outer.append(self.bank.active.selection)
        self.bank.active.selection = self.selection
        return self

    def __exit__(self, *exc):
        self.bank.active.selection = self._outer.pop()


class AdapterBank:
    """K LoRA tunes of one model, served together: see the module docstring. dtype of the tunes' tensors: default
    each base weight's float dtype, else fp32 (a quantized base)."""

    def __init__(self, model, *, dtype: torch.dtype | None = None):
        if getattr(model, "adapter_bank", None) is not None:
            raise ValueError("the model already has an AdapterBank (model.adapter_bank): add tunes to that one")
        self.model, self.dtype, self.active = model, dtype, _Active()
        self._slots: dict[str, int] = {}  # name -> slot, in the order added
        self._serials: dict[str, int] = {}  # name -> the serial of the add that loaded it
        self.layers: dict[str, BankLinear] = {}
        for path in target_paths(model, TARGETS):
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            self.layers[path] = BankLinear(getattr(owner, leaf), self.active)
            setattr(owner, leaf, self.layers[path])
        model.adapter_bank = self

    @property
    def names(self) -> list[str]:
        """The tunes, in the order they were added."""
        return list(self._slots)

    def index(self, name: str) -> int:
        """The slot of a tune: stable while it is in the bank (a removed tune's slot is reused by a later add)."""
        if name not in self._slots:
            known = ", ".join(map(repr, self._slots)) or "none"
            raise ValueError(f"no adapter named {name!r} in the bank (it holds {known}); bank.add(name, path) first")
        return self._slots[name]

    def serial(self, name: str) -> int:
        """A number naming this load of tune `name`: the same tune loaded again (or another under its name) gets
        another, so that what was computed with the old weights (a prefix cache's blocks) is never reused."""
        self.index(name)
        return self._serials[name]

    def add(self, name: str, path) -> int:
        """Load the adapter in directory path as tune `name`; returns its slot. Every tensor is checked before the
        bank changes; the base weights are never written."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._slots:
            raise ValueError(f"the bank already holds an adapter named {name!r}: remove it first")
        path = Path(path)
        config, tensors, metadata = read_adapter(path)
        _check_config(config, path / ADAPTER_CONFIG)
        file = path / (ADAPTER_WEIGHTS if (path / ADAPTER_WEIGHTS).is_file() else ADAPTER_BIN)
        vocab = int(metadata.get(META_VOCAB, self.model.config.vocab_size))
        if vocab != self.model.config.vocab_size:
            raise AdapterError(f"{file}: the adapter was trained with a vocabulary of {vocab} rows, the model has "
                               f"{self.model.config.vocab_size}; an AdapterBank cannot resize the shared embeddings "
                               "(load that adapter alone: GPTNeoX.from_pretrained(base, adapter=...))")
        for key in [k for k in tensors if EMBEDDING_KEY.fullmatch(k)]:  # PEFT saves them when lm_head is a target
            module = EMBEDDING_KEY.fullmatch(key)["module"]
            own = (self.model.gpt_neox.embed_in if module == "gpt_neox.embed_in" else self.model.embed_out).weight
            if tensors[key].shape != own.shape or not torch.equal(tensors[key].to(own), own):
                raise AdapterError(f"{file}: tensor {key!r} replaces a whole embedding matrix, which the tunes of "
                                   "an AdapterBank share; load that adapter alone (load_adapter)")
            del tensors[key]  # the base's own matrix: nothing to do
        plan, _ = _plan(self.model, config, tensors, metadata, file)
        weights = {p: self._fused(self.layers[p], parts) for p, parts in plan}
        slot = min(set(range(len(self._slots) + 1)) - set(self._slots.values()))
        for p, AB in weights.items():
            self.layers[p].tunes[slot] = AB
        self._slots[name], self._serials[name] = slot, next(_LOADS)
        return slot

    def _fused(self, layer: BankLinear, parts) -> tuple[torch.Tensor, torch.Tensor]:
        """One (A [R, in], B [out, R]) of a layer's parts [(name, A, B, alpha, slot)], the scale folded into B."""
        like = _float_tensor(layer.base_layer)
        kw = dict(dtype=self.dtype or (like.dtype if like is not None else torch.float32),
                  device=_device(layer.base_layer))
        R = sum(A.shape[0] for _, A, _, _, _ in parts)
        fused_B = torch.zeros(layer.out_features, R, dtype=torch.float32)
        heads = self.model.config.num_attention_heads
        start = 0
        for _, A, B, alpha, qkv in parts:
            r = A.shape[0]
            scaled = B.float() * (alpha / r)  # [rows, r]
            if qkv is None:
                fused_B[:, start:start + r] = scaled
            else:  # slot qkv of every head's [q | k | v] rows
                fused_B.view(heads, 3, -1, R)[:, qkv, :, start:start + r] = scaled.view(heads, -1, r)
            start += r
        fused_A = torch.cat([A.float() for _, A, _, _, _ in parts])
        return fused_A.to(**kw).contiguous(), fused_B.to(**kw).contiguous()

    def remove(self, name: str) -> None:
        """Drop tune `name` (its slot becomes free); the base and the other tunes are untouched."""
        slot = self.index(name)
        for layer in self.layers.values():
            layer.tunes.pop(slot, None)
        del self._slots[name]
        del self._serials[name]

    def slots(self, adapters: Sequence) -> list[int]:
        """Slots of a row list: names, None (the base), or slots as ints (-1: the base)."""
        out = []
        for a in adapters:
            if a is None:
                out.append(BASE)
            elif isinstance(a, str):
                out.append(self.index(a))
            elif isinstance(a, int) and (a == BASE or a in self._slots.values()):
                out.append(a)
            else:
                raise ValueError(f"adapter {a!r}: give a tune's name, None (the base) or a slot of "
                                 f"bank.index(name) (-1: the base)")
        return out

    def rows(self, adapters: Sequence, *, per_token: bool = False, kept: Sequence | None = None) -> Rows:
        """A context manager (reusable) under which row b of every forward uses adapters[b]: a name, None or -1
        for the base, or a slot (bank.index). A tensor of slots [B] works too. per_token: adapters[i] is for token
        i of the forward (its tokens in order, whatever its shape: a packed forward's [1, N]); kept: then those of
        the positions logits_to_keep keeps, for the layers after it (embed_out)."""
        if isinstance(adapters, torch.Tensor):
            adapters = adapters.tolist()
        device = _device(self.model)
        if per_token and kept is not None:
            per_token = Rows(self, self.slots(kept), device, True)
        return Rows(self, self.slots(adapters), device, per_token)

    def close(self) -> None:
        """Put the plain layers back and detach the bank from the model."""
        for path, layer in self.layers.items():
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, layer.base_layer)
        self.layers, self._slots, self._serials = {}, {}, {}
        self.model.adapter_bank = None


def bank_rows(model, adapters, batch_size: int):
    """The Rows context for generation's adapters= (one per prompt, or a single name for every prompt), or None
    when adapters is None; a clear ValueError without a bank or with the wrong count."""
    if adapters is None:
        return None
    bank = getattr(model, "adapter_bank", None)
    if bank is None:
        raise ValueError("adapters= needs an AdapterBank on the model: bank = gptneox.lora.AdapterBank(model); "
                         "bank.add(name, adapter_dir)")
    if isinstance(adapters, str):
        adapters = [adapters] * batch_size
    adapters = list(adapters)
    if len(adapters) != batch_size:
        raise ValueError(f"adapters names {len(adapters)} rows, but there are {batch_size} prompts: one adapter "
                         "(or None) per prompt")
    return bank.rows(adapters)
