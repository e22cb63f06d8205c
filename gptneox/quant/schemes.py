"""The weight-only schemes, a registry (SCHEMES) of how a float matrix becomes integers and back.

    int8  symmetric, one scale per output channel:   w[n, k] ~ q[n, k] * scales[n],                q in -127..127
    int4  asymmetric, groups of g along the input:    w[n, k] ~ (q[n, k] - 8) * scales[n, j] + zeros[n, j],
          j = k // g, q in 0..15, two per byte (even k in the low nibble); a last group shorter than g (K % g != 0)
          covers the remaining columns. zeros is the value at q = 8, tinygemm's form, which torch's int4 CPU
          kernel and gpt-fast take.

Scales and zeros keep the float dtype of the weight they came from. Each scheme also knows torch's own packed CPU
operator for it (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu), a fallback where cpu_quant.c is not
built. Facts: docs/quantization.md.
"""

import torch
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel and tinygemm take; the sweep
INT4_MID = 8  # q = 8 dequantizes to zeros[n, j]
ROW_CHUNK = 4096  # rows quantized at once: bounds the fp32 temporaries of a 50k-row embed_out


def num_groups(K: int, group_size: int) -> int:
    return -(-K // group_size)


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> the 4-bit values q [N, K] as uint8 (even k in the low nibble)."""
    q = torch.stack([packed & 15, packed >> 4], dim=-1)  # [N, ceil(K/2), 2]
    return q.view(packed.shape[0], -1)[:, :K]


class Int8:
    name, tensors = "int8", ("weight", "scales")

    @staticmethod
    def group(group_size: int | None) -> None:
        return None  # per channel

    @staticmethod
    def settings(group_size) -> dict:  # config.json's "quantization"
        return {"mode": "int8"}

    @staticmethod
    def label(group_size) -> str:  # how a report names the weights
        return "int8"

    @staticmethod
    def empty(N: int, K: int, group_size, dtype, device) -> dict:
        return {"weight": torch.empty(N, K, dtype=torch.int8, device=device),
                "scales": torch.empty(N, dtype=dtype, device=device)}

    @staticmethod
    def rows(w: torch.Tensor, group_size) -> tuple[torch.Tensor, ...]:
        w32 = w.float()
        scales = (w32.abs().amax(dim=1) / 127).to(w.dtype)  # [N], stored rounded: q is computed against this value
        s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w32 / s[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
        return q, scales

    @staticmethod
    def dequantize(weight, scales, zeros, K: int, group_size) -> torch.Tensor:
        return (weight.float() * scales.float()[:, None]).to(scales.dtype)

    @staticmethod
    def torch_pack(weight, scales, zeros, K: int, group_size, dtype):
        return weight, scales  # the tensors themselves: an in-place load reaches them

    @staticmethod
    def torch_mm(x, packed, K: int, N: int, group_size):
        weight, scales = packed
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))


class Int4:
    name, tensors = "int4", ("weight", "scales", "zeros")

    @staticmethod
    def group(group_size: int | None) -> int:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group_size {group_size!r} is not supported; choose one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")
        return group_size

    @staticmethod
    def settings(group_size: int) -> dict:
        return {"mode": "int4", "group_size": group_size}

    @staticmethod
    def label(group_size: int) -> str:
        return f"int4 g{group_size}"

    @staticmethod
    def empty(N: int, K: int, group_size: int, dtype, device) -> dict:
        G = num_groups(K, group_size)
        return {"weight": torch.empty(N, (K + 1) // 2, dtype=torch.uint8, device=device),
                "scales": torch.empty(N, G, dtype=dtype, device=device),
                "zeros": torch.empty(N, G, dtype=dtype, device=device)}

    @staticmethod
    def rows(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
        N, K = w.shape
        g = _group_view(w.float(), group_size)  # [N, G, group_size]
        lo, hi = g.amin(dim=2), g.amax(dim=2)  # [N, G]
        scales = ((hi - lo) / 15).to(w.dtype)
        zeros = (lo + INT4_MID * scales.float()).to(w.dtype)  # [N, G]
        s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # [N, G, 1]
        q = torch.round((g - zeros.float()[..., None]) / s + INT4_MID).clamp_(0, 15).to(torch.uint8)
        q = q.view(N, -1)[:, :K]  # [N, K]
        if K % 2:
            q = torch.cat([q, q.new_full((N, 1), INT4_MID)], dim=1)  # [N, K + 1]: an unused high nibble
        return q[:, 0::2] | (q[:, 1::2] << 4), scales, zeros  # packed [N, ceil(K / 2)]

    @staticmethod
    def dequantize(weight, scales, zeros, K: int, group_size: int) -> torch.Tensor:
        q = unpack_int4(weight, K).float()  # [N, K]
        s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]  # [N, K]
        z = zeros.float().repeat_interleave(group_size, dim=1)[:, :K]
        return ((q - INT4_MID) * s + z).to(scales.dtype)

    @staticmethod
    def torch_pack(weight, scales, zeros, K: int, group_size: int, dtype):
        """torch's CPU int4 layout: (packed [Np, Kp/2], scale_and_zeros [Kp/g, Np, 2] in dtype), N padded to a
        multiple of 16 and K to one of g (the kernel needs both); padded rows are 0, padded columns meet zero-padded
        inputs."""
        N = weight.shape[0]
        Np, Kp = -(-N // 16) * 16, num_groups(K, group_size) * group_size
        q = torch.full((Np, Kp), INT4_MID, dtype=torch.int32)
        q[:N, :K] = unpack_int4(weight, K)
        sz = torch.zeros(Kp // group_size, Np, 2, dtype=dtype)
        sz[:, :N, 0], sz[:, :N, 1] = scales.t().to(dtype), zeros.t().to(dtype)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz

    @staticmethod
    def torch_mm(x, packed, K: int, N: int, group_size: int):
        weight, sz = packed
        Kp = sz.shape[0] * group_size
        x = F.pad(x, (0, Kp - K)) if Kp != K else x  # [M, Kp]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight, group_size, sz)[:, :N]


SCHEMES = {s.name: s for s in (Int8, Int4)}
MODES = tuple(SCHEMES)


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] fp32 -> [N, G, group_size], the last group padded with its own first column (changes no min / max)."""
    N, K = w.shape
    pad = num_groups(K, group_size) * group_size - K
    if pad:
        start = K - (K % group_size)
        w = torch.cat([w, w[:, start:start + 1].expand(N, pad)], dim=1)  # [N, G * group_size]
    return w.view(N, -1, group_size)


def scheme(mode: str):
    """The scheme called mode, or a ValueError naming the choices."""
    if mode not in SCHEMES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    return SCHEMES[mode]


def check_settings(mode: str, group_size: int | None) -> None:
    """A ValueError naming the bad setting: an unknown mode, or an int4 group size outside GROUP_SIZES."""
    scheme(mode).group(group_size)


def settings(mode: str, group_size: int | None = None) -> dict:
    """config.json's "quantization" for these settings, checked, in the canonical order: {"mode": "int8"} or
    {"mode": "int4", "group_size": g}."""
    s = scheme(mode)
    return s.settings(s.group(group_size))


def quantize_weight(w: torch.Tensor, mode: str, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one QuantizedLinear for a float weight w [N, K] (bias aside): int8 {weight int8 [N, K],
    scales [N]}; int4 {weight uint8 [N, ceil(K/2)], scales [N, G], zeros [N, G]}. Rows go ROW_CHUNK at a time, so the
    fp32 temporaries stay small however big w is (quantizing while a checkpoint streams in)."""
    s = scheme(mode)
    group_size = s.group(group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight takes a float matrix [out, in], got {w.dtype} {list(w.shape)}")
    parts = [s.rows(c, group_size) for c in w.split(ROW_CHUNK)]
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(s.tensors)}


def dequantize_weight(weight, scales, zeros, K: int, mode: str, group_size: int | None) -> torch.Tensor:
    """The float matrix [N, K] (in scales' dtype, computed in fp32) that the quantized tensors stand for."""
    return scheme(mode).dequantize(weight, scales, zeros, K, group_size)
