"""gptneox.devices: the scripts' dtype spellings work in the Python API, and a device this machine lacks is one line,
the same rule in every entry point, said before anything loads."""

import pytest
import torch
from tiny import hf_model, save_checkpoint

from gptneox import GPTNeoX
from gptneox.devices import DeviceError, resolve_device, resolve_dtype

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without CUDA")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(hf_model(0), tmp_path_factory.mktemp("devices") / "tiny", "safetensors")


@pytest.mark.parametrize("spelling, dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("BF16", torch.bfloat16), ("fp16", torch.float16),
                                             ("float16", torch.float16), ("fp32", torch.float32),
                                             ("float32", torch.float32), (torch.float16, torch.float16)])
def test_devices_from_pretrained_takes_every_dtype_spelling_of_the_scripts(ckpt, spelling, dtype):
    model = GPTNeoX.from_pretrained(ckpt, dtype=spelling)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_devices_bad_dtype_is_one_line_naming_the_spellings(ckpt):
    with pytest.raises(ValueError, match=r"^dtype='int8': not a dtype; use one of bf16, bfloat16, fp16, float16, fp32"):
        GPTNeoX.from_pretrained(ckpt, dtype="int8")


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_devices_cuda_without_cuda_is_one_line_before_loading(tmp_path, device):
    """Checked first: a directory that does not exist would otherwise be the error."""
    with pytest.raises(DeviceError) as e:
        GPTNeoX.from_pretrained(tmp_path / "not-loaded", device=device)
    assert str(e.value) == f"device='{device}': CUDA is not available on this machine (try device='cpu')"


def test_devices_resolve_device_rules():
    assert resolve_device(None) is None and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match=r"^--device gpu: not a device; use auto, cpu, cuda or cuda:N$"):
        resolve_device("gpu", name="--device")
    with pytest.raises(DeviceError, match=r"^device='xla': gptneox runs on cpu, cuda or mps$"):
        resolve_device("xla")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(DeviceError, match=f"this machine has {n} CUDA device"):
            resolve_device(f"cuda:{n}")


def test_devices_resolve_dtype_keeps_none_and_torch_dtypes():
    assert resolve_dtype(None) is None and resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(DeviceError, match=r"^--dtype half: not a dtype"):
        resolve_dtype("half", name="--dtype")
