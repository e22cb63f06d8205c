"""The seam between the model and its speedups: rotary embedding, attention and activations, torch path.

Everything here is the reference that tests and benchmarks import. Shapes: B batch, nh heads, T queries,
S keys, hs head size, rot rotary dims. Facts: ../shared/docs/neox-spec.md sections 4 and 5.
"""

import importlib.util
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "sdpa", "triton")
DECODE_MAX_T = 16  # triton: at most this many queries with no grad use the split-over-cache decode kernel


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


# ------------------------------------------------------------------------------------------------ triton seam
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def compiling() -> bool:
    """Inside torch.compile, backend "triton" runs the torch path: Inductor writes its own Triton kernels, and ours
    (plain launchers, a mask check that syncs) would break a fullgraph trace."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    return bool(is_compiling and is_compiling())


def default_backend(device: torch.device) -> str:
    """"triton" on CUDA when Triton is installed, else "sdpa"."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "sdpa"


def kernels():
    """gptneox.kernels (the Triton kernels), imported on first use.

    Installed, the repository's kernels/ folder is the package gptneox.kernels (setup.py package_dir); from an
    uninstalled checkout it is loaded from ../kernels under that same name, so its relative imports work.
    """
    if "gptneox.kernels" in sys.modules:
        return sys.modules["gptneox.kernels"]
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package (pip install triton, Linux); "
                         "use backend='sdpa' or 'eager'")
    if importlib.util.find_spec("gptneox.kernels") is None:  # uninstalled checkout: the top-level kernels/ folder
        init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
        if not init.is_file():
            raise ValueError(f"backend='triton': the Triton kernels are not installed and {init} does not exist")
        spec = importlib.util.spec_from_file_location("gptneox.kernels", init,
                                                      submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["gptneox.kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["gptneox.kernels"]
            raise
        return module
    return importlib.import_module("gptneox.kernels")


class CausalMask(NamedTuple):
    """The model's mask as the kernels take it: query i of row b sits at slot q_offset[b] + i and sees keys
    k_start[b] <= j <= its slot (left padding hidden); a padding query sees its own slot (GPTNeoX._mask)."""
    q_offset: torch.Tensor  # [B] int
    k_start: torch.Tensor | None  # [B] int, None for no padding

    def dense(self, T: int, S: int) -> torch.Tensor:
        """The equivalent bool mask [B, 1, T, S] for the torch path."""
        slots = torch.arange(S, device=self.q_offset.device)  # [S]
        qpos = self.q_offset[:, None] + torch.arange(T, device=slots.device)  # [B, T]
        start = 0 if self.k_start is None else self.k_start[:, None, None]
        keep = (slots <= qpos[..., None]) & (slots >= start) | (slots == qpos[..., None])  # [B, T, S]
        return keep[:, None]


def causal_mask(input_pos: torch.Tensor, attention_mask: torch.Tensor | None, B: int, S: int) -> CausalMask:
    """CausalMask for queries at consecutive slots input_pos [T] over S keys with attention_mask [B, S] or None.

    The kernels describe padding by a start per row, so attention_mask must be left padding (0...0 1...1) over
    the keys the queries can reach, and input_pos consecutive. Checking that costs one device sync, so a decode
    step (T = 1) is not checked again: it extends a prefill that was.
    """
    T = input_pos.shape[0]
    q_offset = input_pos[:1].expand(B)  # [B]
    if attention_mask is None:
        k_start, bad = None, torch.zeros((), dtype=torch.bool, device=input_pos.device)
    else:
        if attention_mask.shape[-1] != S:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, attention sees {S}")
        k_start = (attention_mask.cumsum(-1) == 0).sum(-1)  # [B] leading zeros = first real key
        slots = torch.arange(S, device=input_pos.device)
        reach = slots <= input_pos.max()  # [S] keys some query can see
        bad = ((attention_mask.bool() != (slots >= k_start[:, None])) & reach).any()
    if T == 1:
        return CausalMask(q_offset, k_start)
    bad |= (input_pos != input_pos[0] + torch.arange(T, device=input_pos.device)).any()
    if not compiling() and bad.item():
        raise ValueError("backend='triton' takes left padding only (attention_mask rows 0...0 1...1 over the keys "
                         "in reach) and consecutive input_pos; use backend='sdpa' for other masks")
    return CausalMask(q_offset, k_start)


def split_rotary(qkv, num_heads, rope, cache=None, input_pos=None):
    """Triton: q, k, v [B, nh, T, hs] from qkv [B, T, nh * 3 * hs] in one kernel, rope = (position_ids, rot, base);
    with a cache, k and v land in it at input_pos and the whole cache [B, nh, max_len, hs] comes back."""
    position_ids, rot, base = rope
    if compiling():  # the torch path, as model.py writes it
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, num_heads, -1).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
        cos, sin = rotary_cos_sin(position_ids, rot, base)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return (q, k, v) if cache is None else (q, *cache.update(input_pos, k, v))
    if cache is None:
        return kernels().rotary(qkv, position_ids, num_heads, rot, base)
    if torch.is_grad_enabled() and qkv.requires_grad:  # the kernel's cache write is not differentiable
        q, k, v = kernels().rotary(qkv, position_ids, num_heads, rot, base)
        return (q, *cache.update(input_pos, k, v))
    return kernels().rotary(qkv, position_ids, num_heads, rot, base,
                            k_cache=cache.k_cache, v_cache=cache.v_cache, input_pos=input_pos)


# --------------------------------------------------------------------------------------------------- attention
def attention(q, k, v, mask=None, *, backend="sdpa", dropout_p=0.0, return_probs=False):
    """Scaled dot-product attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs].

    mask: bool [B or 1, 1, T, S], True where a query may see a key; None means plain causal with T == S.
    Every row of the mask must allow at least one key (the model lets a padded query see itself).
    backend "eager" computes q k^T and the softmax in fp32 and can return the probabilities [B, nh, T, S];
    "sdpa" is torch.nn.functional.scaled_dot_product_attention (fp32 accumulation inside); "triton" is the flash
    attention kernel (gptneox.kernels), whose mask is a CausalMask or None; it has no dropout, so dropout_p > 0
    (and tracing under torch.compile) runs SDPA with the equivalent dense mask.
    """
    if backend == "triton":
        return _triton_attention(q, k, v, mask, dropout_p, return_probs)
    if backend == "eager":
        return _eager_attention(q, k, v, mask, dropout_p, return_probs)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if return_probs:
        raise ValueError("attention probabilities are only available with backend='eager'")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


def _triton_attention(q, k, v, mask, dropout_p, return_probs):
    if return_probs:
        raise ValueError("attention probabilities are only available with backend='eager'")
    if mask is not None and not isinstance(mask, CausalMask):
        raise ValueError("backend='triton' takes a CausalMask (ops.causal_mask) or None, not a dense mask")
    T, S = q.shape[-2], k.shape[-2]
    if dropout_p > 0.0 or compiling():
        dense = None if mask is None else mask.dense(T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=dropout_p, is_causal=mask is None)
    q_offset, k_start = (None, None) if mask is None else mask
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if T <= DECODE_MAX_T and S > T and not needs_grad:  # a decode step: split the cache over the GPU
        return kernels().decode_attention(q, k, v, q_offset if q_offset is not None else S - T, k_start)
    return kernels().attention(q, k, v, causal=True, q_offset=q_offset, k_start=k_start)


def _eager_attention(q, k, v, mask, dropout_p, return_probs):
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # [T, S]
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # [B, nh, T, S]
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1)  # fp32 [B, nh, T, S]
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
