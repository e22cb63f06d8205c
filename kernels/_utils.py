"""Launch helpers shared by the kernels: interpreter detection, autotune configs, input guards, block sizes."""

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, programs run one by one in numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


AUTOTUNE_MODES = ("1", "quick", "0")  # GPTNEOX_AUTOTUNE: full (pruned) search, a few likely winners, default only


def autotune_mode() -> str:
    """GPTNEOX_AUTOTUNE, read when a kernel first meets a new autotune key (so it may be set after import)."""
    mode = os.environ.get("GPTNEOX_AUTOTUNE", "1")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"GPTNEOX_AUTOTUNE={mode!r}: use 1 (full search), quick (a few configs) or 0 (default only)")
    return mode


def autotune_configs(configs: list, interpret: "triton.Config", default: "triton.Config", quick: list = ()) -> list:
    """What triton.autotune is given: under the interpreter `interpret` alone (its autotuner would time every config
    in numpy); on a GPU every config a mode can pick, so that the kernel's early_config_prune always runs and picks
    with configs_for_mode(...) and the shared memory estimate."""
    if interpreting():
        return [interpret]
    return list(dict.fromkeys([*configs, *quick, default]))  # triton.Config hashes by value


def configs_for_mode(configs: list, default: "triton.Config", quick: list = ()) -> list:
    """The candidates for GPTNEOX_AUTOTUNE: unset or 1, `configs` (the full search); quick, `quick` (a few likely
    winners: seconds of compilation instead of minutes); 0, `default` alone (tests: one compile per head size and
    dtype). The caller then drops what cannot fit."""
    mode = autotune_mode()
    if mode == "0":
        return [default]
    return list(quick or [default]) if mode == "quick" else list(configs)


@functools.cache
def max_shared_memory(device_index: int) -> int:
    """Bytes of shared memory one program may use on this CUDA device: the opt-in per-block limit that Triton's
    driver reports and checks at launch (232448 on H100 / H200, 101376 on sm_86/sm_89)."""
    from triton.runtime import driver
    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def check_device(*tensors: torch.Tensor) -> None:
    """A clear error where Triton cannot run: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                         f"importing gptneox.kernels); got a tensor on {t.device}")


def on_tensor_device(fn):
    """Run a launcher with its first tensor's GPU as the current CUDA device: Triton launches on the current device,
    so a tensor on cuda:1 while cuda:0 is current would otherwise run on the wrong GPU."""
    @functools.wraps(fn)
    def launch(x, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return launch


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
