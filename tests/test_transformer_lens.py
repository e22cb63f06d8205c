"""Our hook points against TransformerLens' on the same weights: logits, every hook point both have, and the names.

The reference is TransformerLens 4.x's TransformerBridge wrapped around a local HF GPTNeoXForCausalLM, offline:
`build_bridge_from_module(hf, "GPTNeoXForCausalLM", hf_config=hf.config)` swaps bridge components into the HF
module tree and never copies, casts or processes a weight (no fold_ln, no centering, no value-bias folding: those
happen only in `enable_compatibility_mode()`), so its hooks see the raw model. `HookedTransformer` is gone in 4.x
(importing it raises), and `boot_transformers(hf_model=...)` would still fetch a tokenizer from the hub.

Shapes need no mapping: the bridge converts its hooks to HookedTransformer's layout, as ours are (q, k, v, z
[B, T, nh, hs]; attn_scores and pattern [B, nh, T, S]; the rest [B, T, C] or [B, T, 4C]).
"""

import pytest
import torch
from tiny import hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, assert_rel_close, rel_err

from gptneox import Config, GPTNeoX

sources = pytest.importorskip("transformer_lens.model_bridge.sources",
                              reason="TransformerLens 4.x (the test extra) is the reference these tests run against")

X = torch.randint(0, 101, (3, 11), generator=torch.Generator().manual_seed(11))  # [B, T], T odd on purpose
CAUSAL = torch.ones(11, 11, dtype=torch.bool).tril()  # [T, S]: the entries of the scores that are not masked
# TransformerLens 4.3's GPT-NeoX attention (JointQKVPositionEmbeddingsAttentionBridge._reconstruct_attention) registers
# hook_rot_q / hook_rot_k but rotates without calling them, so they never reach its cache; test_hooks.py checks ours
# against the rotary of hook_q / hook_k instead.
NOT_FIRED_BY_TL = ("attn.hook_rot_q", "attn.hook_rot_k")


def short(name: str) -> str:
    """blocks.3.attn.hook_q -> attn.hook_q; hook_embed -> hook_embed."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def runs(request):
    """(ours, our logits, our cache, the bridge, its logits, its cache) on the same tiny random model."""
    hf = hf_model(7, use_parallel_residual=request.param)  # 2 layers, C 64, 2 heads, vocab 101, rotary_pct 0.25
    ours = GPTNeoX(Config.from_hf_config(hf.config.to_dict()), backend="sdpa")
    ours.load_state_dict(hf_state_dict(hf), strict=True)  # before the bridge rewires hf's module tree
    bridge = sources.build_bridge_from_module(hf, "GPTNeoXForCausalLM", hf_config=hf.config)
    with torch.no_grad():
        logits, cache = ours.eval().run_with_cache(X)
        tl_logits, tl_cache = bridge.run_with_cache(X)
    return ours, logits, cache, bridge, tl_logits, tl_cache


def test_logits_match_transformer_lens(runs):
    _, logits, _, _, tl_logits, _ = runs
    assert_rel_close(logits, tl_logits, FP32_LOGITS_REL, "logits vs TransformerLens")


def test_every_hook_point_both_have_matches_transformer_lens(runs):
    ours, _, cache, _, _, tl_cache = runs
    common = [n for n in ours.hook_names() if n in tl_cache]  # LayerNorms' hook_normalized included
    failures = []
    for name in common:
        x, ref = cache[name], tl_cache[name]
        if x.shape != ref.shape:
            failures.append(f"{name}: shape {list(x.shape)} vs TransformerLens' {list(ref.shape)}")
            continue
        if name.endswith("hook_attn_scores"):  # masked entries: fp32's minimum here (as HF), maybe -inf there
            x, ref = x[..., CAUSAL], ref[..., CAUSAL]
        if rel_err(x, ref) > FP32_LOGITS_REL:
            failures.append(f"{name}: max relative error {rel_err(x, ref):.3g}")
    assert not failures, "hook points that differ from TransformerLens':\n" + "\n".join(failures)


def test_transformer_lens_has_every_hook_name_of_ours(runs):
    ours, _, _, bridge, _, tl_cache = runs
    names, registered = set(ours.hook_names()), set(bridge.hook_dict)
    theirs_only = sorted({short(n) for n in registered - names})  # hook_in / hook_out, hook_scale, hook_cos, ...
    unknown = sorted(names - registered)
    assert not unknown, f"our names that TransformerLens lacks: {unknown}; its GPT-NeoX names we lack: {theirs_only}"
    unfired = sorted({short(n) for n in names - set(tl_cache)})
    assert set(unfired) <= set(NOT_FIRED_BY_TL), (
        f"our names TransformerLens registers but never fills: {unfired} (expected at most {list(NOT_FIRED_BY_TL)}); "
        f"its GPT-NeoX names we lack: {theirs_only}")
