"""Flash attention (kernels/attention.py) against the torch references gptneox.ops.eager_attention (fp32) and
ops.sdpa_attention (the torch path in the kernel's dtype), forward and backward."""

import math
import sys

import pytest
import torch
from _cases import DEVICE, DTYPES, HEAD_DIMS, assert_matches, dense_mask
from hypothesis import example, given
from hypothesis import strategies as st

from gptneox import ops
from gptneox.ops.runtime import kernels


def make_inputs(B, nh, T, S, hs):
    return [torch.randn(B, nh, n, hs, device=DEVICE) for n in (T, S, S)]


def check_attention(B, nh, T, S, hs, dtype, causal, q_offset, k_start):
    """Kernel vs the fp32 eager reference and the torch SDPA path in dtype, outputs and the three gradients."""
    q_offset = torch.as_tensor(q_offset, device=DEVICE).expand(B)
    k_start = torch.as_tensor(k_start, device=DEVICE).expand(B)
    mask = dense_mask(T, S, q_offset, k_start, causal)
    x32 = make_inputs(B, nh, T, S, hs)
    do = torch.randn(B, nh, T, hs, device=DEVICE)  # one upstream gradient for all three
    runs = {
        "ref": (torch.float32, lambda q, k, v: ops.eager_attention(q, k, v, mask)),
        "base": (dtype, lambda q, k, v: ops.sdpa_attention(q, k, v, mask)),
        "kernel": (dtype, lambda q, k, v: kernels().attention(q, k, v, causal=causal, q_offset=q_offset,
                                                              k_start=k_start)),
    }
    results = {}
    for name, (x_dtype, fn) in runs.items():
        x = [t.to(x_dtype).detach().requires_grad_() for t in x32]
        o = fn(*x)
        o.backward(do.to(x_dtype))
        results[name] = (o, *(t.grad for t in x))
    for what, out, base, ref in zip(("o", "dq", "dk", "dv"), results["kernel"], results["base"], results["ref"]):
        assert out.dtype == dtype and out.shape == ref.shape and not out.isnan().any()
        assert_matches(out, base, ref, f"{what} B={B} nh={nh} T={T} S={S} hs={hs} causal={causal} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hs", HEAD_DIMS)
def test_attention_matches_reference_every_head_dim(hs, dtype):
    check_attention(2, 1, 13, 29, hs, dtype, causal=True, q_offset=16, k_start=[0, 20])  # padded row, S > T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(B=st.integers(1, 2), nh=st.integers(1, 2), T=st.integers(1, 40), extra=st.integers(0, 24),
       hs=st.sampled_from(HEAD_DIMS), causal=st.booleans(),
       offset=st.lists(st.floats(0, 1), min_size=2, max_size=2),
       start=st.lists(st.floats(0, 1), min_size=2, max_size=2))
@example(B=1, nh=1, T=1, extra=0, hs=80, causal=True, offset=[0, 0], start=[0, 0])  # a single token
@example(B=2, nh=1, T=17, extra=0, hs=96, causal=True, offset=[0, 0], start=[0, 1])  # a fully padded query block
def test_attention_matches_reference_on_random_shapes(dtype, B, nh, T, extra, hs, causal, offset, start):
    S = T + extra
    q_offset = [round(f * extra) for f in offset[:B]]  # per-row cache lengths: keys past a row's last query unseen
    k_start = [min(S - 1, int(f * S)) for f in start[:B]]  # left padding, at least one key left
    check_attention(B, nh, T, S, hs, dtype, causal, q_offset, k_start)


def test_attention_saves_logsumexp_in_log2_units():
    q, k, v = make_inputs(2, 2, 9, 13, 64)
    k_start = torch.tensor([0, 5], device=DEVICE)
    o, lse = kernels().attention_fwd(q, k, v, causal=True, k_start=k_start)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(64)  # [B, nh, T, S]
    mask = dense_mask(9, 13, torch.full((2,), 4, device=DEVICE), k_start)
    expected = scores.masked_fill(~mask, float("-inf")).logsumexp(-1) / math.log(2)
    torch.testing.assert_close(lse, expected)


def test_attention_noncausal_row_with_no_visible_key_is_zero():
    q, k, v = make_inputs(2, 1, 5, 7, 32)
    o, lse = kernels().attention_fwd(q, k, v, causal=False, k_start=torch.tensor([0, 7], device=DEVICE))
    assert (o[1] == 0).all() and (lse[1] == float("-inf")).all() and not o.isnan().any()
    torch.testing.assert_close(o[0], ops.sdpa_attention(q[:1], k[:1], v[:1], torch.ones(5, 7, dtype=torch.bool,
                                                                                        device=DEVICE))[0])


@pytest.mark.parametrize("num_splits", [2, 3, pytest.param(100, marks=pytest.mark.slow)])  # 100: ~5 s interpreted
def test_attention_split_over_keys_equals_one_pass(num_splits):
    q, k, v = make_inputs(2, 2, 3, 70, 80)
    kw = dict(causal=True, q_offset=torch.tensor([60, 40], device=DEVICE), k_start=torch.tensor([0, 9], device=DEVICE))
    o1, lse1 = kernels().attention_fwd(q, k, v, **kw)
    o2, lse2 = kernels().attention_fwd(q, k, v, num_splits=num_splits, block_n=16, **kw)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(lse2, lse1)


def test_attention_backward_is_deterministic():
    q, k, v = (t.requires_grad_() for t in make_inputs(2, 2, 33, 33, 80))
    do = torch.randn_like(q)
    first = torch.autograd.grad(kernels().attention(q, k, v), (q, k, v), do)
    second = torch.autograd.grad(kernels().attention(q, k, v), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_rejects_bad_input(monkeypatch):
    q, k, v = make_inputs(1, 2, 4, 4, 32)
    attention = kernels().attention
    with pytest.raises(ValueError, match="head size 512 is above 256"):
        attention(*make_inputs(1, 1, 4, 4, 512))
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="k: expected shape"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="head dim must be contiguous"):
        attention(q.transpose(-1, -2), k, v)
    with pytest.raises(ValueError, match="k_start: expected shape"):
        attention(q, k, v, k_start=torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="head size 8 is below 16"):
        attention(*make_inputs(1, 1, 4, 4, 8))
    if DEVICE == "cpu":  # without the interpreter, CPU tensors get a clear error, not a crash inside Triton
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="Triton kernels need CUDA tensors"):
            attention(q, k, v)


# ------------------------------------------------------------------------------------------ autotune pruning (CPU)
def _attention_module(name="attention"):
    """gptneox.kernels.<name>: attention (the launchers), attention_configs, attention_fwd or attention_bwd."""
    kernels()  # loads gptneox.kernels (from the checkout when not installed)
    return sys.modules[f"gptneox.kernels.{name}"]


@pytest.mark.parametrize("dtype,e", [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)], ids=str)
@pytest.mark.parametrize("hs,D", [(64, 64), (80, 80), (112, 128), (256, 256)])  # D: the head blocks D0 + D1
def test_autotune_keeps_exactly_the_configs_that_fit_shared_memory(monkeypatch, dtype, e, hs, D):
    cfg = _attention_module("attention_configs")
    limit = 120_000  # a fake device, half of sm_90: at hd 256 it keeps some configs of each kernel and drops others
    monkeypatch.setattr(cfg, "max_shared_memory", lambda device_index: limit)
    monkeypatch.setenv("GPTNEOX_AUTOTUNE", "1")
    q = torch.empty(1, 1, 1, hs, dtype=dtype)  # all the pruner reads: dtype, head size, device
    for smem, full, quick, default in (
            (cfg._smem_fwd, [c for c in cfg._FWD_CONFIGS if cfg._keep_fwd(c)], cfg._QUICK_FWD, cfg._DEFAULT_CONFIG),
            (cfg._smem_dkdv, [c for c in cfg._BWD_CONFIGS if cfg._keep_dkdv(c)], cfg._QUICK_DKDV, cfg._DEFAULT_DKDV),
            (cfg._smem_dq, [c for c in cfg._BWD_CONFIGS if cfg._keep_dq(c)], cfg._QUICK_DQ, cfg._DEFAULT_CONFIG)):
        prune = cfg._prune(smem, full, quick, default)
        candidates = cfg._FP32_CONFIGS if dtype == torch.float32 else full
        fitting = [c for c in candidates if smem(c, e, D) <= limit]
        fallback = [cfg._FP32_CONFIGS[0] if dtype == torch.float32 else default]
        assert prune(full, {"q_ptr": q}) == (fitting or fallback)  # Triton 2.x: named_args only
        assert prune(full, {"q_ptr": q}, HS=hs, CAUSAL=True) == (fitting or fallback)  # 3.6 / 3.9: and kwargs
        if dtype != torch.float32 and D == 256:  # the case that prunes: some configs kept, some dropped
            assert 0 < len(fitting) < len(full), [str(c) for c in fitting]


def test_autotune_modes_pick_their_candidates_before_pruning(monkeypatch):
    cfg = _attention_module("attention_configs")
    monkeypatch.setattr(cfg, "max_shared_memory", lambda device_index: 232448)  # sm_90
    full = [c for c in cfg._FWD_CONFIGS if cfg._keep_fwd(c)]
    prune = cfg._prune(cfg._smem_fwd, full, cfg._QUICK_FWD)
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    fitting = [c for c in full if cfg._smem_fwd(c, 2, 128) <= 232448]
    assert 0 < len(fitting) < len(full)  # hd 128 in bf16 on sm_90: 4 stages of 128 x 128 blocks do not fit
    for mode, expected in (("1", fitting), ("quick", cfg._QUICK_FWD), ("0", [cfg._DEFAULT_CONFIG])):
        monkeypatch.setenv("GPTNEOX_AUTOTUNE", mode)
        assert prune(full, {"q_ptr": q}) == expected  # every quick config fits at hd 128
        assert prune(full, {"q_ptr": q.float()}) == cfg._FP32_CONFIGS  # fp32: one small config in every mode
    monkeypatch.setenv("GPTNEOX_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="GPTNEOX_AUTOTUNE='fast'"):
        prune(full, {"q_ptr": q})
    assert 2 <= len(cfg._QUICK_FWD) <= 4 and 2 <= len(cfg._QUICK_DKDV) <= 4 and 2 <= len(cfg._QUICK_DQ) <= 4


def test_autotune_estimate_grows_with_blocks_dtype_and_head_size():
    cfg = _attention_module("attention_configs")
    small, big = cfg._config(32, 32, 2, 4), cfg._config(128, 128, 2, 8)
    for smem in (cfg._smem_fwd, cfg._smem_dkdv, cfg._smem_dq):
        assert smem(small, 2, 64) < smem(big, 2, 64) < smem(big, 2, 256) < smem(big, 4, 256)


# ------------------------------------------------------------------------- every launch config the autotuner can pick
def _block_shapes(*config_lists):
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for configs in config_lists for c in configs})


def _search_spaces():
    cfg = _attention_module("attention_configs")
    fwd = [c for c in cfg._FWD_CONFIGS if cfg._keep_fwd(c)]
    dkdv = [c for c in cfg._BWD_CONFIGS if cfg._keep_dkdv(c)]
    dq = [c for c in cfg._BWD_CONFIGS if cfg._keep_dq(c)]
    extra = [cfg._DEFAULT_CONFIG, *cfg._FP32_CONFIGS]
    return {"fwd": _block_shapes(fwd, cfg._QUICK_FWD, extra),
            "dkdv": _block_shapes(dkdv, cfg._QUICK_DKDV, [cfg._DEFAULT_DKDV, *cfg._FP32_CONFIGS]),
            "dq": _block_shapes(dq, cfg._QUICK_DQ, extra)}


def check_config(kind, block_m, block_n, dtype, hs=80, causal=True):
    """One block shape of one kernel (the others at their defaults) against the references, on a shape where the
    biggest blocks (128) still loop over two key and query blocks with masked and unmasked stretches: T 140, S 164,
    per-row cache offsets and left padding."""
    att, cfg = _attention_module(), _attention_module("attention_configs")
    B, nh, T, S = 2, 1, 140, 164
    q_offset, k_start = torch.tensor([24, 9], device=DEVICE), torch.tensor([0, 40], device=DEVICE)
    mask = dense_mask(T, S, q_offset, k_start, causal)
    chosen = cfg._config(block_m, block_n, 1, 4)
    fwd_cfg = chosen if kind == "fwd" else cfg._DEFAULT_CONFIG
    bwd_cfg = (chosen if kind == "dkdv" else cfg._DEFAULT_DKDV, chosen if kind == "dq" else cfg._DEFAULT_CONFIG)
    x32 = make_inputs(B, nh, T, S, hs)
    do32 = torch.randn(B, nh, T, hs, device=DEVICE)
    results = {}
    for name, x_dtype in (("ref", torch.float32), ("base", dtype)):
        x = [t.to(x_dtype).detach().requires_grad_() for t in x32]
        fn = ops.eager_attention if name == "ref" else ops.sdpa_attention
        o = fn(*x, mask)
        o.backward(do32.to(x_dtype))
        results[name] = (o, *(t.grad for t in x))
    q, k, v = (t.to(dtype) for t in x32)
    kw = dict(causal=causal, q_offset=q_offset, k_start=k_start)
    o, lse = att.attention_fwd(q, k, v, config=fwd_cfg, **kw)
    grads = att.attention_bwd(do32.to(dtype), q, k, v, o, lse, configs=bwd_cfg, **kw)
    for what, out, base, ref in zip(("o", "dq", "dk", "dv"), (o, *grads), results["base"], results["ref"]):
        assert_matches(out, base, ref, f"{what} {kind} BLOCK_M={block_m} BLOCK_N={block_n} hs={hs} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind,block_m,block_n", [(kind, m, n) for kind, shapes in _search_spaces().items()
                                                  for m, n in shapes])
def test_every_block_shape_the_autotuner_can_pick(kind, block_m, block_n, dtype):
    check_config(kind, block_m, block_n, dtype)


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_block_shapes_noncausal_power_of_two_head(kind):
    block_m, block_n = _search_spaces()[kind][-1]  # the largest blocks
    check_config(kind, block_m, block_n, torch.float32, hs=64, causal=False)


def test_search_space_covers_what_the_tests_run():
    spaces = _search_spaces()
    assert (128, 128) in spaces["fwd"] and (32, 128) in spaces["dkdv"] and (128, 32) in spaces["dq"]
    assert len(spaces["fwd"]) >= 5 and len(spaces["dkdv"]) >= 6 and len(spaces["dq"]) >= 6


def test_causal_rows_never_read_past_their_last_query():
    """Keys after each row's last query (the unfilled tail of a static cache) are NaN here: forward, split forward and
    backward stay exact, and those keys get zero gradient."""
    B, nh, T, S, hs = 2, 2, 20, 200, 64
    q_offset, k_start = torch.tensor([100, 31], device=DEVICE), torch.tensor([0, 4], device=DEVICE)
    q, k, v = make_inputs(B, nh, T, S, hs)
    filled = (torch.arange(S, device=DEVICE)[None, :] < (q_offset + T)[:, None])[:, None, :, None]  # [B, 1, S, 1]
    k_nan, v_nan = k.masked_fill(~filled, float("nan")), v.masked_fill(~filled, float("nan"))
    mask = dense_mask(T, S, q_offset, k_start)
    ref = ops.eager_attention(q, k, v, mask)
    kw = dict(causal=True, q_offset=q_offset, k_start=k_start)
    o, lse = kernels().attention_fwd(q, k_nan, v_nan, **kw)
    torch.testing.assert_close(o, ref)
    o_split, _ = kernels().attention_fwd(q, k_nan, v_nan, num_splits=7, block_n=16, **kw)
    torch.testing.assert_close(o_split, ref)
    dq, dk, dv = kernels().attention_bwd(torch.ones_like(o), q, k_nan, v_nan, o, lse, **kw)
    assert not dq.isnan().any() and (dk[~filled.expand_as(dk)] == 0).all() and (dv[~filled.expand_as(dv)] == 0).all()


def test_output_is_heads_last_so_the_model_reshape_is_a_view():
    q, k, v = make_inputs(2, 3, 5, 5, 32)
    o = kernels().attention(q, k, v)
    assert o.shape == (2, 3, 5, 32) and o.transpose(1, 2).is_contiguous()
    y = o.transpose(1, 2).reshape(2, 5, 96)
    assert y.data_ptr() == o.data_ptr()  # no copy


def test_rows_of_an_odd_number_of_bytes_are_refused():
    q, k, v = (t.half() for t in make_inputs(1, 1, 4, 4, 20))
    with pytest.raises(ValueError, match="q: head size 20 in torch.float16 makes rows of 40 bytes"):
        kernels().attention(q, k, v)


def test_autotune_key_buckets_sequence_lengths():
    cfg, fwd, bwd = (_attention_module(f"attention_{name}") for name in ("configs", "fwd", "bwd"))
    assert [cfg.seq_bucket(n) for n in (1, 128, 129, 2048, 3000, 10**6)] == [128, 128, 256, 2048, 4096, 16384]
    for tuned in (fwd._attn_fwd_tuned, bwd._attn_bwd_dkdv_tuned, bwd._attn_bwd_dq_tuned):
        assert list(tuned.keys) == ["D0", "D1", "CAUSAL", "T_BUCKET", "S_BUCKET"]
        assert set(tuned.keys) <= set(tuned.arg_names)


def test_autotune_verbose_prints_the_chosen_config(monkeypatch, capsys):
    att = _attention_module()
    monkeypatch.setenv("GPTNEOX_AUTOTUNE_VERBOSE", "1")
    monkeypatch.setattr(att, "_reported", set())
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 1, 9, 9, 32))
    kernels().attention(q, k, v).sum().backward()
    err = capsys.readouterr().err
    for name in ("fwd", "bwd_dkdv", "bwd_dq"):
        assert f"gptneox.kernels attention {name}: hs=32 causal=True torch.float32 T~128 S~128: BLOCK_M: 16" in err
    kernels().attention(q, k, v)
    assert capsys.readouterr().err == ""  # once per key


def test_inputs_get_strides_a_tensor_descriptor_accepts():
    """16-byte strides and base for the descriptors: a size-1 dim's arbitrary stride is replaced (same elements), an
    odd stride copied; the result is unchanged."""
    att = _attention_module()
    q = torch.randn(2, 1, 1, 64, device=DEVICE).as_strided((2, 1, 1, 64), (64, 1, 3, 1))  # odd size-1 strides
    fixed = att._check_rows("q", q)
    assert torch.equal(fixed, q) and all(s * 4 % 16 == 0 for s in fixed.stride()[:-1])
    x = torch.randn(3, 2, 5, 66, device=DEVICE)[..., 1:65]  # 16-byte rows, but the base is 4 bytes off
    fixed = att._check_rows("k", x)
    assert torch.equal(fixed, x) and fixed.data_ptr() % 16 == 0
    k, v = torch.randn(2, 2, 2, 9, 64, device=DEVICE).unbind(0)
    o = kernels().attention(q.expand(2, 2, 1, 64), k, v, q_offset=8)
    torch.testing.assert_close(o, ops.eager_attention(q.expand(2, 2, 1, 64), k, v, torch.ones(1, 9, dtype=torch.bool,
                                                                                             device=DEVICE)))
