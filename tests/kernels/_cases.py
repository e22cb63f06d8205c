"""Shared test parameters for the kernel tests: the device, the dtype rows of the tolerance table, the dense mask."""

import pytest
import torch
from tolerances import assert_within_2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu runs under TRITON_INTERPRET=1 (tests/conftest.py)
# bf16 tl.dot is broken in Triton 3.9's interpreter and bf16 is raw uint16 there: bf16 runs on CUDA only
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels need CUDA")])]
HEAD_DIMS = [32, 64, 80, 96, 128, 256]  # every Pythia head size, plus FlashAttention's 96


def assert_matches(out, base, ref, what):
    """The tolerance table's kernel row: fp32 -> assert_close defaults against ref; halves -> within 2x of base."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref.to(out.dtype), msg=lambda m: f"{what}: {m}")
    else:
        assert_within_2x(out, base, ref, what)


def dense_mask(T, S, q_offset, k_start, causal=True):
    """bool [B, 1, T, S], written out independently of the code under test: query i of row b sits at slot
    q_offset[b] + i; keys before k_start[b] are padding; a causal query always sees its own slot (model._mask)."""
    slots = torch.arange(S, device=q_offset.device)
    qpos = q_offset[:, None] + torch.arange(T, device=q_offset.device)  # [B, T]
    keep = (slots[None, None, :] >= k_start[:, None, None]).expand(-1, T, -1)  # [B, T, S]
    if causal:
        keep = keep & (slots <= qpos[..., None]) | (slots == qpos[..., None])
    return keep[:, None]
