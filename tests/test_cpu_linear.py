"""gptneox/ops/cpu_linear.c (fp32 products of a few rows) and ops/native.py (its variants and build) against torch."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import FP32_LOGITS_REL, assert_rel_close, assert_within_2x

from gptneox import GPTNeoX
from gptneox.config import Config
from gptneox.ops import cpu_linear, native

VARIANTS = native.runnable()  # every variant this CPU runs


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    built = cpu_linear.library(request.param)
    assert built is not None and built.gptneox_isa() == list(native.ISAS).index(request.param)
    return built


def check(lib, M, N, K, with_bias, seed=0):
    """The kernel rule of the tolerance table: error against fp64 at most 2x torch's own fp32 error (+ rounding)."""
    gen = torch.Generator().manual_seed(seed)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((M, K), (N, K), (N,)))
    b = b if with_bias else None
    y = cpu_linear.small(x, w, b, lib)
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_within_2x(y, F.linear(x, w, b), ref, f"M {M} N {N} K {K}")


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 40), K=st.integers(1, 300), with_bias=st.booleans())
@example(M=1, N=1, K=1, with_bias=True)       # a lone row of W, a masked tail only
@example(M=9, N=17, K=33, with_bias=False)    # 8 + 1 rows of x, an odd last row of W, a tail of 1
def test_cpu_linear_matches_torch(variant, M, N, K, with_bias):
    check(variant, M, N, K, with_bias)


def test_cpu_linear_long_rows_and_many_outputs(variant):
    for M, N, K in [(1, 2304, 768), (8, 50, 3072), (16, 33, 1000)]:
        check(variant, M, N, K, True)


def test_cpu_linear_thread_counts_give_identical_results(variant):
    """Each output is summed whole by one thread, in one order: the thread count cannot change a bit."""
    x, w = torch.randn(5, 700), torch.randn(301, 700)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_linear.small(x, w, None, variant)
        torch.set_num_threads(2)
        two = cpu_linear.small(x, w, None, variant)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_cpu_linears_route_a_model_and_keep_its_logits():
    """Decode (1 row), a batched step (8) and a prompt (40 rows, oneDNN) give F.linear's logits within 1e-5, and
    a gradient still flows (F.linear's path)."""
    config = Config(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=128)
    torch.manual_seed(0)
    plain = GPTNeoX(config).eval()
    routed = GPTNeoX(config).eval()
    routed.load_state_dict(plain.state_dict())
    assert cpu_linear.cpu_linears(routed) == 4 * config.num_hidden_layers + 1
    for T in (1, 8, 40):
        ids = torch.randint(0, 300, (1, T))
        with torch.no_grad():
            assert_rel_close(routed(ids), plain(ids), FP32_LOGITS_REL, f"T {T}")
    routed.train()
    routed(torch.randint(0, 300, (1, 4))).sum().backward()
    assert routed.embed_out.weight.grad is not None


def test_linear_falls_back_off_the_fast_path():
    """bf16 (oneDNN or F.linear), autocast, a gradient: what F.linear gives."""
    x, w, b = torch.randn(3, 40), torch.randn(7, 40), torch.randn(7)
    torch.testing.assert_close(cpu_linear.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()),
                               F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's cast, as F.linear gets it
        assert cpu_linear.linear(x, w, b).dtype == torch.bfloat16
    wg = w.clone().requires_grad_()
    y = cpu_linear.linear(x, wg, b)
    assert y.requires_grad
    torch.testing.assert_close(y, F.linear(x, w, b))


# ------------------------------------------------------------------------------------------------ variants
def run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.mark.parametrize("isa", VARIANTS)
def test_gptneox_cpu_isa_forces_a_lower_variant_for_both_kernels(isa, tmp_path):
    """GPTNEOX_CPU_ISA picks the variant every C kernel loads (a forced fallback), and each still agrees."""
    code = ("import torch; from gptneox.ops import cpu_linear; from gptneox.quant import cpu; "
            "a, b = cpu_linear.library(), cpu.library(); x, w = torch.randn(3, 70), torch.randn(9, 70); "
            "ok = torch.allclose(cpu_linear.small(x, w, None), x @ w.t(), atol=1e-5); "
            "print(a.gptneox_isa(), b.gptneox_isa(), ok, sorted(cpu.own_cpu_kernels()))")
    done = run_fresh(code, GPTNEOX_CPU_ISA=isa, GPTNEOX_CACHE=str(tmp_path))
    code_of = list(native.ISAS).index(isa)
    assert done.stdout.split() == [str(code_of), str(code_of), "True", "['int4',", "'int8']"], done.stderr


def test_gptneox_cpu_isa_is_never_raised_above_the_cpu_and_names_bad_values(monkeypatch):
    monkeypatch.setenv("GPTNEOX_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="GPTNEOX_CPU_ISA='sse9': expected one of plain, avx2, avx512"):
        native.cpu_isa()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setenv("GPTNEOX_CPU_ISA", "avx512")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.cpu_isa() == "plain"
    assert any("runs at most plain" in str(w.message) for w in caught)
