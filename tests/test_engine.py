"""The serving engine's second pass (gptneox/generation/batching.py, prefix.py, ops/ragged.py): packed steps, batched
and chunked prefill, prefix caching, shared prefills, logit_bias and OpenAI's penalties, timeouts, on_end. The
reference is always what the model computes for one sequence alone."""

import threading

import pytest
import torch
from test_batching import PROMPTS, Waiter, dolly, min_margin, reference, submit  # noqa: F401 (the fixture)

from gptneox import GPTNeoX
from gptneox.generation.batching import Engine, Request
from gptneox.generation.config import GenerationConfig
from gptneox.generation.prefix import BLOCK, PrefixCache
from gptneox.ops import Ragged

LONG = ("Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "### Instruction: Name three primary colors and say why they are called primary, in one sentence each.")


class Counting:
    """Wraps model.forward: records (packed tokens, prompt tokens) per forward."""

    def __init__(self, model, monkeypatch):
        self.calls, real = [], model.forward

        def forward(input_ids, **kwargs):
            ragged = kwargs.get("attention_mask")
            self.calls.append((input_ids.shape[1], sum(n for _, _, n in ragged.seqs if n > 1) if ragged else 0))
            return real(input_ids, **kwargs)
        monkeypatch.setattr(model, "forward", forward)


# ------------------------------------------------------------------------------------------------ ragged forwards
def test_ragged_forward_gives_each_sequence_its_logits_alone(dolly):
    """Three sequences at their own cache rows and columns, one mid-prompt (a chunk after 5 cached tokens), one
    decoding, one fresh: each position's logits equal the sequence's own full forward (fp32, 1e-5)."""
    model, tok = dolly
    seqs = [tok.encode(p) for p in (PROMPTS[3], PROMPTS[1], PROMPTS[0])]
    assert len(seqs[0]) > 6
    cache = model.new_cache(4, 64)
    with torch.no_grad():
        for row, ids in ((0, seqs[0][:5]), (2, seqs[1][:-1])):  # what earlier steps left in the cache
            r = Ragged([(row, 0, len(ids))], "cpu")
            model(torch.tensor([ids]), position_ids=r.position_ids, attention_mask=r,
                  cache=r.views(cache), input_pos=torch.arange(len(ids)))
        plan = [(0, 5, seqs[0][5:]), (2, len(seqs[1]) - 1, seqs[1][-1:]), (3, 0, seqs[2])]
        r = Ragged([(row, start, len(ids)) for row, start, ids in plan], "cpu")
        packed = [t for _, _, ids in plan for t in ids]
        logits = model(torch.tensor([packed]), position_ids=r.position_ids, attention_mask=r,
                       cache=r.views(cache), input_pos=torch.arange(len(packed)))[0]
        alone = [model(torch.tensor([s]))[0] for s in (seqs[0], seqs[1], seqs[2])]
    expect = torch.cat([alone[0][5:], alone[1][-1:], alone[2]])
    torch.testing.assert_close(logits, expect, rtol=1e-5, atol=1e-5)


def test_logits_to_keep_positions(dolly):
    model, tok = dolly
    ids = torch.tensor([tok.encode(PROMPTS[3])])
    with torch.no_grad():
        full = model(ids)
        kept = model(ids, logits_to_keep=torch.tensor([0, 4, 2]))
    torch.testing.assert_close(kept, full[:, [0, 4, 2]])


# ------------------------------------------------------------------------------------------- batched and chunked
def test_prompts_that_arrive_together_are_prefilled_in_one_forward(dolly, monkeypatch):
    model, tok = dolly
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    refs = [reference(model, tok, p, max_new_tokens=6, temperature=0)[0] for p in prompts]
    counting = Counting(model, monkeypatch)
    engine = Engine(model, tok, max_batch_size=4, prefix_cache=False).start()
    try:
        with engine._cond:
            runs = [submit(engine, p, max_new_tokens=6, temperature=0) for p in prompts]
        assert [r.tokens for r, w in runs if w.wait()] == refs
    finally:
        engine.stop()
    assert counting.calls[0] == (sum(map(len, prompts)), sum(len(p) for p in prompts if len(p) > 1))
    assert len(counting.calls) == 6  # the prefill with every first token, then 5 decode steps of all four


def test_chunked_prefill_keeps_running_streams_and_equals_alone(dolly, monkeypatch):
    model, tok = dolly
    long = tok.encode(LONG)
    short = [tok.encode(p) for p in PROMPTS[:3]]
    refs = [reference(model, tok, p, max_new_tokens=n, temperature=0)[0] for p, n in [(long, 8)] + [(s, 30)
                                                                                                   for s in short]]
    for p, r in zip([long, *short], refs):
        assert min_margin(model, p, r) > 1e-4
    counting = Counting(model, monkeypatch)
    engine = Engine(model, tok, max_batch_size=4, max_prefill_tokens=8, prefix_cache=False).start()
    try:
        runs = [submit(engine, s, max_new_tokens=30, temperature=0) for s in short]
        for r, _ in runs:  # the three streams are decoding
            while len(r.tokens) < 2:
                threading.Event().wait(0.01)
        steps_before = len(counting.calls)
        entering = submit(engine, long, max_new_tokens=8, temperature=0)
        entering[1].wait()
        for _, w in runs:
            w.wait()
    finally:
        engine.stop()
    assert [entering[0].tokens] + [r.tokens for r, _ in runs] == refs
    assert all(prompt <= 8 for _, prompt in counting.calls)  # no step carried more prompt than max_prefill_tokens
    during = counting.calls[steps_before:steps_before + len(long) // 8]
    assert all(n > prompt for n, prompt in during)  # while the long prompt entered, the streams decoded each step


# ------------------------------------------------------------------------------------------------- prefix cache
def test_prefix_cache_blocks_give_the_logits_of_a_recomputation(dolly):
    model, tok = dolly
    ids = tok.encode(LONG)
    assert len(ids) > 2 * BLOCK
    cache = model.new_cache(2, 128)
    prefix = PrefixCache(model.config, 8, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        model(torch.tensor([ids]), cache=[_Row0(layer) for layer in cache])  # slot 0 holds the whole prompt
        prefix.store(ids, None, cache, 0)
        assert len(prefix) == len(ids) // BLOCK
        other = ids[:2 * BLOCK] + tok.encode(" Then list three secondary colors.")
        hit = prefix.load(other, None, cache, 1, limit=len(other) - 1)
        assert hit == 2 * BLOCK and prefix.load(other, "tune", cache, 1, limit=len(other) - 1) == 0
        rest = torch.tensor([other[hit:]])
        pos = torch.arange(hit, len(other))
        logits = model(rest, cache=[_Row1(layer) for layer in cache], input_pos=pos)[0]
        full = model(torch.tensor([other]))[0, hit:]
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)


class _Row0:
    """Slot 0 of an engine-shaped cache as a KVCache."""
    row = 0

    def __init__(self, layer):
        self.layer, self.max_len = layer, layer.k_cache.shape[2]

    def update(self, input_pos, k, v):
        self.layer.k_cache[self.row:self.row + 1, :, input_pos] = k
        self.layer.v_cache[self.row:self.row + 1, :, input_pos] = v
        return self.layer.k_cache[self.row:self.row + 1], self.layer.v_cache[self.row:self.row + 1]


class _Row1(_Row0):
    row = 1


def test_prefix_cache_is_bounded_and_evicts_the_least_recently_used_leaf(dolly):
    model, _ = dolly
    cache = model.new_cache(1, 128)
    prefix = PrefixCache(model.config, 3, dtype=torch.float32, device="cpu")
    a, b = list(range(1, 2 * BLOCK + 1)), list(range(100, 100 + 2 * BLOCK))
    prefix.store(a, None, cache, 0)
    prefix.store(b, None, cache, 0)  # 4 blocks into 3: a's leaf (the oldest) goes, never b's own first block
    assert len(prefix) == 3
    assert prefix.load(a + [7], None, cache, 0, limit=2 * BLOCK) == BLOCK
    assert prefix.load(b + [7], None, cache, 0, limit=2 * BLOCK) == 2 * BLOCK


def test_prefix_cache_on_and_off_answer_the_same_and_count_hits(dolly):
    model, tok = dolly
    shared = tok.encode(LONG)
    prompts = [shared + tok.encode(q) for q in (" Red?", " And blue, briefly?", " Green.")]
    refs = [reference(model, tok, p, max_new_tokens=10, temperature=0)[0] for p in prompts]
    for cached in (False, True):
        engine = Engine(model, tok, max_batch_size=2, prefix_cache=cached).start()
        try:
            runs = []
            for p in prompts:  # one after another: each later one finds the shared blocks
                runs.append(submit(engine, p, max_new_tokens=10, temperature=0))
                runs[-1][1].wait()
        finally:
            engine.stop()
        assert [r.tokens for r, _ in runs] == refs
        hits = [r.cached_tokens for r, _ in runs]
        assert hits == ([0, 0, 0] if not cached else [0] + [len(shared) // BLOCK * BLOCK] * 2)
        assert engine.stats["cached_tokens"] == sum(hits)
        assert engine.stats["prompt_tokens"] == sum(map(len, prompts))


# ------------------------------------------------------------------------------------------------ shared prefill
def test_identical_prompts_queued_together_share_one_prefill(dolly, monkeypatch):
    model, tok = dolly
    ids = tok.encode(PROMPTS[3])
    seeds = [1, 2, 3]
    refs = [reference(model, tok, ids, max_new_tokens=6, temperature=1.0, seed=s)[0] for s in seeds]
    counting = Counting(model, monkeypatch)
    engine = Engine(model, tok, max_batch_size=4, prefix_cache=False).start()
    try:
        with engine._cond:
            runs = [submit(engine, ids, max_new_tokens=6, temperature=1.0, seed=s) for s in seeds]
        assert [r.tokens for r, w in runs if w.wait()] == refs
    finally:
        engine.stop()
    assert sum(prompt for _, prompt in counting.calls) == len(ids)  # the prompt was computed once, not three times


# ---------------------------------------------------------------------------------------- logit_bias, penalties
def penalized_reference(model, ids, n, bias=None, presence=0.0, frequency=0.0):
    """Greedy tokens by OpenAI's definitions, from the model's full-sequence logits at each step."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids + out]))[0, -1].float()
        for t, b in (bias or {}).items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        out.append(int(logits.argmax()))
    return out


def test_logit_bias_and_penalties_follow_openais_formula(dolly):
    model, tok = dolly
    ids = tok.encode(PROMPTS[1])
    plain = penalized_reference(model, ids, 12)
    cases = [dict(bias={plain[0]: -100.0, plain[1]: 5.0}), dict(presence=1.5), dict(frequency=1.2),
             dict(presence=-0.5, frequency=0.7, bias={plain[2]: 2.0})]
    engine = Engine(model, tok, max_batch_size=4).start()
    try:
        runs = []
        for c in cases:
            waiter = Waiter()
            request = Request(ids, GenerationConfig(max_new_tokens=12, temperature=0, eos_token_id=[]), waiter,
                              logit_bias=c.get("bias"), presence_penalty=c.get("presence", 0.0),
                              frequency_penalty=c.get("frequency", 0.0))
            assert engine.submit(request)
            runs.append((request, waiter))
        got = [r.tokens for r, w in runs if w.wait()]
    finally:
        engine.stop()
    want = [penalized_reference(model, ids, 12, c.get("bias"), c.get("presence", 0.0), c.get("frequency", 0.0))
            for c in cases]
    assert got == want
    assert want[0][0] != plain[0] and any(w != plain for w in want[1:])  # each setting changed something


def test_logit_bias_token_outside_the_vocabulary_is_refused(dolly):
    model, tok = dolly
    engine = Engine(model, tok)
    with pytest.raises(ValueError, match="logit_bias"):
        engine.submit(Request([1, 2], GenerationConfig(max_new_tokens=2), Waiter(), logit_bias={50280: 1.0}))


# --------------------------------------------------------------------------------------------- timeouts, on_end
def test_request_timeout_fails_the_request_and_on_end_sees_every_request(dolly, monkeypatch):
    model, tok = dolly
    real = model.forward

    def slow_forward(*args, **kwargs):  # 20 ms a step: 240 tokens take seconds on any machine, past the 0.3 s limit
        threading.Event().wait(0.02)
        return real(*args, **kwargs)
    monkeypatch.setattr(model, "forward", slow_forward)
    ended = []
    engine = Engine(model, tok, max_batch_size=1, request_timeout=0.3)
    engine.on_end = ended.append
    engine.start()
    try:
        slow, waiter = submit(engine, tok.encode(PROMPTS[0]), max_new_tokens=240, temperature=0)
        quick = Request(tok.encode("a"), GenerationConfig(max_new_tokens=2, temperature=0), Waiter(),
                        deadline=float("inf"))
        assert engine.submit(quick)
        waiter.wait()
        quick.emit.wait()
    finally:
        engine.stop()
    assert waiter.events[-1].kind == "error" and "timed out" in waiter.events[-1].message
    assert slow.finish_reason == "error" and engine.stats["timed_out"] == 1
    assert quick.finish_reason == "length" and len(quick.token_times) == 2 and quick.arrival > 0
    assert ended == [slow, quick]


def test_cpu_linears_compute_what_f_linear_computes(dolly):
    from gptneox.ops.cpu_linear import cpu_linears
    model, tok = dolly
    fresh = GPTNeoX(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    ids = torch.tensor([tok.encode(PROMPTS[3])] * 2)
    with torch.no_grad():
        want = fresh(ids)
        assert cpu_linears(fresh) == 4 * model.config.num_hidden_layers + 1
        got = fresh(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, model.config.hidden_size, requires_grad=True)  # training keeps F.linear (and its gradient)
    fresh.embed_out(x).sum().backward()
    assert x.grad is not None


def test_submit_all_queues_every_request_or_none(dolly):
    model, tok = dolly
    engine = Engine(model, tok, max_batch_size=1, max_queue=4)  # not started: nothing leaves the queue

    def req(ids=(1, 2), **kw):
        return Request(list(ids), GenerationConfig(max_new_tokens=2), Waiter(), **kw)
    assert engine.submit_all([req(), req()])
    assert not engine.submit_all([req(), req(), req()]) and len(engine.waiting) == 2
    assert engine.stats["rejected"] == 3
    with pytest.raises(ValueError, match="logit_bias"):  # a request it cannot run: none of them is queued
        engine.submit_all([req(), req(logit_bias={10 ** 6: 1.0})])
    assert len(engine.waiting) == 2 and engine.submit_all([req(), req()]) and len(engine.waiting) == 4


def test_soak_with_random_cancels_leaks_no_slot_and_no_state(dolly):
    """60 requests of random lengths, n-style twins and shared prefixes among them, a third cancelled at random
    moments: afterwards no slot, queue entry or row state is left, and every request ended exactly once."""
    model, tok = dolly
    g = torch.Generator().manual_seed(0)
    base = tok.encode(LONG)
    engine = Engine(model, tok, max_batch_size=4, max_queue=100, max_prefill_tokens=24, prefix_cache_tokens=64)
    ended = []
    engine.on_end = ended.append
    engine.start()
    try:
        runs = []
        for i in range(60):
            cut = int(torch.randint(1, len(base), (1,), generator=g))
            ids = base[:cut] if i % 3 else base[:cut] + [int(torch.randint(5, 500, (1,), generator=g))]
            runs.append(submit(engine, ids, max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)),
                               temperature=0))
            if i % 3 == 0:
                threading.Timer(float(torch.rand((), generator=g)) * 0.2, engine.cancel, (runs[-1][0],)).start()
        waited = 0.0
        while len(ended) < 60 and waited < 120:  # a cancelled request ends silently: on_end counts them all
            threading.Event().wait(0.05)
            waited += 0.05
    finally:
        engine.stop()
    assert sorted(map(id, ended)) == sorted(id(r) for r, _ in runs)  # each ended once
    assert engine.busy == 0 and not engine.waiting and not engine._state
    assert engine.stats["completed"] + engine.stats["cancelled"] == 60 and engine.stats["failed"] == 0
    assert all(w.events[-1].kind == "done" for r, w in runs if r.finish_reason != "cancelled")
    assert len(engine.prefix) <= engine.prefix.capacity == 4
