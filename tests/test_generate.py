"""gptneox.generation: greedy parity with transformers' generate, the KV-cached loop against full recomputation,
the logits processors against their textbook definitions, seeding, stopping and streaming."""

import dataclasses
import math
import os

import pytest
import torch
from tiny import Scripted, hf_model, hf_state_dict
from tolerances import FP32_LOGITS_REL, assert_rel_close

from gptneox import Config, GPTNeoX, Tokenizer
from gptneox.checkpoint import checkpoint_name
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import Generator, generate, stream
from gptneox.generation.run import left_pad, stop_ids
from gptneox.generation.sampling import apply_repetition_penalty, process_logits, sample, top_k_filter, top_p_filter
from gptneox.generation.streaming import completion_text


def pair(seed=0, **overrides):
    """A tiny random HF model and ours with the same weights."""
    hf = hf_model(seed, **overrides)
    ours = GPTNeoX(Config.from_hf_config(hf.config.to_dict())).eval()
    state = {checkpoint_name(k): v for k, v in hf_state_dict(hf).items() if checkpoint_name(k)}
    ours.load_state_dict(state, strict=True)
    return hf, ours


def byte_token(tokenizer, byte: int) -> int:
    """The id of the single-byte token for `byte` in a byte-level BPE vocabulary (GPT-2's byte-to-unicode map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char = chr(byte) if byte in printable else chr(256 + sorted(set(range(256)) - set(printable)).index(byte))
    return tokenizer.token_to_id(char)


@pytest.fixture(scope="module")
def pythia_tokenizer():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pythia-tokenizer.json")
    if not os.path.exists(path):
        pytest.skip("shared tokenizer data not found")
    return Tokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_generate_greedy_matches_hf_batch1(parallel, rotary_pct):
    hf, ours = pair(1, use_parallel_residual=parallel, rotary_pct=rotary_pct)
    ids = torch.randint(1, 101, (1, 9))
    ref = hf.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)[:, 9:]
    out = generate(ours, ids, max_new_tokens=24, temperature=0)
    assert torch.equal(out, ref), f"ours {out.tolist()} != HF {ref.tolist()}"


def test_generate_greedy_matches_hf_left_padded_batch():
    hf, ours = pair(2)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (3, 11, 7, 1)]
    free = generate(ours, prompts, max_new_tokens=20, temperature=0, eos_token_id=[])
    eos = int(free[1, 4])  # a token row 1 makes early: rows now stop at different steps
    x, mask = left_pad(prompts, pad_id=1)
    ref = hf.generate(x, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                      pad_token_id=eos)[:, x.shape[1]:]
    out = generate(ours, prompts, max_new_tokens=20, temperature=0, eos_token_id=eos)
    assert torch.equal(out, ref[:, :out.shape[1]]), f"ours {out.tolist()} != HF {ref.tolist()}"
    assert (out == eos).any(dim=1).any(), "the chosen eos never stopped a row: the test checks nothing"
    # the same batch given as a left-padded tensor with its mask
    assert torch.equal(generate(ours, x, attention_mask=mask, max_new_tokens=20, temperature=0, eos_token_id=eos), out)


def test_generate_repetition_penalty_matches_hf_batch1():
    hf, ours = pair(3)
    ids = torch.randint(1, 101, (1, 6))
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.7, pad_token_id=0)[:, 6:]
    plain = generate(ours, ids, max_new_tokens=20, temperature=0)
    out = generate(ours, ids, max_new_tokens=20, temperature=0, repetition_penalty=1.7)
    assert torch.equal(out, ref)
    assert not torch.equal(out, plain), "the penalty changed nothing: the test checks nothing"


# ------------------------------------------------------------------------------------- cache vs recomputation
def test_generate_cached_equals_full_recompute():
    _, ours = pair(4)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (5, 2, 8)]
    out, logprobs = generate(ours, prompts, max_new_tokens=12, temperature=0, eos_token_id=[], return_logprobs=True)
    x, mask = left_pad(prompts, pad_id=0)
    for i in range(out.shape[1]):  # no cache: the whole sequence every step, positions from the mask
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = ours(x, attention_mask=mask, position_ids=position_ids)[:, -1]
        assert torch.equal(logits.argmax(-1), out[:, i]), f"step {i}"
        assert_rel_close(logprobs[:, i], logits.log_softmax(-1).gather(1, out[:, i:i + 1])[:, 0], FP32_LOGITS_REL,
                         f"log-probabilities at step {i}")
        x, mask = torch.cat([x, out[:, i:i + 1]], 1), torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)


# ------------------------------------------------------------------------------ processors vs their definitions
def test_top_k_filter_matches_definition():
    logits = torch.randn(3, 50)
    for k in (1, 5, 50):
        out = top_k_filter(logits, k)
        for row, orig in zip(out.tolist(), logits.tolist()):
            kth = sorted(orig, reverse=True)[k - 1]
            assert row == [v if v >= kth else -math.inf for v in orig]


@pytest.mark.parametrize("candidates", [2, 256])  # 2 forces the widening search
def test_top_p_filter_matches_definition(candidates):
    logits = torch.randn(4, 300) * 3
    for p in (0.05, 0.5, 0.92, 1.0):
        out = top_p_filter(logits, p, candidates=candidates)
        for row, orig in zip(out.tolist(), logits.tolist()):
            probs = [math.exp(v) / sum(math.exp(u) for u in orig) for v in orig]
            ranked = sorted(range(len(orig)), key=lambda i: -probs[i])
            keep, mass = set(), 0.0
            for i in ranked:  # the smallest prefix of the ranking with mass >= p
                keep.add(i)
                mass += probs[i]
                if mass >= p:
                    break
            assert {i for i, v in enumerate(row) if v != -math.inf} == keep, f"p={p}"
            assert all(row[i] == orig[i] for i in keep)


def test_repetition_penalty_matches_definition():
    logits = torch.tensor([[2.0, -2.0, 0.5, -0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 0.5, -0.5, 1.5]]


def test_process_logits_applies_penalty_temperature_top_k_top_p_in_order():
    logits = torch.randn(2, 40) * 2
    seen = torch.rand(2, 40) < 0.3
    expected = apply_repetition_penalty(logits, seen, 1.3) / 0.7
    expected = top_p_filter(top_k_filter(expected, 10), 0.8)
    out = process_logits(logits, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, seen=seen)
    torch.testing.assert_close(out, expected)
    assert torch.equal(process_logits(logits, temperature=0.0, top_k=3), logits), "greedy ignores the warpers"


def test_sample_frequencies_match_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, -math.inf]]).expand(20000, 5)
    draws = sample(logits, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    expected = logits[0].softmax(-1)
    assert freq[4] == 0, "a filtered token was drawn"
    torch.testing.assert_close(freq, expected, atol=0.012, rtol=0)  # ~4 standard errors at n = 20000
    assert torch.equal(sample(logits[:1], 0.0), torch.tensor([3])), "temperature 0 is argmax"


# -------------------------------------------------------------------------------------------- seeds, stopping
def test_generate_seed_reproducible():
    _, ours = pair(5)
    ids = torch.randint(1, 101, (2, 4))
    kw = dict(max_new_tokens=30, temperature=1.5, top_p=0.95, eos_token_id=[])
    a, b = generate(ours, ids, seed=7, **kw), generate(ours, ids, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(ours, ids, seed=8, **kw)), "different seeds gave the same 60 draws"


def test_generate_stops_each_row_on_eos_and_pads_after():
    script = [7, 8, 9, 0, 5, 5]
    out = generate(Scripted(script), [[3]], max_new_tokens=6, temperature=0)
    assert out.tolist() == [[7, 8, 9, 0]], "the eos token is kept, the loop ends when every row has stopped"


def test_generate_stop_strings_cut_text(pythia_tokenizer):
    tok = pythia_tokenizer
    script = tok.encode("Hello there. STOP and more text")
    model = Scripted(script)
    out = generate(model, [[script[0]]], max_new_tokens=len(script), temperature=0, tokenizer=tok,
                   stop_strings=["STOP"], eos_token_id=[])
    stop_at = next(i for i in range(len(script)) if "STOP" in tok.decode(script[:i + 1]))
    assert out.tolist() == [script[:stop_at + 1]], "generation ends on the token that completes the stop string"
    assert completion_text(tok, out[0], [], ["STOP"]) == "Hello there. "
    assert "".join(stream(model, tok, [script[0]], max_new_tokens=len(script), temperature=0,
                          stop_strings=["STOP"], eos_token_id=[])) == "Hello there. "


def test_generate_stops_on_dolly_end_token(shared_data):
    tok = Tokenizer.from_pretrained(os.path.join(shared_data, "dolly-tokenizer.json"))
    answer = tok.encode("Paris is the capital.")
    model = Scripted(answer + [tok.end_key_id] + tok.encode(" and then more"), vocab_size=50280)
    with_tok = generate(model, [[answer[0]]], max_new_tokens=20, temperature=0, tokenizer=tok)
    assert with_tok.tolist() == [answer + [tok.end_key_id]]
    assert stop_ids(model, tokenizer=tok) == [0, tok.end_key_id]
    assert generate(model, [[answer[0]]], max_new_tokens=20, temperature=0).shape[1] == 20, "no tokenizer: eos only"
    assert "".join(stream(model, tok, [answer[0]], max_new_tokens=20, temperature=0)) == "Paris is the capital."


# ------------------------------------------------------------------------------------------------- streaming
def test_stream_never_splits_a_multibyte_character(pythia_tokenizer):
    tok = pythia_tokenizer
    text = "Grüße 🙂 €5"
    script = [byte_token(tok, b) for b in text.encode("utf-8")]  # one token per byte: characters span tokens
    assert tok.decode(script[8:10]) != text[6:8], "the emoji must be split over tokens for this test"
    pieces = list(stream(Scripted(script), tok, [script[0]], max_new_tokens=len(script), temperature=0,
                         eos_token_id=[]))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), pieces
    assert len(pieces) > 3, "the text arrived in one piece: nothing streamed"


def test_stream_equals_final_decode(pythia_tokenizer):
    tok = pythia_tokenizer
    _, ours = pair(6, vocab_size=50304)
    prompt = tok.encode("Once upon a time")
    kw = dict(max_new_tokens=40, temperature=1.0, seed=3, eos_token_id=[])
    tokens = generate(ours, [prompt], **kw)
    assert "".join(stream(ours, tok, prompt, **kw)) == completion_text(tok, tokens[0])


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-3), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_generate_rejects_invalid_settings(kw, message):
    _, ours = pair(0)
    with pytest.raises(ValueError, match=message):
        generate(ours, [[1, 2, 3]], **{"max_new_tokens": 4, **kw})


def test_generate_rejects_bad_prompts():
    _, ours = pair(0)  # context window 128
    with pytest.raises(ValueError, match=r"prompt of 120 tokens \+ max_new_tokens 20 = 140 exceeds the context "
                                         r"window of 128 tokens; at most 8 new tokens fit"):
        generate(ours, [[1] * 120], max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(ours, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        generate(ours, [[5, 101]], max_new_tokens=2)
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        generate(ours, [[5]], max_new_tokens=2, stop_strings=["x"])


@pytest.mark.slow
def test_generate_compile_matches_eager():
    _, ours = pair(7)
    prompts = [torch.randint(1, 101, (n,)).tolist() for n in (4, 9)]
    eager = generate(ours, prompts, max_new_tokens=10, temperature=0, eos_token_id=[])
    assert torch.equal(generate(ours, prompts, max_new_tokens=10, temperature=0, eos_token_id=[], compile=True), eager)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_generate_under_autocast_caches_in_the_autocast_dtype(backend):
    """fp32 master weights under fp16 autocast (train.py's in-training sample): k, v and the cache agree in dtype."""
    hf, ours = pair(num_hidden_layers=2)
    ours.backend = backend
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    with torch.autocast("cpu", dtype=torch.float16):
        tokens = generate(ours, prompts, max_new_tokens=6, temperature=0)
    ours.backend = "sdpa"
    with torch.autocast("cpu", dtype=torch.float16):
        reference = generate(ours, prompts, max_new_tokens=6, temperature=0)
    assert tokens.shape == (2, 6)
    assert torch.equal(tokens, reference)


# --------------------------------------------------------------------------------------- settings and state
def test_generation_config_is_validated_and_frozen():
    config = GenerationConfig(max_new_tokens=5, eos_token_id=[3, 4], stop_strings=["###"])
    assert config.eos_token_id == (3, 4) and config.stop_strings == ("###",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.temperature = 0.5
    with pytest.raises(ValueError, match="stop_strings must be non-empty strings"):
        GenerationConfig(max_new_tokens=5, stop_strings=[""])  # `sample.py --stop ""` used to stop silently at once
    with pytest.raises(ValueError, match="stop_strings must be a list of strings"):
        GenerationConfig(max_new_tokens=5, stop_strings="###")
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        GenerationConfig(max_new_tokens=5, eos_token_id=-1)
    with pytest.raises(ValueError, match=r"unknown generation setting\(s\) temprature"):
        GenerationConfig.of(max_new_tokens=5, temprature=0.5)
    with pytest.raises(ValueError, match="max_new_tokens is required"):
        GenerationConfig.of(temperature=0)
    assert GenerationConfig.of(config, temperature=0).temperature == 0 and config.temperature == 1.0


def test_generate_rejects_no_prompts_and_empty_stop_strings():
    _, ours = pair(0)
    with pytest.raises(ValueError, match="no prompts"):
        generate(ours, [], max_new_tokens=2)  # was "max() arg is an empty sequence"
    with pytest.raises(ValueError, match="stop_strings must be non-empty"):
        generate(ours, [[1, 2]], max_new_tokens=2, stop_strings=[""])


def test_generator_owns_and_reuses_its_cache_and_counts_real_tokens():
    script = [7, 8, 0, 9]  # eos (0) at the third new token
    gen = Generator(Scripted(script))
    config = GenerationConfig(max_new_tokens=4, temperature=0)
    first = gen.generate([[3], [5]], config)
    cache = gen.cache
    assert first.tolist() == [[7, 8, 0], [7, 8, 0]] and gen.tokens_generated == 6
    gen.generate([[3], [4]], config)
    assert gen.cache is cache, "same batch and length: the cache is reused"
    gen.generate([[3]], config)
    assert gen.cache is not cache and gen.cache[0].k_cache.shape[0] == 1
    assert gen.tokens_generated == 6 + 6 + 3
    assert Generator(Scripted(script)).cache is None, "each Generator holds its own state; nothing module-global"


def test_generator_stream_joins_to_generate_text(pythia_tokenizer):
    tok = pythia_tokenizer
    _, ours = pair(6, vocab_size=50304)
    gen, prompt = Generator(ours), tok.encode("Once upon a time")
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=2, eos_token_id=[])
    assert "".join(gen.stream(tok, prompt, config)) == completion_text(tok, gen.generate([prompt], config)[0])
