"""gptneox.serve with many LoRA adapters (vLLM's contract): --adapter NAME=DIR repeated, the request's "model" picking
the tune, /v1/models listing each adapter with its parent, an unknown model a 404 model_not_found, and with
--allow-runtime-adapters POST /v1/load_lora_adapter / unload_lora_adapter (atomic loads, 409 for an adapter in use,
least-recently-used eviction at --max-adapters). An in-process server on a tiny Pythia checkpoint and the official
openai client; every answer equals greedy generate() of the model with that adapter alone attached."""

import json
import os
import socket
import threading
import time
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import checkpoint_with_tokenizer

openai = pytest.importorskip("openai", reason="the test extra installs openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra installs uvicorn")

from gptneox import GPTNeoX, LoRAConfig, Tokenizer, add_lora, save_adapter  # noqa: E402
from gptneox.generation.generator import generate  # noqa: E402
from gptneox.generation.run import stop_ids  # noqa: E402
from gptneox.generation.streaming import completion_text  # noqa: E402
from gptneox.lora import AdapterBank  # noqa: E402
from gptneox.prompts.chat import PLAIN_STOP, plain_prompt  # noqa: E402
from gptneox.serve.app import Engine, Service  # noqa: E402
from gptneox.serve.http import create_app  # noqa: E402

BASE = "tiny-pythia"
PROMPT = "Name three colors."
N = 6
KEY = "k"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, shared_data):
    return checkpoint_with_tokenizer(tmp_path_factory.mktemp("serve-lora") / BASE,
                                     os.path.join(shared_data, "pythia-tokenizer.json"), seed=1, vocab_size=50304,
                                     max_position_embeddings=256)


def make_adapter(base_dir, path, seed, r=4, targets=("query", "value", "dense_4h_to_h")):
    model = add_lora(GPTNeoX.from_pretrained(base_dir, dtype=torch.float32), LoRAConfig(r=r, alpha=2 * r,
                                                                                       targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # B starts at zero: a fresh adapter changes nothing
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, path)
    return path


@pytest.fixture(scope="module")
def tunes(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tunes")
    return {"sql": make_adapter(base_dir, root / "sql", 1), "chat": make_adapter(base_dir, root / "chat", 2),
            "extra": make_adapter(base_dir, root / "extra", 3, targets=("dense",)),
            "big": make_adapter(base_dir, root / "big", 4, r=16)}  # q + v fused: r 32


@pytest.fixture(scope="module")
def tok(base_dir):
    return Tokenizer.from_pretrained(base_dir)


def greedy(model, tok, prompt, n=N, stop_strings=()):
    row = generate(model, [tok.encode(prompt)], max_new_tokens=n, temperature=0, tokenizer=tok,
                   stop_strings=stop_strings)[0].tolist()
    return completion_text(tok, row, stop_ids(model, tokenizer=tok), stop_strings)


@pytest.fixture(scope="module")
def want(base_dir, tunes, tok):
    """{None or adapter: (completion of PROMPT, chat answer)}, each from the base with that adapter alone."""
    chat = plain_prompt([("user", "Hi!")])
    out = {}
    for name in (None, "sql", "chat", "extra"):
        model = GPTNeoX.from_pretrained(base_dir, dtype=torch.float32, adapter=tunes.get(name)).eval()
        out[name] = greedy(model, tok, PROMPT), greedy(model, tok, chat, stop_strings=PLAIN_STOP).strip()
    assert len({v for v in out.values()}) == 4, "the adapters change nothing"
    return out


class Server:
    """Service + create_app on uvicorn in a thread of this process, the model carrying an AdapterBank."""

    def __init__(self, base_dir, tok, adapters, api_key=None, **service):
        model = GPTNeoX.from_pretrained(base_dir, dtype=torch.float32)
        bank = AdapterBank(model)
        for name, path in adapters.items():
            bank.add(name, path)
        self.bank, self.engine = bank, Engine(model, tok, max_batch_size=4)
        self.service = Service(self.engine, tok, model_name=BASE, template="plain", adapters=adapters, **service)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.service, api_key=api_key), host="127.0.0.1",
                                                    port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("the in-process server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path, body, **kw):
        return httpx.post(f"{self.url}/v1/{path}", json=body, timeout=60, headers=self.headers, **kw)

    def complete(self, model, **kw):
        return self.client().completions.create(model=model, prompt=PROMPT, max_tokens=N, temperature=0, **kw)

    def ids(self):
        return [m.id for m in self.client().models.list().data]

    def hold(self, *models):
        """Requests of these models started in threads while the engine cannot run a forward: each is queued or
        running (the service counts it in use) until release() lets them finish."""
        self.engine.forward_lock.acquire()
        threads = [threading.Thread(target=self.complete, args=(m,), daemon=True) for m in models]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(self.service.in_use(m) for m in set(models)) < len(models):
            assert time.monotonic() < deadline, "the held requests never arrived"
            time.sleep(0.02)

        def release():
            self.engine.forward_lock.release()
            for t in threads:
                t.join(30)
        return release


def error(r):
    return r.status_code, r.json()["error"]["code"]


def test_each_adapter_and_the_base_answer_as_alone(base_dir, tunes, tok, want):
    """Two adapters and the base through completions (streamed and not, concurrently: one batch of mixed tunes) and
    chat; /v1/models lists each adapter with the base as parent; an unknown model is a 404 model_not_found."""
    served = {"sql": tunes["sql"], "chat": tunes["chat"]}
    with Server(base_dir, tok, served) as s:
        c = s.client()
        models = {m.id: m.model_dump() for m in c.models.list().data}
        assert list(models) == [BASE, "sql", "chat"]
        assert models[BASE]["parent"] is None
        assert [models[n]["parent"] for n in served] == [BASE, BASE]
        assert models["sql"]["root"] == str(tunes["sql"])
        results = {}

        def ask(model):
            results[model] = s.complete(model).choices[0].text
        threads = [threading.Thread(target=ask, args=(m,)) for m in (BASE, "sql", "chat") * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for model in (BASE, "sql", "chat"):
            key = None if model == BASE else model
            assert results[model] == want[key][0], model
            streamed = "".join(ch.choices[0].text for ch in s.complete(model, stream=True))
            assert streamed == want[key][0], model
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=N,
                                          temperature=0)
            assert (r.choices[0].message.content, r.model) == (want[key][1], model)
        with pytest.raises(openai.NotFoundError) as e:
            s.complete("gpt-4")
        assert e.value.status_code == 404
        assert (e.value.body["code"], e.value.body["param"], e.value.body["type"]) == (
            "model_not_found", "model", "invalid_request_error")
        for path in ("load_lora_adapter", "unload_lora_adapter"):  # no --allow-runtime-adapters: no such endpoint
            assert s.post(path, {"lora_name": "x", "lora_path": str(tunes["extra"])}).status_code == 404
        assert s.bank.names == ["sql", "chat"]


def test_runtime_load_use_unload_and_load_errors(base_dir, tunes, tok, want, tmp_path):
    with Server(base_dir, tok, {"sql": tunes["sql"]}, api_key=KEY, runtime=True, max_rank=8) as s:
        body = {"lora_name": "extra", "lora_path": str(tunes["extra"])}
        assert httpx.post(f"{s.url}/v1/load_lora_adapter", json=body, timeout=30).status_code == 401  # --api-key
        r = s.post("load_lora_adapter", body)
        assert r.status_code == 200, r.text
        assert s.ids() == [BASE, "sql", "extra"] and s.bank.names == ["sql", "extra"]
        assert s.complete("extra").choices[0].text == want["extra"][0]
        assert s.complete("sql").choices[0].text == want["sql"][0]

        # load errors: a 400 naming the field or tensor, the bank unchanged
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text((tunes["chat"] / "adapter_config.json").read_text())
        weights = load_file(tunes["chat"] / "adapter_model.safetensors")
        key = sorted(weights)[-1]
        weights[key] = torch.zeros(3, 3)  # fits no layer of the base
        save_file(weights, broken / "adapter_model.safetensors")
        for name, path, words in (("x", tmp_path / "missing", "not a directory"),
                                  ("x", tmp_path, "no adapter_config.json"),
                                  ("x", broken, key),
                                  ("x", tunes["big"], "rank r=32 is over this server's --max-adapter-rank 8"),
                                  ("sql", tunes["chat"], "already served"),
                                  (BASE, tunes["chat"], "already served")):
            r = s.post("load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
            assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text)
        assert s.bank.names == ["sql", "extra"] and s.ids() == [BASE, "sql", "extra"]
        assert s.complete("sql").choices[0].text == want["sql"][0]
        assert error(s.post("load_lora_adapter", {"lora_name": "x"})) == (400, "invalid_value")

        # unloading: refused (409) while a request of that adapter is queued or running; then gone (404)
        release = s.hold("extra")
        try:
            assert error(s.post("unload_lora_adapter", {"lora_name": "extra"})) == (409, "adapter_in_use")
        finally:
            release()
        r = s.post("unload_lora_adapter", {"lora_name": "extra"})
        assert r.status_code == 200, r.text
        assert s.bank.names == ["sql"] and s.ids() == [BASE, "sql"]
        with pytest.raises(openai.NotFoundError):
            s.complete("extra")
        assert error(s.post("unload_lora_adapter", {"lora_name": "extra"})) == (404, "model_not_found")
        assert error(s.post("unload_lora_adapter", {"lora_name": BASE})) == (400, "invalid_value")
        assert s.complete(BASE).choices[0].text == want[None][0]
        assert httpx.get(f"{s.url}/health").json()["requests"]["failed"] == 0


def test_max_adapters_evicts_the_least_recently_used_idle_one(base_dir, tunes, tok, want):
    with Server(base_dir, tok, {"sql": tunes["sql"], "chat": tunes["chat"]}, runtime=True, max_adapters=2) as s:
        s.complete("sql")  # chat is now the least recently used
        r = s.post("load_lora_adapter", {"lora_name": "extra", "lora_path": str(tunes["extra"])})
        assert r.status_code == 200, r.text
        assert s.ids() == [BASE, "sql", "extra"] and sorted(s.bank.names) == ["extra", "sql"]
        assert s.complete("extra").choices[0].text == want["extra"][0]
        release = s.hold("sql", "extra")  # every adapter busy: nothing to evict
        try:
            r = s.post("load_lora_adapter", {"lora_name": "chat", "lora_path": str(tunes["chat"])})
            assert error(r) == (409, "adapter_limit")
        finally:
            release()
        assert sorted(s.bank.names) == ["extra", "sql"]
        s.complete("extra")  # sql is now the least recently used
        r = s.post("load_lora_adapter", {"lora_name": "chat", "lora_path": str(tunes["chat"])})
        assert r.status_code == 200 and s.ids() == [BASE, "extra", "chat"]  # sql was the least recently used
        assert s.complete("chat").choices[0].text == want["chat"][0]


# ------------------------------------------------------------------------------------------- the command line
def test_adapter_flags_are_checked_before_the_port_and_the_model(base_dir, tunes, capsys, monkeypatch):
    from gptneox import cli
    from gptneox.serve import server as serve
    monkeypatch.setattr(serve, "load", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    monkeypatch.setattr(serve, "bind", lambda *a, **k: pytest.fail("the port was bound before the checks"))
    sql, chat, big = tunes["sql"], tunes["chat"], tunes["big"]

    def run(*args) -> tuple[int, str]:
        status = cli.run(serve.main, serve.build_parser(), ["--ckpt", str(base_dir), "--device", "cpu", *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return status, err.strip().splitlines()[-1]

    for args, message in (
            (["--adapter", "sql="], "--adapter sql=: give NAME=DIR"),
            (["--adapter", f"a={sql}", "--adapter", f"a={chat}"], "the name 'a' is already taken"),
            (["--adapter", str(sql), "--adapter", f"sql={chat}"], "the name 'sql' is already taken"),
            (["--adapter", f"{BASE}={sql}"], f"the name '{BASE}' is already taken"),
            (["--adapter", f"a={base_dir}"], "no adapter_config.json"),
            (["--adapter", f"a={base_dir / 'nope'}"], "not a directory"),
            (["--adapter", f"a={big}", "--max-adapter-rank", "8"], "rank 32 is over --max-adapter-rank 8"),
            (["--adapter", f"a={sql}", "--adapter", f"b={chat}", "--max-adapters", "1"],
             "--max-adapters 1: 2 --adapter flags given"),
            (["--max-adapters", "0"], "argument --max-adapters: must be positive")):
        status, line = run(*args)
        assert status == 2 and message in line, (args, line)


def test_load_puts_several_adapters_in_a_bank_and_one_is_merged(base_dir, tunes, tok, want, tmp_path):
    """server.load: a bank of the named tunes (not merged); a tensor that does not fit the base is a usage error."""
    from gptneox.cli import UsageError
    from gptneox.loading import plan
    from gptneox.serve.server import load
    checked = plan(base_dir, dtype=torch.float32)
    model, _ = load(checked, {"sql": tunes["sql"], "chat": tunes["chat"]})
    assert model.adapter_bank.names == ["sql", "chat"]
    assert greedy(model, tok, PROMPT) == want[None][0]  # the base's weights untouched
    row = generate(model, [tok.encode(PROMPT)], max_new_tokens=N, temperature=0, tokenizer=tok,
                   adapters=["chat"])[0].tolist()
    assert completion_text(tok, row, stop_ids(model, tokenizer=tok), ()) == want["chat"][0]
    config = json.loads((tunes["sql"] / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: torch.zeros(2, 2) for k in load_file(tunes["sql"] / "adapter_model.safetensors")},
              bad / "adapter_model.safetensors")
    with pytest.raises(UsageError, match=r"--adapter x=.*bad.*tensor"):
        load(checked, {"x": bad})


@pytest.mark.parametrize("flags, bank, aliases", [
    (["--adapter", "SQL"], None, ["sql"]),  # a lone adapter (bare DIR: named after its folder): merged, as before
    (["--adapter", "a=SQL", "--adapter", "b=CHAT"], ["a", "b"], []),
    (["--adapter", "a=SQL", "--allow-runtime-adapters"], ["a"], []),
    (["--allow-runtime-adapters"], [], [])])
def test_main_serves_the_adapters_as_the_flags_say(base_dir, tunes, monkeypatch, flags, bank, aliases):
    """main(): which adapters go into an AdapterBank and which one is merged; the Service it serves (uvicorn's run
    replaced by a no-op)."""
    from gptneox import cli
    from gptneox.serve import server as serve
    made = {}

    def create_app(service, **kw):  # the app server.main hands to uvicorn: only its drain is read
        made["service"] = service
        return types.SimpleNamespace(state=types.SimpleNamespace(drain=None))
    monkeypatch.setattr(serve, "create_app", create_app)

    def run(self, sockets):
        self.started = True
        for s in sockets:
            s.close()
    monkeypatch.setattr(uvicorn.Server, "run", run)
    flags = [f.replace("SQL", str(tunes["sql"])).replace("CHAT", str(tunes["chat"])) for f in flags]
    assert cli.run(serve.main, serve.build_parser(), ["--ckpt", str(base_dir), "--device", "cpu", "--port", "0",
                                                      "--log-level", "warning", *flags]) == 0
    service = made["service"]
    assert list(service.aliases) == aliases and list(service.adapters) == (bank or [])
    assert (service.bank.names if service.bank else None) == bank
    assert service.runtime == ("--allow-runtime-adapters" in flags)
    assert [m["parent"] for m in service.models()["data"]] == [None] + [BASE] * len(aliases + (bank or []))
