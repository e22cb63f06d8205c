"""gptneox/ops/cpu_attention.c: a CPU decode step's rotary, cache write and attention against ops/reference.py."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gptneox.model import KVCache
from gptneox.ops import Mask, cpu_attention, native, reference

VARIANTS = native.runnable()  # every variant this CPU runs


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    """cpu_attention.c as built for each instruction-set variant this CPU runs."""
    built = cpu_attention.library(request.param)
    assert built is not None and built.gptneox_isa() == list(native.ISAS).index(request.param)
    return built


def case(B, T, nh, hs, rot_quarter, L, seed):
    gen = torch.Generator().manual_seed(seed)
    rot = hs // 4 * 2 if rot_quarter else hs  # Pythia rotates a quarter of each head (even), some models all of it
    qkv = torch.randn(B, T, nh * 3 * hs, generator=gen)
    start = int(torch.randint(0, L - T + 1, (1,), generator=gen))
    input_pos = torch.arange(start, start + T)
    position_ids = input_pos[None].repeat(B, 1) - torch.randint(0, start + 1, (B, 1), generator=gen)  # left padding
    cos, sin = reference.rotary_cos_sin(position_ids, rot, 10000.0)
    return qkv, input_pos, cos, sin, gen


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), nh=st.integers(1, 4), hs=st.sampled_from([8, 20, 64, 80]),
       rot_quarter=st.booleans(), seed=st.integers(0, 99))
@example(B=1, T=1, nh=12, hs=64, rot_quarter=True, seed=0)  # pythia-160m's decode step
def test_qkv_rotary_cache_is_the_reference_bit_for_bit(variant, B, T, nh, hs, rot_quarter, seed):
    L = 12
    qkv, input_pos, cos, sin, _ = case(B, T, nh, hs, rot_quarter, L, seed)
    ours, ref = KVCache(B, nh, L, hs), KVCache(B, nh, L, hs)
    q, k, v = cpu_attention.qkv_rotary_cache(qkv, nh, cos, sin, ours, input_pos, variant)
    rq, rk, rv = qkv.view(B, T, nh, -1).transpose(1, 2).chunk(3, dim=-1)
    rq, rk = reference.apply_rotary(rq, cos, sin), reference.apply_rotary(rk, cos, sin)
    ref.update(input_pos, rk, rv)
    assert torch.equal(q, rq) and torch.equal(k, ref.k_cache) and torch.equal(v, ref.v_cache)
    assert k.data_ptr() == ours.k_cache.data_ptr()  # written in place: the cache itself comes back


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), nh=st.integers(1, 4), hs=st.sampled_from([8, 20, 64, 80]),
       L=st.integers(6, 70), padded=st.booleans(), seed=st.integers(0, 99))
@example(B=2, T=1, nh=12, hs=64, L=48, padded=True, seed=0)
def test_attention_matches_sdpa_under_the_masks_rule(variant, B, T, nh, hs, L, padded, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, n, hs, generator=gen) for n in (T, L, L))
    start = int(torch.randint(0, L - T + 1, (1,), generator=gen))
    input_pos = torch.arange(start, start + T)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    if padded:  # left padding, and a row whose first query sees only itself
        attention_mask[:, :int(torch.randint(0, start + 1, (1,), generator=gen))] = 0
        attention_mask[-1, :start + 1] = 0
    dense = Mask(input_pos, attention_mask, B, L, "sdpa").dense
    got = cpu_attention.attention(q, k, v, dense, variant)
    ref = reference.sdpa_attention(q.double(), k.double(), v.double(), dense)
    base = reference.sdpa_attention(q, k, v, dense)
    err, base_err = (got.double() - ref).abs().max().item(), (base.double() - ref).abs().max().item()
    assert err <= 2 * base_err + 1e-6, f"error {err:.3g} vs SDPA's own {base_err:.3g}"


def test_decode_steps_take_the_c_path_and_keep_the_logits(monkeypatch):
    """A cached decode step runs cpu_attention (counted) and gives the logits of the torch path (1e-5); a forward
    that needs a gradient, or more than MAX_T new tokens, does not take it."""
    from tolerances import FP32_LOGITS_REL, assert_rel_close

    from gptneox import GPTNeoX
    from gptneox.config import Config
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=64, rotary_pct=0.25)).eval()
    calls = []
    for name in ("qkv_rotary_cache", "attention"):
        real = getattr(cpu_attention, name)
        monkeypatch.setattr(cpu_attention, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    ids = torch.randint(0, 100, (2, 9))

    def decode(enabled):
        cache = model.new_cache(2, 16)
        monkeypatch.setattr(cpu_attention, "MAX_T", 16 if enabled else 0)
        with torch.no_grad():
            model(ids[:, :6], cache=cache, input_pos=torch.arange(6))  # a short prompt with a cache: the C path too
            return model(ids[:, 6:], cache=cache, input_pos=torch.arange(6, 9))

    torch_path = decode(False)
    assert calls == []
    ours = decode(True)
    assert calls == ["qkv_rotary_cache", "attention"] * 4  # 2 layers, 2 forwards
    assert_rel_close(ours, torch_path, FP32_LOGITS_REL, "decode logits")
    calls.clear()
    monkeypatch.setattr(cpu_attention, "MAX_T", 16)
    model(ids, cache=model.new_cache(2, 16), input_pos=torch.arange(9)).sum().backward()  # a gradient: torch's
    assert calls == []
