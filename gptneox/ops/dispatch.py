"""The seam between the model and its speedups: the model calls two functions here and knows nothing of how they run.

    qkv_rotary(qkv, nh, rope, cache, input_pos) -> q, k, v   the fused projection split per head, q and k rotated,
                                                             this forward's keys and values written into the cache
    attention(q, k, v, mask) -> y                            causal attention under the forward's Mask

A forward describes its tokens once, in a Rotary and a Mask, which every layer shares; the backend it names picks
the implementation from ATTENTION, a table: the torch path (reference.py) for "eager" and "sdpa", our Triton kernels
for "triton" (eager: their launchers; under torch.compile: the custom ops of custom.py, which CUDA graphs keep). On the
CPU, "sdpa"'s decode steps in fp32 run cpu_attention.c (cpu_attention.py says when).
Shapes: B batch, nh heads, T queries, S keys, hs head size. Facts: docs/architecture.md, "Forward pass".
"""

import torch

from . import cpu_attention, custom, ragged, reference
from .ragged import Ragged
from .runtime import compiling, direct, kernels

DECODE_MAX_T = 16  # triton: at most this many queries with no grad use the split-over-cache decode kernel
# the hook points inside attention (gptneox/hooks.py names them; a hooked layer's InnerHooks is called at each)
ROTARY_POINTS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k")  # [B, nh, T, hs] before / after rotary
ATTENTION_POINTS = ("hook_attn_scores", "hook_pattern")  # [B, nh, T, S] fp32, after the scale and the mask
SPANS_ERROR = ("backend='triton' takes left padding only (attention_mask rows 0...0 1...1 over the keys in reach) "
               "and consecutive input_pos; use backend='sdpa' for other masks")


# ------------------------------------------------------------------------------------------------------ rotary
class Rotary:
    """The rotary embedding of one forward's tokens, shared by every layer: integer positions [B, T] or [T] (what
    the fused kernel takes), and for the torch path the fp32 cos / sin tables, computed once here."""

    def __init__(self, position_ids: torch.Tensor, rot: int, base: float, backend: str):
        self.position_ids, self.rot, self.base = position_ids, rot, base
        self.fused = backend == "triton"
        self.cos, self.sin = (None, None) if self.fused else reference.rotary_cos_sin(position_ids, rot, base)


def qkv_rotary(qkv: torch.Tensor, num_heads: int, rope: Rotary, cache=None, input_pos=None, hook=None):
    """q, k, v [B, nh, T, hs] from the fused projection qkv [B, T, nh * 3 * hs], q and k rotated.

    qkv holds HF's per-head [q | k | v] (not [Q | K | V]; docs/architecture.md, "Forward pass"). With a KVCache, k and
    v are written at its slots input_pos [T] and the whole cache [B, nh, max_len, hs] comes back as k and v.
    hook: a hooked layer's InnerHooks; hooks on ROTARY_POINTS run this step in torch.
    """
    hooked = hook is not None and any(name in hook for name in ROTARY_POINTS)
    if rope.fused and not hooked:
        return _fused_qkv_rotary(qkv, num_heads, rope, cache, input_pos)
    B, T, _ = qkv.shape
    if (not hooked and not rope.fused and getattr(cache, "in_place", False)  # a KVCache (model.py)
            and cache.k_cache.shape[0] == B and cache.k_cache.dtype == torch.float32 and cpu_attention.applies(qkv, T)):
        return cpu_attention.qkv_rotary_cache(qkv, num_heads, rope.cos, rope.sin, cache, input_pos)
    q, k, v = qkv.view(B, T, num_heads, -1).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
    if hooked:
        q, k, v = hook("hook_q", q), hook("hook_k", k), hook("hook_v", v)
    cos, sin = rope.cos, rope.sin
    if cos is None:  # a fused Rotary in a hooked layer
        cos, sin = reference.rotary_cos_sin(rope.position_ids, rope.rot, rope.base)
    q, k = reference.apply_rotary(q, cos, sin), reference.apply_rotary(k, cos, sin)  # first rot dims, in fp32
    if hooked:
        q, k = hook("hook_rot_q", q), hook("hook_rot_k", k)
    return (q, k, v) if cache is None else (q, *cache.update(input_pos, k, v))


def _fused_qkv_rotary(qkv, num_heads, rope, cache, input_pos):
    """One kernel splits and rotates; when nothing needs a gradient it also writes k and v into the cache."""
    pos, rot, base = rope.position_ids, rope.rot, float(rope.base)
    launch = direct(qkv)  # eager on the kernels' device: the launchers themselves, the same kernels as the ops
    if cache is None or (torch.is_grad_enabled() and qkv.requires_grad):  # the kernel's cache write is inference only
        q, k, v = (kernels().rotary if launch else custom.rotary)(qkv, pos, num_heads, rot, base)
        return (q, k, v) if cache is None else (q, *cache.update(input_pos, k, v))
    if launch:
        return kernels().rotary(qkv, pos, num_heads, rot, base, k_cache=cache.k_cache, v_cache=cache.v_cache,
                                input_pos=input_pos)
    q = custom.rotary_into_cache(qkv, pos, cache.k_cache, cache.v_cache, input_pos, num_heads, rot, base)
    return q, cache.k_cache, cache.v_cache


# ------------------------------------------------------------------------------------------------------- masks
class Mask:
    """Which keys each query of one forward sees, shared by every layer. The one rule:

        query i sits at slot input_pos[i] and sees slot j iff j <= input_pos[i] and key j is real (attention_mask
        [B, S]: 1 = token, 0 = padding); a padding query also sees its own slot, so no softmax row is empty.

    S is the number of keys: T without a cache, the cache length with one. For the torch path the rule becomes
    `dense`, bool [B or 1, 1, T, S] (None: plain causal, T == S, no padding: SDPA's is_causal fast path); for the
    kernels it becomes `spans`, the two [B] vectors they take: q_offset (the slot of query 0) and k_start (the
    first real key), which can express left padding (0...0 1...1) and consecutive slots only.

    attention_mask may instead be a Ragged (ragged.py): packed sequences, each at its own cache row and columns,
    which attention() runs on the torch path whatever the backend.
    """

    def __init__(self, input_pos: torch.Tensor, attention_mask, B: int, S: int, backend: str):
        self.ragged = attention_mask if isinstance(attention_mask, Ragged) else None
        if self.ragged is not None:
            if backend == "triton":
                raise ValueError("a ragged forward runs the torch path: use backend='sdpa' or 'eager'")
            self.input_pos, self.attention_mask, self.B, self.S, self.backend = input_pos, None, B, S, backend
            self.fused, self.spans, self._dense = False, None, None
            return
        if attention_mask is not None and attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, attention sees {S}")
        self.input_pos, self.attention_mask, self.B, self.S = input_pos, attention_mask, B, S
        self.backend = backend
        self.fused = backend == "triton"
        self.spans = self._spans() if self.fused else None
        self._dense = None if self.fused else self._rule()

    @property
    def dense(self) -> torch.Tensor | None:
        if self.fused and self._dense is None:  # a fused forward falling back to SDPA (attention dropout)
            self._dense = self._rule()
        return self._dense

    def _rule(self) -> torch.Tensor | None:
        T = self.input_pos.shape[0]
        if self.attention_mask is None and T == self.S:
            return None
        slots = torch.arange(self.S, device=self.input_pos.device)  # [S]
        keep = slots[None, :] <= self.input_pos[:, None]  # [T, S] causal
        if self.attention_mask is None:
            return keep[None, None]  # [1, 1, T, S]
        own = slots[None, :] == self.input_pos[:, None]  # [T, S]
        return (keep & self.attention_mask.bool()[:, None, None, :]) | own  # [B, 1, T, S]

    def _spans(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_offset, k_start), int32 [B] each, after checking that the rule fits them. In eager the check costs one
        device sync and raises a ValueError; under torch.compile it is a device-side assert (no sync, no graph break).
        A decode step (T = 1) is not checked again: it extends a prefill that was."""
        input_pos, mask = self.input_pos, self.attention_mask
        T, device = input_pos.shape[0], input_pos.device
        q_offset = input_pos[:1].to(torch.int32).repeat(self.B)  # [B]
        if mask is None:
            k_start = torch.zeros(self.B, dtype=torch.int32, device=device)  # no padding
            bad = torch.zeros((), dtype=torch.bool, device=device)
        else:
            k_start = (mask.cumsum(-1) == 0).sum(-1).to(torch.int32)  # [B] leading zeros = first real key
            slots = torch.arange(self.S, device=device)
            reach = slots <= input_pos.max()  # [S] keys some query can see
            bad = ((mask.bool() != (slots >= k_start[:, None])) & reach).any()
        if T > 1:
            bad |= (input_pos != input_pos[0] + torch.arange(T, device=device)).any()
            if compiling():
                torch._assert_async(~bad, SPANS_ERROR)
            elif bad.item():
                raise ValueError(SPANS_ERROR)
        return q_offset, k_start


# --------------------------------------------------------------------------------------------------- attention
def attention(q, k, v, mask: Mask, *, dropout_p: float = 0.0, return_probs: bool = False, hook=None):
    """Causal attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs], under the forward's Mask.

    By mask.backend (the ATTENTION table): "eager" computes q k^T and the softmax in fp32 (and alone can return the
    probabilities [B, nh, T, S]); "sdpa" is torch's scaled_dot_product_attention; "triton" our flash attention
    kernel, or the flash-decoding kernel for a few queries against a longer cache (no dropout there: dropout_p > 0
    runs SDPA). hook: a hooked layer's InnerHooks; hooks on ATTENTION_POINTS run this layer eagerly, on any backend.
    """
    if not isinstance(mask, Mask):
        raise TypeError(f"attention takes an ops.Mask (the forward's mask description), got {type(mask).__name__}; "
                        "the torch references with a dense mask are eager_attention and sdpa_attention")
    if mask.ragged is not None:
        if dropout_p or return_probs or (hook is not None and any(name in hook for name in ATTENTION_POINTS)):
            raise ValueError("a ragged forward (serving) has no attention dropout, probabilities or pattern hooks")
        return ragged.attention(q, k, v, mask.ragged)
    if hook is not None and any(name in hook for name in ATTENTION_POINTS):
        return reference.eager_attention(q, k, v, mask.dense, dropout_p, return_probs, hook)
    if return_probs and mask.backend != "eager":
        raise ValueError("attention probabilities are only available with backend='eager'")
    return ATTENTION[mask.backend](q, k, v, mask, dropout_p, return_probs)


def _eager(q, k, v, mask, dropout_p, return_probs):
    return reference.eager_attention(q, k, v, mask.dense, dropout_p, return_probs)


def _sdpa(q, k, v, mask, dropout_p, return_probs):
    dense = mask.dense
    if (dropout_p == 0.0 and dense is not None and k.shape[-2] == dense.shape[-1] and k.is_contiguous()
            and v.is_contiguous() and k.dtype == v.dtype == torch.float32 and cpu_attention.applies(q, q.shape[-2])):
        return cpu_attention.attention(q, k, v, dense)  # a CPU decode step against its cache
    return reference.sdpa_attention(q, k, v, dense, dropout_p)


def _triton(q, k, v, mask, dropout_p, return_probs):
    return fused_attention(q, k, v, mask.spans) if dropout_p == 0.0 else _sdpa(q, k, v, mask, dropout_p, False)


def fused_attention(q, k, v, spans):
    q_offset, k_start = spans
    T, S = q.shape[-2], k.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    decode = T <= DECODE_MAX_T and S > T and not needs_grad  # a decode step: split the cache over the GPU
    if direct(q):
        if decode:
            return kernels().decode_attention(q, k, v, q_offset, k_start)
        return kernels().attention(q, k, v, causal=True, q_offset=q_offset, k_start=k_start)
    if decode:
        return custom.decode_attention(q, k, v, q_offset, k_start)
    return custom.attention(q, k, v, q_offset, k_start)[0]  # lse is for the backward


ATTENTION = {"eager": _eager, "sdpa": _sdpa, "triton": _triton}  # backend -> (q, k, v, mask, dropout_p, probs) -> y
