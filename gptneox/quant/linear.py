"""QuantizedLinear: nn.Linear's interface over int8 / int4 weights (schemes.py), and its matmul as a custom op.

Forward runs, by device: CUDA with Triton, our kernels (kernels/quant_matmul.py); CPU, our own matmul (cpu_quant.c,
cpu.py), else torch's packed operator for the scheme, each after a one-time check that it builds or exists and
agrees with dequantize_weight; else a dequantize-then-matmul. Under torch.compile the custom op
torch.ops.gptneox.quant_matmul keeps the kernel in the graph. Nothing is trainable: the gradient with respect to x
is dy @ dequantize() (on CPU in chunks of rows), so LoRA's gradients flow through (QLoRA).
"""

import torch
import torch.nn as nn
from torch import Tensor
from torch.library import custom_op

from ..ops.runtime import compiling, kernels, on_kernels, triton_available
from . import cpu
from .schemes import dequantize_weight, quantize_weight, scheme

HALF_OR_FP32 = (torch.float32, torch.bfloat16, torch.float16)  # what torch's packed CPU operators take
LORA_POINTER = ("a quantized model's weights are frozen integers and cannot be trained; train LoRA adapters on top "
                "of it (QLoRA), or train the unquantized model and quantize it afterwards")


@custom_op("gptneox::quant_matmul", mutates_args=())
def quant_matmul(x: Tensor, weight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int | None) -> Tensor:
    """x [M, K] times the weight-only int8 / int4 W^T -> [M, N] in x's dtype (schemes.py's layout: weight
    int8 [N, K] or packed int4 [N, ceil(K / 2)], scales and zeros per channel or group). Inference only. The kernels
    of kernels/quant_matmul.py; on CPU cpu_quant.c; elsewhere dequantize-then-matmul, the reference both are
    tested against."""
    if on_kernels(x):
        return kernels().quant_matmul(x, weight, scales, zeros, group_size)
    mode = "int8" if zeros is None else "int4"
    on_cpu = x.device.type == "cpu"
    matmul = cpu.cpu_matmul(mode, x.shape[1], weight, scales, zeros, None, group_size) if on_cpu else None
    if matmul is not None:
        return matmul(x)
    return x @ dequantize_weight(weight, scales, zeros, x.shape[1], mode, group_size).to(x.dtype).t()


@quant_matmul.register_fake
def _(x, weight, scales, zeros, group_size):
    return x.new_empty(x.shape[0], weight.shape[0])


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
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.group_size = mode, scheme(mode).group(group_size)
        tensors = scheme(mode).empty(out_features, in_features, self.group_size, dtype, device)
        for name in ("weight", "scales", "zeros"):
            self.register_buffer(name, tensors.get(name))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self._runtime = {}  # "cpu": the cpu_quant.c binding; or torch's packed CPU form (fallback)
        self.activations = None  # "int8": decode steps on the CPU quantize x too (opt-in; quantize_activations)

    @property
    def scheme(self):  # schemes.SCHEMES' entry of self.mode
        return scheme(self.mode)

    def __getstate__(self):  # deepcopy / torch.save: the CPU kernel's binding holds pointers, and is rebuilt on use
        return {**self.__dict__, "_runtime": {}}

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
        if compiling():  # the custom op keeps the kernel in a torch.compile graph (CUDA graphs included)
            return quant_matmul(x, self.weight, self.scales, self.zeros, g)
        if x.is_cuda and triton_available():
            return kernels().quant_matmul(x, self.weight, self.scales, self.zeros, g)
        if x.device.type == "cpu" and x.dtype in HALF_OR_FP32 and self.mode in cpu.cpu_kernels():
            return self.scheme.torch_mm(x, self._torch_packed(x.dtype), K, N, g)
        return x @ self.dequantize().to(x.dtype).t()  # no fast kernel here: one dequantize per call

    def _cpu_matmul(self, x) -> "cpu.QuantMatmul | None":
        """cpu_quant.c bound to this layer's tensors as they are now, or None where x does not run through it
        (while compiling, off the CPU, a layout the kernels do not take, a failed build).

        A load, `.data =` or torch.func.functional_call may have replaced any tensor since the last call, so the
        binding is reused only while every tensor still has the same storage and shape; it holds the tensors it
        points into, so no storage it knows can be freed and its address handed to another tensor meanwhile."""
        if x.device.type != "cpu" or compiling():
            return None
        bufs = self._buffers  # what self.weight etc. read, without nn.Module.__getattr__ (a decode step makes 49)
        w, s, z, b = bufs["weight"], bufs["scales"], bufs["zeros"], bufs["bias"]
        key = (w.data_ptr(), w.shape, s.data_ptr(), s.shape, z.data_ptr() if z is not None else None,
               b.data_ptr() if b is not None else None, b.shape if b is not None else None, self.activations)
        matmul = self._runtime.get("cpu")
        if matmul is not None and matmul.key == key:
            return matmul
        matmul = cpu.cpu_matmul(self.mode, self.in_features, w, s, z, b, self.group_size, self.activations)
        if matmul is None:
            return None
        matmul.key = key
        self._runtime = {"cpu": matmul}
        return matmul

    def _torch_packed(self, dtype):  # the tensors in the layout of torch's CPU operator for this scheme
        w, s, z = self.weight, self.scales, self.zeros
        key = (w.device, dtype, w.data_ptr(), s.data_ptr(), z.data_ptr() if z is not None else None)
        if key not in self._runtime:
            self._runtime = {key: self.scheme.torch_pack(w, s, z, self.in_features, self.group_size, dtype)}
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
        acts = f", activations={self.activations}" if self.activations else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"mode={self.mode}{group}{acts}"
