"""The server's service: the endpoints of gptneox.serve on a batching engine, in OpenAI's shapes (http.py puts
them on FastAPI).

    service = Service(Engine(model, tokenizer, max_batch_size=8), tokenizer, model_name="dolly-v2-3b", template="dolly")
    app = create_app(service, api_key=None)       # http.py: a FastAPI app; its lifespan starts and stops the engine
    uvicorn.run(app, host="127.0.0.1", port=8000)

Each HTTP request becomes one engine Request per choice (prompts x n), submitted together (a Call); the engine's
events come back through one asyncio queue and leave as one JSON response or as server-sent events, the choices'
chunks interleaved as they come. Every limit is checked before anything is submitted; prompts are tokenized on a
small thread pool, never on the event loop. The request bodies, errors and response shapes are api.py's; the chat
templates gptneox/prompts/chat.py's. Guide: docs/serving.md.
"""

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..generation import batching
from ..generation.batching import Request
from ..generation.config import GenerationConfig
from ..lora.adapter import ADAPTER_CONFIG
from ..prompts.chat import PLAIN_STOP, Stripped, dolly_prompt, plain_prompt
from .api import (APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, chat_body,
                  chat_choice, chat_chunk, chat_logprobs, completion_body, completion_choice, completion_logprobs,
                  new_id, usage)
from .call import Call, ClientGone, sse

log = logging.getLogger("gptneox.serve")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DOLLY_CHAT = dict(top_p=0.92, max_tokens=256)  # Dolly's pipeline defaults (docs/architecture.md, "Dolly v2")
NFC_SHRINK = 4  # NFC composes at most 4 code points into one (U+1F82): a text's characters shrink at most 4-fold


def adapter_rank(path) -> int:
    """The largest LoRA rank an adapter directory's adapter_config.json gives ("r", "rank_pattern"); ValueError
    naming the file or the field when there is none to read."""
    file = Path(path) / ADAPTER_CONFIG
    if not Path(path).is_dir():
        raise ValueError(f"{path}: not a directory")
    if not file.is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG} (not a LoRA adapter directory)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()] if isinstance(config, dict) else [None]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ValueError(f"{file}: field 'r' (and rank_pattern) must hold positive integers")
    return max(ranks)


Engine = batching.Engine  # each step under its forward_lock: the AdapterBank changes between steps (bank_op)


# --------------------------------------------------------------------------------------------- the service
class Service:
    """What the endpoints share: the engine, the tokenizer, the served name and the chat template.

    LoRA adapters: the request's `model` picks one. adapters {name: directory} are the tunes of the model's
    AdapterBank (lora/bank.py; each row of a batch runs its own); aliases {name: directory} name an adapter merged
    into the weights at load (the one --adapter, served under its name and the base's alike). runtime: the tunes may
    be loaded and unloaded while serving (load_adapter / unload_adapter; the engine must be this module's Engine);
    max_adapters: at most that many tunes, the least recently used idle one evicted by a load past it; max_rank:
    a tune of a higher rank is refused."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, template: str, adapters=None, aliases=None,
                 runtime: bool = False, max_adapters: int | None = None, max_rank: int | None = None):
        if template not in ("dolly", "plain"):
            raise ValueError(f"template must be 'dolly' or 'plain', got {template!r}")
        self.engine, self.tokenizer, self.model_name, self.template = engine, tokenizer, model_name, template
        self.window, self.vocab = engine.max_len, engine.model.config.vocab_size
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # byte-level: one character per byte
        self.token_chars = max(map(len, vocab))  # the most characters one token covers
        self.encoder = ThreadPoolExecutor(2, thread_name_prefix="gptneox-tokenize")  # never on the event loop
        self.created = int(time.time())
        self.bank = getattr(engine.model, "adapter_bank", None)
        if (adapters or runtime) and self.bank is None:
            raise ValueError("adapters and runtime loading need an AdapterBank on the engine's model")
        if runtime and not isinstance(engine, Engine):
            raise ValueError("runtime adapter loading needs gptneox.serve.app.Engine (it locks each forward)")
        self.adapters = {name: str(path) for name, path in (adapters or {}).items()}  # the bank's tunes served
        self.aliases = {name: str(path) for name, path in (aliases or {}).items()}  # names of the merged weights
        self.runtime, self.max_adapters, self.max_rank = runtime, max_adapters, max_rank
        self.used = {name: time.monotonic() for name in self.adapters}  # name -> last request (least recently used)
        self.requests: dict[str, list[Request]] = {}  # name -> its requests not known to be finished
        self.changing = None  # an asyncio.Lock, made in the event loop: one load / unload at a time

    def adapter_of(self, model: str) -> str | None:
        """The bank tune a request's model names (None: the served weights); an unknown name is a 404."""
        if model == self.model_name or model in self.aliases:
            return None
        if model in self.adapters:
            self.used[model] = time.monotonic()
            return model
        served = ", ".join(map(repr, [self.model_name, *self.aliases, *self.adapters]))
        raise APIError(404, f"The model {model!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")

    def check(self, body, prompts: int = 1) -> str | None:
        """The request's adapter (adapter_of), once its unsupported fields and logit_bias are checked and its
        choices (prompts x n) found to fit the wait queue: they are queued together."""
        adapter = self.adapter_of(body.model)
        bad = body.unsupported()
        if bad:
            raise APIError(400, f"{bad[0]}: not supported by this server", param=bad[0], code="unsupported")
        n, most = body.n or 1, self.engine.max_queue
        if prompts * n > most:
            asked = f"{prompts} prompts x n {n} = {prompts * n} completions" if prompts > 1 else (
                f"n {n} completions" if n > 1 else "1 completion")
            raise APIError(400, f"{'n' if n > 1 else 'prompt'}: {asked} in one request, more than this server "
                           f"queues at once ({most}, its --max-queue)", param="n" if n > 1 else "prompt",
                           code="invalid_value")
        body.biases(self.vocab)
        return adapter

    def call(self, http, body, rid: str, prompts: list[list[int]], configs: list[GenerationConfig], adapter,
             **options) -> Call:
        """The request's choices, prompt by prompt then n samples each (index = prompt index x n + sample), sample
        j seeded seed + j, queued together."""
        n, seed, bias = body.n or 1, body.seed, body.biases(self.vocab)
        choices = [dict(prompt=ids, config=config if seed is None else replace(config, seed=seed + j), id=rid,
                        adapter=adapter, logit_bias=bias, presence_penalty=body.presence_penalty or 0.0,
                        frequency_penalty=body.frequency_penalty or 0.0, **options)
                   for ids, config in zip(prompts, configs) for j in range(n)]
        call = Call(self.engine, http, choices)
        if adapter is not None:
            self.requests.setdefault(adapter, []).extend(call.requests)
        return call

    def in_use(self, name: str) -> int:
        """Requests of tune `name` queued or running (a finished or cancelled one is forgotten)."""
        live = [r for r in self.requests.get(name, []) if r.finish_reason is None and not r.cancelled]
        self.requests[name] = live
        return len(live)

    async def ids(self, prompts: list[str | list[int]], param: str) -> list[list[int]]:
        """The prompts' token ids, tokenized on the thread pool. A prompt sure to overflow the context is refused
        first, untokenized: a text by its length (a token covers at most token_chars characters), ids by their
        count."""
        for i, prompt in enumerate(prompts):
            least = (len(prompt) if isinstance(prompt, list) else
                     -(-len(prompt) // (self.token_chars * (1 if prompt.isascii() else NFC_SHRINK))))
            if least >= self.window:
                self.too_long(param, least, None, i if len(prompts) > 1 else None, isinstance(prompt, str))
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await asyncio.get_running_loop().run_in_executor(
            self.encoder, lambda: [self.tokenizer.encode(t) for t in texts]) if texts else ())
        out = [next(encoded) if isinstance(p, str) else list(p) for p in prompts]
        for i, ids in enumerate(out):
            which = f"prompt {i}" if len(out) > 1 else "the prompt"
            if not ids:
                raise APIError(400, f"{param}: {which} encodes to no tokens", param=param, code="invalid_value")
            if not all(0 <= t < self.vocab for t in ids):
                raise APIError(400, f"{param}: token ids must lie in [0, {self.vocab})" +
                               (f" ({which})" if len(out) > 1 else ""), param=param, code="invalid_value")
        return out

    def too_long(self, param: str, prompt_len: int, asked: int | None, index: int | None = None, at_least=False):
        """OpenAI's context_length_exceeded: the context, the prompt's tokens and those asked for."""
        room = self.window - prompt_len
        which = "the prompt" if index is None else f"prompt {index}"
        has = f"has at least {prompt_len} tokens" if at_least else f"has {prompt_len}"
        raise APIError(400, f"this model's context is {self.window} tokens; {which} {has}" +
                       (f" and {asked} more were asked for" if asked is not None else "") +
                       (f" (at most {room} fit)" if room > 0 else ""), param=param, code="context_length_exceeded")

    def config(self, body, prompt_len: int, max_tokens: int | None, top_p: float | None, stops,
               index: int | None = None) -> GenerationConfig:
        """The request's GenerationConfig; max_tokens None: what the context leaves. A prompt that leaves no room,
        or asks for more than the context holds, is OpenAI's context_length_exceeded (index: which prompt)."""
        room = self.window - prompt_len
        asked = room if max_tokens is None else max_tokens
        if room < 1 or asked > room:
            self.too_long("messages" if isinstance(body, ChatRequest) else "prompt", prompt_len, asked, index)
        temperature = 1.0 if body.temperature is None else body.temperature
        return GenerationConfig(max_new_tokens=asked, temperature=temperature, top_p=top_p, seed=body.seed,
                                stop_strings=stops)

    # ----------------------------------------------------------------------------------------- completions
    async def completions(self, body: CompletionRequest, http):
        prompts = body.prompts()
        adapter, stops, n = self.check(body, len(prompts)), body.stops(), body.n or 1
        ids = await self.ids(prompts, "prompt")
        many = len(ids) > 1
        configs = [self.config(body, len(x), body.max_tokens or COMPLETION_MAX_TOKENS, body.top_p, stops,
                               i if many else None) for i, x in enumerate(ids)]
        echoes = [self.tokenizer.decode(x) if body.echo else "" for x in ids for _ in range(n)]  # per choice
        rid, created = new_id("cmpl"), int(time.time())
        call = self.call(http, body, rid, ids, configs, adapter, top_logprobs=body.logprobs,
                         prompt_logprobs=body.echo and body.logprobs is not None)
        first = await call.first()
        prompt_tokens = sum(map(len, ids))  # once per prompt, as OpenAI counts them
        if body.stream:
            return self.stream(self.completion_chunks(call, first, body, rid, created, echoes, prompt_tokens), call)
        texts = await call.texts(first)
        choices = [completion_choice(i, echo + text, r.finish_reason,
                                     None if body.logprobs is None else self.completion_scores(r, body.echo, 0))
                   for i, (r, echo, text) in enumerate(zip(call.requests, echoes, texts))]
        return completion_body(rid, body.model, choices, self.total_usage(call, prompt_tokens), created)

    @staticmethod
    def total_usage(call: Call, prompt_tokens: int) -> dict:
        return usage(prompt_tokens, sum(len(r.tokens) for r in call.requests))

    def completion_scores(self, r: Request, echo: bool, offset: int, start: int = 0, end: int | None = None):
        ids = (list(r.prompt) if echo else []) + r.tokens[start:end]
        scores = (r.prompt_scores if echo else []) + r.logprobs[start:end]
        return completion_logprobs(self.tokenizer, ids, scores, offset)

    async def completion_chunks(self, call: Call, first, body, rid, created, echoes: list[str], prompt_tokens: int):
        """The choices' pieces as they come (each choice's echo before its first token, once its prompt is scored),
        each choice's finish chunk when it ends; the last one carries the usage when asked."""
        def chunk(i, text, reason=None, logprobs=None, use=None):
            return sse(completion_body(rid, body.model, [completion_choice(i, text, reason, logprobs)], use, created))
        reqs, sent, count = call.requests, [len(e) for e in echoes], [0] * len(echoes)
        i, event = first
        while True:
            r = reqs[i]
            if echoes[i] and count[i] == 0 and event.kind == "token":
                yield chunk(i, echoes[i], logprobs=self.completion_scores(r, True, 0, 0, 0)
                            if body.logprobs is not None else None)
            if event.kind == "token":
                count[i] += 1
                logprobs = (None if body.logprobs is None
                            else self.completion_scores(r, False, sent[i], count[i] - 1, count[i]))
                if event.text or logprobs:
                    yield chunk(i, event.text, logprobs=logprobs)
                sent[i] += len(event.text)
            else:
                last = call.finished and _include_usage(body)
                yield chunk(i, event.text, r.finish_reason, use=self.total_usage(call, prompt_tokens) if last else None)
            if call.finished:
                return
            i, event = await call.next()

    # ------------------------------------------------------------------------------------------------ chat
    async def chat(self, body: ChatRequest, http):
        adapter = self.check(body)
        messages = [m.pair() for m in body.messages]
        try:
            prompt = dolly_prompt(messages) if self.template == "dolly" else plain_prompt(messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        [ids] = await self.ids([prompt], "messages")
        stops = body.stops() + (PLAIN_STOP if self.template == "plain" else ())
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_p = body.top_p
        if self.template == "dolly":
            top_p = DOLLY_CHAT["top_p"] if top_p is None else top_p
            max_tokens = max_tokens or min(DOLLY_CHAT["max_tokens"], self.window - len(ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        rid, created = new_id("chatcmpl"), int(time.time())
        call = self.call(http, body, rid, [ids], [self.config(body, len(ids), max_tokens, top_p, stops)], adapter,
                         top_logprobs=top)
        first = await call.first()
        if body.stream:
            return self.stream(self.chat_chunks(call, first, body, rid, created, len(ids)), call)
        answers = [Stripped() for _ in call.requests]
        texts = await call.texts(first, lambda i, piece: answers[i].feed(piece))
        choices = [chat_choice(i, text, r.finish_reason,
                               chat_logprobs(self.tokenizer, r.tokens, r.logprobs) if body.logprobs else None)
                   for i, (r, text) in enumerate(zip(call.requests, texts))]
        return chat_body(rid, body.model, choices, self.total_usage(call, len(ids)))

    async def chat_chunks(self, call: Call, first, body, rid, created, prompt_tokens: int):
        """Each choice's role chunk, then the choices' pieces as they come, each choice's finish chunk when it ends,
        then the usage chunk when asked."""
        reqs, answers, count = call.requests, [Stripped() for _ in call.requests], [0] * len(call.requests)
        for i in range(len(reqs)):
            yield sse(chat_chunk(rid, body.model, created, i, {"role": "assistant", "content": ""}))
        i, event = first
        while True:
            r, piece = reqs[i], answers[i].feed(event.text)
            if event.kind == "token":
                count[i] += 1
                logprobs = (chat_logprobs(self.tokenizer, r.tokens[count[i] - 1:count[i]],
                                          r.logprobs[count[i] - 1:count[i]]) if body.logprobs else None)
                if piece or logprobs:
                    yield sse(chat_chunk(rid, body.model, created, i, {"content": piece}, logprobs=logprobs))
            else:
                yield sse(chat_chunk(rid, body.model, created, i, {"content": piece} if piece else {},
                                     r.finish_reason))
            if call.finished:
                break
            i, event = await call.next()
        if _include_usage(body):
            yield sse(chat_chunk(rid, body.model, created, 0, None, use=self.total_usage(call, prompt_tokens)))

    # ------------------------------------------------------------------------------------------- streaming
    def stream(self, chunks, call: Call):
        """A server-sent event stream of chunks, then "data: [DONE]"; a failure midway is sent as an error chunk
        (the 200 status is already out); a client that leaves cancels the call at once."""
        from fastapi.responses import StreamingResponse

        async def body():
            try:
                async for chunk in chunks:
                    yield chunk
                yield "data: [DONE]\n\n"
            except APIError as e:
                yield sse(e.body())
            except ClientGone:
                return
            finally:  # also when the response is torn down because the client left
                call.close()
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def health(self) -> dict:
        e = self.engine
        steps = {str(n): k for n, k in enumerate(e.decode_steps) if k}  # requests per step -> steps
        return {"status": "ok", "model": self.model_name, "adapters": [*self.aliases, *self.adapters],
                "slots": {"busy": e.busy, "total": e.max_batch_size}, "waiting": len(e.waiting),
                "decode_steps": steps, "requests": dict(e.stats)}

    def models(self) -> dict:
        """The base and every adapter, an adapter's "parent" the base's id (as vLLM lists LoRA modules)."""
        def entry(name, root, parent):
            return {"id": name, "object": "model", "created": self.created, "owned_by": "gptneox", "root": root,
                    "parent": parent, "max_model_len": self.window}
        tunes = {**self.aliases, **self.adapters}
        return {"object": "list", "data": [entry(self.model_name, self.model_name, None),
                                           *(entry(n, path, self.model_name) for n, path in tunes.items())]}

    # ------------------------------------------------------------------------------- adapters at runtime
    async def bank_op(self, op, *args):
        """op(*args) on a worker thread, between two of the engine's forwards."""
        return await asyncio.to_thread(self.engine.between_forwards, op, *args)

    def idle_victim(self, keep: str | None = None) -> str | None:
        """The least recently used tune with no request queued or running (None when every one is busy)."""
        idle = [n for n in self.adapters if n != keep and not self.in_use(n)]
        return min(idle, key=lambda n: self.used[n]) if idle else None

    async def load_adapter(self, body: LoadAdapterRequest):
        """POST /v1/load_lora_adapter: all or nothing. A bad directory, a tensor that does not fit the base or a
        rank over max_rank is a 400 and the bank is as it was; past max_adapters the least recently used idle tune
        is evicted, and when every tune is busy the load is refused (409)."""
        from fastapi.responses import PlainTextResponse
        self.changing = self.changing or asyncio.Lock()
        async with self.changing:
            name, path = body.lora_name, body.lora_path
            if name == self.model_name or name in self.aliases or name in self.adapters:
                raise APIError(400, f"lora_name: the model {name!r} is already served (unload it first)",
                               param="lora_name", code="invalid_value")
            try:
                rank = adapter_rank(path)
            except ValueError as e:
                raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_value") from None
            if self.max_rank is not None and rank > self.max_rank:
                raise APIError(400, f"lora_path: {Path(path) / ADAPTER_CONFIG}: rank r={rank} is over this server's "
                               f"--max-adapter-rank {self.max_rank}", param="lora_path", code="invalid_value")
            full = self.max_adapters is not None and len(self.adapters) >= self.max_adapters
            if full and self.idle_victim() is None:
                raise APIError(409, f"{len(self.adapters)} adapters are loaded (--max-adapters {self.max_adapters}) "
                               "and every one has requests running; retry later", code="adapter_limit")
            try:
                await self.bank_op(self.bank.add, name, path)
            except (ValueError, OSError) as e:  # AdapterError is a ValueError; add checks all before it changes
                raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_value") from None
            if full:  # evicted only now, so that a failed load evicts nothing
                victim = self.idle_victim(keep=name)
                if victim is None:  # the idle one took a request meanwhile
                    await self.bank_op(self.bank.remove, name)
                    raise APIError(409, f"{len(self.adapters)} adapters are loaded (--max-adapters "
                                   f"{self.max_adapters}) and every one has requests running; retry later",
                                   code="adapter_limit")
                await self.drop(victim)
                log.info("evicted LoRA adapter %r (least recently used) for %r", victim, name)
            self.adapters[name], self.used[name] = path, time.monotonic()
            log.info("loaded LoRA adapter %r from %s", name, path)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, body: UnloadAdapterRequest):
        """POST /v1/unload_lora_adapter: refused (409) while the adapter has requests queued or running."""
        from fastapi.responses import PlainTextResponse
        self.changing = self.changing or asyncio.Lock()
        async with self.changing:
            name = body.lora_name
            if name not in self.adapters:
                why = "is the base model" if name == self.model_name else (
                    "is merged into the weights" if name in self.aliases else "is not loaded")
                raise APIError(404 if why == "is not loaded" else 400, f"lora_name: the adapter {name!r} {why}",
                               param="lora_name", code="model_not_found" if why == "is not loaded" else "invalid_value")
            busy = self.in_use(name)
            if busy:
                raise APIError(409, f"the adapter {name!r} has {busy} request(s) queued or running; retry when they "
                               "are done", param="lora_name", code="adapter_in_use")
            await self.drop(name)
            log.info("unloaded LoRA adapter %r", name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def drop(self, name: str) -> None:
        """Stop serving tune `name` (new requests get 404 at once), then take it out of the bank."""
        del self.adapters[name]
        self.used.pop(name, None)
        self.requests.pop(name, None)
        await self.bank_op(self.bank.remove, name)


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage
