"""Launch helpers shared by the kernels: interpreter detection, autotune configs, input guards, block sizes."""

import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, programs run one by one in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(configs: list, interpret: "triton.Config", default: "triton.Config") -> list:
    """The configs to autotune over on a GPU; one config under the interpreter (its autotuner would time them all),
    and `default` alone with GPTNEOX_AUTOTUNE=0 (tests: no minutes of tuning per new head size and dtype)."""
    if interpreting():
        return [interpret]
    return [default] if os.environ.get("GPTNEOX_AUTOTUNE", "1") == "0" else configs


def check_device(*tensors: torch.Tensor) -> None:
    """A clear error where Triton cannot run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                         f"importing gptneox.kernels); got a tensor on {t.device}")


def check_dtype(name: str, t: torch.Tensor, dtypes=(torch.float16, torch.bfloat16, torch.float32)) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} is not supported; use one of {dtypes}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """shape entries of None match any size."""
    ok = t.dim() == len(shape) and all(s is None or s == n for s, n in zip(shape, t.shape))
    if not ok:
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def split_head_dim(hs: int) -> tuple[int, int]:
    """(D0, D1): the head dim as a power-of-two block plus a remainder block (0 when hs is a power of two).

    80 = 64 + 16 and 96 = 64 + 32, so Pythia-2.8b / Dolly-3b do not pay for 128 (FlashAttention pads to 96 and the
    Triton tutorial to 128). A remainder that is not a power of two is padded (masked) up to one, at least 16 for
    tl.dot: 112 = 64 + 64 (48 used).
    """
    if hs < 16:
        raise ValueError(f"head size {hs} is below 16, the smallest tl.dot operand")
    d0 = 1 << (hs.bit_length() - 1)  # largest power of two <= hs
    rest = hs - d0
    return d0, 0 if rest == 0 else max(16, triton.next_power_of_2(rest))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact ("ieee") products, so fp32 tests match the torch path; halves ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
