"""Devices and dtypes as users name them: one rule for every entry point (sample.py, train.py, the server, lm-eval's
model, and the Python API), checked before any model loads.

- dtypes: bf16 / bfloat16, fp16 / float16, fp32 / float32, or a torch.dtype.
- devices: "auto" (cuda when this machine has a GPU, else cpu) or anything torch.device takes (cpu, cuda, cuda:1,
  mps); a device this machine lacks is refused in one line that says what to use instead.

`name` is how the caller spells the setting in its error messages: "--device" for a script ("--device cuda: ..."),
"device" for a Python argument ("device='cuda': ...").
"""

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


class DeviceError(ValueError):
    """A device or dtype that cannot work on this machine, or is not one; the message is one line."""


def shown(name: str, value) -> str:
    """The setting as the user wrote it: "--device cuda" on a command line ("--model_args device=cuda" for a name
    ending in "="), "device='cuda'" in Python."""
    if name.startswith("--"):
        return f"{name}{value}" if name.endswith("=") else f"{name} {value}"
    return f"{name}={str(value)!r}"


def resolve_dtype(dtype, *, name: str = "dtype") -> torch.dtype | None:
    """torch.dtype for a spelling in DTYPES, a torch.dtype as it is; None stays None (the caller's default)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise DeviceError(f"{shown(name, dtype)}: not a dtype; use one of {', '.join(DTYPES)} (or a torch.dtype)")


def resolve_device(device, *, name: str = "device") -> torch.device | None:
    """torch.device for "auto", a device name or a torch.device, after checking this machine has it; None stays
    None (the caller's default, the CPU)."""
    if device is None:
        return None
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"{shown(name, device)}: not a device; use auto, cpu, cuda or cuda:N") from None
    cpu = shown(name, "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{shown(name, device)}: CUDA is not available on this machine (try {cpu})")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"{shown(name, device)}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not (torch.backends.mps.is_available()):
        raise DeviceError(f"{shown(name, device)}: Apple's MPS is not available on this machine (try {cpu})")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"{shown(name, device)}: gptneox runs on cpu, cuda or mps")
    return dev


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype "auto" means on device: bf16 on GPUs that have it (Dolly's own choice), else fp16 on a GPU; fp32 on
    the CPU (fast and exact there)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
