"""gptneox/quant/cpu_quant.c: the CPU int8 / int4 matmul against dequantize-then-matmul, its build, cache and
fallbacks."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tolerances import assert_within_2x

from gptneox.ops import native
from gptneox.quant import cpu as cpu_quant
from gptneox.quant.linear import QuantizedLinear
from gptneox.quant.schemes import GROUP_SIZES, dequantize_weight, quantize_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = native.runnable()  # every variant this CPU runs


def dense(t, K, mode, g, dtype):
    """The dequantized weight [N, K] in dtype, computed from the stored tensors without rounding in between."""
    zeros = t.get("zeros")
    return dequantize_weight(t["weight"], t["scales"].to(dtype), zeros.to(dtype) if zeros is not None else None, K,
                             mode, g)


def check(lib, M, N, K, mode, g, dtype, with_bias, x_dtype=torch.float32, seed=0):
    """The tolerance table's rule for kernels: error against the fp64 result at most 2x that of torch's own matmul
    of the dequantized weight in x's dtype (plus rounding), as tests/kernels/test_quant_matmul.py checks Triton's."""
    gen = torch.Generator().manual_seed(seed)
    t = quantize_weight(torch.randn(N, K, generator=gen).to(dtype), mode, g)
    bias = torch.randn(N, generator=gen).to(dtype) if with_bias else torch.zeros(N, dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    y = cpu_quant.QuantMatmul(lib, mode, K, t["weight"], t["scales"], t.get("zeros"), bias if with_bias else None,
                              g)(x)
    ref = x.double() @ dense(t, K, mode, g, torch.float64).t() + bias.double()
    base = x @ dense(t, K, mode, g, torch.float32).to(x_dtype).t() + bias.to(x_dtype)
    assert y.dtype == x_dtype and y.shape == (M, N)
    assert_within_2x(y, base, ref, f"{mode} g{g} M {M} N {N} K {K} {dtype} x {x_dtype}")


@pytest.fixture(scope="module")
def lib():
    built = cpu_quant.library()
    assert built is not None, "this machine has a C compiler: the kernel must build"
    return built


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    """cpu_quant.c built for each instruction-set variant this CPU runs (the best is what library() loads)."""
    built = cpu_quant.library(request.param)
    assert built is not None and built.gptneox_isa() == list(native.ISAS).index(request.param)
    return built


# ------------------------------------------------------------------------------------------------ numerics
@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 40), K=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       with_bias=st.booleans())
@example(M=1, N=8, K=32, dtype=torch.float32, with_bias=False)      # one whole vector block
@example(M=9, N=17, K=41, dtype=torch.bfloat16, with_bias=True)     # 8 + 1 rows, vector + 8-wide + scalar tail
def test_cpu_quant_int8_matches_dequantized_matmul(variant, M, N, K, dtype, with_bias):
    check(variant, M, N, K, "int8", None, dtype, with_bias)


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 40), K=st.integers(1, 600), g=st.sampled_from(GROUP_SIZES),
       dtype=st.sampled_from(DTYPES), with_bias=st.booleans())
@example(M=1, N=8, K=256, g=128, dtype=torch.float32, with_bias=False)   # whole groups only
@example(M=8, N=5, K=75, g=32, dtype=torch.float16, with_bias=True)      # odd K: a short last group, half a byte
@example(M=17, N=3, K=130, g=64, dtype=torch.bfloat16, with_bias=False)  # K % g = 2, three blocks of rows
def test_cpu_quant_int4_matches_dequantized_matmul(variant, M, N, K, g, dtype, with_bias):
    check(variant, M, N, K, "int4", g, dtype, with_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,g,K", [("int8", None, 77), ("int4", 32, 75), ("int4", 128, 256)])
def test_cpu_quant_long_prompts_dequantize_chunks_for_torch_gemm(lib, mode, g, K, dtype, monkeypatch):
    """More than PROMPT_ROWS rows: dequantized chunks of weight rows (here 3 chunks and a short one) + torch.mm."""
    monkeypatch.setattr(cpu_quant, "CHUNK_BYTES", 64 * 4 * K)  # 64 rows per chunk
    check(lib, cpu_quant.PROMPT_ROWS + 3, 3 * 64 + 5, K, mode, g, dtype, True)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 64)])
def test_cpu_quant_half_activations_come_back_in_their_dtype(lib, mode, g, x_dtype):
    check(lib, 5, 24, 200, mode, g, x_dtype, True, x_dtype=x_dtype)


@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 32)])
def test_cpu_quant_every_variant_takes_both_paths_and_long_rows(variant, mode, g):
    """Each variant's vector loops, tails and 8-row blocks, and the prompt path, on sizes the draws rarely reach."""
    for M, N, K in [(1, 7, 64), (9, 13, 75), (3, 5, 300), (8, 3, 1056), (cpu_quant.PROMPT_ROWS + 1, 9, 70)]:
        check(variant, M, N, K, mode, g, torch.float32, True)


@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 128)])
def test_cpu_quant_threads_give_identical_results(lib, mode, g):
    """Each output row is computed whole by one thread, in one order: the thread count cannot change a bit."""
    t = quantize_weight(torch.randn(300, 512), mode, g)
    matmul = cpu_quant.QuantMatmul(lib, mode, 512, t["weight"], t["scales"], t.get("zeros"), None, g)
    x = torch.randn(3, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul(x)
        torch.set_num_threads(2)
        two = matmul(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


# -------------------------------------------------------------------------------------------- bad operands
def test_cpu_quant_refuses_tensors_that_disagree(lib):
    t = quantize_weight(torch.randn(16, 64), "int4", 32)
    with pytest.raises(ValueError, match=r"torch.uint8 \[16, 32\] on cpu, expected torch.uint8 \[16, 33\]"):
        cpu_quant.QuantMatmul(lib, "int4", 65, t["weight"], t["scales"], t["zeros"], None, 32)
    with pytest.raises(ValueError, match=r"\[15\] on cpu, expected torch.float32 \[16\]"):
        cpu_quant.QuantMatmul(lib, "int4", 64, t["weight"], t["scales"], t["zeros"], torch.zeros(15), 32)
    with pytest.raises(ValueError, match="on meta"):
        cpu_quant.QuantMatmul(lib, "int4", 64, t["weight"].to("meta"), t["scales"], t["zeros"], None, 32)
    with pytest.raises(ValueError, match="expected torch.int8"):  # int4's bytes are not int8 weights
        cpu_quant.QuantMatmul(lib, "int8", 32, t["weight"], t["scales"][:, 0])
    matmul = cpu_quant.QuantMatmul(lib, "int4", 64, t["weight"], t["scales"], t["zeros"], None, 32)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\] on the CPU"):
        matmul(torch.randn(2, 63))
    assert matmul(torch.randn(0, 64, dtype=torch.bfloat16)).shape == (0, 16)  # an empty batch is no error
    t8 = quantize_weight(torch.randn(16, 64), "int8")
    with pytest.raises(ValueError, match="no kernel for int8 with scales in torch.float64"):
        cpu_quant.QuantMatmul(lib, "int8", 64, t8["weight"], t8["scales"].double())


# --------------------------------------------------------------------------------------------- the module
def test_quantized_linear_reads_its_tensors_as_they_are_at_each_call():
    """A load assigns new tensors, `.data =` swaps a storage, functional_call substitutes buffers: every call must
    read the tensors the layer holds then (an earlier version kept pointers: freed memory, or a stale bias)."""
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), "int4", 32)
    x = torch.randn(2, 64)

    def expected(m):
        return x @ m.dequantize().t() + m.bias

    with torch.no_grad():
        layer(x)
        other = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), "int4", 32)
        for name in ("weight", "scales", "zeros", "bias"):
            setattr(layer, name, getattr(other, name).clone())
        torch.testing.assert_close(layer(x), expected(other))
        layer.weight.data = torch.randint_like(layer.weight, 0, 256)
        torch.testing.assert_close(layer(x), expected(layer))
        swapped = {"bias": torch.zeros(16), "scales": layer.scales * 2}
        out = torch.func.functional_call(layer, swapped, (x,))
        torch.testing.assert_close(out, x @ dequantize_weight(layer.weight, swapped["scales"], layer.zeros, 64,
                                                              "int4", 32).t())
        layer.half().float()  # _apply
        torch.testing.assert_close(layer(x), expected(layer))


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_cpu_quant_ignores_torchs_default_dtype(default):
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), "int8")
    x = torch.randn(60, 64)  # the prompt path too
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(default)
        with torch.no_grad():
            got = layer(x), layer(x[:3])
    finally:
        torch.set_default_dtype(before)
    torch.testing.assert_close(got[0], x @ layer.dequantize().t() + layer.bias)
    torch.testing.assert_close(got[1], got[0][:3])


def test_layouts_the_kernels_do_not_take_fall_back_to_torch():
    """More than GROUPS_MAX int4 groups per row, or float64 scales: the torch path, not an error."""
    wide = QuantizedLinear.from_linear(torch.nn.Linear(40000, 4), "int4", 32)  # 1250 groups
    double = QuantizedLinear.from_linear(torch.nn.Linear(64, 8), "int8").double()
    with torch.no_grad():
        for layer in (wide, double):
            x = torch.randn(2, layer.in_features, dtype=layer.scales.dtype)
            torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias)


def test_weights_off_the_cpu_are_refused_not_read():
    """x on the CPU and the weights elsewhere (meta here, CUDA for a user): an error, never a pointer into them."""
    layer = QuantizedLinear(64, 16, True, "int8", device="meta")
    with pytest.raises((RuntimeError, ValueError, NotImplementedError)), torch.no_grad():
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("mode,g", [("int8", None), ("int4", 32)])
def test_quantized_linear_gradient_through_cpu_quant_matches_the_dequantized_weight(mode, g, monkeypatch):
    """QLoRA's backward on CPU: dx = dy W, accumulated over chunks of dequantized rows (three here), no bias term."""
    monkeypatch.setattr(cpu_quant, "CHUNK_BYTES", 64 * 4 * 75)  # 64 rows per chunk
    layer = QuantizedLinear.from_linear(torch.nn.Linear(75, 150), mode, g)
    x = torch.randn(5, 75, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = layer.dequantize()
    torch.testing.assert_close(y, x.detach() @ w.t() + layer.bias)
    torch.testing.assert_close(x.grad, dy @ w)


# -------------------------------------------------------------------------------------------- build, cache
def run_fresh(code: str, **env) -> subprocess.CompletedProcess:
    """code in a new interpreter (library() is cached per process) with env added."""
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          env={**os.environ, **env})


BUILD = "from gptneox import cpu_quant; print(cpu_quant.library() is not None)"


def test_cpu_quant_builds_once_into_the_cache_and_atomically(tmp_path):
    first = run_fresh(BUILD, GPTNEOX_CACHE=str(tmp_path))
    assert first.stdout.strip() == "True", first.stderr
    (built,) = tmp_path.glob("cpu_quant-*.so")
    stamp = built.stat().st_mtime_ns
    again = run_fresh(BUILD, GPTNEOX_CACHE=str(tmp_path))
    assert again.stdout.strip() == "True", again.stderr
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # reused, and no temporary file left behind
    assert built.stat().st_mtime_ns == stamp


def test_cpu_quant_rebuilds_when_the_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "cpu_quant.c"
    source.write_text(cpu_quant.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setenv("GPTNEOX_CACHE", str(tmp_path / "cache"))
    cc = cpu_quant.compiler()
    a = cpu_quant._build(cc, ["-O1", "-shared", "-fPIC"])
    monkeypatch.setattr(cpu_quant, "SOURCE", source)
    b = cpu_quant._build(cc, ["-O1", "-shared", "-fPIC"])
    assert a != b and a.exists() and b.exists()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """library() and own_cpu_kernels() forget this process's build for one test (and again after it)."""
    from gptneox.quant.cpu import own_cpu_kernels
    monkeypatch.setenv("GPTNEOX_CACHE", str(tmp_path))
    for cached in (cpu_quant.library, own_cpu_kernels):
        cached.cache_clear()
    yield tmp_path
    for cached in (cpu_quant.library, own_cpu_kernels):
        cached.cache_clear()


@pytest.mark.parametrize("env,says", [({"CC": "/nonexistent/cc"}, "building cpu_quant.c failed"),
                                      ({"CC": "false"}, "failed"),
                                      ({"PATH": "", "CC": ""}, "no C compiler found"),
                                      ({"GPTNEOX_CPU_KERNEL": "0"}, None)])
def test_cpu_quant_without_a_compiler_falls_back_to_torch_with_a_warning(fresh_build, monkeypatch, env, says):
    from gptneox.quant.cpu import own_cpu_kernels
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_quant.library() is None and own_cpu_kernels() == frozenset()
    said = " ".join(str(w.message) for w in caught)
    assert (says in said and "slower operators" in said) if says else not said
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), "int4", 32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias)
    assert not list(fresh_build.glob("*.so"))


def test_cpu_quant_cc_may_carry_a_wrapper_and_flags(tmp_path, monkeypatch):
    """CC="env gcc -O2", as "ccache gcc" is set: split into words, not run as one file name."""
    monkeypatch.setenv("CC", f"env {cpu_quant.compiler()} -O2")
    monkeypatch.setenv("GPTNEOX_CACHE", str(tmp_path))
    path = cpu_quant._build(cpu_quant.compiler(), ["-O1", "-shared", "-fPIC"])
    assert path.exists() and path.parent == tmp_path


def test_cpu_quant_compiler_without_openmp_still_builds(fresh_build, monkeypatch):
    """A compiler that refuses -fopenmp (Apple's clang) gets a one-thread build and a warning, not a fallback."""
    wrapper = fresh_build / "cc"
    wrapper.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && exit 1; done\n"
                       f"exec {cpu_quant.compiler()} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = cpu_quant.library()
    assert single is not None and any("no OpenMP" in str(w.message) for w in caught)
    check(single, 9, 11, 96, "int4", 32, torch.float32, True)


# ------------------------------------------------------------------------------------- int8 activations (opt-in)
def a8_operands(x, t, K, mode, g):
    """(x as the a8 kernels see it: blocks of 32 columns rounded to int8 steps of max |x| / 127, the dequantized
    weight without its zeros, the zeros' part [N, K]) in fp64: the products cpu_quant.c's a8 mode computes."""
    M, nb = x.shape[0], -(-K // 32)
    padded = torch.zeros(M, nb * 32)
    padded[:, :K] = x
    blocks = padded.view(M, nb, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # [M, nb, 1] fp32, as the kernel computes it
    xq = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1)), torch.zeros_like(blocks))
    xd = (xq.double() * d.double()).view(M, -1)[:, :K]
    zeros = t.get("zeros")
    w = dequantize_weight(t["weight"], t["scales"].double(), zeros.double() if zeros is not None else None, K, mode, g)
    wz = zeros.double().repeat_interleave(g, dim=1)[:, :K] if zeros is not None else torch.zeros_like(w)
    return xd, w - wz, wz


@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(1, 30), K=st.integers(1, 600), mode_g=st.sampled_from(
    [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)]), dtype=st.sampled_from(DTYPES))
@example(M=1, N=5, K=1024, mode_g=("int4", 128), dtype=torch.float32)  # whole 128-column chunks only
@example(M=3, N=4, K=300, mode_g=("int8", None), dtype=torch.bfloat16)   # chunks, a block tail, a column tail
def test_cpu_quant_int8_activations_compute_llamacpps_products(variant, M, N, K, mode_g, dtype):
    """quantize_activations' kernels against the same products in fp64: x rounded per 32 columns to int8, times the
    weight, zeros against the exact x; within 2x of torch's own fp32 error on those operands (the kernel rule)."""
    mode, g = mode_g
    gen = torch.Generator().manual_seed(M * 1000 + K)
    t = quantize_weight(torch.randn(N, K, generator=gen).to(dtype), mode, g)
    x = torch.randn(M, K, generator=gen)
    y = cpu_quant.QuantMatmul(variant, mode, K, t["weight"], t["scales"], t.get("zeros"), None, g, "int8")(x)
    xd, w, wz = a8_operands(x, t, K, mode, g)
    ref = xd @ w.t() + x.double() @ wz.t()
    base = xd.float() @ w.float().t() + x @ wz.float().t()
    assert_within_2x(y, base, ref, f"a8 {mode} g{g} M {M} N {N} K {K} {dtype}")


def test_quantize_activations_is_opt_in_reversible_and_refused_without_quantized_layers():
    from tolerances import rel_err

    from gptneox import GPTNeoX, quantize
    from gptneox.config import Config
    from gptneox.quant import quantize_activations
    torch.manual_seed(0)
    model = GPTNeoX(Config(vocab_size=200, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=64)).eval()
    with pytest.raises(ValueError, match="needs a quantized model"):
        quantize_activations(model)
    quantize(model, "int4", group_size=32)
    with pytest.raises(ValueError, match="activations must be one of"):
        quantize_activations(model, "int4")
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        weight_only = model(ids)
        a8 = model(quantize_activations(model, "int8") and ids)
        assert "activations=int8" in repr(model.embed_out)
        back = model(quantize_activations(model, None) and ids)
    assert torch.equal(back, weight_only)  # opting out restores the weight-only numbers exactly
    assert 0 < rel_err(a8, weight_only) < 0.05  # x really is rounded, by about 8 bits' worth
