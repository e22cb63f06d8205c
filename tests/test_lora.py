"""LoRA (gptneox/lora/): against PEFT on the HF model with identical adapter weights (logits, loss, gradients),
q / k / v adapters on exactly their rows of every head, merge / unmerge, adapters in PEFT's format both ways, the
forward, generation, KV cache and backends with adapters, a stand-in base module without a weight, bad input."""

import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tiny import hf_model, hf_state_dict
from tolerances import FP32_GRAD_REL, FP32_LOGITS_REL, FP32_LOSS_ABS, assert_rel_close

from gptneox import Config, GPTNeoX, causal_lm_loss
from gptneox.lora.adapter import _fused
from gptneox.lora.adapter import AdapterError, load_adapter, save_adapter
from gptneox.lora.layers import (QKV, LoRAConfig, LoRALinear, add_lora, base_state_dict, lora_modules, lora_state_dict,
                                 merge_lora, unmerge_lora)

warnings.filterwarnings("ignore", module="peft")
peft = pytest.importorskip("peft")  # the test extra (setup.py); pinned in .ci/run
ALL_LINEAR = "query,key,value,dense,dense_h_to_4h,dense_4h_to_h,embed_out"


def pair(seed=1, **overrides):
    """(HF model, ours) with the same random weights."""
    hf = hf_model(seed, **overrides)
    ours = GPTNeoX(Config.from_hf_config(hf.config.to_dict()))
    ours.load_state_dict(hf_state_dict(hf))
    return hf, ours.eval()


def with_random_adapters(model, targets, r=4, alpha=8.0, dropout=0.0, seed=0):
    """add_lora, then B random too (a fresh B is zero, which would hide every mistake in B's placement)."""
    add_lora(model, LoRAConfig(r, alpha, dropout, targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def randomize_lora_b(peft_model):
    """PEFT's B matrices start at zero; random ones make its adapter change the logits."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)


def ids_and_labels(B=3, T=11, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


# ----------------------------------------------------------------------------------------------- against PEFT
@pytest.mark.parametrize("targets", ["query,key,value", "query,value", "value", "dense,dense_h_to_4h", ALL_LINEAR])
@pytest.mark.parametrize("parallel", [True, False])
def test_lora_matches_peft_logits_loss_and_grads(tmp_path, targets, parallel):
    hf, ours = pair(use_parallel_residual=parallel)
    with_random_adapters(ours, targets)
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    peft_model.train(), ours.train()  # dropout 0: training mode changes nothing but is the mode gradients run in
    ids, labels = ids_and_labels()
    theirs = peft_model(ids, labels=labels)
    logits = ours(ids)
    loss = causal_lm_loss(logits, labels)
    assert_rel_close(logits, theirs.logits, FP32_LOGITS_REL, "logits with adapters")
    assert abs(loss.item() - theirs.loss.item()) <= FP32_LOSS_ABS
    loss.backward(), theirs.loss.backward()
    peft_params = dict(peft_model.named_parameters())
    for path, m in lora_modules(ours).items():
        grads = {f"{path}.lora_{ab}.{n}": getattr(m, f"lora_{ab}")[n].grad for ab in "AB" for n in m.lora_A}
        grad_A, grad_B, _, _ = _fused(m, grads, f"{path}.")  # our gradients in PEFT's fused layout
        ones = {f"{path}.lora_B.{n}": torch.ones_like(m.lora_B[n]) for n in m.lora_B}
        block = _fused(m, ones, f"{path}.")[1] != 0  # PEFT also trains the zero blocks; ours are not parameters
        hf_path = "lm_head" if path == "embed_out" else path
        theirs_A = peft_params[f"base_model.model.{hf_path}.lora_A.default.weight"].grad
        theirs_B = peft_params[f"base_model.model.{hf_path}.lora_B.default.weight"].grad
        assert_rel_close(grad_A, theirs_A, FP32_GRAD_REL, f"grad {path}.lora_A")
        assert_rel_close(grad_B, theirs_B * block, FP32_GRAD_REL, f"grad {path}.lora_B")
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n), "the base must be frozen"


def test_lora_adapter_peft_wrote_loads_into_ours(tmp_path):
    hf, ours = pair()
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query_key_value", "dense_4h_to_h", "lm_head"],
                             rank_pattern={"dense_4h_to_h": 2, "gpt_neox.layers.1.attention.query_key_value": 3},
                             alpha_pattern={"lm_head": 3}, lora_dropout=0.1)
    peft_model = peft.get_peft_model(hf, config)
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    ids, _ = ids_and_labels()
    expected = peft_model.eval()(ids).logits
    load_adapter(ours, tmp_path)
    assert sorted(lora_modules(ours)) == sorted(
        [f"gpt_neox.layers.{i}.{m}" for i in range(2) for m in ("attention.query_key_value", "mlp.dense_4h_to_h")]
        + ["embed_out"])
    assert ours.gpt_neox.layers[0].mlp.dense_4h_to_h.lora_A["all"].shape[0] == 2  # rank_pattern
    assert ours.gpt_neox.layers[1].attention.query_key_value.lora_A["all"].shape[0] == 3  # one layer's own rank
    assert ours.embed_out.scaling("all") == 3 / 4  # alpha_pattern
    assert_rel_close(ours(ids), expected, FP32_LOGITS_REL, "logits of a PEFT-trained adapter")
    save_adapter(ours, tmp_path / "again")  # and back: ranks that differ between layers of one kind
    again = peft.PeftModel.from_pretrained(pair()[0], tmp_path / "again").eval()
    assert_rel_close(again(ids).logits, expected, FP32_LOGITS_REL, "PEFT's adapter through ours, back into PEFT")


def test_lora_adapter_peft_wrote_with_rslora_loads_with_its_scale(tmp_path):
    hf, ours = pair()
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"],
                                                         use_rslora=True))
    randomize_lora_b(peft_model)
    peft_model.save_pretrained(tmp_path)
    ids, _ = ids_and_labels()
    expected = peft_model.eval()(ids).logits
    assert_rel_close(load_adapter(ours, tmp_path)(ids), expected, FP32_LOGITS_REL, "rsLoRA logits")


def contents(folder) -> dict:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_lora_save_adapter_replaces_an_adapter_only_with_force_and_only_its_own(tmp_path):
    _, ours = pair()
    with_random_adapters(ours, "query,value")
    save_adapter(ours, tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = contents(tmp_path / "a")
    with pytest.raises(FileExistsError) as e:
        save_adapter(ours, tmp_path / "a")
    assert str(e.value) == (f"{tmp_path / 'a'} already holds the output of save_adapter (adapter_config.json, "
                            "adapter_model.safetensors); pass force=True to replace it")
    assert contents(tmp_path / "a") == before
    save_adapter(ours, tmp_path / "a", base_model_name_or_path="EleutherAI/pythia-70m", force=True)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "EleutherAI/pythia-70m"
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"
    hf, _ = pair()  # an adapter PEFT wrote: never ours to replace
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["query_key_value"])).save_pretrained(tmp_path / "p")
    before = contents(tmp_path / "p")
    with pytest.raises(FileExistsError, match="p holds adapter_config.json, adapter_model.safetensors, not written by "
                                              "gptneox"):
        save_adapter(ours, tmp_path / "p", force=True)
    assert contents(tmp_path / "p") == before


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_lora_save_adapter_files_follow_the_umask(umask, tmp_path):
    _, ours = pair()
    with_random_adapters(ours, "query,value")
    old = os.umask(umask)
    try:
        save_adapter(ours, tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert len(modes) == 3 and set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would give 0600


def test_lora_from_pretrained_with_adapter_equals_peft(tmp_path):
    hf, ours = pair()
    hf.save_pretrained(tmp_path / "base")
    with_random_adapters(ours, "query,value,dense")
    save_adapter(ours, tmp_path / "adapter")
    ids, _ = ids_and_labels()
    loaded = GPTNeoX.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert torch.equal(loaded(ids), ours(ids))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(ids).logits
    assert_rel_close(loaded(ids), theirs, FP32_LOGITS_REL, "from_pretrained(adapter=) vs PEFT")


# ---------------------------------------------------------------------------------------------- rows exactly
@pytest.mark.parametrize("targets", [("query",), ("value",), ("key",), ("query", "value"), QKV])
def test_lora_qkv_adapters_touch_exactly_their_rows_of_every_head(targets):
    """The base query_key_value zeroed: what attention reads as q, k and v (ops' own split, via the hooks) is the
    adapter's alone; the untargeted slices are exactly zero in every head, the targeted ones are not."""
    _, ours = pair(num_attention_heads=4)
    for layer in ours.gpt_neox.layers:
        nn.init.zeros_(layer.attention.query_key_value.weight)
        nn.init.zeros_(layer.attention.query_key_value.bias)
    with_random_adapters(ours, ",".join(targets))
    ids, _ = ids_and_labels()
    names = [f"blocks.{i}.attn.hook_{t[0]}" for i in range(2) for t in QKV]
    _, cache = ours.run_with_cache(ids, names_filter=names)
    for i in range(2):
        for t in QKV:
            x = cache[f"blocks.{i}.attn.hook_{t[0]}"]  # [B, nh, T, hs]
            per_head = x.abs().amax(dim=(0, 2, 3))  # [nh]
            if t in targets:
                assert (per_head > 0).all(), f"layer {i} {t}: the adapter misses a head ({per_head})"
            else:
                assert torch.equal(x, torch.zeros_like(x)), f"layer {i} {t}: touched by an adapter on {targets}"
    merge_lora(ours)
    w = ours.gpt_neox.layers[0].attention.query_key_value.weight.view(4, 3, 16, 64)  # [nh, q|k|v, hs, C]
    for j, t in enumerate(QKV):
        assert (w[:, j].abs().amax(dim=(1, 2)) > 0).all() if t in targets else not w[:, j].any()


def test_lora_q_adapter_equals_an_explicit_low_rank_update_of_the_q_rows():
    _, ours = pair()
    qkv = ours.gpt_neox.layers[1].attention.query_key_value
    w = qkv.weight.detach().clone()
    with_random_adapters(ours, "query", r=3, alpha=5.0)
    m = ours.gpt_neox.layers[1].attention.query_key_value
    delta = 5.0 / 3 * m.lora_B["query"] @ m.lora_A["query"]  # [C, C]: per head h, rows h * hs .. (h + 1) * hs
    expected = w.view(2, 3, 32, 64).clone()
    expected[:, 0] += delta.view(2, 32, 64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(m(x), F.linear(x, expected.view(192, 64), m.base_layer.bias))


def test_lora_fresh_adapter_leaves_logits_unchanged():
    _, ours = pair()
    ids, _ = ids_and_labels()
    before = ours(ids)
    add_lora(ours, LoRAConfig(8, 16, targets=ALL_LINEAR))
    assert torch.equal(ours(ids), before)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(ours)) and len(trainable) == 2 * (2 * 6 + 1)


# ------------------------------------------------------------------------------------------ merge, save, load
def test_lora_merge_folds_the_adapters_and_unmerge_restores_bit_for_bit():
    _, ours = pair()
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    with_random_adapters(ours, ALL_LINEAR)
    ids, _ = ids_and_labels()
    with_adapters = ours(ids)
    merge_lora(ours)
    assert_rel_close(ours(ids), with_adapters, FP32_LOGITS_REL, "merged logits")
    merged = base_state_dict(ours)
    plain = GPTNeoX(ours.config).eval()
    plain.load_state_dict(merged)  # the merged weights are a plain model's: strict load, HF names
    assert torch.equal(plain(ids), ours(ids))
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(ours)
    unmerge_lora(ours)
    assert all(torch.equal(v, base[k]) for k, v in base_state_dict(ours).items())
    assert torch.equal(ours(ids), with_adapters)
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(ours)


def test_lora_save_pretrained_writes_a_merged_model_and_refuses_unmerged_adapters(tmp_path):
    from transformers import GPTNeoXForCausalLM
    _, ours = pair()
    with_random_adapters(ours, ("query", "value", "dense_h_to_4h"))
    ids, _ = ids_and_labels()
    with pytest.raises(ValueError, match="LoRA adapters that are not merged: save_adapter"):
        ours.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    merge_lora(ours)
    ours.save_pretrained(tmp_path / "merged")
    hf = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_rel_close(hf(ids).logits, ours(ids), FP32_LOGITS_REL, "merged checkpoint in transformers")


def test_lora_save_and_load_round_trip_is_exact(tmp_path):
    _, ours = pair()
    with_random_adapters(ours, "query,value,dense_4h_to_h", r=3, alpha=7.0, dropout=0.1)
    (tmp_path / "notes.txt").write_text("mine")
    save_adapter(ours, tmp_path, base_model_name_or_path="EleutherAI/pythia-70m")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (6, 14.0, 0.1)  # q + v: rank 2r, 2 alpha
    assert config["rank_pattern"] == {"dense_4h_to_h": 3} and config["alpha_pattern"] == {"dense_4h_to_h": 7.0}
    assert config["target_modules"] == ["dense_4h_to_h", "query_key_value"] and config["peft_type"] == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gptneox-manifest.json", "adapter_config.json",
                                                          "adapter_model.safetensors", "notes.txt"]
    _, again = pair()
    load_adapter(again, tmp_path)
    a, b = lora_state_dict(ours), lora_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lora_modules(again)["gpt_neox.layers.0.attention.query_key_value"].lora_dropout.p == 0.1
    ids, _ = ids_and_labels()
    assert torch.equal(again(ids), ours(ids))


# ------------------------------------------------------------------------------- forward paths with adapters
def test_lora_kv_cache_steps_equal_the_full_forward_and_generate_equals_peft(tmp_path):
    hf, ours = pair()
    with_random_adapters(ours, ALL_LINEAR)
    ids, _ = ids_and_labels(B=1, T=8)
    full = ours(ids)
    cache = ours.new_cache(1, 16)
    steps = [ours(ids[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), full)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    expected = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 8:]
    assert ours.generate(ids.tolist(), max_new_tokens=12, temperature=0).tolist() == expected.tolist()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_lora_every_backend_gives_the_same_logits(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    _, ours = pair()
    with_random_adapters(ours, ALL_LINEAR)
    ids, _ = ids_and_labels(B=2, T=16)
    reference = ours(ids)  # sdpa on CPU
    ours.backend = backend
    assert_rel_close(ours(ids), reference, FP32_LOGITS_REL, f"backend {backend}")


def test_lora_trains_with_gradient_checkpointing_and_dropout():
    _, ours = pair()
    with_random_adapters(ours, "query,value", dropout=0.3)
    ids, labels = ids_and_labels()
    ours.train()
    torch.manual_seed(5)
    causal_lm_loss(ours(ids), labels).backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    ours.gradient_checkpointing = True
    torch.manual_seed(5)
    causal_lm_loss(ours(ids), labels).backward()
    for n, g in plain.items():
        torch.testing.assert_close(dict(ours.named_parameters())[n].grad, g, msg=n)
    ours.eval()
    a = ours(ids)
    assert torch.equal(a, ours(ids)), "no dropout in eval"


# --------------------------------------------------------------------------- a base that is not an nn.Linear
@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32)])
def test_qlora_matches_lora_on_the_dequantized_base(mode, group_size):
    """QLoRA: adapters on a base held by gptneox.quantize give the loss and LoRA gradients of the same adapters on a
    float model holding the dequantized weights; gradients flow through the frozen quantized layers."""
    from gptneox import QuantizedLinear, quantize
    _, ours = pair()
    quantize(ours, mode, group_size=group_size)
    _, reference = pair()
    for path, q in ours.named_modules():  # the reference: plain nn.Linear holding the dequantized weights
        if isinstance(q, QuantizedLinear):
            linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
            linear.weight.data = q.dequantize().float()
            if q.bias is not None:
                linear.bias.data = q.bias.float().clone()
            owner, name = path.rsplit(".", 1) if "." in path else ("", path)
            setattr(reference.get_submodule(owner) if owner else reference, name, linear)
    targets = "query,value,dense_h_to_4h,embed_out"
    with_random_adapters(ours, targets)
    with_random_adapters(reference, targets)
    a, b = lora_state_dict(ours), lora_state_dict(reference)
    with torch.no_grad():
        for k in a:  # the same A (the init drew in another order of modules) and B
            b[k].copy_(a[k])
    assert a["gpt_neox.layers.0.attention.query_key_value.lora_A.query"].dtype == torch.float32
    ids, labels = ids_and_labels()
    la, lb = (causal_lm_loss(m(ids), labels) for m in (ours, reference))
    assert abs(la.item() - lb.item()) <= FP32_LOSS_ABS
    la.backward(), lb.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    lora = [n for n, p in ours.named_parameters() if ".lora_" in n]
    assert lora and all(n in grads for n in lora)
    for n, p in ours.named_parameters():
        if ".lora_" in n:
            assert_rel_close(p.grad, grads[n], FP32_GRAD_REL, f"grad {n} through the {mode} base")
    with pytest.raises(ValueError, match="merging into a quantized base: gpt_neox.layers.0.attention."
                                         "query_key_value is a QuantizedLinear"):
        merge_lora(ours)
    assert all(m.unmerged is None for m in lora_modules(ours).values()), "nothing merged half-way"


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, message", [
    (dict(r=8, alpha=16, targets="query,qkv"), "unknown qkv; choose from query, key, value, dense, dense_h_to_4h, "
                                               "dense_4h_to_h, embed_out"),
    (dict(r=8, alpha=16, targets="query,query"), "empty or repeated"),
    (dict(r=0, alpha=16), "rank r must be a positive integer, got 0"),
    (dict(r=-2, alpha=16), "rank r must be a positive integer, got -2"),
    (dict(r=8, alpha=0), "alpha must be a finite number > 0"),
    (dict(r=8, alpha=16, dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_lora_config_refuses_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kw)


def test_lora_refuses_adapters_twice(tmp_path):
    _, ours = pair()
    with_random_adapters(ours, "value")
    save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(ours, LoRAConfig(4, 8))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(ours, tmp_path)


def test_lora_adapter_of_another_shape_is_refused_naming_tensor_and_shapes_leaving_the_model_untouched(tmp_path):
    _, small = pair(hidden_size=32, intermediate_size=64)
    with_random_adapters(small, "query,dense_4h_to_h")
    save_adapter(small, tmp_path)
    _, ours = pair()
    before = {n: p.requires_grad for n, p in ours.named_parameters()}
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: tensor 'base_model.model.gpt_neox.layers.0."
                                           r"attention.query_key_value.lora_A.weight' has shape \[4, 32\], but the "
                                           r"model's gpt_neox.layers.0.attention.query_key_value \(192 x 64\) needs "
                                           r"\[4, 64\]"):
        load_adapter(ours, tmp_path)
    assert not lora_modules(ours) and {n: p.requires_grad for n, p in ours.named_parameters()} == before


def test_lora_adapter_for_more_layers_or_another_vocabulary_is_refused(tmp_path):
    _, deep = pair(num_hidden_layers=3)
    with_random_adapters(deep, "dense")
    save_adapter(deep, tmp_path / "deep")
    _, ours = pair()
    with pytest.raises(AdapterError, match=r"adapts 'gpt_neox.layers.2.attention.dense', which is not a layer of "
                                           r"this model .*\(2 layers"):
        load_adapter(ours, tmp_path / "deep")
    _, resized = pair()
    resized.resize_token_embeddings(104)
    with_random_adapters(resized, "value")
    save_adapter(resized, tmp_path / "resized")
    with pytest.raises(AdapterError, match=r"vocabulary of 104 rows, the model has 101: "
                                           r"model.resize_token_embeddings\(104\) first"):
        load_adapter(ours, tmp_path / "resized")
    load_adapter(ours, tmp_path / "resized", resize_embeddings=True)
    assert ours.config.vocab_size == 104


def test_lora_refuses_adapter_files_it_cannot_apply(tmp_path):
    _, ours = pair()
    with_random_adapters(ours, "value")
    save_adapter(ours, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    _, fresh = pair()
    for field, value, message in (("use_dora", True, "use_dora True is not supported"),
                                  ("peft_type", "IA3", "peft_type 'IA3' is not supported"),
                                  ("modules_to_save", ["embed_out"], "modules_to_save"),
                                  ("r", 8, r"gives gpt_neox.layers.0.attention.query_key_value rank 8, but tensor")):
        config_file.write_text(json.dumps({**config, field: value}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(fresh, tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(fresh, tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(fresh, tmp_path / "nothing")
    assert not lora_modules(fresh)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(fresh, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_lora_embed_out_of_a_tied_model_is_refused():
    _, tied = pair(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties embed_out to embed_in"):
        add_lora(tied, LoRAConfig(4, 8, targets="embed_out"))


def test_lora_wrapper_keeps_the_base_interface():
    _, ours = pair()
    add_lora(ours, LoRAConfig(4, 8, targets="embed_out,query"))
    m = ours.embed_out
    assert isinstance(m, LoRALinear) and m.weight is m.base_layer.weight
    assert (m.in_features, m.out_features) == (64, 101)
    assert ours.new_cache(1, 4)[0].k_cache.dtype == torch.float32  # reads model.embed_out.weight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels need CUDA")
def test_lora_bf16_on_cuda_with_triton_kernels_within_twice_the_torch_path_error():
    """bf16 base with fp32 adapters (train.py's LoRA layout) on CUDA: the triton backend's logits are within the
    half-precision rule of the fp32 reference, as the sdpa path's are, and the adapters' gradients flow."""
    from tolerances import assert_within_2x
    _, ours = pair()
    with_random_adapters(ours, ALL_LINEAR)
    ids, labels = ids_and_labels(B=2, T=32)
    ref = ours.cuda()(ids.cuda())  # fp32
    ours.to(torch.bfloat16)
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            p.data = p.data.float()
    ours.backend = "sdpa"
    base = ours(ids.cuda())
    ours.backend = "triton"
    assert_within_2x(ours(ids.cuda()), base, ref, "bf16 triton logits with adapters")
    ours.train()
    causal_lm_loss(ours(ids.cuda()), labels.cuda()).backward()
    grads = [p.grad for n, p in ours.named_parameters() if ".lora_B." in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
