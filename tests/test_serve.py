"""python -m gptneox.serve end to end: a real server process on 127.0.0.1 (a tiny checkpoint with the real Dolly
tokenizer) driven by the official openai client and httpx: completions and chat, streamed and not, equal to
generate(); every bad request a 400 in OpenAI's error body; the API key; a client that leaves frees its slot; the
bounded queue; concurrent clients each answered as alone. A server in a thread of this process (the same app) checks
the plain chat template of a base model and a model failure (500, then recovery)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny import checkpoint_with_tokenizer

openai = pytest.importorskip("openai", reason="the test extra installs openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")

from gptneox import GPTNeoX, Tokenizer  # noqa: E402
from gptneox.generation.batching import Engine  # noqa: E402
from gptneox.prompts.chat import PLAIN_STOP, dolly_prompt, plain_prompt  # noqa: E402
from gptneox.generation.generator import generate
from gptneox.generation.run import stop_ids  # noqa: E402
from gptneox.serve.app import Service  # noqa: E402
from gptneox.serve.http import create_app  # noqa: E402
from gptneox.generation.streaming import completion_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
SLOTS, QUEUE = 4, 8
START_S = 120  # the server process must answer /health by then (imports and a tiny model on a busy 2-core machine)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, proc=None, log=None, timeout=START_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not answer {url}/health within {timeout} s")


@pytest.fixture(scope="module")
def dolly_dir(tmp_path_factory, shared_data):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("serve") / "tiny-dolly",
                                     os.path.join(shared_data, "dolly-tokenizer.json"), vocab_size=50280,
                                     max_position_embeddings=2048)


@pytest.fixture(scope="module")
def dolly(dolly_dir):
    return GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32), Tokenizer.from_pretrained(dolly_dir)


@contextmanager
def serving(ckpt, *flags):
    """The base URL of `python -m gptneox.serve --ckpt ckpt --device cpu FLAGS` on a free port; killed at exit. Its
    log goes to a file (a pipe nobody reads would fill and block the server)."""
    port = free_port()
    log = open(Path(ckpt).parent / f"server-{port}.log", "w+")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "gptneox.serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--device", "cpu", "--log-level", "warning", *flags],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(dolly_dir):
    """The tiny Dolly checkpoint served with an API key, 4 slots and a queue of 8."""
    with serving(dolly_dir, "--max-batch-size", str(SLOTS), "--max-queue", str(QUEUE), "--api-key", KEY) as url:
        yield url


def client(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def greedy(model, tok, prompt: str, n: int, stop_strings=()):
    """generate()'s greedy completion text of prompt, and how many tokens it generated."""
    row = generate(model, [tok.encode(prompt)], max_new_tokens=n, temperature=0, tokenizer=tok,
                   stop_strings=stop_strings)[0].tolist()
    ends = stop_ids(model, tokenizer=tok)
    n = next((i + 1 for i, t in enumerate(row) if t in ends), len(row))  # tokens generated, the stop token included
    return completion_text(tok, row, ends, stop_strings), n


# ------------------------------------------------------------------------------------------- happy paths
def test_serve_lists_the_model_and_reports_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-dolly"]
    h = health(server)
    assert h["status"] == "ok" and h["slots"] == {"busy": 0, "total": SLOTS}


def test_serve_completion_equals_generate_streamed_and_not(server, dolly):
    model, tok = dolly
    prompt = "The capital of France is"
    text, n = greedy(model, tok, prompt, 12)
    c = client(server)
    r = c.completions.create(model="tiny-dolly", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), n)
    chunks = list(c.completions.create(model="tiny-dolly", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == n
    echoed = c.completions.create(model="tiny-dolly", prompt=prompt, max_tokens=12, temperature=0, echo=True,
                                  logprobs=2)
    assert echoed.choices[0].text == prompt + text
    lp = echoed.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(tok.encode(prompt)) + n
    assert "".join(lp.tokens) == prompt + text and all(len(t) == 2 for t in lp.top_logprobs[1:])


def test_serve_chat_uses_dollys_template_streamed_and_not(server, dolly):
    model, tok = dolly
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = dolly_prompt([(m["role"], m["content"]) for m in messages])
    assert "Input:\nYou answer briefly." in prompt and prompt.endswith("### Response:\n")
    text, n = greedy(model, tok, prompt, 10)
    c = client(server)
    r = c.chat.completions.create(model="tiny-dolly", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text.strip()
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), n)
    chunks = list(c.chat.completions.create(model="tiny-dolly", messages=messages, max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text.strip()
    assert chunks[-1].choices[0].finish_reason == "length"


def test_serve_shared_prompt_prefix_is_computed_once_and_answers_as_alone(server, dolly):
    """Requests sharing a long system block before their question: the later ones read its blocks from the prefix
    cache (the server's metrics count the hits), and every answer is the greedy answer computed alone."""
    from prometheus_client.parser import text_string_to_metric_families
    model, tok = dolly

    def hits():
        text = httpx.get(f"{server}/metrics", timeout=10).text
        return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "gptneox:prefix_cache_hits_total")
    system = "You are a careful assistant for a library. " * 8
    questions = ["Where are the maps?", "When do you open on Sunday?", "Can I renew a book twice?"]
    c, before = client(server), hits()
    for q in questions:
        r = c.completions.create(model="tiny-dolly", prompt=system + q, max_tokens=8, temperature=0)
        assert r.choices[0].text == greedy(model, tok, system + q, 8)[0]
    shared = len(tok.encode(system)) - 1  # its last token may merge with the question's first
    assert hits() - before >= 2 * (shared // 16) * 16  # the second and third reused the shared blocks


def test_serve_seeded_sampling_is_reproducible(server):
    c = client(server)
    ask = dict(model="tiny-dolly", prompt="Once upon a time", max_tokens=8, temperature=0.8, top_p=0.95)
    a, b = (c.completions.create(**ask, seed=7).choices[0].text for _ in range(2))
    assert a == b and a != c.completions.create(**ask, seed=8).choices[0].text


# -------------------------------------------------------------------------------------------- bad requests
BAD = [
    ("{not json", "invalid_json", None),
    ('["a", "list"]', "invalid_value", None),
    ({"model": "gpt-4", "prompt": "hi"}, "model_not_found", "model"),
    ({"model": "tiny-dolly", "prompt": 5}, "invalid_value", "prompt"),
    ({"model": "tiny-dolly", "prompt": "hi", "max_tokens": "ten"}, "invalid_value", "max_tokens"),
    ({"model": "tiny-dolly", "prompt": "hi", "max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"model": "tiny-dolly", "prompt": "hi", "max_tokens": -3}, "invalid_value", "max_tokens"),
    ({"model": "tiny-dolly", "prompt": "hi", "temperature": -0.5}, "invalid_value", "temperature"),
    ({"model": "tiny-dolly", "prompt": "hi", "stream": "yes"}, "invalid_value", "stream"),
    ({"model": "tiny-dolly", "prompt": "hi " * 2100}, "context_length_exceeded", "prompt"),
    ({"model": "tiny-dolly", "prompt": "hi", "max_tokens": 2048}, "context_length_exceeded", "prompt"),
    ({"model": "tiny-dolly", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "invalid_value", "stop"),
    ({"model": "tiny-dolly", "prompt": [1, 99999]}, "invalid_value", "prompt"),
    ({"model": "tiny-dolly", "prompt": "hi", "best_of": 2}, "unsupported", "best_of"),
]


@pytest.mark.parametrize("body, code, param", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_serve_bad_completion_is_a_400_in_openais_shape(server, body, code, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server}/v1/completions", content=content, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == (404 if code == "model_not_found" else 400), r.text  # OpenAI's 404 for a model
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)


def test_serve_bad_chat_is_a_400_and_the_server_keeps_serving(server):
    c = client(server)
    for messages in ([], [{"role": "assistant", "content": "hi"}], [{"role": "wizard", "content": "hi"}]):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-dolly", messages=messages)
        assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-dolly", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert c.completions.create(model="tiny-dolly", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"


def test_serve_api_key_is_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server}/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).completions.create(
            model="tiny-dolly", prompt="hi", max_tokens=2)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200  # probes need no key


# ------------------------------------------------------------------------------------ slots and the queue
def test_serve_client_that_disconnects_frees_its_slot(server):
    before = health(server)["requests"]
    body = {"model": "tiny-dolly", "prompt": "Tell me a long story", "max_tokens": 2000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()  # (leaving a loop over it would close the stream: read it by hand)
        while not next(lines).startswith("data: {"):
            pass
        assert health(server)["slots"]["busy"] == 1  # running, and still connected
    deadline = time.monotonic() + 10
    while health(server)["slots"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = health(server)["requests"]
    assert health(server)["slots"]["busy"] == 0
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_serve_full_queue_answers_503_at_once(server):
    async def scenario():
        headers = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "tiny-dolly", "prompt": "Go on and on", "max_tokens": 2000, "stream": True}
        async with httpx.AsyncClient(base_url=server, headers=headers, timeout=30) as http:
            # fill the slots, then the queue; a holder's 2000 tokens take seconds, but a loaded machine can starve
            # the server's event loop for as long, so a holder that ends is replaced until the queue is seen full
            holders = [asyncio.ensure_future(hold(http, body)) for _ in range(SLOTS + QUEUE)]
            deadline, seen = time.monotonic() + 60, []
            while time.monotonic() < deadline:
                h = (await http.get("/health")).json()
                seen.append((h["slots"]["busy"], h["waiting"]))
                if seen[-1] == (SLOTS, QUEUE):
                    break
                holders += [asyncio.ensure_future(hold(http, body)) for t in holders if t.done()]
                holders = [t for t in holders if not t.done()]
                await asyncio.sleep(0.05)
            assert seen[-1] == (SLOTS, QUEUE), seen[-20:]
            t0 = time.monotonic()
            r = await http.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
            assert time.monotonic() - t0 < 5 and r.headers["retry-after"] == "1"
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)

    async def hold(http, body):  # a client whose request runs until its 2000 tokens are out (then it is done)
        async with http.stream("POST", "/v1/completions", json=body) as r:
            async for _ in r.aiter_raw():
                pass
    asyncio.run(scenario())
    deadline = time.monotonic() + 15
    while (health(server)["slots"]["busy"] or health(server)["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["slots"]["busy"] == 0 and health(server)["waiting"] == 0


def test_serve_concurrent_clients_are_each_answered_as_alone(server, dolly):
    model, tok = dolly
    prompts = ["Hello there, how", "The capital of France is", "a", "Once upon a time in a land far away",
               "1 2 3 4", "Dear colleagues,", "import torch", "Roses are red"]
    lengths = [14, 20, 6, 18, 9, 16, 11, 13]
    c = client(server)
    alone = [c.completions.create(model="tiny-dolly", prompt=p, max_tokens=n, temperature=0).choices[0].text
             for p, n in zip(prompts, lengths)]
    assert alone == [greedy(model, tok, p, n)[0] for p, n in zip(prompts, lengths)]
    results, before = [None] * len(prompts), health(server)["decode_steps"]

    def ask(i):
        stream = i % 2 == 0
        r = c.completions.create(model="tiny-dolly", prompt=prompts[i], max_tokens=lengths[i], temperature=0,
                                 stream=stream)
        results[i] = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone  # none lost (a lost one is None), each as it was alone
    steps = health(server)["decode_steps"]
    assert steps.get(str(SLOTS), 0) > before.get(str(SLOTS), 0)  # they did run side by side, every slot busy


def test_serve_cli_help_and_usage_errors(dolly_dir, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "gptneox.serve", *a], capture_output=True, text=True,
                                    timeout=120, env=env, cwd=ROOT)
    h = run("--help")
    assert h.returncode == 0
    for flag in ("--ckpt", "--host", "--port", "--max-batch-size", "--max-queue", "--max-model-len", "--device",
                 "--dtype", "--api-key", "--model-name", "--template", "--threads", "127.0.0.1"):
        assert flag in h.stdout
    from gptneox import cli
    from gptneox.serve import server as serve
    assert cli.run(serve.main, serve.build_parser(), ["--ckpt", str(dolly_dir), "--max-batch-size", "0"]) == 2
    assert cli.run(serve.main, serve.build_parser(), ["--ckpt", str(dolly_dir / "missing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "argument --max-batch-size: must be positive" in err and f"{dolly_dir / 'missing'}" in err
    assert "Traceback" not in err


def test_serve_host_and_port_are_checked_before_the_model_loads(dolly_dir, capsys, monkeypatch):
    """A bad --host or --port is a usage error (2), a busy port a runtime error (1): one line each, said before the
    model loads (here, loading fails the test)."""
    from gptneox import cli
    from gptneox.serve import server as serve
    monkeypatch.setattr(serve, "load", lambda *a, **k: pytest.fail("the model loaded before the checks"))

    def run(*args) -> tuple[int, str]:
        status = cli.run(serve.main, serve.build_parser(), ["--ckpt", str(dolly_dir), *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return status, err.strip().splitlines()[-1]

    for args, message in ((["--port", "70000"], "argument --port: must be a TCP port, 0 to 65535"),
                          (["--port", "-1"], "argument --port: must be >= 0"),
                          (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not a host name"),
                          (["--host", "192.0.2.1"], "--host 192.0.2.1: not an address of this machine")):
        status, line = run(*args)
        assert status == 2 and message in line, (args, line)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run("--port", str(port)) == (1, f"python -m gptneox.serve: error: --port {port}: 127.0.0.1:{port} is "
                                               "already in use (another server?); choose another --port, or 0 for "
                                               "any free one")


# -------------------------------------------------------------------------------- a server in this process
class InProcess:
    """The app on uvicorn in a thread of the test process, for what needs the model in hand."""

    def __init__(self, model, tok, template, name):
        self.url = f"http://127.0.0.1:{free_port()}"
        engine = Engine(model, tok, max_batch_size=2)
        app = create_app(Service(engine, tok, model_name=name, template=template))
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_healthy(self.url, timeout=30)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def pythia(tmp_path_factory, shared_data):
    path = checkpoint_with_tokenizer(tmp_path_factory.mktemp("serve") / "tiny-pythia",
                                     os.path.join(shared_data, "pythia-tokenizer.json"), seed=1, vocab_size=50304,
                                     max_position_embeddings=256)
    return GPTNeoX.from_pretrained(path, dtype=torch.float32), Tokenizer.from_pretrained(path)


def test_serve_chat_of_a_base_model_uses_the_plain_template(pythia):
    model, tok = pythia
    messages = [("system", "Be brief."), ("user", "Hi!"), ("assistant", "Hello."), ("user", "Name a color.")]
    prompt = plain_prompt(messages)
    assert prompt == "System: Be brief.\n\nUser: Hi!\n\nAssistant: Hello.\n\nUser: Name a color.\n\nAssistant:"
    text, _ = greedy(model, tok, prompt, 12, stop_strings=PLAIN_STOP)
    with InProcess(model, tok, "plain", "tiny-pythia") as s:
        r = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60).chat.completions.create(
            model="tiny-pythia", messages=[{"role": m[0], "content": m[1]} for m in messages], max_tokens=12,
            temperature=0)
    assert r.choices[0].message.content == text.strip()


def test_serve_model_failure_is_a_500_and_the_server_recovers(pythia, monkeypatch):
    model, tok = pythia
    real, failing = model.forward, threading.Event()

    def forward(*args, **kwargs):
        if failing.is_set():
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(model, "forward", forward)
    with InProcess(model, tok, "plain", "tiny-pythia") as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60)
        failing.set()
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="tiny-pythia", prompt="Hello", max_tokens=5, temperature=0)
        assert "injected failure" in e.value.body["message"] and e.value.status_code == 500
        failing.clear()
        r = c.completions.create(model="tiny-pythia", prompt="Hello", max_tokens=5, temperature=0)
        assert r.choices[0].text == greedy(model, tok, "Hello", 5)[0]
        assert httpx.get(f"{s.url}/health", timeout=10).json()["requests"]["failed"] == 1


# --------------------------------------------------------------------------------- the same templates for vLLM
CONVERSATIONS = [[("user", "Hi")], [("system", "Be brief."), ("user", " What? ")],
                 [("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")],
                 [("user", "a"), ("assistant", "b"), ("user", "c")]]


@pytest.mark.parametrize("name, template", [("dolly", dolly_prompt), ("plain", plain_prompt)])
def test_vllm_chat_templates_render_as_the_server_does(shared_data, name, template):
    """examples/vllm/*.jinja (docs/serving.md) rendered by transformers' chat-template renderer, which vLLM uses,
    give the server's prompt character for character."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(shared_data, "dolly-tokenizer.json"))
    jinja = (ROOT / "examples" / "vllm" / f"{name}.jinja").read_text()
    for conversation in CONVERSATIONS:
        messages = [{"role": role, "content": content} for role, content in conversation]
        assert tok.apply_chat_template(messages, chat_template=jinja, tokenize=False) == template(conversation)


def test_import_gptneox_needs_no_server_packages():
    code = ("import sys, gptneox, gptneox.generation.batching, gptneox.prompts.chat; "
            "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr


def test_serve_adapter_is_attached_merged_and_served(dolly_dir, tmp_path):
    """--adapter: the LoRA adapter on --ckpt, merged at load (serve.load), answers as the unmerged adapter does."""
    from gptneox import LoRAConfig, add_lora, save_adapter
    from gptneox.cli import UsageError
    from gptneox.loading import plan
    from gptneox.serve.server import load
    model = GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32)
    add_lora(model, LoRAConfig(r=4, alpha=8, targets=("query", "value", "dense_4h_to_h")))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # B starts at zero: a fresh adapter changes nothing
                p.copy_(torch.randn_like(p) * 0.3)
    save_adapter(model, tmp_path / "adapter")
    served, tok = load(plan(dolly_dir, dtype=torch.float32, adapter=tmp_path / "adapter"))
    want = GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32, adapter=tmp_path / "adapter")
    base = GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32)
    ids = torch.tensor([tok.encode("Name three colors.")])
    with torch.no_grad():
        got, ref, plain = served(ids), want(ids), base(ids)
    assert (ref - plain).abs().max() > 1e-2, "the adapter changed nothing"
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    with InProcess(served, tok, "dolly", "tiny-dolly") as s:
        r = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60).completions.create(
            model="tiny-dolly", prompt="Name three colors.", max_tokens=8, temperature=0)
    assert r.choices[0].text == greedy(want, tok, "Name three colors.", 8)[0]
    with pytest.raises(UsageError, match="no adapter_config.json"):
        plan(dolly_dir, dtype=torch.float32, adapter=tmp_path)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_serve_quantize_loads_quantized_weights_and_keeps_an_adapter_beside_them(dolly_dir, tmp_path, mode):
    """--quantize: the weights quantized while they load; an --adapter on a quantized base is not merged (QLoRA)."""
    from gptneox import LoRAConfig, QuantizedLinear, add_lora, quantize, save_adapter
    from gptneox.lora.layers import lora_modules
    from gptneox.loading import plan
    from gptneox.serve.server import load
    model = GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32)
    add_lora(model, LoRAConfig(r=2, alpha=4, targets=("value",)))
    save_adapter(model, tmp_path / "adapter")
    served, tok = load(plan(dolly_dir, dtype=torch.float32, adapter=tmp_path / "adapter", quantize=mode, group_size=32))
    assert any(isinstance(m, QuantizedLinear) for m in served.modules())
    assert lora_modules(served) and all(m.unmerged is None for m in lora_modules(served).values())
    want = quantize(GPTNeoX.from_pretrained(dolly_dir, dtype=torch.float32), mode, group_size=32)
    ids = torch.tensor([tok.encode("Name three colors.")])
    with torch.no_grad():  # a fresh adapter (B = 0) adds nothing: the quantized model's own logits
        assert torch.equal(served(ids), want(ids))


def test_serve_without_the_serve_extra_says_how_to_install_it(monkeypatch):
    """No fastapi / pydantic: one line naming the extra, not an import traceback (gptneox.serve still imports)."""
    from gptneox.serve import server
    monkeypatch.setattr(server, "MISSING", "pydantic")
    with pytest.raises(RuntimeError, match=r"serve extra \(pydantic is missing\): pip install -e \"\.\[serve\]\""):
        server.main(ckpt="anything")
