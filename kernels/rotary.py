"""Fused GPT-NeoX partial rotary: fused QKV projection output -> rotated q, k and v in attention's layout.

Math (rotate-half, pairs (i, i + rot/2)): for the first rot dims of each q and k head, with angle = pos * inv_freq[i],
    out[i] = x[i] cos - x[i + rot/2] sin,    out[i + rot/2] = x[i + rot/2] cos + x[i] sin,
and the remaining hs - rot dims (and all of v) pass through. Input qkv [B, T, nh * 3 * hs] is HF's per-head
interleaved layout (per head [q | k | v]); outputs are q, k, v [B, nh, T, hs], or k and v written straight into a
preallocated KV cache [B, nh, max_len, hs] at slots input_pos [T] (decode). One read and one write per element:
no split, transpose or cat copies. Any head size (the d axis is a masked power-of-two block, so 80 costs 80 of
memory traffic) and any even rot <= hs, 0 included; positions per row [B, T] (left padding) or shared [T].

Numerics: loads upcast to fp32, angles pos * inv_freq in fp32 with inv_freq computed by torch exactly as the
reference, rotation in fp32, stores cast to the output dtype. Backward is the inverse rotation (sin -> -sin).
Reference: gptneox.ops.rotary_cos_sin + gptneox.ops.apply_rotary (HF apply_rotary_pos_emb). Layout facts:
docs/architecture.md, "Forward pass".
"""

import torch
import triton
import triton.language as tl

from ._utils import check_device, check_dtype, check_shape, on_tensor_device

# ------------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _rotation(pos, inv_freq_ptr, offs_d, ROT: tl.constexpr):
    """cos, signed sin and partner index for each dim d of a head: out = x cos + x[partner] * ssin (forward)."""
    HALF: tl.constexpr = ROT // 2
    is_rot = offs_d < ROT  # [BLOCK_D]
    first = offs_d < HALF
    j = tl.where(first, offs_d, offs_d - HALF)  # frequency index of each rotated dim
    inv = tl.load(inv_freq_ptr + j, mask=is_rot, other=0.0)  # [BLOCK_D] fp32
    angle = pos * inv  # fp32, as torch computes position_ids.float() * inv_freq
    cos = tl.where(is_rot, tl.cos(angle), 1.0)
    ssin = tl.where(is_rot, tl.where(first, -tl.sin(angle), tl.sin(angle)), 0.0)
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    return cos, ssin, partner, is_rot


@triton.jit
def _rotary_fwd_kernel(
    qkv_ptr,  # [B, T, nh * 3 * hs], per head [q | k | v], last dim contiguous
    pos_ptr,  # [B, T] integer positions (stride_pos_b = 0 when shared by all rows)
    inv_freq_ptr,  # [rot / 2] fp32
    q_ptr,  # [B, nh, T, hs]
    k_ptr,  # [B, nh, T, hs], or the k cache [B, nh, max_len, hs] when HAS_SLOTS
    v_ptr,  # like k_ptr
    slot_ptr,  # [T] cache slot of each token (HAS_SLOTS)
    T, nh,  # tokens per row, heads
    stride_qkv_b, stride_qkv_t, stride_pos_b, stride_pos_t,
    stride_q_b, stride_q_h, stride_q_t,
    stride_k_b, stride_k_h, stride_k_t,
    stride_v_b, stride_v_h, stride_v_t,
    HS: tl.constexpr, ROT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    pid_bt, pid_h = tl.program_id(0), tl.program_id(1)
    b, t = (pid_bt // T).to(tl.int64), (pid_bt % T).to(tl.int64)
    offs_h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = (offs_h < nh)[:, None] & (offs_d < HS)[None, :]  # [BLOCK_H, BLOCK_D]
    if HAS_SLOTS:  # decode: k and v go to their cache slots
        slot = tl.load(slot_ptr + t).to(tl.int64)
    else:
        slot = t
    src = qkv_ptr + b * stride_qkv_b + t * stride_qkv_t + offs_h[:, None] * (3 * HS)  # [BLOCK_H, 1] head starts
    q = tl.load(src + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
    k = tl.load(src + HS + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(src + 2 * HS + offs_d[None, :], mask=mask, other=0.0)
    if ROT > 0:
        pos = tl.load(pos_ptr + b * stride_pos_b + t * stride_pos_t).to(tl.float32)
        cos, ssin, partner, is_rot = _rotation(pos, inv_freq_ptr, offs_d, ROT)
        mask_p = mask & is_rot[None, :]
        qp = tl.load(src + partner[None, :], mask=mask_p, other=0.0).to(tl.float32)  # rotate-half partners
        kp = tl.load(src + HS + partner[None, :], mask=mask_p, other=0.0).to(tl.float32)
        q = q * cos[None, :] + qp * ssin[None, :]
        k = k * cos[None, :] + kp * ssin[None, :]
    q_dst = q_ptr + b * stride_q_b + offs_h[:, None] * stride_q_h + t * stride_q_t + offs_d[None, :]
    k_dst = k_ptr + b * stride_k_b + offs_h[:, None] * stride_k_h + slot * stride_k_t + offs_d[None, :]
    v_dst = v_ptr + b * stride_v_b + offs_h[:, None] * stride_v_h + slot * stride_v_t + offs_d[None, :]
    tl.store(q_dst, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(k_dst, k.to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr,  # [B, nh, T, hs] each, last dim contiguous
    pos_ptr,  # [B, T] integer positions (stride_pos_b = 0 when shared)
    inv_freq_ptr,  # [rot / 2] fp32
    dqkv_ptr,  # [B, T, nh * 3 * hs] contiguous
    T, nh,
    stride_pos_b, stride_pos_t,
    stride_dq_b, stride_dq_h, stride_dq_t,
    stride_dk_b, stride_dk_h, stride_dk_t,
    stride_dv_b, stride_dv_h, stride_dv_t,
    HS: tl.constexpr, ROT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bt, pid_h = tl.program_id(0), tl.program_id(1)
    b, t = (pid_bt // T).to(tl.int64), (pid_bt % T).to(tl.int64)
    offs_h = (pid_h * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < nh)[:, None] & (offs_d < HS)[None, :]
    dq_src = dq_ptr + b * stride_dq_b + offs_h[:, None] * stride_dq_h + t * stride_dq_t  # [BLOCK_H, 1]
    dk_src = dk_ptr + b * stride_dk_b + offs_h[:, None] * stride_dk_h + t * stride_dk_t
    dv_src = dv_ptr + b * stride_dv_b + offs_h[:, None] * stride_dv_h + t * stride_dv_t
    dq = tl.load(dq_src + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    dk = tl.load(dk_src + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    dv = tl.load(dv_src + offs_d[None, :], mask=mask, other=0.0)
    if ROT > 0:
        pos = tl.load(pos_ptr + b * stride_pos_b + t * stride_pos_t).to(tl.float32)
        cos, ssin, partner, is_rot = _rotation(pos, inv_freq_ptr, offs_d, ROT)
        mask_p = mask & is_rot[None, :]
        dqp = tl.load(dq_src + partner[None, :], mask=mask_p, other=0.0).to(tl.float32)
        dkp = tl.load(dk_src + partner[None, :], mask=mask_p, other=0.0).to(tl.float32)
        dq = dq * cos[None, :] - dqp * ssin[None, :]  # the transpose of a rotation is the rotation by -angle
        dk = dk * cos[None, :] - dkp * ssin[None, :]
    dst = dqkv_ptr + (b * T + t) * (nh * 3 * HS) + offs_h[:, None] * (3 * HS) + offs_d[None, :]  # [BLOCK_H, BLOCK_D]
    ty = dqkv_ptr.dtype.element_ty
    tl.store(dst, dq.to(ty), mask=mask)
    tl.store(dst + HS, dk.to(ty), mask=mask)
    tl.store(dst + 2 * HS, dv.to(ty), mask=mask)


# ----------------------------------------------------------------------------------------------------- launchers
def _inv_freq(rot: int, base: float, device) -> torch.Tensor:
    """[rot / 2] fp32, the reference's exact formula (gptneox.ops.rotary_cos_sin), so angles match bit for bit."""
    return 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot))


def _blocks(nh: int, hs: int) -> tuple[int, int, int]:
    BLOCK_D = triton.next_power_of_2(hs)
    BLOCK_H = min(triton.next_power_of_2(nh), max(1, 4096 // BLOCK_D))  # ~4k elements per tensor per program
    return BLOCK_H, BLOCK_D, 4


def _positions(position_ids: torch.Tensor, B: int, T: int) -> tuple[torch.Tensor, int, int]:
    """positions and their (b, t) strides; [T] is shared by every row (stride 0)."""
    if position_ids.dim() == 1:
        check_shape("position_ids", position_ids, (T,))
        return position_ids, 0, position_ids.stride(0)
    check_shape("position_ids", position_ids, (B, T))
    return position_ids, position_ids.stride(0), position_ids.stride(1)


def _check_rot(hs: int, rot: int) -> None:
    if rot % 2 or not 0 <= rot <= hs:
        raise ValueError(f"rotary_ndims {rot} must be even and within the head size {hs}")


@on_tensor_device
def rotary_fwd(qkv, position_ids, num_heads: int, rotary_ndims: int, base: float, *,
               k_cache=None, v_cache=None, input_pos=None):
    """q, k, v [B, nh, T, hs] from qkv [B, T, nh * 3 * hs]; with caches, k and v go into them at input_pos [T]
    and the caches [B, nh, max_len, hs] are returned in their place."""
    B, T, C3 = qkv.shape
    nh, rot = num_heads, rotary_ndims
    if C3 % (3 * nh):
        raise ValueError(f"qkv: last dim {C3} is not num_heads ({nh}) * 3 * head_size")
    hs = C3 // (3 * nh)
    _check_rot(hs, rot)
    check_device(qkv, position_ids)
    check_dtype("qkv", qkv)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    pos, stride_pos_b, stride_pos_t = _positions(position_ids, B, T)
    q = torch.empty(B, nh, T, hs, dtype=qkv.dtype, device=qkv.device)
    if k_cache is None:
        k, v, slots = torch.empty_like(q), torch.empty_like(q), pos
    else:
        check_shape("k_cache", k_cache, (B, nh, None, hs))
        check_shape("v_cache", v_cache, k_cache.shape)
        check_shape("input_pos", input_pos, (T,))
        if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
            raise ValueError("k_cache and v_cache need a contiguous last dim")
        k, v, slots = k_cache, v_cache, input_pos
    BLOCK_H, BLOCK_D, num_warps = _blocks(nh, hs)
    grid = (B * T, triton.cdiv(nh, BLOCK_H))
    _rotary_fwd_kernel[grid](
        qkv, pos, _inv_freq(max(rot, 2), base, qkv.device), q, k, v, slots, T, nh,
        qkv.stride(0), qkv.stride(1), stride_pos_b, stride_pos_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        HS=hs, ROT=rot, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, HAS_SLOTS=k_cache is not None, num_warps=num_warps)
    return q, k, v


@on_tensor_device
def rotary_bwd(dq, dk, dv, position_ids, rotary_ndims: int, base: float):
    """dqkv [B, T, nh * 3 * hs] from the gradients of q, k, v [B, nh, T, hs]."""
    B, nh, T, hs = dq.shape
    _check_rot(hs, rotary_ndims)
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    pos, stride_pos_b, stride_pos_t = _positions(position_ids, B, T)
    dqkv = torch.empty(B, T, nh * 3 * hs, dtype=dq.dtype, device=dq.device)
    BLOCK_H, BLOCK_D, num_warps = _blocks(nh, hs)
    grid = (B * T, triton.cdiv(nh, BLOCK_H))
    _rotary_bwd_kernel[grid](
        dq, dk, dv, pos, _inv_freq(max(rotary_ndims, 2), base, dq.device), dqkv, T, nh,
        stride_pos_b, stride_pos_t, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        HS=hs, ROT=rotary_ndims, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, num_warps=num_warps)
    return dqkv


# ------------------------------------------------------------------------------------------------------ autograd
class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, position_ids, num_heads, rotary_ndims, base):
        ctx.save_for_backward(position_ids)
        ctx.rotary_ndims, ctx.base = rotary_ndims, base
        return rotary_fwd(qkv, position_ids, num_heads, rotary_ndims, base)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (position_ids,) = ctx.saved_tensors
        like = next(g for g in (dq, dk, dv) if g is not None)
        dq, dk, dv = (torch.zeros_like(like) if g is None else g for g in (dq, dk, dv))
        return rotary_bwd(dq, dk, dv, position_ids, ctx.rotary_ndims, ctx.base), None, None, None, None


def rotary(qkv: torch.Tensor, position_ids: torch.Tensor, num_heads: int, rotary_ndims: int, base: float, *,
           k_cache: torch.Tensor | None = None, v_cache: torch.Tensor | None = None,
           input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the fused QKV output [B, T, nh * 3 * hs] into q, k, v [B, nh, T, hs], rotary applied to q and k.

    position_ids [B, T] or [T] are the integer rotary positions. With k_cache / v_cache [B, nh, max_len, hs] and
    input_pos [T], k and v are written into the caches at those slots (inference only) and the caches are
    returned as k and v. Differentiable in qkv without caches.
    """
    if k_cache is None:
        return RotaryFunction.apply(qkv, position_ids, num_heads, rotary_ndims, base)
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise ValueError("rotary into a KV cache is inference only: run it under torch.no_grad()")
    return rotary_fwd(qkv, position_ids, num_heads, rotary_ndims, base,
                      k_cache=k_cache, v_cache=v_cache, input_pos=input_pos)
