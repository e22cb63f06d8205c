"""The seam between the model and its speedups: rotary embedding, attention and activations.

The model calls two functions here and knows nothing of how they run:
    qkv_rotary(qkv, nh, rope, cache, input_pos) -> q, k, v   the fused projection split per head, q and k rotated,
                                                             this forward's keys and values written into the cache
    attention(q, k, v, mask) -> y                            causal attention under the forward's Mask
Both run the torch path written out below (the reference every kernel is tested against) or, for backend "triton",
our kernels through their custom ops (gptneox/kernel_ops.py: torch.ops.gptneox.*, kept whole by torch.compile and
CUDA graphs; the kernels themselves, gptneox.kernels, are imported on first use). A forward describes its tokens
once, in a Rotary and a Mask, which every layer shares. Shapes: B batch, nh heads, T queries, S keys, hs head size,
rot rotary dims.
Facts: docs/architecture.md, "Forward pass" and "Half precision".
"""

import importlib
import importlib.util
import math

import torch
import torch.nn.functional as F

from . import kernel_ops  # torch.ops.gptneox.*; it calls back into this module at run time only

BACKENDS = ("eager", "sdpa", "triton")
DECODE_MAX_T = 16  # triton: at most this many queries with no grad use the split-over-cache decode kernel
# the hook points inside attention (gptneox/hooks.py names them; ops calls a hooked layer's InnerHooks at each)
ROTARY_POINTS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k")  # [B, nh, T, hs] before / after rotary
ATTENTION_POINTS = ("hook_attn_scores", "hook_pattern")  # [B, nh, T, S] fp32, after the scale and the mask
SPANS_ERROR = ("backend='triton' takes left padding only (attention_mask rows 0...0 1...1 over the keys in reach) "
               "and consecutive input_pos; use backend='sdpa' for other masks")


# ---------------------------------------------------------------------------------------------------- backends
TRITON_MISSING = ("backend='triton' needs the triton package, which CUDA builds of torch bring on Linux (else pip "
                  "install triton, or the gptneox[triton] extra); use backend='sdpa' or 'eager'")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def compiling() -> bool:
    """Inside torch.compile (Dynamo tracing). Rotary and attention keep their kernels there (custom ops), and the
    mask check becomes a device-side assert; QuantizedLinear, whose kernel is a plain launcher, runs torch."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def check_backend(name: str | None) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise ValueError(TRITON_MISSING)


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    """"triton" for fp16 / bf16 activations (autocast's dtype when it is on) on CUDA with Triton installed, else
    "sdpa". fp32 stays on SDPA: our exact-fp32 kernels are no faster there and take tens of seconds each to compile."""
    device = torch.device(device)
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    fast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return "triton" if fast and triton_available() else "sdpa"


def kernels():
    """gptneox.kernels.api (the Triton kernels' public functions), imported on first use. The repository's kernels/
    folder is the namespace package gptneox.kernels, installed or mounted by gptneox/__init__.py."""
    if not triton_available():
        raise ValueError(TRITON_MISSING)
    try:
        return importlib.import_module("gptneox.kernels.api")
    except ModuleNotFoundError as e:
        if e.name not in ("gptneox.kernels", "gptneox.kernels.api"):
            raise
        raise ValueError("backend='triton': the Triton kernels (gptneox.kernels) are not installed; reinstall "
                         "gptneox, or use backend='sdpa' or 'eager'") from None


# ------------------------------------------------------------------------------------------------------ rotary
def rotary_cos_sin(position_ids: torch.Tensor, rot: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, rot] in fp32 for integer positions [B, T] (or [T]).

    inv_freq[j] = base^(-2j/rot), angle = p * inv_freq, duplicated as [angle | angle] for rotate-half
    (HF GPTNeoXRotaryEmbedding; fp32 angles as HF 4.37+ and gpt-neox after nx#873).
    """
    device = position_ids.device
    inv_freq = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot))  # [rot/2]
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, rot/2]
    emb = torch.cat((angles, angles), dim=-1)  # [B, T, rot]
    emb = emb if emb.dim() == 3 else emb[None]  # [B or 1, T, rot]
    return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, rot]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot dims of every head of x [B, nh, T, hs] in fp32; pass the rest through.

    Pairs are (i, i + rot/2), NeoX's rotate-half, not GPT-J's interleave (HF apply_rotary_pos_emb).
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:]  # [B, nh, T, rot], [B, nh, T, hs - rot]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)  # [B, nh, T, hs]


class Rotary:
    """The rotary embedding of one forward's tokens, shared by every layer: integer positions [B, T] or [T] (what
    the fused kernel takes), and for the torch path the fp32 cos / sin tables, computed once here."""

    def __init__(self, position_ids: torch.Tensor, rot: int, base: float, backend: str):
        self.position_ids, self.rot, self.base = position_ids, rot, base
        self.fused = backend == "triton"
        self.cos, self.sin = (None, None) if self.fused else rotary_cos_sin(position_ids, rot, base)


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
    q, k, v = qkv.view(B, T, num_heads, -1).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
    if hooked:
        q, k, v = hook("hook_q", q), hook("hook_k", k), hook("hook_v", v)
    cos, sin = (rope.cos, rope.sin) if rope.cos is not None else rotary_cos_sin(rope.position_ids, rope.rot, rope.base)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # first rot dims, in fp32
    if hooked:
        q, k = hook("hook_rot_q", q), hook("hook_rot_k", k)
    return (q, k, v) if cache is None else (q, *cache.update(input_pos, k, v))


def _fused_qkv_rotary(qkv, num_heads, rope, cache, input_pos):
    """One kernel splits and rotates; when nothing needs a gradient it also writes k and v into the cache."""
    pos, rot, base = rope.position_ids, rope.rot, float(rope.base)
    direct = _direct(qkv)  # eager on the kernels' device: the launchers themselves, the same kernels as the ops
    if cache is None or (torch.is_grad_enabled() and qkv.requires_grad):  # the kernel's cache write is inference only
        q, k, v = (kernels().rotary if direct else kernel_ops.rotary)(qkv, pos, num_heads, rot, base)
        return (q, k, v) if cache is None else (q, *cache.update(input_pos, k, v))
    if direct:
        return kernels().rotary(qkv, pos, num_heads, rot, base, k_cache=cache.k_cache, v_cache=cache.v_cache,
                                input_pos=input_pos)
    q = kernel_ops.rotary_into_cache(qkv, pos, cache.k_cache, cache.v_cache, input_pos, num_heads, rot, base)
    return q, cache.k_cache, cache.v_cache


def _direct(t: torch.Tensor) -> bool:
    """Eager, on a device the kernels run on: call the launchers directly. A custom op's dispatch costs 44-74 us of
    Python per call on the 2-core CPU machine (2 calls per layer per step), which an eager decode step, bound by
    launches, would feel; under torch.compile the ops are what keeps the kernels in the graph (kernel_ops)."""
    return not compiling() and kernel_ops._on_kernels(t)


# ------------------------------------------------------------------------------------------------------- masks
class Mask:
    """Which keys each query of one forward sees, shared by every layer. The one rule:

        query i sits at slot input_pos[i] and sees slot j iff j <= input_pos[i] and key j is real (attention_mask
        [B, S]: 1 = token, 0 = padding); a padding query also sees its own slot, so no softmax row is empty.

    S is the number of keys: T without a cache, the cache length with one. For the torch path the rule becomes
    `dense`, bool [B or 1, 1, T, S] (None: plain causal, T == S, no padding: SDPA's is_causal fast path); for the
    kernels it becomes `spans`, the two [B] vectors they take: q_offset (the slot of query 0) and k_start (the
    first real key), which can express left padding (0...0 1...1) and consecutive slots only.
    """

    def __init__(self, input_pos: torch.Tensor, attention_mask: torch.Tensor | None, B: int, S: int, backend: str):
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


def spans_to_dense(q_offset: torch.Tensor, k_start: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """The dense bool mask [B, 1, T, S] of the spans q_offset, k_start [B], by Mask's rule: query i of row b sits at
    slot q_offset[b] + i and sees keys k_start[b] <= j <= q_offset[b] + i, and always its own slot."""
    slots = torch.arange(S, device=q_offset.device)  # [S]
    qpos = (q_offset[:, None] + torch.arange(T, device=q_offset.device))[..., None]  # [B, T, 1]
    keep = (slots <= qpos) & (slots >= k_start[:, None, None])  # [B, T, S]
    return (keep | (slots == qpos))[:, None]  # [B, 1, T, S]


# --------------------------------------------------------------------------------------------------- attention
def attention(q, k, v, mask: Mask, *, dropout_p: float = 0.0, return_probs: bool = False, hook=None):
    """Causal attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs], under the forward's Mask.

    By mask.backend: "eager" computes q k^T and the softmax in fp32 (and alone can return the probabilities
    [B, nh, T, S]); "sdpa" is torch's scaled_dot_product_attention; "triton" our flash attention kernel, or the
    flash-decoding kernel for a few queries against a longer cache. The kernel has no dropout: dropout_p > 0 runs SDPA.
    hook: a hooked layer's InnerHooks; hooks on ATTENTION_POINTS run this layer's attention eagerly, on any backend.
    """
    if not isinstance(mask, Mask):
        raise TypeError(f"attention takes an ops.Mask (the forward's mask description), got {type(mask).__name__}; "
                        "the torch references with a dense mask are eager_attention and sdpa_attention")
    if hook is not None and any(name in hook for name in ATTENTION_POINTS):
        return eager_attention(q, k, v, mask.dense, dropout_p, return_probs, hook)
    if return_probs or mask.backend == "eager":
        if mask.backend != "eager":
            raise ValueError("attention probabilities are only available with backend='eager'")
        return eager_attention(q, k, v, mask.dense, dropout_p, return_probs)
    if mask.fused and dropout_p == 0.0:
        return _fused_attention(q, k, v, mask.spans)
    return sdpa_attention(q, k, v, mask.dense, dropout_p)


def _fused_attention(q, k, v, spans):
    q_offset, k_start = spans
    T, S = q.shape[-2], k.shape[-2]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    decode = T <= DECODE_MAX_T and S > T and not needs_grad  # a decode step: split the cache over the GPU
    if _direct(q):
        if decode:
            return kernels().decode_attention(q, k, v, q_offset, k_start)
        return kernels().attention(q, k, v, causal=True, q_offset=q_offset, k_start=k_start)
    if decode:
        return kernel_ops.decode_attention(q, k, v, q_offset, k_start)
    return kernel_ops.attention(q, k, v, q_offset, k_start)[0]  # lse is for the backward


def sdpa_attention(q, k, v, mask=None, dropout_p: float = 0.0):
    """torch's scaled_dot_product_attention (fp32 accumulation inside) under a dense bool mask [B or 1, 1, T, S]
    (True: the query sees the key), or plain causal with T == S when mask is None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


def eager_attention(q, k, v, mask=None, dropout_p: float = 0.0, return_probs: bool = False, hook=None):
    """The explicit reference: fp32 scores q k^T / sqrt(hs), masked with fp32's minimum (as HF), fp32 softmax,
    probabilities cast to v's dtype before P v; mask as sdpa_attention's. Returns y, or (y, fp32 probs).
    hook: an InnerHooks, called on the masked scores and on the probabilities."""
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, nh, T, S]
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    if hook is not None:
        scores = hook("hook_attn_scores", scores)
    probs = scores.softmax(dim=-1)  # fp32 [B, nh, T, S]
    if hook is not None:
        probs = hook("hook_pattern", probs)
    y = F.dropout(probs, p=dropout_p).to(v.dtype) @ v  # [B, nh, T, hs]
    return (y, probs) if return_probs else y


# -------------------------------------------------------------------------------------------------- activation
def gelu_fast(x):  # HF FastGELUActivation ("gelu_fast", gpt-neox-20b): tanh GELU with rounded constants
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def gelu_new(x):  # HF NewGELUActivation ("gelu_new", OpenAI GPT-2's form)
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x):  # HF GELUTanh ("gelu_pytorch_tanh")
    return F.gelu(x, approximate="tanh")


# HF ACT2FN names -> function; "gelu" is the exact erf GELU that every Pythia / Dolly config names.
ACT2FN = {"gelu": F.gelu, "gelu_fast": gelu_fast, "gelu_new": gelu_new, "gelu_pytorch_tanh": gelu_tanh,
          "relu": F.relu, "silu": F.silu, "swish": F.silu}
