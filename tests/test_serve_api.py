"""The rest of OpenAI's API on `python -m gptneox.serve` (a real server process, the official openai client): n,
several prompts in one completions request, logit_bias, presence / frequency penalties, usage over all choices,
each against greedy decoding recomputed here from the model's logits with OpenAI's formulas; every limit a 400
naming its field; a client that leaves, or a choice that fails, ends every choice of its request; prompts refused
by their length before tokenizing, and tokenized off the event loop."""

import asyncio
import json
import threading
import time

import pytest
import torch
from test_serve import dolly, dolly_dir, greedy, serving  # noqa: F401 - fixtures

openai = pytest.importorskip("openai", reason="the test extra installs openai")
httpx = pytest.importorskip("httpx")

from gptneox.generation.batching import Engine, Event  # noqa: E402
from gptneox.generation.config import GenerationConfig  # noqa: E402
from gptneox.generation.run import stop_ids  # noqa: E402
from gptneox.generation.streaming import completion_text  # noqa: E402
from gptneox.serve.api import APIError  # noqa: E402
from gptneox.serve.app import Call, Service  # noqa: E402

SLOTS, QUEUE = 4, 8
NAME = "tiny-dolly"


@pytest.fixture(scope="module")
def server(dolly_dir):  # noqa: F811
    """`python -m gptneox.serve` on the tiny Dolly checkpoint, 4 slots and a queue of 8, no API key."""
    with serving(dolly_dir, "--max-batch-size", str(SLOTS), "--max-queue", str(QUEUE)) as url:
        yield url


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def reference(model, tok, prompt, max_tokens, bias=None, presence=0.0, frequency=0.0):
    """Greedy decoding step by step, a full forward over the sequence each step, with OpenAI's logit_bias (added to
    the logits) and penalties (logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c counted over the tokens
    generated so far): (the completion's text, its tokens)."""
    key = (id(model), prompt, max_tokens, tuple(sorted((bias or {}).items())), presence, frequency)
    if key not in _MEMO:
        _MEMO[key] = _reference(model, tok, prompt, max_tokens, bias, presence, frequency)
    return _MEMO[key]


_MEMO = {}


@torch.no_grad()
def _reference(model, tok, prompt, max_tokens, bias, presence, frequency):
    ids = tok.encode(prompt)
    ends, out = stop_ids(model, tokenizer=tok), []
    vocab = model.config.vocab_size
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids + out]))[0, -1].double()
        for token, b in (bias or {}).items():
            logits[token] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=vocab).double()
        logits -= counts * frequency + (counts > 0).double() * presence
        out.append(int(logits.argmax()))
        if out[-1] in ends:
            break
    return completion_text(tok, out, ends), out


def sse_chunks(url, path, body):
    """The raw server-sent events of a streamed request: the JSON chunks, and whether [DONE] came once, last."""
    lines = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines.count("[DONE]") == 1 and lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def by_choice(chunks, field="text"):
    """{index: (the joined text, [finish_reason chunks])} of streamed chunks."""
    out = {}
    for ch in chunks:
        for c in ch["choices"]:
            text, reasons = out.setdefault(c["index"], ["", []])
            piece = c[field] if field == "text" else (c["delta"].get("content") or "")
            out[c["index"]][0] = text + piece
            if c["finish_reason"] is not None:
                reasons.append(c["finish_reason"])
    return {i: (t, r) for i, (t, r) in out.items()}


# --------------------------------------------------------------------------------- n and several prompts
PROMPTS = ["The capital of France is", "Once upon a time", "1 2 3 4"]


def test_n_and_several_prompts_are_ordered_and_counted_as_openai_does(server, dolly):  # noqa: F811
    model, tok = dolly
    want = [reference(model, tok, p, 8)[0] for p in PROMPTS]
    assert len(set(want)) == len(want)  # distinct, so the order shows
    prompt_tokens = sum(len(tok.encode(p)) for p in PROMPTS)
    r = client(server).completions.create(model=NAME, prompt=PROMPTS, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]  # index = prompt index x n + sample
    completion_tokens = sum(len(reference(model, tok, p, 8)[1]) for p in PROMPTS) * 2
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)

    body = {"model": NAME, "prompt": PROMPTS, "n": 2, "max_tokens": 8, "temperature": 0,
            "stream_options": {"include_usage": True}}
    chunks = sse_chunks(server, "/v1/completions", body)
    assert all(len(ch["choices"]) == 1 for ch in chunks)  # one choice per chunk, interleaved
    got = by_choice(chunks)
    assert {i: t for i, (t, _) in got.items()} == {i: want[i // 2] for i in range(6)}
    assert all(len(reasons) == 1 for _, reasons in got.values())  # each choice ends once
    usage = [ch["usage"] for ch in chunks if ch.get("usage")]
    assert usage == [{"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}] and chunks[-1].get("usage")
    echoed = sse_chunks(server, "/v1/completions", {**body, "echo": True, "logprobs": 1, "max_tokens": 3})
    for i in range(6):  # 6 choices, 4 slots: each choice's echo comes with its prompt's logprobs, queued or not
        first = next(c for ch in echoed for c in ch["choices"] if c["index"] == i)
        assert first["text"] == PROMPTS[i // 2]
        assert len(first["logprobs"]["tokens"]) == len(tok.encode(PROMPTS[i // 2]))
    ids = [tok.encode(p) for p in PROMPTS[:2]]  # several prompts as token ids
    r = client(server).completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert [c.text for c in r.choices] == [p + w for p, w in zip(PROMPTS, want[:2])]


def test_chat_n_streamed_and_not(server, dolly):  # noqa: F811
    model, tok = dolly
    messages = [{"role": "user", "content": "Name a color."}]
    from gptneox.prompts.chat import dolly_prompt
    prompt = dolly_prompt([("user", "Name a color.")])
    text, out = reference(model, tok, prompt, 6)
    r = client(server).chat.completions.create(model=NAME, messages=messages, n=3, max_tokens=6, temperature=0)
    assert [(c.index, c.message.content) for c in r.choices] == [(i, text.strip()) for i in range(3)]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), 3 * len(out))
    chunks = sse_chunks(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "n": 3,
                                                         "max_tokens": 6, "temperature": 0,
                                                         "stream_options": {"include_usage": True}})
    roles = [ch["choices"][0]["index"] for ch in chunks if ch["choices"] and "role" in ch["choices"][0]["delta"]]
    assert sorted(roles) == [0, 1, 2]
    got = by_choice(chunks, "delta")
    assert {i: (t, len(rs)) for i, (t, rs) in got.items()} == {i: (text.strip(), 1) for i in range(3)}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3 * len(out)


def test_n_with_a_seed_draws_each_sample_with_its_own_seed(server):
    c = client(server)
    ask = dict(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0)
    r = c.completions.create(**ask, n=3, seed=7)
    texts = [ch.text for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2] and len(set(texts)) > 1  # n answers, not n copies
    assert texts == [c.completions.create(**ask, seed=7 + j).choices[0].text for j in range(3)]  # sample j: seed + j
    streamed = by_choice(sse_chunks(server, "/v1/completions", {**ask, "n": 3, "seed": 7}))
    assert [streamed[i][0] for i in range(3)] == texts


# ------------------------------------------------------------------------------- logit_bias and penalties
def test_logit_bias_and_penalties_follow_openais_formulas(server, dolly):  # noqa: F811
    model, tok = dolly
    prompt, c = "The capital of France is", client(server)
    plain, plain_ids = reference(model, tok, prompt, 16)
    bias = {plain_ids[0]: -100, plain_ids[3]: -30, 42: 4.5}
    cases = [dict(bias=bias), dict(presence=1.5), dict(frequency=0.8), dict(presence=-1.0, frequency=2.0),
             dict(bias=bias, presence=0.5, frequency=0.5)]
    for case in cases:
        want, _ = reference(model, tok, prompt, 16, **case)
        assert want != plain, case  # each setting changes the answer: a server ignoring it fails
        fields = dict(logit_bias={str(k): v for k, v in case.get("bias", {}).items()} or None,
                      presence_penalty=case.get("presence"), frequency_penalty=case.get("frequency"))
        fields = {k: v for k, v in fields.items() if v is not None}
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, **fields)
        assert r.choices[0].text == want, case
    # streamed, two prompts x n 2, every setting at once
    case = dict(bias={plain_ids[1]: -50, 7: 2.0}, presence=0.3, frequency=1.1)
    prompts = [prompt, "Hello there"]
    want = [reference(model, tok, p, 12, **case)[0] for p in prompts]
    chunks = sse_chunks(server, "/v1/completions", {
        "model": NAME, "prompt": prompts, "n": 2, "max_tokens": 12, "temperature": 0,
        "logit_bias": {str(k): v for k, v in case["bias"].items()}, "presence_penalty": 0.3,
        "frequency_penalty": 1.1})
    assert {i: t for i, (t, _) in by_choice(chunks).items()} == {i: want[i // 2] for i in range(4)}


def test_chat_takes_logit_bias_and_penalties(server, dolly):  # noqa: F811
    model, tok = dolly
    from gptneox.prompts.chat import dolly_prompt
    prompt = dolly_prompt([("user", "Name a color.")])
    plain = reference(model, tok, prompt, 10)
    bias = {plain[1][0]: -100, plain[1][2]: 3.0}
    want = reference(model, tok, prompt, 10, bias=bias, presence=0.7, frequency=0.4)[0]
    assert want != plain[0]
    r = client(server).chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Name a color."}], max_tokens=10, temperature=0,
        logit_bias={str(k): v for k, v in bias.items()}, presence_penalty=0.7, frequency_penalty=0.4)
    assert r.choices[0].message.content == want.strip()


# ---------------------------------------------------------------------------------------------- refusals
LONG = "hi " * 2100  # ~2100 tokens: over the 2048-token context
BAD = [
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"50280": 1}}, "logit_bias", "[0, 50280)"),  # the model's vocabulary size
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias", "not a token id"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": -101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": "high"}}, "logit_bias", None),
    ({"logit_bias": [5]}, "logit_bias", None),
    ({"presence_penalty": 2.5}, "presence_penalty", "2"),
    ({"presence_penalty": -2.01}, "presence_penalty", "-2"),
    ({"frequency_penalty": 3}, "frequency_penalty", "2"),
    ({"frequency_penalty": "1"}, "frequency_penalty", None),
    ({"n": 0}, "n", None),
    ({"n": 129}, "n", "128"),
    ({"n": "2"}, "n", None),
    ({"n": QUEUE + 1}, "n", f"({QUEUE}, its --max-queue)"),
    ({"n": 3, "prompt": ["a", "b", "c"]}, "n", "3 prompts x n 3 = 9 completions"),
    ({"prompt": ["a"] * (QUEUE + 1)}, "prompt", "queues at once"),
    ({"prompt": ["a", ""]}, "prompt", "prompt 1 is empty"),
    ({"prompt": ["a", LONG]}, "prompt", "prompt 1 has"),
    ({"prompt": ["a", "b"], "max_tokens": 2048}, "prompt", "prompt 0 has 1 and 2048 more were asked for (at most"),
    ({"prompt": [[1, 2], [3, 99999]]}, "prompt", "(prompt 1)"),
    ({"prompt": [0] * 2048}, "prompt", "the prompt has 2048"),
    ({"best_of": 2}, "best_of", "not supported"),
]


@pytest.mark.parametrize("fields, param, says", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_field_is_a_400_naming_it(server, fields, param, says):
    before = health(server)["requests"]
    r = httpx.post(f"{server}/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2, **fields},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}:" if "context" not in error["message"]
                                                                   else "this model's context")
    assert says is None or says in error["message"], error["message"]
    assert health(server)["requests"] == before  # refused before anything was submitted


def test_chat_refusals_name_the_field(server):
    c = client(server)
    ask = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for fields, param in (({"n": 200}, "n"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"presence_penalty": 9}, "presence_penalty"), ({"n": QUEUE + 1}, "n")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(**ask, **fields)
        assert e.value.body["param"] == param


def test_n_beyond_the_free_queue_is_a_503_and_nothing_runs(server):
    """Slots busy and the queue half full: a request whose choices do not all fit is refused whole (503)."""
    async def scenario():
        body = {"model": NAME, "prompt": "Go on and on", "max_tokens": 2000, "stream": True}
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            holders = [asyncio.ensure_future(hold(http, body)) for _ in range(SLOTS + QUEUE // 2)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                h = (await http.get("/health")).json()
                if (h["slots"]["busy"], h["waiting"]) == (SLOTS, QUEUE // 2):
                    break
                await asyncio.sleep(0.05)
            r = await http.post("/v1/completions", json={**body, "stream": False, "n": QUEUE // 2 + 1})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy"
            assert (await http.get("/health")).json()["waiting"] == QUEUE // 2  # none of its choices queued
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)

    async def hold(http, body):
        async with http.stream("POST", "/v1/completions", json=body):
            await asyncio.sleep(3600)
    asyncio.run(scenario())
    settle(server)


def settle(url, timeout=30):
    deadline = time.monotonic() + timeout
    while (health(url)["slots"]["busy"] or health(url)["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(url)["slots"]["busy"] == 0 and health(url)["waiting"] == 0


def test_a_client_that_leaves_cancels_every_choice(server):
    settle(server)
    before = health(server)["requests"]
    body = {"model": NAME, "prompt": ["Tell me a long story", "And another"], "n": 2, "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        deadline = time.monotonic() + 30
        while health(server)["slots"]["busy"] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(server)["slots"]["busy"] == 4  # every choice running, the client still there
    settle(server)
    after = health(server)["requests"]
    assert after["cancelled"] == before["cancelled"] + 4 and after["completed"] == before["completed"]


# ------------------------------------------------------------------------------------ the service alone
class FakeEngine:
    """What Call needs of an engine: submit_all (all or none, as Engine.submit_all) and cancel, no model."""

    def __init__(self, max_queue=8):
        self.waiting, self.max_queue, self.max_batch_size = [], max_queue, 1
        self.stats, self.cancelled = {"rejected": 0}, []

    def submit_all(self, requests):
        if len(self.waiting) + len(requests) > self.max_queue:
            self.stats["rejected"] += len(requests)
            return False
        self.waiting.extend(requests)
        return True

    def cancel(self, r):
        self.cancelled.append(r)


class Connected:
    async def is_disconnected(self):
        return False


def test_a_failed_choice_fails_the_request_and_cancels_the_others():
    async def scenario():
        engine = FakeEngine()
        config = GenerationConfig(max_new_tokens=4)
        call = Call(engine, Connected(), [dict(prompt=[1, 2], config=config) for _ in range(3)])
        a, b, _ = call.requests
        a.emit(Event("token", text="x", token=5))
        b.emit(Event("error", message="the model failed on this request"))
        first = await call.first()
        with pytest.raises(APIError) as e:
            await call.texts(first)
        assert e.value.status == 500 and "the model failed" in e.value.message
        return engine, call
    engine, call = asyncio.run(scenario())
    assert engine.cancelled == call.requests  # no choice's finish_reason was set: every one cancelled


def test_choices_are_queued_together_or_not_at_all():
    async def scenario():
        engine = FakeEngine(max_queue=4)
        engine.waiting = ["someone else's"] * 2
        config = GenerationConfig(max_new_tokens=4)
        with pytest.raises(APIError) as e:
            Call(engine, Connected(), [dict(prompt=[1], config=config) for _ in range(3)])
        assert e.value.status == 503 and engine.waiting == ["someone else's"] * 2 and engine.stats["rejected"] == 3
        Call(engine, Connected(), [dict(prompt=[1], config=config) for _ in range(2)])
        assert len(engine.waiting) == 4
    asyncio.run(scenario())


def test_a_long_prompt_is_refused_untokenized_and_prompts_are_tokenized_off_the_event_loop(dolly):  # noqa: F811
    model, tok = dolly
    service = Service(Engine(model, tok, max_batch_size=1, max_len=64), tok, model_name=NAME, template="dolly")
    assert service.token_chars == max(len(t) for t in tok.backend.get_vocab())
    threads = []

    class Watched:
        backend = tok.backend

        def encode(self, text):
            threads.append(threading.current_thread())
            return tok.encode(text)
    service.tokenizer = Watched()

    async def scenario():
        loop_thread = threading.current_thread()
        assert await service.ids(["hello world", [5, 6]], "prompt") == [tok.encode("hello world"), [5, 6]]
        assert threads and loop_thread not in threads
        threads.clear()
        for prompt, least in (("a" * (64 * service.token_chars), 64), ("é" * (64 * service.token_chars * 4), 64),
                              ([1] * 64, 64)):
            with pytest.raises(APIError) as e:
                await service.ids(["ok", prompt], "prompt")
            assert e.value.code == "context_length_exceeded" and "prompt 1 has" in e.value.message
            assert str(least) in e.value.message
        assert not threads  # refused before tokenizing anything
        [ids] = await service.ids(["a" * (63 * service.token_chars)], "prompt")  # under the bound: tokenized (and
        assert threads and len(ids) > 64  # refused by its count when its config is made)
    asyncio.run(scenario())
