"""The int8 / int4 weight-only matmul kernels (decode and prefill) against dequantize-then-matmul."""

import pytest
import torch
from _cases import DEVICE, DTYPES
from hypothesis import example, given
from hypothesis import strategies as st
from tolerances import assert_within_2x

from gptneox.ops.runtime import kernels
from gptneox.quant.schemes import GROUP_SIZES, dequantize_weight, quantize_weight

SCHEMES = [("int8", None), *(("int4", g) for g in GROUP_SIZES)]


def check(M, N, K, mode, group_size, dtype, kernel):
    """Scales and zeros held in dtype, as a model in dtype holds them; the reference dequantizes those in fp64 and
    the kernel must be within 2x of the torch path's own error in dtype (the tolerance table's rule; for fp32 too:
    the kernel scales an int8 row after its sum, a rounding order assert_close's 1.3e-6 cannot see past at K=500)."""
    t = {k: v if k == "weight" else v.to(dtype) for k, v in quantize_weight(torch.randn(N, K, device=DEVICE), mode,
                                                                           group_size).items()}
    x = torch.randn(M, K, device=DEVICE).to(dtype)
    W = dequantize_weight(t["weight"], t["scales"].double(), t["zeros"].double() if "zeros" in t else None, K, mode,
                          group_size)  # [N, K] fp64
    ref = x.double() @ W.t()  # dequantize, then an fp64 matmul
    base = x @ W.to(dtype).t()  # the torch path: dequantize, then a matmul in dtype
    out = kernels().quant_matmul_fwd(x, t["weight"], t["scales"], t.get("zeros"), group_size, kernel=kernel)
    assert out.shape == (M, N) and out.dtype == dtype
    assert_within_2x(out, base, ref, f"{kernel} {mode} g={group_size} M={M} N={N} K={K} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_quant_matmul_matches_dequantized_reference(mode, group_size, kernel, dtype):
    check(3, 48, 2 * 256 + 32, mode, group_size, dtype, kernel)  # K: 2 groups of 256 and a short last one


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
@given(M=st.integers(1, 40), N=st.integers(1, 80), K=st.integers(1, 300), scheme=st.sampled_from(SCHEMES))
@example(M=1, N=1, K=1, scheme=("int4", 32))  # one column: a single low nibble
@example(M=1, N=17, K=97, scheme=("int4", 64))  # odd K, K % g != 0, a decode row
@example(M=33, N=65, K=256, scheme=("int8", None))  # every block dimension one past a multiple
def test_quant_matmul_matches_reference_on_random_shapes(kernel, dtype, M, N, K, scheme):
    check(M, N, K, *scheme, dtype, kernel)


def test_quant_matmul_auto_picks_decode_for_few_rows_and_prefill_for_many():
    t = quantize_weight(torch.randn(40, 70, device=DEVICE), "int4", 32)
    for M in (1, 16, 17, 50):
        x = torch.randn(M, 70, device=DEVICE)
        auto = kernels().quant_matmul(x, t["weight"], t["scales"], t["zeros"], 32)
        forced = kernels().quant_matmul_fwd(x, t["weight"], t["scales"], t["zeros"], 32,
                                            kernel="decode" if M <= 16 else "prefill")
        torch.testing.assert_close(auto, forced, rtol=0, atol=0)


def test_quant_matmul_refuses_mismatched_tensors():
    t = quantize_weight(torch.randn(8, 64, device=DEVICE), "int4", 32)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="zeros"):
        kernels().quant_matmul(x, t["weight"], t["scales"], None, 32)
    with pytest.raises(ValueError, match=r"scales \(int4\)"):
        kernels().quant_matmul(x, t["weight"], t["scales"][:, :1], t["zeros"], 32)
    with pytest.raises(ValueError, match=r"weight \(int8\)"):
        kernels().quant_matmul(torch.randn(2, 63, device=DEVICE), *quantize_weight(torch.randn(8, 64), "int8").values())


# ------------------------------------------------------------------------- every launch config the autotuner can pick
def _module():
    import sys
    kernels()
    return sys.modules["gptneox.kernels.quant_matmul"]


def _shapes(configs, names):
    return sorted({tuple(c.kwargs[n] for n in names) for c in configs})


_QM = _module()
DECODE_SHAPES = _shapes([*_QM.DECODE_CONFIGS, *_QM.DECODE_QUICK], ("BLOCK_N", "BLOCK_J"))
PREFILL_SHAPES = _shapes([*_QM.PREFILL_CONFIGS, *_QM.PREFILL_QUICK], ("BLOCK_M", "BLOCK_N", "BLOCK_J"))


def check_config(kernel, config, M, dtype):
    """One block shape on a shape with several blocks along N and K and a short last group (int4 g 32 and int8)."""
    N, K = 150, 300
    for mode, g in (("int8", None), ("int4", 32)):
        t = {k: v if k == "weight" else v.to(dtype) for k, v in
             quantize_weight(torch.randn(N, K, device=DEVICE), mode, g).items()}
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        W = dequantize_weight(t["weight"], t["scales"].double(), t["zeros"].double() if "zeros" in t else None, K,
                              mode, g)
        out = kernels().quant_matmul_fwd(x, t["weight"], t["scales"], t.get("zeros"), g, kernel=kernel, config=config)
        assert_within_2x(out, x @ W.to(dtype).t(), x.double() @ W.t(), f"{kernel} {config} {mode} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)  # fp32 runs the default config alone (_prune)
@pytest.mark.parametrize("block_n,block_j", DECODE_SHAPES)
def test_decode_every_block_shape_the_autotuner_can_pick(block_n, block_j, dtype):
    check_config("decode", _QM._decode_config(block_n, block_j, 4, 1), 2, dtype)


@pytest.mark.parametrize("dtype", [torch.float16], ids=str)  # fp32 runs the default config alone (_prune)
@pytest.mark.parametrize("block_m,block_n,block_j", PREFILL_SHAPES)
def test_prefill_every_block_shape_the_autotuner_can_pick(block_m, block_n, block_j, dtype):
    check_config("prefill", _QM._prefill_config(block_m, block_n, block_j, 4, 1), 70, dtype)


def test_quant_autotune_prunes_to_the_mode_and_the_shared_memory(monkeypatch):
    qm = _module()
    monkeypatch.setattr(qm, "max_shared_memory", lambda index: 100_000)
    prune = qm._prune(qm.PREFILL_CONFIGS, qm.PREFILL_DEFAULT, qm.PREFILL_QUICK, qm._smem_prefill)
    x = torch.empty(1, 8, dtype=torch.float16)
    for mode, pool in (("1", qm.PREFILL_CONFIGS), ("quick", qm.PREFILL_QUICK), ("0", [qm.PREFILL_DEFAULT])):
        monkeypatch.setenv("GPTNEOX_AUTOTUNE", mode)
        kept = prune(pool, {"x_ptr": x}, GROUP=32)
        assert kept == [c for c in pool if qm._smem_prefill(c, 2) <= 100_000]
        assert prune(pool, {"x_ptr": x.float()}) == [qm.PREFILL_DEFAULT]  # fp32: the default alone
    monkeypatch.setenv("GPTNEOX_AUTOTUNE", "1")
    assert 0 < len(prune(None, {"x_ptr": x})) < len(qm.PREFILL_CONFIGS)  # the limit drops the biggest tiles
    assert [qm.m_bucket(m) for m in (1, 16, 17, 5000)] == [16, 16, 32, 4096]
