"""gptneox.batching: the continuous-batching engine against generate() on a tiny model with the real Dolly tokenizer:
greedy and seeded sampling token for token alone or beside others, stops, logprobs, the bounded queue, cancelling,
and a failing model step that fails only the requests it touched."""

import os
import threading

import pytest
import torch
from tiny import Scripted, checkpoint_with_tokenizer

from gptneox import GPTNeoX, Tokenizer
from gptneox.generation.batching import Engine, Request
from gptneox.generation.config import GenerationConfig
from gptneox.generation.generator import generate
from gptneox.generation.run import stop_ids
from gptneox.generation.streaming import completion_text

PROMPTS = ["Hello there, how", "The capital of France is", "a", "Once upon a time in a land far far away there lived",
           "1 2 3 4", "Dear colleagues,"]
TIMEOUT = 60  # seconds any one request may take before the test calls it lost


@pytest.fixture(scope="module")
def dolly(tmp_path_factory, shared_data):
    path = checkpoint_with_tokenizer(tmp_path_factory.mktemp("dolly") / "dolly",
                                     os.path.join(shared_data, "dolly-tokenizer.json"), vocab_size=50280,
                                     max_position_embeddings=256)
    return GPTNeoX.from_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path)


class Waiter:
    """A request's events, collected; wait() blocks until its "done" or "error"."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.kind != "token":
            self.finished.set()

    def wait(self):
        assert self.finished.wait(TIMEOUT), "the request was never answered"
        return self

    @property
    def text(self):
        return "".join(e.text for e in self.events)


def submit(engine, ids, **settings):
    waiter = Waiter()
    request = Request(ids, GenerationConfig(**settings), waiter)
    assert engine.submit(request)
    return request, waiter


def reference(model, tok, ids, **settings):
    """generate()'s tokens for one prompt, cut after the stop token, and its completion text."""
    row = generate(model, [ids], tokenizer=tok, **settings)[0].tolist()
    ends = stop_ids(model, tokenizer=tok)
    cut = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))
    return row[:cut], completion_text(tok, row, ends, settings.get("stop_strings", ()))


def min_margin(model, ids, new) -> float:
    """The smallest gap between the top two logits over the positions that chose the new tokens: the test's claim
    (equal tokens beside other rows) needs no near-tie, which fp32 rounding of a batched matmul (1e-7) could flip."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + new[:-1]]))[0, len(ids) - 1:]  # [N, V]
    top = logits.topk(2, dim=-1).values
    return float((top[:, 0] - top[:, 1]).min())


def test_engine_greedy_equals_generate_alone_and_in_a_batch(dolly):
    model, tok = dolly
    prompts = [tok.encode(p) for p in PROMPTS]
    lengths = [20, 33, 7, 25, 12, 30]
    refs = [reference(model, tok, p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, lengths)]
    for p, (tokens, _) in zip(prompts, refs):
        assert min_margin(model, p, tokens) > 1e-4, "a near-tie in the reference: choose another prompt"
    engine = Engine(model, tok, max_batch_size=4).start()  # 6 requests for 4 slots: two wait, slots are reused
    try:
        alone, waiter = submit(engine, prompts[0], max_new_tokens=lengths[0], temperature=0)
        waiter.wait()
        together = [submit(engine, p, max_new_tokens=n, temperature=0) for p, n in zip(prompts, lengths)]
        for (request, waiter), (tokens, text) in zip(together, refs):
            waiter.wait()
            assert request.tokens == tokens
            assert waiter.text == text
            assert request.finish_reason == "length"
        assert alone.tokens == together[0][0].tokens
        assert engine.busy == 0 and engine.stats["completed"] == 7
    finally:
        engine.stop()


def test_engine_sampling_settings_and_seeds_are_per_request(dolly):
    model, tok = dolly
    settings = [dict(temperature=1.0, top_p=0.9, seed=1), dict(temperature=0.7, seed=2), dict(temperature=0),
                dict(temperature=1.3, top_p=0.5, seed=3)]
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    refs = [reference(model, tok, p, max_new_tokens=8, **s)[0] for p, s in zip(prompts, settings)]
    engine = Engine(model, tok, max_batch_size=4).start()
    try:
        runs = [submit(engine, p, max_new_tokens=8, **s) for p, s in zip(prompts, settings)]
        assert [r.tokens for r, w in runs if w.wait()] == refs
    finally:
        engine.stop()
    assert len({tuple(t) for t in refs}) == 4


def test_engine_logprobs_are_generates(dolly):
    model, tok = dolly
    ids = tok.encode(PROMPTS[1])
    tokens, logprobs = generate(model, [ids], max_new_tokens=6, temperature=0, return_logprobs=True)
    engine = Engine(model, tok, max_batch_size=2).start()
    try:
        waiter = Waiter()
        request = Request(ids, GenerationConfig(max_new_tokens=6, temperature=0), waiter, top_logprobs=3,
                          prompt_logprobs=True)
        engine.submit(request)
        waiter.wait()
    finally:
        engine.stop()
    assert request.tokens == tokens[0].tolist()
    torch.testing.assert_close(torch.tensor([lp for lp, _ in request.logprobs]), logprobs[0])
    for (lp, top), token in zip(request.logprobs, request.tokens):
        assert top[0][0] == token and top[0][1] == lp and len(top) == 3  # greedy: the chosen token is the top one
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0].log_softmax(-1)  # [P, V]
    assert request.prompt_scores[0] is None
    expected = [float(full[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    torch.testing.assert_close(torch.tensor([s[0] for s in request.prompt_scores[1:]]), torch.tensor(expected))


def test_engine_stops_at_dolly_end_and_stop_strings(dolly):
    _, tok = dolly
    answer = tok.encode(" Paris is the capital") + [tok.end_key_id] + tok.encode(" more")
    # a prompt of 3 tokens: the first new token is script[2]
    model = Scripted([0] * 2 + answer, vocab_size=50280, max_position_embeddings=64)
    engine = Engine(model, tok, max_batch_size=2).start()
    try:
        ended = submit(engine, [5, 6, 7], max_new_tokens=20, temperature=0)
        cut = submit(engine, [5, 6, 7], max_new_tokens=20, temperature=0, stop_strings=("capital",))
        for _, waiter in (ended, cut):
            waiter.wait()
    finally:
        engine.stop()
    assert ended[0].tokens == answer[:answer.index(tok.end_key_id) + 1] and ended[0].finish_reason == "stop"
    assert ended[1].text == " Paris is the capital"
    assert cut[1].text == " Paris is the " and cut[0].finish_reason == "stop"


def test_engine_queue_is_bounded_and_cancel_frees_the_slot(dolly):
    model, tok = dolly
    engine = Engine(model, tok, max_batch_size=1, max_queue=1)  # not started: nothing leaves the queue
    first, _ = submit(engine, tok.encode("a"), max_new_tokens=200, temperature=0)
    refused = Request(tok.encode("b"), GenerationConfig(max_new_tokens=5), Waiter())
    assert not engine.submit(refused) and engine.stats["rejected"] == 1
    engine.start()
    try:
        started = threading.Event()
        long = Request(tok.encode("b"), GenerationConfig(max_new_tokens=250, temperature=0),
                       lambda e: started.set())
        engine.cancel(first)  # cancelled while waiting: dropped from the queue
        assert engine.submit(long)
        assert started.wait(TIMEOUT)
        engine.cancel(long)  # cancelled while running: out of its slot at the next step
        for _ in range(500):
            if engine.busy == 0 and engine.stats["cancelled"] == 2:
                break
            threading.Event().wait(0.01)
        assert engine.busy == 0 and engine.stats["cancelled"] == 2 and engine.stats["completed"] == 0
        assert len(long.tokens) < 250
        _, waiter = submit(engine, tok.encode("c"), max_new_tokens=3, temperature=0)
        assert waiter.wait().events[-1].kind == "done"
    finally:
        engine.stop()


def test_engine_failure_fails_the_batch_it_touched_and_recovers(dolly, monkeypatch):
    model, tok = dolly
    engine = Engine(model, tok, max_batch_size=4).start()
    try:
        calls, real = [], model.forward

        def flaky(input_ids, **kwargs):  # the 3rd forward (a decode step of both rows, packed) raises
            calls.append(input_ids.shape)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real(input_ids, **kwargs)
        monkeypatch.setattr(model, "forward", flaky)
        with engine._cond:  # both requests are admitted in one iteration: one packed prefill of both prompts
            runs = [submit(engine, tok.encode(p), max_new_tokens=10, temperature=0) for p in PROMPTS[:2]]
        for request, waiter in runs:
            assert waiter.wait().events[-1].kind == "error" and "injected failure" in waiter.events[-1].message
            assert request.finish_reason == "error"
        prompts = sum(len(tok.encode(p)) for p in PROMPTS[:2])
        assert calls[0] == (1, prompts) and calls[2] == (1, 2) and engine.busy == 0 and engine.stats["failed"] == 2
        monkeypatch.setattr(model, "forward", real)
        ids = tok.encode(PROMPTS[0])
        request, waiter = submit(engine, ids, max_new_tokens=10, temperature=0)
        waiter.wait()
        assert request.tokens == reference(model, tok, ids, max_new_tokens=10, temperature=0)[0]
    finally:
        engine.stop()
