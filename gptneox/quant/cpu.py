"""The CPU weight-only int8 / int4 matmul (cpu_quant.c): built once by the machine's C compiler, called via ctypes.

torch's own packed CPU operators stream int8 / int4 weights slower than MKL's fp32 GEMV reads fp32 ones
(docs/benchmarks.md, "Packed int8 / int4 CPU operators"), which defeats the point of reading fewer bytes. cpu_quant.c
reads the quantized bytes once and converts them in registers. It is compiled on first use with `$CC` (else cc / gcc /
clang), -O3, AVX2 and FMA when torch reports that the CPU has them, and OpenMP, into GPTNEOX_CACHE (default
~/.cache/gptneox) under a name hashing the source, the compiler and the flags; the file is written to a temporary name
and renamed, so two processes building at once never load half a library. GPTNEOX_CPU_KERNEL=0 turns it off. Without a
compiler, library() is None (with one warning) and QuantizedLinear falls back to torch's operators (schemes.py). Which
of the two runs is decided once per process, by a small check against dequantize_weight (below).
"""

import ctypes
import functools
import warnings
from pathlib import Path

import torch

from ..ops import native
from ..ops.native import compiler  # noqa: F401  (the tests' name for it)
from .schemes import SCHEMES, dequantize_weight, quantize_weight

SOURCE = Path(__file__).with_name("cpu_quant.c")
PROMPT_ROWS = 48  # rows of x above which a layer dequantizes into chunks for torch's GEMM (measured crossover)
CHUNK_BYTES = 1 << 24  # fp32 weight rows per chunk of a long prompt: 16 MiB, a transient bound for any layer
GROUPS_MAX = 1024  # cpu_quant.c's GMAX: int4 groups per row (K <= 32768 at g = 32; Pythia's largest K is 20480)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the scales' dtype, cpu_quant.c's enum


def _build(cc: str, flags: list[str]) -> Path:
    return native.build(SOURCE, cc, flags)


SIGNATURES = {  # name: (argument types, return type), as in cpu_quant.c
    "gptneox_int8_matmul": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], None),
    "gptneox_int4_matmul": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int),
    "gptneox_int8_dequant": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int], None),
    "gptneox_int4_dequant": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                              ctypes.c_int], None),
    "gptneox_a8_matmul": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                           ctypes.c_void_p, ctypes.c_int64, ctypes.c_int], ctypes.c_int),
}


@functools.cache
def library(isa: str | None = None) -> ctypes.CDLL | None:
    """cpu_quant.c built for this instruction-set variant (a key of ops.native.ISAS; None: the best this CPU runs),
    or None with a warning (ops/native.py's load)."""
    return native.load(SOURCE, isa, SIGNATURES, "quantized CPU layers use torch's slower operators")


def supports(mode: str, K: int, group_size: int | None, scales_dtype: torch.dtype) -> bool:
    """Whether the kernels take this layout: scales in fp32 / bf16 / fp16 and, for int4, at most GROUPS_MAX groups of
    a multiple of 32 columns per row (every scheme of schemes.py makes, for K up to 32768)."""
    return scales_dtype in DTYPE_CODES and (mode == "int8" or (group_size % 32 == 0
                                                               and -(-K // group_size) <= GROUPS_MAX))


class QuantMatmul:
    """y = x W^T + bias for one quantized layer on CPU (the tensors of schemes.py: int8 weight [N, K] and
    scales [N]; int4 weight uint8 [N, ceil(K/2)], scales and zeros [N, ceil(K/g)]; bias [N] or None).

    It checks the tensors (device, dtype, shape) and holds them while it holds their pointers; QuantizedLinear makes
    a new one whenever a tensor's storage or shape changed (a load, `.data =`, functional_call). Up to
    PROMPT_ROWS rows of x run the matrix-vector kernel, which converts each weight once per 8 rows; a longer prompt is
    compute-bound, so its weight is dequantized CHUNK_BYTES of fp32 rows at a time and multiplied by torch's GEMM
    (docs/quantization.md)."""

    def __init__(self, lib, mode: str, K: int, weight, scales, zeros=None, bias=None, group_size: int | None = None,
                 activations: str | None = None):
        N = weight.shape[0]
        if not supports(mode, K, group_size, scales.dtype):
            raise ValueError(f"cpu_quant: no kernel for {mode} with scales in {scales.dtype}, K {K}, g {group_size}")
        G = -(-K // group_size) if mode == "int4" else 1
        want = [(weight, torch.int8 if mode == "int8" else torch.uint8, (N, K if mode == "int8" else (K + 1) // 2)),
                (scales, scales.dtype, (N,) if mode == "int8" else (N, G))]
        want += [(zeros, scales.dtype, (N, G))] if mode == "int4" else []
        want += [(bias, bias.dtype, (N,))] if bias is not None else []
        for t, dtype, shape in want:
            if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"cpu_quant: a {mode} tensor is {t.dtype} {list(t.shape)} on {t.device}, expected "
                                 f"{dtype} {list(shape)} on the CPU (K = {K})")
        self.lib, self.mode, self.N, self.K, self.G, self.g = lib, mode, N, K, G, group_size
        self.a8 = activations == "int8"  # decode rows with x quantized too (cpu_quant.c's a8; docs/quantization.md)
        self.code = DTYPE_CODES[scales.dtype]
        self.weight, self.scales = weight.contiguous(), scales.contiguous()  # held for the call: the pointers' owners
        self.zeros = zeros.contiguous() if zeros is not None else None
        self.bias = bias.contiguous() if bias is not None else None
        self.fused_bias = bias is not None and bias.dtype == scales.dtype  # the kernel reads it in the scales' dtype
        held = (self.weight, self.scales, self.zeros, self.bias if self.fused_bias else None)
        self.ptrs = [t.data_ptr() if t is not None else None for t in held]

    def __call__(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:  # x [M, K] -> [M, N] in x's dtype
        if x.dim() != 2 or x.shape[1] != self.K or x.device.type != "cpu":
            raise ValueError(f"cpu_quant: x must be [M, {self.K}] on the CPU, got {list(x.shape)} on {x.device}")
        if x.shape[0] == 0:  # an empty batch: nothing to compute (and malloc(0) may fail)
            return x.new_empty(0, self.N)
        x32 = x.to(torch.float32).contiguous()  # [M, K]; no copy when x is fp32 and contiguous
        y = self._prompt(x32) if x32.shape[0] > PROMPT_ROWS else self._rows(x32, bias)
        if self.bias is not None and bias and not (self.fused_bias and x32.shape[0] <= PROMPT_ROWS):
            y += self.bias.float()
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def grad_input(self, dy: torch.Tensor) -> torch.Tensor:  # dy [M, N] -> dx = dy W [M, K] in dy's dtype
        """The backward of __call__ for an adapter on top (QLoRA): dx accumulated over CHUNK_BYTES chunks of
        dequantized weight rows, so no float copy of a whole layer (embed_out's is 4 bytes x 50k x C) is made."""
        dy32 = dy.to(torch.float32).contiguous()  # [M, N]
        dx = torch.zeros(dy.shape[0], self.K, dtype=torch.float32, device="cpu")  # [M, K]
        for n0, n1, chunk in self._chunks():
            dx.addmm_(dy32[:, n0:n1], chunk)
        return dx.to(dy.dtype)

    def _chunks(self):
        """(n0, n1, the fp32 weight rows n0 .. n1 - 1 [n1 - n0, K]) over all rows, CHUNK_BYTES at a time; the buffer
        is reused, so each chunk is valid until the next one."""
        q, s, z, _ = self.ptrs
        rows = min(self.N, max(64, CHUNK_BYTES // (4 * self.K)))
        buf = torch.empty(rows, self.K, dtype=torch.float32, device="cpu")  # [rows, K]
        threads = torch.get_num_threads()
        for n0 in range(0, self.N, rows):
            n1 = min(n0 + rows, self.N)
            if self.mode == "int8":
                self.lib.gptneox_int8_dequant(q, self.K, s, self.code, n0, n1, buf.data_ptr(), threads)
            else:
                self.lib.gptneox_int4_dequant(q, self.K, s, z, self.code, self.G, self.g, n0, n1, buf.data_ptr(),
                                              threads)
            yield n0, n1, buf[:n1 - n0]

    def _rows(self, x32, bias):  # the matrix-vector kernel; the bias fused when it has the scales' dtype
        M, (q, s, z, b) = x32.shape[0], self.ptrs
        b = b if bias else None
        y = torch.empty(M, self.N, dtype=torch.float32, device="cpu")  # [M, N]
        threads = torch.get_num_threads()
        if self.a8:
            if self.lib.gptneox_a8_matmul(x32.data_ptr(), M, self.K, q, s, z, b, self.code, self.mode == "int4",
                                          self.G, self.g or 0, y.data_ptr(), self.N, threads):
                raise MemoryError(f"cpu_quant: no memory for the a8 scratch of {M} x {self.K}")
        elif self.mode == "int8":
            self.lib.gptneox_int8_matmul(x32.data_ptr(), M, self.K, q, s, b, self.code, y.data_ptr(), self.N, threads)
        elif self.lib.gptneox_int4_matmul(x32.data_ptr(), M, self.K, q, s, z, b, self.code, self.G, self.g,
                                          y.data_ptr(), self.N, threads):
            raise MemoryError(f"cpu_quant: no memory for the int4 scratch of {M} x {self.K} floats")
        return y

    def _prompt(self, x32):  # many rows: dequantized chunks of weight rows, then torch's fp32 GEMM (bias after)
        y = torch.empty(x32.shape[0], self.N, dtype=torch.float32, device="cpu")  # [M, N]
        for n0, n1, chunk in self._chunks():
            torch.mm(x32, chunk.t(), out=y[:, n0:n1])
        return y


# ---------------------------------------------------------------------------------------- which kernel runs
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
        scheme = SCHEMES[mode]
        try:
            packed = scheme.torch_pack(t["weight"], t["scales"], t.get("zeros"), 72, g, x.dtype)
            y = scheme.torch_mm(x, packed, 72, 20, g)
        except (AttributeError, RuntimeError, NotImplementedError):
            continue
        if y.shape == ref.shape and torch.allclose(y, ref, rtol=1e-4, atol=1e-4):
            ok.add(mode)
    return frozenset(ok)


@functools.cache
def own_cpu_kernels() -> frozenset:
    """The modes that cpu_quant.c runs here: built by this machine's compiler (library()) and agreeing with
    dequantize_weight on small odd cases (a short last group, an odd K, a scalar tail, a bias, both of its paths),
    so that a broken build falls back instead of computing wrong numbers."""
    lib = library()
    if lib is None:
        return frozenset()
    ok = set()
    gen = torch.Generator().manual_seed(0)
    f32 = {"generator": gen, "dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    w, bias = torch.randn(21, 75, **f32), torch.randn(21, **f32)
    for mode, g in (("int8", None), ("int4", 32)):
        t = quantize_weight(w, mode, g)
        matmul = QuantMatmul(lib, mode, 75, t["weight"], t["scales"], t.get("zeros"), bias, g)
        dense = dequantize_weight(t["weight"], t["scales"], t.get("zeros"), 75, mode, g)
        for M in (3, 17, PROMPT_ROWS + 1):  # the kernel's partial and whole 8-row blocks, a prompt
            x = torch.randn(M, 75, **f32)
            if not torch.allclose(matmul(x), torch.addmm(bias, x, dense.t()), rtol=1e-4, atol=1e-4):
                break
        else:
            ok.add(mode)
    return frozenset(ok)


def cpu_matmul(mode: str, K: int, weight, scales, zeros, bias, group_size, activations=None) -> "QuantMatmul | None":
    """cpu_quant.c bound to these tensors, or None where they do not run through it (not on the CPU, a layout the
    kernels do not take, a failed build): QuantizedLinear's and the custom op's one test."""
    if weight.device.type != "cpu" or not supports(mode, K, group_size, scales.dtype) or mode not in own_cpu_kernels():
        return None
    return QuantMatmul(library(), mode, K, weight, scales, zeros, bias, group_size, activations)
