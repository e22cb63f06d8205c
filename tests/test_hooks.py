"""Hook points (gptneox/hooks.py): every value against an independent computation (HF's hidden states, the eager
attention probabilities, the residual identities), patching, ablation, gradients, removal, and bad input."""

import json
import math
import os
import site
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, assert_rel_close

from gptneox import Config, GPTNeoX, causal_lm_loss, ops

NH, HS = 2, 32
ROOT = Path(__file__).resolve().parents[1]


def ours_from(hf, backend="sdpa") -> GPTNeoX:
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()), backend=backend)
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def pair(request):
    hf = hf_model(3, num_hidden_layers=3, use_parallel_residual=request.param, hidden_size=NH * HS,
                  num_attention_heads=NH, intermediate_size=4 * NH * HS)
    return hf, ours_from(hf)


X = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(5))


def test_hook_names_are_transformer_lens_names_in_forward_order(pair):
    _, model = pair
    names = model.hook_names()
    per_layer = ["hook_resid_pre", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                 "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
                 "hook_attn_out", *([] if model.config.use_parallel_residual else ["hook_resid_mid"]),
                 "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"]
    expected = ["hook_embed", *[f"blocks.{i}.{n}" for i in range(3) for n in per_layer], "ln_final.hook_normalized"]
    assert names == expected


def test_hook_values_equal_independent_computations(pair):
    hf, model = pair
    logits, cache = model.run_with_cache(X)
    with torch.no_grad():
        out = hf(X, output_hidden_states=True, output_attentions=True)
    hidden, L = out.hidden_states, model.config.num_hidden_layers  # [emb, out_0 .. out_{L-2}, ln_f(out_{L-1})]
    assert_rel_close(logits, out.logits, FP32_LOGITS_REL, "logits")
    torch.testing.assert_close(cache["hook_embed"], hidden[0], rtol=0, atol=0)
    for i in range(L):
        b = f"blocks.{i}."
        pre, post = cache[b + "hook_resid_pre"], cache[b + "hook_resid_post"]
        assert torch.equal(pre, hidden[i]) if i else torch.equal(pre, cache["hook_embed"])
        if i + 1 < L:
            assert_rel_close(post, hidden[i + 1], FP32_LOGITS_REL, f"resid_post {i} vs HF's hidden state")
            assert torch.equal(post, cache[f"blocks.{i + 1}.hook_resid_pre"])
        layer = model.gpt_neox.layers[i]
        with torch.no_grad():
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm  # hook_normalized: before the affine
            torch.testing.assert_close(cache[b + "ln1.hook_normalized"] * ln1.weight + ln1.bias, ln1(pre))
            torch.testing.assert_close(cache[b + "ln1.hook_normalized"], F.layer_norm(pre, (64,)))
            mid = pre if model.config.use_parallel_residual else cache[b + "hook_resid_mid"]
            if not model.config.use_parallel_residual:
                torch.testing.assert_close(mid, pre + cache[b + "hook_attn_out"])
            torch.testing.assert_close(cache[b + "ln2.hook_normalized"] * ln2.weight + ln2.bias, ln2(mid))
            torch.testing.assert_close(post, cache[b + "hook_mlp_out"] + cache[b + "hook_attn_out"] + pre
                                       if model.config.use_parallel_residual else mid + cache[b + "hook_mlp_out"])
            torch.testing.assert_close(cache[b + "mlp.hook_post"], F.gelu(cache[b + "mlp.hook_pre"]))
            torch.testing.assert_close(layer.mlp.dense_4h_to_h(cache[b + "mlp.hook_post"]), cache[b + "hook_mlp_out"])
            z = cache[b + "attn.hook_z"]  # [B, T, nh, hs]
            torch.testing.assert_close(layer.attention.dense(z.flatten(-2)), cache[b + "hook_attn_out"])
        check_attention_points(cache, b, model.config, out.attentions[i])
    ln_f = model.gpt_neox.final_layer_norm
    with torch.no_grad():
        final = cache["ln_final.hook_normalized"] * ln_f.weight + ln_f.bias
    assert_rel_close(final, hidden[-1], FP32_LOGITS_REL, "ln_final (with its affine) vs HF")


def check_attention_points(cache, b, config, hf_pattern):
    """q, k, v, their rotation, the scores, the pattern and z, recomputed from each other and from HF's pattern."""
    q, k, v = (cache[b + f"attn.hook_{n}"] for n in "qkv")  # [B, T, nh, hs]
    rq, rk = cache[b + "attn.hook_rot_q"], cache[b + "attn.hook_rot_k"]
    assert q.shape == (2, 9, NH, HS) and torch.equal(rq[..., config.rotary_ndims:], q[..., config.rotary_ndims:])
    cos, sin = ops.rotary_cos_sin(torch.arange(9), config.rotary_ndims, config.rotary_emb_base)
    torch.testing.assert_close(rq, ops.apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2))
    torch.testing.assert_close(rk, ops.apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2))
    scores = (rq.transpose(1, 2) @ rk.transpose(1, 2).transpose(-1, -2)) / math.sqrt(HS)  # [B, nh, T, T]
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(cache[b + "attn.hook_attn_scores"][..., causal], scores[..., causal])
    pattern = cache[b + "attn.hook_pattern"]
    torch.testing.assert_close(pattern, scores.masked_fill(~causal, -math.inf).softmax(-1))
    assert_rel_close(pattern, hf_pattern, FP32_LOGITS_REL, "pattern vs HF's attentions")
    torch.testing.assert_close(cache[b + "attn.hook_z"], (pattern @ v.transpose(1, 2)).transpose(1, 2))


def test_patching_each_hook_with_its_own_value_leaves_logits_bitwise_unchanged(pair):
    hf, _ = pair
    model = ours_from(hf, backend="eager")  # the path a scores or pattern hook takes, everywhere
    with torch.no_grad():
        plain = model(X)
        _, cache = model.run_with_cache(X)
        for name in model.hook_names():
            patched = model.run_with_hooks(X, fwd_hooks=[(name, lambda t, n: cache[n].clone())])
            assert torch.equal(patched, plain), name


def test_patching_a_layer_norm_applies_its_weight_and_bias(pair):
    _, model = pair
    ln = model.gpt_neox.layers[0].post_attention_layernorm
    with torch.no_grad():
        _, cache = model.run_with_cache(X, names_filter=["blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_pre"])
        _, patched = run_with_cache_and_hooks(model, [("blocks.0.ln2.hook_normalized", lambda t, n: 2 * t)])
        expected = model.gpt_neox.layers[0].mlp.dense_h_to_4h(2 * cache["blocks.0.ln2.hook_normalized"] * ln.weight
                                                              + ln.bias)
    torch.testing.assert_close(patched["blocks.0.mlp.hook_pre"], expected)


def test_zero_ablating_a_head_changes_exactly_what_it_should(pair):
    _, model = pair
    layer, head = 1, 1

    def ablate(z, name):  # [B, T, nh, hs]
        z = z.clone()
        z[:, :, head] = 0.0
        return z
    with torch.no_grad():
        plain = model(X)
        _, clean = model.run_with_cache(X)
        ablated, cache = run_with_cache_and_hooks(model, [(f"blocks.{layer}.attn.hook_z", ablate)])
        dense = model.gpt_neox.layers[layer].attention.dense
        expected = dense(ablate(clean[f"blocks.{layer}.attn.hook_z"], "").flatten(-2))
    assert not torch.equal(ablated, plain)
    assert torch.equal(cache[f"blocks.{layer}.hook_resid_pre"], clean[f"blocks.{layer}.hook_resid_pre"])
    assert torch.equal(cache[f"blocks.{layer}.attn.hook_pattern"], clean[f"blocks.{layer}.attn.hook_pattern"])
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_attn_out"], expected, rtol=0, atol=0)
    assert (cache[f"blocks.{layer}.attn.hook_z"][:, :, head] == 0).all()


def run_with_cache_and_hooks(model, fwd_hooks):
    with model.hooks(fwd_hooks):
        return model.run_with_cache(X)


def test_gradients_flow_through_hooks_and_incl_bwd_caches_them(pair):
    _, model = pair
    steer = torch.zeros(model.config.hidden_size, requires_grad=True)
    logits = model.run_with_hooks(X, fwd_hooks=[("blocks.1.hook_resid_post", lambda t, n: t + steer)])
    causal_lm_loss(logits, X).backward()
    assert steer.grad is not None and steer.grad.abs().sum() > 0
    logits, cache = model.run_with_cache(X, names_filter="blocks.1.hook_resid_post", incl_bwd=True)
    with pytest.raises(KeyError, match="no gradient yet"):
        cache["blocks.1.hook_resid_post_grad"]
    causal_lm_loss(logits, X).backward()
    torch.testing.assert_close(cache["blocks.1.hook_resid_post_grad"].sum((0, 1)), steer.grad)  # d loss / d steer


def test_hooks_are_removed_after_an_error_and_the_plain_forward_is_back(pair):
    _, model = pair
    with torch.no_grad():
        plain = model(X)

        def boom(t, name):
            raise RuntimeError("inside a hook")
        with pytest.raises(RuntimeError, match="inside a hook"):
            model.run_with_hooks(X, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, n: None),
                                               ("blocks.2.hook_mlp_out", boom)])
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(block.attention.hook is None for block in model.gpt_neox.layers)
        assert torch.equal(model(X), plain)


def test_hooks_reject_unknown_names_and_wrong_replacements(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"unknown hook point 'blocks.0.attn.hook_patern'; did you mean "
                                         r"blocks.0.attn.hook_pattern"):
        model.run_with_hooks(X, fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, n: None)])
    with pytest.raises(ValueError, match=r"hook blocks.0.hook_mlp_out: the function returned \(\[2, 9, 32\]"):
        model.run_with_hooks(X, fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, n: t[..., :32])])
    with pytest.raises(ValueError, match=r"hook blocks.1.attn.hook_q: .*torch.float16"):
        model.run_with_hooks(X, fwd_hooks=[("blocks.1.attn.hook_q", lambda t, n: t.half())])
    with torch.no_grad(), pytest.raises(ValueError, match="outside torch.no_grad"):
        model.run_with_cache(X, incl_bwd=True)
    assert all(block.attention.hook is None for block in model.gpt_neox.layers)


def test_run_with_cache_filters_and_logit_lens(pair):
    _, model = pair
    with torch.no_grad():
        logits, cache = model.run_with_cache(X, names_filter=lambda n: n.endswith("hook_resid_post"))
        assert sorted(cache) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
        last = cache["blocks.2.hook_resid_post"]
        assert torch.equal(model.unembed(last), logits)  # the logit lens at the last layer is the model
        _, one = model.run_with_cache(X, names_filter=["hook_embed"])
        assert list(one) == ["hook_embed"] and not one["hook_embed"].requires_grad


BEFORE_HOOKS = "c5f0a15"  # the last commit before hook points existed
OLD_FORWARD = ("import json, sys, torch; from gptneox import Config, GPTNeoX; torch.set_num_threads(1); "
               "m = GPTNeoX(Config(**json.loads(sys.argv[1])), backend='sdpa').eval(); "
               "m.load_state_dict(torch.load(sys.argv[2])); torch.save(m(torch.load(sys.argv[3])).detach(), sys.argv[4])")


def test_no_hook_forward_is_bitwise_the_model_before_hooks(tmp_path):
    """Today's plain forward against the code of the commit before hooks (git archive), same weights and inputs,
    one thread each (so that both run the same GEMM splits)."""
    old = tmp_path / "before"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE_HOOKS, "gptneox", "kernels"],
                             capture_output=True)
    if archive.returncode:
        pytest.skip(f"git history without {BEFORE_HOOKS} (a shallow clone?): {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    ours = ours_from(hf_model(3, num_hidden_layers=3))
    torch.save(ours.state_dict(), tmp_path / "state.pt")
    torch.save(X, tmp_path / "x.pt")
    config = {k: v for k, v in asdict(ours.config).items() if k != "name"}
    # -S: no site initialisation, so an editable install of today's gptneox (a .pth finder) cannot shadow the old one
    path = os.pathsep.join([str(old), *site.getsitepackages()])
    done = subprocess.run([sys.executable, "-S", "-c", OLD_FORWARD + "; import gptneox; print(gptneox.__file__)",
                           json.dumps(config), *(str(tmp_path / f) for f in ("state.pt", "x.pt", "old.pt"))],
                          check=True, env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.stdout.strip() == str(old / "gptneox" / "__init__.py"), "the old code must be the one run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            assert torch.equal(ours(X), torch.load(tmp_path / "old.pt"))
    finally:
        torch.set_num_threads(threads)
