"""The seam between the model and its speedups: rotary embedding, attention and activations, torch path.

Everything here is the reference that tests and benchmarks import. Shapes: B batch, nh heads, T queries,
S keys, hs head size, rot rotary dims. Facts: ../shared/docs/neox-spec.md sections 4 and 5.
"""

import math

import torch
import torch.nn.functional as F

BACKENDS = ("eager", "sdpa")


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


# --------------------------------------------------------------------------------------------------- attention
def attention(q, k, v, mask=None, *, backend="sdpa", dropout_p=0.0, return_probs=False):
    """Scaled dot-product attention, q [B, nh, T, hs], k and v [B, nh, S, hs] -> [B, nh, T, hs].

    mask: bool [B or 1, 1, T, S], True where a query may see a key; None means plain causal with T == S.
    Every row of the mask must allow at least one key (the model lets a padded query see itself).
    backend "eager" computes q k^T and the softmax in fp32 and can return the probabilities [B, nh, T, S];
    "sdpa" is torch.nn.functional.scaled_dot_product_attention (fp32 accumulation inside).
    """
    if backend == "eager":
        return _eager_attention(q, k, v, mask, dropout_p, return_probs)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if return_probs:
        raise ValueError("attention probabilities are only available with backend='eager'")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None)


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
