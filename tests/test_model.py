"""GPTNeoX against Hugging Face's GPTNeoXForCausalLM on tiny random models: logits, loss, gradients, cache, padding."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from tiny import hf_model, hf_state_dict
from tolerances import (FP32_LOGITS_REL, FP32_LOSS_ABS, assert_grads_match_hf, assert_rel_close, assert_within_2x,
                        rel_err)

from gptneox import Config, GPTNeoX, causal_lm_loss


def ours_from(hf, backend="sdpa", dtype=torch.float32) -> GPTNeoX:
    """Our model with the HF model's weights, through a strict load (names must match exactly)."""
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()), backend=backend)
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model.to(dtype).eval()


SHAPES = [  # (use_parallel_residual, rotary_pct, head size, heads, rope base)
    (True, 0.25, 32, 2, 10000),
    (False, 0.25, 32, 2, 10000),
    (True, 0.5, 64, 2, 500),
    (True, 1.0, 64, 1, 10000),
    (False, 1.0, 80, 2, 10000),
    (True, 0.25, 80, 2, 10000),  # pythia-2.8b / dolly-v2-3b head size
    (True, 0.25, 256, 1, 10000),  # pythia-1b head size
]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("parallel,pct,hs,nh,base", SHAPES)
def test_model_matches_hf_logits_fp32(parallel, pct, hs, nh, base, backend):
    hf = hf_model(use_parallel_residual=parallel, rotary_pct=pct, hidden_size=hs * nh, num_attention_heads=nh,
                  intermediate_size=4 * hs * nh, rotary_emb_base=base)
    ours = ours_from(hf, backend)
    x = torch.randint(0, hf.config.vocab_size, (3, 19))
    with torch.no_grad():
        assert_rel_close(ours(x), hf(x).logits, FP32_LOGITS_REL, f"logits ({backend})")


@given(B=st.integers(1, 3), T=st.integers(1, 40), nh=st.integers(1, 3), hs=st.sampled_from([32, 64, 80]),
       vocab=st.integers(7, 300), pct=st.sampled_from([0.25, 0.5, 1.0]), layers=st.integers(1, 3))
@example(B=1, T=1, nh=1, hs=32, vocab=7, pct=0.25, layers=1)
def test_model_matches_hf_logits_on_random_shapes(B, T, nh, hs, vocab, pct, layers):
    hf = hf_model(hidden_size=hs * nh, num_attention_heads=nh, intermediate_size=2 * hs * nh, vocab_size=vocab,
                  rotary_pct=pct, num_hidden_layers=layers)
    x = torch.randint(0, vocab, (B, T))
    with torch.no_grad():
        assert_rel_close(ours_from(hf)(x), hf(x).logits, FP32_LOGITS_REL, f"logits B={B} T={T}")


@pytest.mark.parametrize("overrides", [dict(attention_bias=False), dict(tie_word_embeddings=True),
                                       dict(hidden_act="gelu_fast"), dict(hidden_act="gelu_new"),
                                       dict(hidden_act="relu"), dict(layer_norm_eps=1e-3)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_model_matches_hf_variants(overrides):
    hf = hf_model(**overrides)
    ours = ours_from(hf)
    if overrides.get("tie_word_embeddings"):
        assert ours.embed_out.weight is ours.gpt_neox.embed_in.weight
    x = torch.randint(0, hf.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert_rel_close(ours(x), hf(x).logits, FP32_LOGITS_REL, "logits")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_model_half_precision_within_2x_of_hf(dtype, backend):
    hf32 = hf_model(num_hidden_layers=3)
    x = torch.randint(0, hf32.config.vocab_size, (2, 33))
    with torch.no_grad():
        ref = hf32(x).logits  # the fp32 reference
        hf_half = hf_model(num_hidden_layers=3).to(dtype)(x).logits
        ours = ours_from(hf32, backend, dtype)(x)
    assert ours.dtype == dtype
    assert_within_2x(ours, hf_half, ref, f"{dtype} logits")


def test_model_loss_and_gradients_match_hf():
    hf = hf_model(num_hidden_layers=2, use_parallel_residual=False).train()
    ours = ours_from(hf).train()
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    labels = x.clone()
    labels[0, :5] = -100  # ignored positions, as in Dolly's prompt masking
    hf_loss = hf(x, labels=labels).loss
    loss = causal_lm_loss(ours(x), labels)
    assert abs(loss.item() - hf_loss.item()) <= FP32_LOSS_ABS, (loss.item(), hf_loss.item())
    hf_loss.backward()
    loss.backward()
    assert_grads_match_hf(ours, hf)


def test_model_kv_cache_steps_equal_full_forward():
    model = ours_from(hf_model(num_hidden_layers=2))
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = model.new_cache(2, max_len=16)
    with torch.no_grad():
        full = model(x)
        prefill = model(x[:, :5], cache=cache, input_pos=torch.arange(5))
        steps = [model(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(5, 12)]
    assert_rel_close(torch.cat([prefill, *steps], dim=1), full, FP32_LOGITS_REL, "cached vs full logits")


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_model_left_padding_gives_unpadded_logits(backend):
    model = ours_from(hf_model(), backend)
    long, short = torch.randint(2, 101, (9,)), torch.randint(2, 101, (5,))
    pad = 9 - 5
    x = torch.stack([long, torch.cat([torch.ones(pad, dtype=torch.long), short])])  # left-pad the short row
    mask = (torch.arange(9) >= torch.tensor([[0], [pad]])).long()  # [2, 9]
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens at 0, 1, 2, ...
    with torch.no_grad():
        out = model(x, position_ids=position_ids, attention_mask=mask)
        alone = model(short[None])
    assert not out.isnan().any()
    assert_rel_close(out[1, pad:], alone[0], FP32_LOGITS_REL, "padded row")
    assert_rel_close(out[0], model(long[None])[0], FP32_LOGITS_REL, "unpadded row")


def test_model_returns_hf_attention_probabilities():
    hf = hf_model()
    x = torch.randint(0, hf.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits, probs = ours_from(hf)(x, return_attentions=True)
        expected = hf(x, output_attentions=True).attentions
    assert len(probs) == len(expected) == hf.config.num_hidden_layers
    for p, e in zip(probs, expected):
        assert_rel_close(p, e, FP32_LOGITS_REL, "attention probabilities")
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_model_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        GPTNeoX(Config(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                       intermediate_size=64), backend="flash3")


def test_model_init_weights_follows_gpt_neox():
    config = Config(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=1024)
    model = GPTNeoX(config)
    model.init_weights()
    small, wang = math.sqrt(2 / (5 * 256)), 2 / (4 * math.sqrt(256))
    layer = model.gpt_neox.layers[0]
    assert abs(model.gpt_neox.embed_in.weight.std().item() - small) < 0.05 * small
    assert abs(layer.attention.query_key_value.weight.std().item() - small) < 0.05 * small
    assert abs(layer.attention.dense.weight.std().item() - wang) < 0.05 * wang
    assert abs(layer.mlp.dense_4h_to_h.weight.std().item() - wang) < 0.05 * wang
    assert layer.mlp.dense_h_to_4h.bias.abs().max() == 0 and (layer.input_layernorm.weight == 1).all()


def test_model_trains_loss_decreases():
    config = Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    model = GPTNeoX(config)
    model.init_weights()
    x = torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = causal_lm_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_rel_err_is_relative_to_the_reference_max():
    assert rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == 0.5


def test_model_logits_to_keep_gives_the_last_positions():
    model = ours_from(hf_model())
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, logits_to_keep=3), model(x)[:, -3:])


def test_model_gradient_checkpointing_recomputes_each_block_with_equal_gradients():
    hf = hf_model(num_hidden_layers=2)
    plain, recomputing = ours_from(hf).train(), ours_from(hf).train()
    recomputing.gradient_checkpointing = True
    calls = []
    for block in recomputing.gpt_neox.layers:
        block.register_forward_pre_hook(lambda *args: calls.append(1))
    x = torch.randint(0, hf.config.vocab_size, (2, 12))
    for model in (plain, recomputing):
        causal_lm_loss(model(x), x).backward()
    assert len(calls) == 2 * 2, "each block runs once in forward and once more in backward"
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    with torch.no_grad():
        recomputing(x)
    assert len(calls) == 2 * 2 + 2, "no recomputation without gradients"
