"""The Triton kernels as PyTorch custom ops, torch.ops.gptneox.*, so that torch.compile(fullgraph=True) and CUDA
graphs keep them: Dynamo and Inductor see one opaque call with a fake (meta) implementation of its exact output
shapes, dtypes and strides, instead of tracing into a Triton launcher.

    rotary(qkv, position_ids, num_heads, rotary_ndims, base) -> q, k, v                    differentiable in qkv
    rotary_into_cache(qkv, position_ids, k_cache!, v_cache!, input_pos, ...) -> q           k, v written in place
    attention(q, k, v, q_offset, k_start) -> o, lse                                        differentiable in q, k, v
    decode_attention(q, k_cache, v_cache, q_offset, k_start) -> o                          inference
and the backward ops rotary_bwd and attention_bwd. Shapes: qkv [B, T, nh * 3 * hs] (per head [q | k | v]); q, k, v
[B, nh, T, hs] contiguous; caches [B, nh, L, hs]; position_ids [B, T] or [T] and input_pos [T] integers; q_offset and
k_start [B] integers (the two vectors of dispatch.Mask: causal query i of row b sees the keys
k_start[b] <= j <= q_offset[b] + i, and its own slot). o [B, nh, T, hs] is a view of a [B, T, nh, hs] buffer, so the
model's y.transpose(1, 2).reshape(B, T, C) is free; lse [B, nh, T] fp32 (log2 units of the scaled scores) is
auxiliary and not differentiated.

Where they run: CUDA tensors, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests), go to
the launchers of gptneox.kernels (kernels(), imported on first use); other CPU tensors run the torch path of
reference.py (apply_rotary, the attention math with Mask's dense rule). Facts: docs/kernels.md, "Under
torch.compile: custom ops".
"""

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference
from .runtime import kernels, on_kernels

LOG2E = 1.4426950408889634  # the kernels' lse is log2 of the row's sum of exp(scores): ln-lse * log2(e)


# ------------------------------------------------------------------------------------------------------ helpers
def _empty_bthd(B: int, nh: int, T: int, hs: int, like: Tensor) -> Tensor:
    return like.new_empty(B, T, nh, hs).transpose(1, 2)  # [B, nh, T, hs] view of a [B, T, nh, hs] buffer


def _bthd(o: Tensor) -> Tensor:
    """o [B, nh, T, hs] in the layout the fake implementations promise (a view of [B, T, nh, hs]). A launcher that
    writes that layout costs nothing here (the strides of size-1 dims are relabelled); any other is copied."""
    B, nh, T, hs = o.shape
    if o.transpose(1, 2).is_contiguous():
        return o.as_strided(o.shape, (T * nh * hs, hs, nh * hs, 1))
    return _empty_bthd(B, nh, T, hs, o).copy_(o)


def _head_size(qkv: Tensor, num_heads: int) -> int:
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv: expected [B, T, num_heads ({num_heads}) * 3 * head_size], got {tuple(qkv.shape)}")
    return qkv.shape[-1] // (3 * num_heads)


# ------------------------------------------------------------------------------------------ torch path (CPU)
def _torch_rotary(qkv, position_ids, num_heads, rotary_ndims, base):
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, num_heads, -1).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
    cos, sin = reference.rotary_cos_sin(position_ids, rotary_ndims, base)  # [B or 1, 1, T, rot] fp32
    q, k = reference.apply_rotary(q, cos, sin), reference.apply_rotary(k, cos, sin)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _torch_rotary_bwd(dq, dk, dv, position_ids, rotary_ndims, base):
    """The transpose of a rotation is the rotation by -angle: apply_rotary with -sin; then back to qkv's layout."""
    B, _, T, _ = dq.shape
    cos, sin = reference.rotary_cos_sin(position_ids, rotary_ndims, base)
    dq, dk = reference.apply_rotary(dq, cos, -sin), reference.apply_rotary(dk, cos, -sin)
    return torch.cat((dq, dk, dv), dim=-1).transpose(1, 2).reshape(B, T, -1)  # [B, T, nh * 3 * hs]


def _scores(q, k, q_offset, k_start):
    """fp32 scores q k^T / sqrt(hs) [B, nh, T, S] under Mask's rule for the spans, masked with fp32's minimum."""
    mask = reference.spans_to_dense(q_offset, k_start, q.shape[2], k.shape[2])  # [B, 1, T, S]
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, torch.finfo(torch.float32).min)


def _torch_attention(q, k, v, q_offset, k_start):
    scores = _scores(q, k, q_offset, k_start)
    lse = scores.logsumexp(-1)  # [B, nh, T] natural log
    o = (scores - lse[..., None]).exp().to(v.dtype) @ v  # softmax in fp32, then P v as eager_attention
    return _bthd(o), (lse * LOG2E).contiguous()


def _torch_attention_bwd(do, q, k, v, o, lse, q_offset, k_start):
    """FlashAttention-2's backward in fp32 with P recomputed from lse: dv = P^T do, dp = do v^T,
    ds = P (dp - rowsum(o do)), dq = ds k / sqrt(hs), dk = ds^T q / sqrt(hs)."""
    p = (_scores(q, k, q_offset, k_start) - lse[..., None] / LOG2E).exp()  # [B, nh, T, S] fp32
    do32 = do.float()
    dv = p.transpose(-2, -1) @ do32
    dp = do32 @ v.float().transpose(-2, -1)
    ds = p * (dp - (o.float() * do32).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
    dq, dk = ds @ k.float(), ds.transpose(-2, -1) @ q.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------------- rotary
@custom_op("gptneox::rotary", mutates_args=())
def rotary(qkv: Tensor, position_ids: Tensor, num_heads: int, rotary_ndims: int, base: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, nh, T, hs] (contiguous) from qkv [B, T, nh * 3 * hs], q and k rotated at position_ids."""
    if on_kernels(qkv):
        return kernels().rotary_fwd(qkv, position_ids, num_heads, rotary_ndims, base)
    return _torch_rotary(qkv, position_ids, num_heads, rotary_ndims, base)


@rotary.register_fake
def _(qkv, position_ids, num_heads, rotary_ndims, base):
    B, T, _ = qkv.shape
    shape = (B, num_heads, T, _head_size(qkv, num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


@custom_op("gptneox::rotary_bwd", mutates_args=())
def rotary_bwd(dq: Tensor, dk: Tensor, dv: Tensor, position_ids: Tensor, rotary_ndims: int, base: float) -> Tensor:
    """dqkv [B, T, nh * 3 * hs] (contiguous) from the gradients of q, k, v [B, nh, T, hs]."""
    if on_kernels(dq):
        return kernels().rotary_bwd(dq, dk, dv, position_ids, rotary_ndims, base)
    return _torch_rotary_bwd(dq, dk, dv, position_ids, rotary_ndims, base)


@rotary_bwd.register_fake
def _(dq, dk, dv, position_ids, rotary_ndims, base):
    B, nh, T, hs = dq.shape
    return dq.new_empty(B, T, nh * 3 * hs)


def _rotary_setup(ctx, inputs, output):
    _, position_ids, _, ctx.rotary_ndims, ctx.base = inputs
    ctx.save_for_backward(position_ids)


def _rotary_backward(ctx, dq, dk, dv):
    (position_ids,) = ctx.saved_tensors
    like = next(g for g in (dq, dk, dv) if g is not None)
    dq, dk, dv = (torch.zeros_like(like) if g is None else g for g in (dq, dk, dv))
    return rotary_bwd(dq, dk, dv, position_ids, ctx.rotary_ndims, ctx.base), None, None, None, None


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup)


@custom_op("gptneox::rotary_into_cache", mutates_args=("k_cache", "v_cache"))
def rotary_into_cache(qkv: Tensor, position_ids: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                      num_heads: int, rotary_ndims: int, base: float) -> Tensor:
    """q [B, nh, T, hs] (contiguous); rotated k and v are written into k_cache, v_cache [B, nh, L, hs] at the slots
    input_pos [T]. Inference only (no autograd)."""
    if on_kernels(qkv):
        q, _, _ = kernels().rotary_fwd(qkv, position_ids, num_heads, rotary_ndims, base, k_cache=k_cache,
                                           v_cache=v_cache, input_pos=input_pos)
        return q
    q, k, v = _torch_rotary(qkv, position_ids, num_heads, rotary_ndims, base)
    k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
    v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
    return q


@rotary_into_cache.register_fake
def _(qkv, position_ids, k_cache, v_cache, input_pos, num_heads, rotary_ndims, base):
    B, T, _ = qkv.shape
    return qkv.new_empty(B, num_heads, T, _head_size(qkv, num_heads))


# ---------------------------------------------------------------------------------------------------- attention
@custom_op("gptneox::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, q_offset: Tensor, k_start: Tensor) -> tuple[Tensor, Tensor]:
    """Causal flash attention of q [B, nh, T, hs] over k, v [B, nh, S, hs] under the spans q_offset, k_start [B]:
    o [B, nh, T, hs] (a view of [B, T, nh, hs]) and lse [B, nh, T] fp32."""
    if on_kernels(q):
        o, lse = kernels().attention_fwd(q, k, v, causal=True, q_offset=q_offset, k_start=k_start)
        return _bthd(o), lse
    return _torch_attention(q, k, v, q_offset, k_start)


@attention.register_fake
def _(q, k, v, q_offset, k_start):
    B, nh, T, hs = q.shape
    return _empty_bthd(B, nh, T, hs, q), q.new_empty(B, nh, T, dtype=torch.float32)


@custom_op("gptneox::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, q_offset: Tensor,
                  k_start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (contiguous, the shapes of q, k, v) from do [B, nh, T, hs] and the forward's o and lse."""
    if on_kernels(q):
        return kernels().attention_bwd(do, q, k, v, o, lse, causal=True, q_offset=q_offset, k_start=k_start)
    return _torch_attention_bwd(do, q, k, v, o, lse, q_offset, k_start)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, q_offset, k_start):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, q_offset, k_start = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, q_offset, k_start)


def _attention_backward(ctx, do, dlse):  # dlse: zeros, lse is not differentiable
    q, k, v, o, lse, q_offset, k_start = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, q_offset, k_start)
    return dq, dk, dv, None, None


attention.register_autograd(_attention_backward, setup_context=_attention_setup)


@custom_op("gptneox::decode_attention", mutates_args=())
def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, q_offset: Tensor, k_start: Tensor) -> Tensor:
    """Flash-decoding: o [B, nh, T, hs] (a view of [B, T, nh, hs]) for a few queries q [B, nh, T, hs] over the whole
    caches [B, nh, L, hs]; row b reads only its filled slots (up to q_offset[b] + T), found on the device, so a
    compiled step with a static cache needs no host-side length. Inference only."""
    if on_kernels(q):
        return _bthd(kernels().decode_attention(q, k_cache, v_cache, q_offset, k_start))
    mask = reference.spans_to_dense(q_offset, k_start, q.shape[2], k_cache.shape[2])  # [B, 1, T, L]
    return _bthd(reference.sdpa_attention(q, k_cache, v_cache, mask))


@decode_attention.register_fake
def _(q, k_cache, v_cache, q_offset, k_start):
    B, nh, T, hs = q.shape
    return _empty_bthd(B, nh, T, hs, q)
