"""The kernels as torch.library custom ops (gptneox/kernel_ops.py): opcheck on every op (schema, fake tensors and
their strides, autograd registration, AOT dispatch), and the torch path they take on a CPU without the interpreter
against the kernels."""

import pytest
import torch
from _cases import DEVICE

from gptneox import kernel_ops

B, nh, T, S, L, hs, rot = 2, 2, 5, 9, 20, 32, 8  # batch, heads, queries, keys, cache slots, head size, rotary dims
OPS = ("rotary", "rotary_bwd", "rotary_into_cache", "attention", "attention_bwd", "decode_attention")


def rows(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)  # a [B] vector of the mask spans


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def op_args(name: str, dtype: torch.dtype) -> tuple:
    """Inputs of op `name`, differentiable ones requiring grad. Row 1 is left-padded; positions are per row."""
    position_ids = torch.arange(3, 3 + T, device=DEVICE) - rows(0, 1)[:, None]  # [B, T]
    if name == "rotary":
        return randn(B, T, nh * 3 * hs, dtype=dtype).requires_grad_(), position_ids, nh, rot, 10000.0
    if name == "rotary_bwd":
        return randn(B, nh, T, hs, dtype=dtype), randn(B, nh, T, hs, dtype=dtype), randn(B, nh, T, hs, dtype=dtype), \
            position_ids, rot, 10000.0
    if name == "rotary_into_cache":
        return (randn(B, T, nh * 3 * hs, dtype=dtype), position_ids, randn(B, nh, L, hs, dtype=dtype),
                randn(B, nh, L, hs, dtype=dtype), torch.arange(3, 3 + T, device=DEVICE), nh, rot, 10000.0)
    q, k, v = randn(B, nh, T, hs, dtype=dtype), randn(B, nh, S, hs, dtype=dtype), randn(B, nh, S, hs, dtype=dtype)
    spans = rows(4, 2), rows(0, 3)  # q_offset, k_start: row 1's queries sit at slots 2..6 after 3 pads
    if name == "attention":
        return (*(t.requires_grad_() for t in (q, k, v)), *spans)
    if name == "attention_bwd":
        o, lse = torch.ops.gptneox.attention(q, k, v, *spans)
        return randn(B, nh, T, hs, dtype=dtype), q, k, v, o, lse, *spans
    assert name == "decode_attention", name
    return randn(B, nh, 1, hs, dtype=dtype), randn(B, nh, L, hs, dtype=dtype), randn(B, nh, L, hs, dtype=dtype), \
        rows(7, 12), rows(0, 4)


def run_torch_path(monkeypatch):
    """Make the ops take their torch path, as on a CPU without TRITON_INTERPRET."""
    monkeypatch.setattr(kernel_ops, "_on_kernels", lambda t: False)


@pytest.mark.parametrize("path", ["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", OPS)
def test_custom_op_passes_opcheck(name, dtype, path, monkeypatch):
    if path == "torch":
        run_torch_path(monkeypatch)
    torch.library.opcheck(getattr(torch.ops.gptneox, name).default, op_args(name, dtype))


@pytest.mark.parametrize("name", OPS)
def test_custom_op_torch_path_equals_the_kernels(name, monkeypatch):
    """Every output (and, for rotary_into_cache, the caches) in fp32 and with the same strides."""
    args = op_args(name, torch.float32)
    op = getattr(torch.ops.gptneox, name)
    kernel_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    torch_args = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    expected = op(*kernel_args)
    run_torch_path(monkeypatch)
    got = op(*torch_args)
    expected, got = (out if isinstance(out, tuple) else (out,) for out in (expected, got))
    if name == "rotary_into_cache":
        expected, got = (*expected, *kernel_args[2:4]), (*got, *torch_args[2:4])
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name} output {i}: {m}")
        assert g.stride() == e.stride(), f"{name} output {i}: strides {g.stride()} vs the kernels' {e.stride()}"


def test_attention_op_output_is_a_view_of_a_bthd_buffer():
    """o [B, nh, T, hs] lies in memory as [B, T, nh, hs], so the model's y.transpose(1, 2).reshape(B, T, C) is free."""
    for name in ("attention", "decode_attention"):
        out = getattr(torch.ops.gptneox, name)(*op_args(name, torch.float32))
        o = out[0] if name == "attention" else out
        assert o.transpose(1, 2).is_contiguous(), (name, o.stride())
