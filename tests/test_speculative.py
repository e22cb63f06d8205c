"""Speculative decoding (gptneox/generation/speculative.py): greedy output token for token the target's own for any
draft, the sampled distribution the target's, caches that roll back, rows and stops inside accepted runs, and bad
input."""

import math
import os

import pytest
import torch
from tiny import Scripted, hf_model, hf_state_dict

from gptneox import Config, GPTNeoX, Tokenizer
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator, generate, stream
from gptneox.generation.run import left_pad
from gptneox.generation.sampling import process_logits
from gptneox.generation.speculative import SpeculativeRun, accept, predicted_speedup


def ours(seed=0, **overrides) -> GPTNeoX:
    hf = hf_model(seed, **overrides)
    model = GPTNeoX(Config.from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf_state_dict(hf), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def target():
    return ours(1, num_hidden_layers=3, hidden_size=64, num_attention_heads=2)


DRAFTS = {  # the target itself (every draft accepted), an unrelated smaller model, one with a narrower padded vocab
    "itself": None,
    "unrelated": dict(seed=2, num_hidden_layers=1, hidden_size=32, num_attention_heads=1, intermediate_size=64),
    "narrow-vocab": dict(seed=3, num_hidden_layers=1, hidden_size=32, num_attention_heads=1, intermediate_size=64,
                         vocab_size=96),
}


def draft_for(name, target):
    return target if DRAFTS[name] is None else ours(**DRAFTS[name])


PROMPTS = [torch.randint(1, 90, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (6, 1, 9)]


# ---------------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("name", DRAFTS)
def test_speculative_greedy_is_token_for_token_the_target_alone(target, name, k):
    draft = draft_for(name, target)
    config = GenerationConfig(max_new_tokens=17, temperature=0, eos_token_id=[], num_draft_tokens=k)
    plain = generate(target, PROMPTS, config)
    fast, stats = generate(target, PROMPTS, config, draft_model=draft, return_stats=True)
    assert torch.equal(fast, plain), f"{name} k={k}: {fast.tolist()} != {plain.tolist()}"
    if name == "itself":
        assert stats.acceptance_rate == 1.0
    one, stats = generate(target, PROMPTS[:1], config, draft_model=draft, return_stats=True)
    assert torch.equal(one, plain[:1])
    if name == "itself":  # every iteration yields k + 1 tokens: ceil(N / (k + 1)) target forwards
        assert stats.target_forwards == math.ceil(17 / (k + 1)) and stats.tokens == 17


def test_speculative_batched_rows_stop_on_their_own(target):
    free = generate(target, PROMPTS, max_new_tokens=20, temperature=0, eos_token_id=[])
    eos = int(free[0, 4])  # a token row 0 makes early: rows now stop at different steps
    plain = generate(target, PROMPTS, max_new_tokens=20, temperature=0, eos_token_id=eos)
    draft = ours(**DRAFTS["unrelated"])
    fast = generate(target, PROMPTS, max_new_tokens=20, temperature=0, eos_token_id=eos, draft_model=draft,
                    num_draft_tokens=4)
    assert torch.equal(fast, plain) and (plain == eos).any(), plain.tolist()
    x, mask = left_pad(PROMPTS, pad_id=1)  # the same batch as a left-padded tensor with its mask
    assert torch.equal(generate(target, x, attention_mask=mask, max_new_tokens=20, temperature=0, eos_token_id=eos,
                                draft_model=draft), plain)


def test_speculative_logprobs_are_the_targets(target):
    draft = ours(**DRAFTS["unrelated"])
    config = GenerationConfig(max_new_tokens=9, temperature=0, eos_token_id=[])
    tokens, logprobs = generate(target, PROMPTS, config, return_logprobs=True)
    fast, fast_logprobs = generate(target, PROMPTS, config, draft_model=draft, return_logprobs=True)
    assert torch.equal(fast, tokens)
    torch.testing.assert_close(fast_logprobs, logprobs, rtol=1e-4, atol=1e-5)  # a chunked forward vs one at a time


# -------------------------------------------------------------------------------------------------- sampling
def exact_two_token_distribution(model, prompt, config):
    """The target's own P(t1, t2) [V, V] after prompt under config's processing, computed by enumeration."""
    def dist(ids, seen):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[:, -1].float()
        return process_logits(logits, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                              repetition_penalty=config.repetition_penalty, seen=seen).softmax(-1)[0]
    V = model.config.vocab_size
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, prompt] = True
    p1 = dist(prompt, seen)
    rows = []
    for t in range(V):
        s = seen.clone()
        s[0, t] = True
        rows.append(dist(prompt + [t], s))
    return p1[:, None] * torch.stack(rows)


def empirical(tokens, V):
    counts = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V).float()
    return (counts / counts.sum()).view(V, V)


def test_speculative_sampling_draws_from_the_targets_distribution():
    """20k rows of one prompt, two tokens each: total variation from the exact joint within what 20k draws allow."""
    V, n = 16, 20_000
    target = ours(4, vocab_size=V, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    draft = ours(5, vocab_size=V, num_hidden_layers=1, hidden_size=32, num_attention_heads=1, intermediate_size=64)
    prompt = [3, 7, 1, 12]
    config = GenerationConfig(max_new_tokens=2, temperature=0.9, top_k=12, top_p=0.97, repetition_penalty=1.3,
                              eos_token_id=[], num_draft_tokens=3, seed=0)
    exact = exact_two_token_distribution(target, prompt, config)
    fast, stats = generate(target, [prompt] * n, config, draft_model=draft, return_stats=True)
    plain = generate(target, [prompt] * n, config.of(config, seed=1))
    tv_fast = 0.5 * (empirical(fast, V) - exact).abs().sum().item()
    tv_plain = 0.5 * (empirical(plain, V) - exact).abs().sum().item()
    # E[TV] of n draws over the ~100 cells with mass is about 0.5 * sum sqrt(2 p / (pi n)) ~ 0.03 here
    assert tv_fast < 0.05 and tv_plain < 0.05, (tv_fast, tv_plain)
    assert 0.05 < stats.acceptance_rate < 0.95, "an unrelated draft: some drafts accepted, some rejected"


def test_accept_rule_keeps_the_targets_distribution_exactly():
    """One position, many rows: the accepted-or-resampled token is distributed as p whatever q is."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(1, 1, 8) * 2, -1).expand(50_000, 2, 8)  # [B, k + 1, V], k = 1
    q = torch.softmax(torch.randn(1, 1, 8) * 2, -1).expand(50_000, 1, 8)
    drafts = torch.multinomial(q[:, 0], 1, generator=g)  # [B, 1]
    a, t = accept(p, q, drafts, greedy=False, generator=g)
    first = torch.where(a > 0, drafts[:, 0], t)  # the token at the first position
    freq = torch.bincount(first, minlength=8).float() / 50_000
    torch.testing.assert_close(freq, p[0, 0], atol=0.01, rtol=0)  # ~4 standard errors


# ------------------------------------------------------------------------------------------- cache rollback
def test_speculative_cache_rolls_back_to_a_fresh_recompute(target):
    """After some iterations with rejections, each row's valid slots hold exactly the keys a fresh prefill of its
    committed tokens computes (the rejected drafts' slots are masked, never read)."""
    draft = ours(**DRAFTS["unrelated"])
    gen = Generator(target, draft_model=draft)
    config = GenerationConfig(max_new_tokens=12, temperature=0, eos_token_id=[], num_draft_tokens=3)
    run = SpeculativeRun(gen, PROMPTS, None, config, None)
    with torch.no_grad():
        steps = run.loop()
        for _ in range(3):
            next(steps)
        assert run.stats.accepted < run.stats.proposed, "no rejection: nothing was rolled back"
        x, mask = left_pad(PROMPTS, pad_id=0)
        for b in range(len(PROMPTS)):
            committed = PROMPTS[b] + run.state.tokens[b, :run.state.lengths[b]].tolist()
            fresh = target.new_cache(1, len(committed))
            target(torch.tensor([committed[:-1]]), cache=fresh)  # the newest token is not cached yet
            valid = torch.nonzero(run.mask[b, :run.s]).flatten()  # this row's slots, in order
            assert len(valid) == len(committed) - 1
            for layer, cache in enumerate(run.cache):
                torch.testing.assert_close(cache.k_cache[b, :, valid], fresh[layer].k_cache[0, :, :len(valid)],
                                           msg=f"row {b} layer {layer}")


# ------------------------------------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def pythia_tokenizer():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pythia-tokenizer.json")
    if not os.path.exists(path):
        pytest.skip("shared tokenizer data not found")
    return Tokenizer.from_pretrained(path)


def test_speculative_stops_inside_an_accepted_run(pythia_tokenizer):
    tok = pythia_tokenizer
    script = tok.encode("Hello there. STOP and more text") + [0] + tok.encode(" after the end")
    model = Scripted(script)  # target and draft agree: whole runs of k drafts are accepted
    for k in (2, 4, 7):
        kw = dict(max_new_tokens=len(script), temperature=0, tokenizer=tok, num_draft_tokens=k)
        for stops in ([], ["STOP"]):
            plain = generate(model, [[script[0]]], stop_strings=stops, **kw)
            fast = generate(model, [[script[0]]], stop_strings=stops, draft_model=model, **kw)
            assert torch.equal(fast, plain), (k, stops, fast.tolist(), plain.tolist())
        kw.pop("tokenizer")
        text = "".join(stream(model, tok, [script[0]], stop_strings=["STOP"], draft_model=model, **kw))
        assert text == "Hello there. "


def test_speculative_stops_on_dollys_end_token(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))
    answer = tok.encode("Paris is the capital.")
    model = Scripted(answer + [tok.end_key_id] + tok.encode(" and then more"), vocab_size=50280)
    out = generate(model, [[answer[0]]], max_new_tokens=20, temperature=0, tokenizer=tok, draft_model=model,
                   num_draft_tokens=5)
    assert out.tolist() == [answer + [tok.end_key_id]]


# ------------------------------------------------------------------------------------------------ bad input
def test_speculative_rejects_bad_drafts_and_settings(target):
    with pytest.raises(ValueError, match="num_draft_tokens must be a positive integer"):
        generate(target, PROMPTS, max_new_tokens=4, draft_model=target, num_draft_tokens=0)
    short = ours(2, max_position_embeddings=16)
    with pytest.raises(ValueError, match="exceeds the draft model's context window of 16 tokens"):
        generate(target, PROMPTS, max_new_tokens=12, draft_model=short)
    with torch.device("meta"):
        elsewhere = GPTNeoX(target.config)
    with pytest.raises(ValueError, match="the draft model is on meta, the target on cpu"):
        generate(target, PROMPTS, max_new_tokens=4, draft_model=elsewhere)
    with pytest.raises(ValueError, match="return_stats reports speculative decoding"):
        generate(target, PROMPTS, max_new_tokens=4, return_stats=True)


def test_speculative_refuses_a_draft_narrower_than_the_tokenizer(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))  # 50280 tokens
    target, pythia = Scripted([5], vocab_size=50280), Scripted([5], vocab_size=50277)
    with pytest.raises(ValueError, match="vocabulary of 50277 rows cannot hold the tokenizer's 50280 tokens"):
        generate(target, [[5]], max_new_tokens=3, tokenizer=tok, draft_model=pythia)


def test_predicted_speedup_is_leviathans_formula():
    assert predicted_speedup(1.0, 4, 0.0) == 5.0
    assert math.isclose(predicted_speedup(0.5, 2, 0.1), (1 - 0.5 ** 3) / 0.5 / 1.2)
