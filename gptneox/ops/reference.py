"""The torch path: rotary embedding, attention under a dense mask, and activations, written out as the equations.

This is the reference every kernel is tested against, and what runs wherever the kernels do not (backend "eager" and
"sdpa", CPU tensors outside Triton's interpreter, hooked layers). Shapes: B batch, nh heads, T queries, S keys,
hs head size, rot rotary dims. Facts: docs/architecture.md, "Forward pass" and "Half precision".
"""

import math

import torch
import torch.nn.functional as F


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


# ------------------------------------------------------------------------------------------------------- masks
def spans_to_dense(q_offset: torch.Tensor, k_start: torch.Tensor, T: int, S: int) -> torch.Tensor:
    """The dense bool mask [B, 1, T, S] of the spans q_offset, k_start [B], by Mask's rule: query i of row b sits at
    slot q_offset[b] + i and sees keys k_start[b] <= j <= q_offset[b] + i, and always its own slot."""
    slots = torch.arange(S, device=q_offset.device)  # [S]
    qpos = (q_offset[:, None] + torch.arange(T, device=q_offset.device))[..., None]  # [B, T, 1]
    keep = (slots <= qpos) & (slots >= k_start[:, None, None])  # [B, T, S]
    return (keep | (slots == qpos))[:, None]  # [B, 1, T, S]


# --------------------------------------------------------------------------------------------------- attention
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
