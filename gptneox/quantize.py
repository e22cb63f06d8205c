"""Weight-only int8 and int4 quantization of a finished GPTNeoX: a transform of the model, not branches in model.py.

Decoding one token reads every weight once, so it runs at memory bandwidth: fewer bytes per weight are more tokens
per second (gpt-fast's int8 / int4 handlers, whose transform-a-finished-model shape this follows). quantize() swaps
every nn.Linear of the blocks and embed_out for a QuantizedLinear; the input embedding stays as it is (a lookup
reads one row per token, not the table). The schemes (docs/quantization.md):

    int8  symmetric, one scale per output channel:   w[n, k] ~ q[n, k] * scales[n],                q in -127..127
    int4  asymmetric, groups of g along the input:    w[n, k] ~ (q[n, k] - 8) * scales[n, j] + zeros[n, j],
          j = k // g, q in 0..15, two per byte (even k in the low nibble); a last group shorter than g (K % g != 0)
          covers the remaining columns. zeros is the value at q = 8, tinygemm's form, which torch's int4 CPU
          kernel and gpt-fast take.

Scales and zeros keep the float dtype of the weight they came from; the bias stays float. Nothing is trainable: a
quantized model is adapted with LoRA on top (QLoRA), never by training these integers. Forward runs, by device:
CUDA with Triton, our kernels (kernels/quant_matmul.py); CPU, our own matmul (gptneox/cpu_quant.c, built by the
machine's compiler), else torch's packed operators (aten._weight_int8pack_mm, aten._weight_int4pack_mm_for_cpu), each
after a one-time check that it builds or exists and agrees with dequantize_weight here; else a dequantize-then-matmul.
Its gradient with respect to x is dy @ dequantize() (on CPU in chunks of rows), so LoRA's gradients flow through.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_quant, kernel_ops, ops

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel and tinygemm take; the sweep
INT4_MID = 8  # q = 8 dequantizes to zeros[n, j]
HALF_OR_FP32 = (torch.float32, torch.bfloat16, torch.float16)  # what torch's packed CPU operators take
ROW_CHUNK = 4096  # rows quantized at once: bounds the fp32 temporaries of a 50k-row embed_out
LORA_POINTER = ("a quantized model's weights are frozen integers and cannot be trained; train LoRA adapters on top "
                "of it (QLoRA), or train the unquantized model and quantize it afterwards")


# ------------------------------------------------------------------------------------------------ the schemes
def check_settings(mode: str, group_size: int | None) -> None:
    """A ValueError naming the bad setting: an unknown mode, or an int4 group size outside GROUP_SIZES."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size {group_size!r} is not supported; choose one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")


def num_groups(K: int, group_size: int) -> int:
    return -(-K // group_size)


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] fp32 -> [N, G, group_size], the last group padded with its own first column (changes no min / max)."""
    N, K = w.shape
    pad = num_groups(K, group_size) * group_size - K
    if pad:
        start = K - (K % group_size)
        w = torch.cat([w, w[:, start:start + 1].expand(N, pad)], dim=1)  # [N, G * group_size]
    return w.view(N, -1, group_size)


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w32 = w.float()
    scales = (w32.abs().amax(dim=1) / 127).to(w.dtype)  # [N], stored rounded: q is computed against this value
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w32 / s[:, None]).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scales


def _int4_rows(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def quantize_weight(w: torch.Tensor, mode: str, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one QuantizedLinear for a float weight w [N, K] (bias aside): int8 {weight int8 [N, K],
    scales [N]}; int4 {weight uint8 [N, ceil(K/2)], scales [N, G], zeros [N, G]}. Rows go ROW_CHUNK at a time, so the
    fp32 temporaries stay small however big w is (quantizing while a checkpoint streams in)."""
    check_settings(mode, group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight takes a float matrix [out, in], got {w.dtype} {list(w.shape)}")
    parts = [_int8_rows(c) if mode == "int8" else _int4_rows(c, group_size) for c in w.split(ROW_CHUNK)]
    names = ("weight", "scales") if mode == "int8" else ("weight", "scales", "zeros")
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(names)}


def unpack_int4(packed: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] -> the 4-bit values q [N, K] as uint8 (even k in the low nibble)."""
    q = torch.stack([packed & 15, packed >> 4], dim=-1)  # [N, ceil(K/2), 2]
    return q.view(packed.shape[0], -1)[:, :K]


def dequantize_weight(weight, scales, zeros, K: int, mode: str, group_size: int | None) -> torch.Tensor:
    """The float matrix [N, K] (in scales' dtype, computed in fp32) that the quantized tensors stand for."""
    if mode == "int8":
        return (weight.float() * scales.float()[:, None]).to(scales.dtype)
    q = unpack_int4(weight, K).float()  # [N, K]
    s = scales.float().repeat_interleave(group_size, dim=1)[:, :K]  # [N, K]
    z = zeros.float().repeat_interleave(group_size, dim=1)[:, :K]
    return ((q - INT4_MID) * s + z).to(scales.dtype)


# ------------------------------------------------------------------------------------------------ CPU kernels
def _cpu_int4_pack(weight, scales, zeros, K: int, group_size: int, dtype):
    """torch's CPU int4 layout: (packed [Np, Kp/2], scale_and_zeros [Kp/g, Np, 2] in dtype), N padded to a multiple
    of 16 and K to one of g (the kernel needs both); padded rows are 0, padded columns meet zero-padded inputs."""
    N = weight.shape[0]
    Np, Kp = -(-N // 16) * 16, num_groups(K, group_size) * group_size
    q = torch.full((Np, Kp), INT4_MID, dtype=torch.int32)
    q[:N, :K] = unpack_int4(weight, K)
    sz = torch.zeros(Kp // group_size, Np, 2, dtype=dtype)
    sz[:, :N, 0], sz[:, :N, 1] = scales.t().to(dtype), zeros.t().to(dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


def _cpu_int4_mm(x, packed, sz, K: int, N: int, group_size: int):
    Kp = sz.shape[0] * group_size
    x = F.pad(x, (0, Kp - K)) if Kp != K else x  # [M, Kp]
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, sz)[:, :N]


@functools.cache
def cpu_kernels() -> frozenset:
    """The modes whose torch CPU operator exists in this torch and agrees with dequantize_weight on a small case
    (odd sizes, a short last group): a changed or missing operator falls back instead of computing wrong numbers."""
    ok = set()
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(20, 72, generator=gen), torch.randn(3, 72, generator=gen)
    for mode, g in (("int8", None), ("int4", 32)):
        t = quantize_weight(w, mode, g)
        ref = x @ dequantize_weight(t["weight"], t["scales"], t.get("zeros"), 72, mode, g).t()
        try:
            if mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x, t["weight"], t["scales"])
            else:
                y = _cpu_int4_mm(x, *_cpu_int4_pack(t["weight"], t["scales"], t["zeros"], 72, g, x.dtype), 72, 20, g)
        except (AttributeError, RuntimeError, NotImplementedError):
            continue
        if y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-4, atol=1e-4):
            ok.add(mode)
    return frozenset(ok)


@functools.cache
def own_cpu_kernels() -> frozenset:
    """The modes that gptneox/cpu_quant.c runs here: built by this machine's compiler (cpu_quant.library()) and
    agreeing with dequantize_weight on small odd cases (a short last group, an odd K, a scalar tail, a bias, both
    of its paths), so that a broken build falls back instead of computing wrong numbers."""
    lib = cpu_quant.library()
    if lib is None:
        return frozenset()
    ok = set()
    gen = torch.Generator().manual_seed(0)
    f32 = {"generator": gen, "dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    w, bias = torch.randn(21, 75, **f32), torch.randn(21, **f32)
    for mode, g in (("int8", None), ("int4", 32)):
        t = quantize_weight(w, mode, g)
        matmul = cpu_quant.QuantMatmul(lib, mode, 75, t["weight"], t["scales"], t.get("zeros"), bias, g)
        dense = dequantize_weight(t["weight"], t["scales"], t.get("zeros"), 75, mode, g)
        for M in (3, 17, cpu_quant.PROMPT_ROWS + 1):  # the kernel's partial and whole 8-row blocks, a prompt
            x = torch.randn(M, 75, **f32)
            if not torch.allclose(matmul(x), torch.addmm(bias, x, dense.t()), rtol=1e-4, atol=1e-4):
                break
        else:
            ok.add(mode)
    return frozenset(ok)


def cpu_matmul(mode: str, K: int, weight, scales, zeros, bias, group_size):
    """gptneox/cpu_quant.c bound to these tensors, or None where they do not run through it (not on the CPU, a
    layout the kernels do not take, a failed build): QuantizedLinear's and the custom op's one test."""
    if weight.device.type != "cpu" or not cpu_quant.supports(mode, K, group_size, scales.dtype) \
            or mode not in own_cpu_kernels():
        return None
    return cpu_quant.QuantMatmul(cpu_quant.library(), mode, K, weight, scales, zeros, bias, group_size)


# --------------------------------------------------------------------------------------------------- the module
class _DequantGrad(torch.autograd.Function):
    """y = x W^T by the module's fast path; dx = dy W with W dequantized (the weights themselves get no gradient):
    on CPU in chunks of rows by cpu_quant.c, elsewhere the whole layer at once."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.matmul = module, module._cpu_matmul(x)
        return ctx.matmul(x, bias=False) if ctx.matmul is not None else module._matmul(x)

    @staticmethod
    def backward(ctx, dy):  # dy [M, N] -> dx [M, K]
        if ctx.matmul is not None:
            return ctx.matmul.grad_input(dy), None
        return dy @ ctx.module.dequantize().to(dy.dtype), None


class QuantizedLinear(nn.Module):
    """nn.Linear's interface over int8 / int4 weights (module docstring). Buffers: weight, scales, zeros (int4) and
    bias; no parameters, so no optimizer can pick up a quantized weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, mode: str, group_size: int | None = 128, *,
                 dtype=None, device=None):
        super().__init__()
        check_settings(mode, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size = mode, group_size if mode == "int4" else None
        N, K, f = out_features, in_features, dict(dtype=dtype, device=device)
        if mode == "int8":
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, **f))
            self.register_buffer("zeros", None)
        else:
            G = num_groups(K, group_size)
            self.register_buffer("weight", torch.empty(N, (K + 1) // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, G, **f))
            self.register_buffer("zeros", torch.empty(N, G, **f))
        self.register_buffer("bias", torch.empty(N, **f) if bias else None)
        self._runtime = {}  # "cpu": the cpu_quant.c binding; or torch's packed CPU int4 form (fallback)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int | None = 128) -> "QuantizedLinear":
        w = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size,
                     dtype=w.dtype, device=w.device)
        for name, t in quantize_weight(w.detach(), mode, module.group_size).items():
            setattr(module, name, t)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    @torch.no_grad()
    def keep_rows(self, n: int) -> None:
        """Keep the first n output rows (a vocabulary cut: Pythia's padded 50304 -> Dolly's 50280); exact, since
        every row has its own scales."""
        if not 0 < n <= self.out_features:
            raise ValueError(f"a quantized layer of {self.out_features} rows cannot grow to {n}: resize the float "
                             "model before quantizing it")
        for name in ("weight", "scales", "zeros", "bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[:n].clone())  # [n, ...]
        self.out_features, self._runtime = n, {}

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in] these integers stand for (scales' dtype)."""
        return dequantize_weight(self.weight, self.scales, self.zeros, self.in_features, self.mode, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        x2 = x.reshape(-1, self.in_features)  # [M, K]; a copy only if x is not viewable
        if torch.is_grad_enabled() and x.requires_grad:
            y = _DequantGrad.apply(x2, self)
        elif (matmul := self._cpu_matmul(x2)) is not None:
            return matmul(x2).view(*x.shape[:-1], self.out_features)  # bias added by the kernel
        else:
            y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] -> x W^T [M, N]
        K, N, g = self.in_features, self.out_features, self.group_size
        if ops.compiling():  # the custom op keeps the kernel in a torch.compile graph (CUDA graphs included)
            return kernel_ops.quant_matmul(x, self.weight, self.scales, self.zeros, g)
        if x.is_cuda and ops.triton_available():
            return ops.kernels().quant_matmul(x, self.weight, self.scales, self.zeros, g)
        if x.device.type == "cpu" and x.dtype in HALF_OR_FP32 and self.mode in cpu_kernels():
            if self.mode == "int8":
                return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scales.to(x.dtype))
            return _cpu_int4_mm(x, *self._cpu_int4(x.dtype), K, N, g)
        return x @ self.dequantize().to(x.dtype).t()  # no fast kernel here: one dequantize per call

    def _cpu_matmul(self, x) -> "cpu_quant.QuantMatmul | None":
        """gptneox/cpu_quant.c bound to this layer's tensors as they are now, or None where x does not run through it
        (while compiling, off the CPU, a layout the kernels do not take, a failed build).

        A load, `.data =` or torch.func.functional_call may have replaced any tensor since the last call, so the
        binding is reused only while every tensor still has the same storage and shape; it holds the tensors it
        points into, so no storage it knows can be freed and its address handed to another tensor meanwhile."""
        if x.device.type != "cpu" or ops.compiling():
            return None
        bufs = self._buffers  # what self.weight etc. read, without nn.Module.__getattr__ (a decode step makes 49)
        w, s, z, b = bufs["weight"], bufs["scales"], bufs["zeros"], bufs["bias"]
        key = (w.data_ptr(), w.shape, s.data_ptr(), s.shape, z.data_ptr() if z is not None else None,
               b.data_ptr() if b is not None else None, b.shape if b is not None else None)
        matmul = self._runtime.get("cpu")
        if matmul is not None and matmul.key == key:
            return matmul
        matmul = cpu_matmul(self.mode, self.in_features, w, s, z, b, self.group_size)
        if matmul is None:
            return None
        matmul.key = key
        self._runtime = {"cpu": matmul}
        return matmul

    def _cpu_int4(self, dtype):
        key = (self.weight.device, dtype, self.weight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr())
        if key not in self._runtime:
            self._runtime = {key: _cpu_int4_pack(self.weight, self.scales, self.zeros, self.in_features,
                                                 self.group_size, dtype)}
        return self._runtime[key]

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the packed CPU form is rebuilt when needed
        self._runtime = {}
        return super()._apply(fn, recurse)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            raise ValueError(LORA_POINTER)
        return self

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode}{group}"


# ------------------------------------------------------------------------------------------------- the model
def targets(model) -> list[str]:
    """Names of the modules quantize() replaces: every nn.Linear of the blocks, and embed_out unless it is tied to
    the input embedding (then it is the embedding table, which stays float)."""
    names = [f"gpt_neox.layers.{n}" for n, m in model.gpt_neox.layers.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear))]
    return names + ([] if model.config.tie_word_embeddings else ["embed_out"])


def settings_of(model) -> dict | None:
    """{"mode", "group_size"} of a quantized model (config.json's "quantization"), None if it is not quantized."""
    found = {(m.mode, m.group_size) for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not found:
        return None
    assert len(found) == 1, f"mixed quantization settings {found}"
    mode, group_size = found.pop()
    return {"mode": mode} if mode == "int8" else {"mode": mode, "group_size": group_size}


def _replace(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize(model, mode: str, *, group_size: int = 128):
    """Quantize model in place (and return it): every target() linear becomes a QuantizedLinear. A model on the
    meta device gets empty quantized modules of the right shapes (checkpoint.py then streams the tensors in)."""
    check_settings(mode, group_size)
    done = settings_of(model)
    if done is not None:
        raise ValueError(f"the model is already quantized ({done}); quantizing twice compounds the error: load the "
                         "unquantized checkpoint again and quantize that")
    for name in targets(model):
        linear = model.get_submodule(name)
        if linear.weight.is_meta:
            module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, mode,
                                     group_size, dtype=linear.weight.dtype, device="meta")
        else:
            module = QuantizedLinear.from_linear(linear, mode, group_size)
        _replace(model, name, module)
    return model


def config_entries(settings: dict) -> dict:
    """What config.json gets for a quantized model: "quantization" (ours, read back by checkpoint.py) and a
    "quantization_config" naming an unknown quant_method, so that transformers, which would otherwise cast int8
    weights to float without a word, at least warns that it skips a quantization (docs/quantization.md, "Files")."""
    return {"quantization": settings,
            "quantization_config": {"quant_method": "gptneox", **settings,
                                    "note": "weight-only quantization of the gptneox package: load the directory "
                                            "with gptneox.GPTNeoX.from_pretrained, not transformers"}}


def refuse_training(model) -> None:
    """A ValueError pointing to LoRA if model holds quantized (frozen) weights: train.py calls it before training."""
    settings = settings_of(model)
    if settings is not None:
        raise ValueError(f"the model is quantized ({settings}): {LORA_POINTER}")


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer except the input embedding (one row per token)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if "embed_in" not in n)


def describe(settings: dict | None, dtype: torch.dtype) -> str:
    """"int4 g128", "int8", or the float dtype's name ("bfloat16"): how a report names the weights."""
    if settings is None:
        return str(dtype).removeprefix("torch.")
    return settings["mode"] + (f" g{settings['group_size']}" if settings["mode"] == "int4" else "")


def model_bytes(config, dtype: torch.dtype, settings: dict | None = None) -> int:
    """Bytes of all weights of a model of this config in dtype, quantized with settings (None: not), input
    embedding included; computed on the meta device, so nothing is allocated."""
    from .model import GPTNeoX
    with torch.device("meta"):
        model = GPTNeoX(config).to(dtype)
        if settings is not None:
            quantize(model, settings["mode"], group_size=settings.get("group_size") or 128)
    embed = model.gpt_neox.embed_in.weight
    return weight_bytes(model) + embed.numel() * embed.element_size()
