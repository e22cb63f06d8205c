"""The server's application: the endpoints of gptneox.serve on a batching engine, in OpenAI's shapes.

    service = Service(Engine(model, tokenizer, max_batch_size=8), tokenizer, model_name="dolly-v2-3b", template="dolly")
    app = create_app(service, api_key=None)       # a FastAPI app; its lifespan starts and stops the engine
    uvicorn.run(app, host="127.0.0.1", port=8000)

Each HTTP request becomes one engine Request (a Call); the engine's events come back through an asyncio queue and
leave as one JSON response or as server-sent events. The request bodies, errors and response shapes are
api.py's; the chat templates gptneox/prompts/chat.py's. Guide: docs/serving.md.
"""

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from ..generation.batching import Engine, Event, Request
from ..generation.config import GenerationConfig
from ..prompts.chat import PLAIN_STOP, Stripped, dolly_prompt, plain_prompt
from .api import (APIError, ChatRequest, CompletionRequest, chat_body, chat_chunk, chat_logprobs, completion_body,
                  completion_logprobs, new_id, usage, validation_error)

log = logging.getLogger("gptneox.serve")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DOLLY_CHAT = dict(top_p=0.92, max_tokens=256)  # Dolly's pipeline defaults (docs/architecture.md, "Dolly v2")
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client closed its connection while its request was running."""


# ------------------------------------------------------------------------------------------------- one call
class Call:
    """One engine request seen from the event loop: its events arrive in an asyncio queue, from the engine's
    thread; a client that goes away cancels it (checked every POLL_S while waiting), and so does close()."""

    def __init__(self, engine: Engine, http, prompt: list[int], config: GenerationConfig, **options):
        loop, self.events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event):
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is stopping
                pass
        self.engine, self.http, self.request, self._get = engine, http, Request(prompt, config, emit, **options), None
        if not engine.submit(self.request):
            raise APIError(503, f"the server is at capacity ({engine.max_batch_size} running, {engine.max_queue} "
                           "waiting); retry later", code="server_busy")

    async def next(self) -> Event:
        """The next event; "error" raises a 500 APIError."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.events.get())
        while True:
            done, _ = await asyncio.wait({self._get}, timeout=POLL_S)
            if done:
                event, self._get = self._get.result(), None
                if event.kind == "error":
                    raise APIError(500, event.message, code="model_error")
                return event
            if await self.http.is_disconnected():
                raise ClientGone

    async def first(self) -> Event:
        """The first event (the request admitted and prefilled); on any failure the request is cancelled."""
        try:
            return await self.next()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()
        if self.request.finish_reason is None:
            self.engine.cancel(self.request)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# --------------------------------------------------------------------------------------------- the service
class Service:
    """What the endpoints share: the engine, the tokenizer, the served name and the chat template."""

    def __init__(self, engine: Engine, tokenizer, *, model_name: str, template: str):
        if template not in ("dolly", "plain"):
            raise ValueError(f"template must be 'dolly' or 'plain', got {template!r}")
        self.engine, self.tokenizer, self.model_name, self.template = engine, tokenizer, model_name, template
        self.window, self.vocab = engine.max_len, engine.model.config.vocab_size
        self.created = int(time.time())

    def check(self, body) -> None:
        if body.model != self.model_name:
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        bad = body.unsupported()
        if bad:
            raise APIError(400, f"{bad[0]}: not supported by this server", param=bad[0], code="unsupported")

    def ids(self, prompt: str | list[int], param: str) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, f"{param}: the prompt encodes to no tokens", param=param, code="invalid_value")
        if not all(0 <= i < self.vocab for i in ids):
            raise APIError(400, f"{param}: token ids must lie in [0, {self.vocab})", param=param, code="invalid_value")
        return ids

    def config(self, body, prompt_len: int, max_tokens: int | None, top_p: float | None, stops) -> GenerationConfig:
        """The request's GenerationConfig; max_tokens None: what the context leaves. A prompt that leaves no room,
        or asks for more than the context holds, is OpenAI's context_length_exceeded."""
        room = self.window - prompt_len
        asked = room if max_tokens is None else max_tokens
        if room < 1 or asked > room:
            raise APIError(400, f"this model's context is {self.window} tokens; the prompt has {prompt_len} and "
                           f"{asked} more were asked for" + (f" (at most {room} fit)" if room > 0 else ""),
                           param="messages" if isinstance(body, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else body.temperature
        return GenerationConfig(max_new_tokens=asked, temperature=temperature, top_p=top_p, seed=body.seed,
                                stop_strings=stops)

    # ----------------------------------------------------------------------------------------- completions
    async def completions(self, body: CompletionRequest, http):
        self.check(body)
        prompt = body.one_prompt()
        ids, stops = self.ids(prompt, "prompt"), body.stops()
        config = self.config(body, len(ids), body.max_tokens or COMPLETION_MAX_TOKENS, body.top_p, stops)
        echo = self.tokenizer.decode(ids) if body.echo else ""
        call = Call(self.engine, http, ids, config, top_logprobs=body.logprobs,
                    prompt_logprobs=body.echo and body.logprobs is not None)
        rid, created = new_id("cmpl"), int(time.time())
        first = await call.first()
        if body.stream:
            return self.stream(self.completion_chunks(call, first, body, rid, created, echo, len(ids)), call)
        try:
            text, event = echo + first.text, first
            while event.kind != "done":
                event = await call.next()
                text += event.text
        finally:
            call.close()
        r = call.request
        logprobs = None if body.logprobs is None else self.completion_scores(r, body.echo, 0)
        return completion_body(rid, self.model_name, text, r.finish_reason, usage(len(ids), len(r.tokens)), logprobs,
                               created)

    def completion_scores(self, r: Request, echo: bool, offset: int, start: int = 0, end: int | None = None):
        ids = (list(r.prompt) if echo else []) + r.tokens[start:end]
        scores = (r.prompt_scores if echo else []) + r.logprobs[start:end]
        return completion_logprobs(self.tokenizer, ids, scores, offset)

    async def completion_chunks(self, call: Call, event: Event, body, rid, created, echo: str, prompt_len: int):
        r, sent, n = call.request, len(echo), 0
        if echo:
            logprobs = self.completion_scores(r, True, 0, 0, 0) if body.logprobs is not None else None
            yield sse(completion_body(rid, self.model_name, echo, None, None, logprobs, created))
        while True:
            if event.kind == "token":
                n += 1
                logprobs = (None if body.logprobs is None
                            else self.completion_scores(r, False, sent, n - 1, n))
                if event.text or logprobs:
                    yield sse(completion_body(rid, self.model_name, event.text, None, None, logprobs, created))
                sent += len(event.text)
            else:
                use = usage(prompt_len, len(r.tokens))
                yield sse(completion_body(rid, self.model_name, "", r.finish_reason,
                                          use if _include_usage(body) else None, None, created))
                return
            event = await call.next()

    # ------------------------------------------------------------------------------------------------ chat
    async def chat(self, body: ChatRequest, http):
        self.check(body)
        messages = [m.pair() for m in body.messages]
        try:
            prompt = dolly_prompt(messages) if self.template == "dolly" else plain_prompt(messages)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        ids = self.ids(prompt, "messages")
        stops = body.stops() + (PLAIN_STOP if self.template == "plain" else ())
        max_tokens = body.max_completion_tokens or body.max_tokens
        top_p = body.top_p
        if self.template == "dolly":
            top_p = DOLLY_CHAT["top_p"] if top_p is None else top_p
            max_tokens = max_tokens or min(DOLLY_CHAT["max_tokens"], self.window - len(ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        call = Call(self.engine, http, ids, self.config(body, len(ids), max_tokens, top_p, stops), top_logprobs=top)
        rid, created = new_id("chatcmpl"), int(time.time())
        first = await call.first()
        if body.stream:
            return self.stream(self.chat_chunks(call, first, body, rid, created, len(ids)), call)
        answer, event = Stripped(), first
        try:
            text = answer.feed(first.text)
            while event.kind != "done":
                event = await call.next()
                text += answer.feed(event.text)
        finally:
            call.close()
        r = call.request
        logprobs = chat_logprobs(self.tokenizer, r.tokens, r.logprobs) if body.logprobs else None
        return chat_body(rid, self.model_name, text, r.finish_reason, usage(len(ids), len(r.tokens)), logprobs)

    async def chat_chunks(self, call: Call, event: Event, body, rid, created, prompt_len: int):
        r, answer, n = call.request, Stripped(), 0
        yield sse(chat_chunk(rid, self.model_name, created, {"role": "assistant", "content": ""}))
        while event.kind == "token":
            n += 1
            piece = answer.feed(event.text)
            logprobs = chat_logprobs(self.tokenizer, r.tokens[n - 1:n], r.logprobs[n - 1:n]) if body.logprobs else None
            if piece or logprobs:
                yield sse(chat_chunk(rid, self.model_name, created, {"content": piece}, logprobs=logprobs))
            event = await call.next()
        yield sse(chat_chunk(rid, self.model_name, created, {}, r.finish_reason))
        if _include_usage(body):
            yield sse(chat_chunk(rid, self.model_name, created, None, use=usage(prompt_len, len(r.tokens))))

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
        return {"status": "ok", "model": self.model_name, "slots": {"busy": e.busy, "total": e.max_batch_size},
                "waiting": len(e.waiting), "decode_steps": steps, "requests": dict(e.stats)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "gptneox", "max_model_len": self.window}]}


def _include_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


# ------------------------------------------------------------------------------------------------------ app
class BearerKey:
    """ASGI middleware: /v1 requests without 'Authorization: Bearer KEY' get the refusal (a 401 response).
    Plain ASGI, not Starlette's BaseHTTPMiddleware, so streaming and disconnects pass through untouched."""

    def __init__(self, app, *, key: str, refusal):
        self.app, self.expected, self.refusal = app, f"Bearer {key}".encode(), refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await self.refusal(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(service: Service, *, api_key: str | None = None):
    """The FastAPI app; its lifespan starts and stops the service's engine."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        log.info("serving %s: %d slots of %d tokens, a queue of %d", service.model_name,
                 service.engine.max_batch_size, service.window, service.engine.max_queue)
        yield
        service.engine.stop()

    app = FastAPI(title="gptneox", lifespan=lifespan)

    def error(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers={"Retry-After": "1"} if e.status == 503 else None)

    @app.exception_handler(APIError)
    async def refused(request, e: APIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return error(validation_error(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # an unknown path (404), a wrong method (405)
        return error(APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def crashed(request, e):
        log.exception("unexpected error")
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key, refusal=error(APIError(
            401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(service.completions, CompletionRequest, request)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await handle(service.chat, ChatRequest, request)

    async def handle(endpoint, schema, request):
        """The body is read as JSON whatever the Content-Type says (curl -d sends form-urlencoded)."""
        try:
            body = schema.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e.errors()) from None
        try:
            return await endpoint(body, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; nginx's "client closed request"

    app.get("/v1/models")(service.models)
    app.get("/health")(service.health)
    return app
