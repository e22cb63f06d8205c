"""The fused partial rotary kernel against the torch path (gptneox.ops.rotary_cos_sin + apply_rotary), fwd and bwd."""

import pytest
import torch
from _cases import DEVICE, DTYPES, assert_matches
from hypothesis import example, given
from hypothesis import strategies as st

from gptneox import ops
from gptneox.ops.runtime import kernels

PYTHIA_HEADS = [(32, 8), (64, 16), (80, 20), (128, 32), (256, 64), (64, 64), (32, 0)]  # (hs, rot); full; none


def reference(qkv, position_ids, nh, rot, base):
    """The torch path as model.py runs it: split HF's per-head [q | k | v], rotate q and k in fp32."""
    B, T, _ = qkv.shape
    hs = qkv.shape[-1] // (3 * nh)
    q, k, v = qkv.view(B, T, nh, 3 * hs).transpose(1, 2).chunk(3, dim=-1)  # each [B, nh, T, hs]
    cos, sin = ops.rotary_cos_sin(position_ids, rot, base)
    return ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin), v


def check_rotary(B, T, nh, hs, rot, base, dtype, shared_positions=False):
    qkv32 = torch.randn(B, T, nh * 3 * hs, device=DEVICE)
    pos = torch.randint(0, 2048, (T,) if shared_positions else (B, T), device=DEVICE)  # Pythia's context
    grads = [torch.randn(B, nh, T, hs, device=DEVICE) for _ in range(3)]  # one upstream gradient for all
    results = {}
    for name, x_dtype, fn in (("ref", torch.float32, reference), ("base", dtype, reference),
                              ("kernel", dtype, kernels().rotary)):
        qkv = qkv32.to(x_dtype).detach().requires_grad_()
        out = fn(qkv, pos, nh, rot, base)
        torch.autograd.backward(out, [g.to(x_dtype) for g in grads])
        results[name] = (*out, qkv.grad)
    for what, out, base_, ref in zip(("q", "k", "v", "dqkv"), results["kernel"], results["base"], results["ref"]):
        assert out.dtype == dtype and out.shape == ref.shape
        assert_matches(out, base_, ref, f"{what} hs={hs} rot={rot} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hs,rot", PYTHIA_HEADS)
def test_rotary_matches_reference_every_pythia_head(hs, rot, dtype):
    check_rotary(2, 5, 3, hs, rot, 10000.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(B=st.integers(1, 3), T=st.integers(1, 17), nh=st.integers(1, 5), hs_rot=st.sampled_from(PYTHIA_HEADS),
       base=st.sampled_from([10000.0, 500.0, 1e6]), shared=st.booleans())
@example(B=1, T=1, nh=1, hs_rot=(80, 20), base=10000.0, shared=True)
def test_rotary_matches_reference_on_random_shapes(dtype, B, T, nh, hs_rot, base, shared):
    check_rotary(B, T, nh, *hs_rot, base, dtype, shared)


def test_rotary_outputs_attention_layout():
    qkv = torch.randn(2, 3, 4 * 3 * 32, device=DEVICE)
    q, k, v = kernels().rotary(qkv, torch.arange(3, device=DEVICE), 4, 8, 10000.0)
    assert q.shape == k.shape == v.shape == (2, 4, 3, 32) and q.is_contiguous() and v.is_contiguous()
    torch.testing.assert_close(v, qkv.view(2, 3, 4, 96)[..., 64:].transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rotary_writes_kv_cache_at_input_pos(dtype):
    B, T, nh, hs, rot, L = 2, 3, 2, 80, 20, 10
    qkv = torch.randn(B, T, nh * 3 * hs, device=DEVICE, dtype=dtype)
    input_pos = torch.tensor([4, 5, 6], device=DEVICE)
    pos = torch.tensor([[4, 5, 6], [1, 2, 3]], device=DEVICE)  # row 1 left-padded by 3
    k_cache = torch.full((B, nh, L, hs), 7.0, device=DEVICE, dtype=dtype)
    v_cache = k_cache.clone()
    with torch.no_grad():
        q, k, v = kernels().rotary(qkv, pos, nh, rot, 10000.0, k_cache=k_cache, v_cache=v_cache, input_pos=input_pos)
    rq, rk, rv = reference(qkv, pos, nh, rot, 10000.0)
    assert k is k_cache and v is v_cache
    torch.testing.assert_close(q, rq)  # the table's fp32 row; halves: one rounding of the same fp32 math
    torch.testing.assert_close(k_cache[:, :, 4:7], rk)
    torch.testing.assert_close(v_cache[:, :, 4:7], rv, rtol=0, atol=0)
    untouched = torch.cat([k_cache[:, :, :4], k_cache[:, :, 7:], v_cache[:, :, :4], v_cache[:, :, 7:]], dim=2)
    assert (untouched == 7.0).all()


def test_rotary_rejects_bad_input():
    qkv = torch.randn(1, 2, 3 * 2 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_ndims 33 must be even"):
        kernels().rotary(qkv, torch.arange(2, device=DEVICE), 2, 33, 10000.0)
    with pytest.raises(ValueError, match="not num_heads"):
        kernels().rotary(qkv, torch.arange(2, device=DEVICE), 5, 8, 10000.0)
    with pytest.raises(ValueError, match="position_ids: expected shape"):
        kernels().rotary(qkv, torch.arange(3, device=DEVICE), 2, 8, 10000.0)
    with pytest.raises(ValueError, match="inference only"):
        kernels().rotary(qkv.requires_grad_(), torch.arange(2, device=DEVICE), 2, 8, 10000.0,
                         k_cache=torch.zeros(1, 2, 4, 32), v_cache=torch.zeros(1, 2, 4, 32),
                         input_pos=torch.arange(2))
