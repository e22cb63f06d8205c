"""The HTTP side of the server: the FastAPI app over a Service (app.py), its error bodies and /metrics, and the plain
ASGI middleware around it, outermost first: the metrics' request counts, the drain at shutdown, the API key, the
request body limit. FastAPI and Starlette are the serve extra's, imported when the app is made."""

import hmac
import logging
from contextlib import asynccontextmanager

from .api import APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, validation_error
from .app import ClientGone, Service
from .metrics import Metrics

log = logging.getLogger("gptneox.serve")
JSON_ESCAPE = 6  # the most bytes JSON writes for one byte of text: a control character as \u00XX
BODY_SLACK = 1 << 20  # bytes for a request's fields besides its prompt (messages' keys, stop strings, logit_bias)


def body_limit(window: int, tokenizer) -> int:
    """The default --max-request-bytes: a prompt of `window` tokens, each as long in UTF-8 as the tokenizer's longest
    and every byte written as JSON's longest escape, plus BODY_SLACK. Any prompt that fits the context fits it."""
    texts = tokenizer.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    return window * JSON_ESCAPE * max(len(t.encode()) for t in texts) + BODY_SLACK


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


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets the refusal (a 413) at once, before the app runs: by
    its Content-Length before a byte of it is read, or (a chunked body) as soon as the bytes read pass the limit.
    Nothing past the limit is kept (uvicorn reads and drops the rest of a refused body, so the client still gets
    the answer). A body within it is read whole and handed to the app as one message (the endpoints read it whole)."""

    def __init__(self, app, *, limit: int, refusal):
        self.app, self.limit, self.refusal = app, limit, refusal

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.refusal(scope, receive, send)
        body, message = bytearray(), {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client left before the end of its body
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await self.refusal(scope, receive, send)
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}

        async def replay():  # the body once, then what the client does next (a disconnect)
            nonlocal whole
            message, whole = whole, None
            return message or await receive()
        return await self.app(scope, replay, send)


class Drain:
    """The graceful stop, which server.py starts at SIGTERM or SIGINT: in_flight counts the /v1 requests not yet
    answered; once started, new ones (and /health, so that a load balancer stops sending) get a 503."""

    def __init__(self):
        self.started, self.in_flight = False, 0

    def start(self) -> None:
        self.started = True


class DrainGate:
    """ASGI middleware of a Drain: counts the /v1 requests in flight, and refuses new ones once it has started."""

    def __init__(self, app, *, drain: Drain, refusal):
        self.app, self.drain, self.refusal = app, drain, refusal

    async def __call__(self, scope, receive, send):
        api = scope["type"] == "http" and scope["path"].startswith("/v1")
        if self.drain.started and (api or scope["type"] == "http" and scope["path"] == "/health"):
            return await self.refusal(scope, receive, send)
        if not api:
            return await self.app(scope, receive, send)
        self.drain.in_flight += 1  # one thread (the event loop): no lock
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class Counted:
    """ASGI middleware: each /v1 request counted in the metrics by endpoint (a path the app does not serve counts as
    "other") and the status it was answered with (500 for an exception, 499 when none was sent: the client left)."""

    def __init__(self, app, *, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            self.metrics.count(scope["path"] if scope["path"] in self.endpoints else "other", status or 499)


def create_app(service: Service, *, api_key: str | None = None, max_request_bytes: int | None = None):
    """The FastAPI app; its lifespan starts and stops the service's engine, whose on_end it sets to the app's
    Metrics (app.state.metrics). app.state.drain: the Drain that server.py starts at a signal. max_request_bytes:
    the body limit (default body_limit of the service's context and tokenizer)."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    limit = body_limit(service.window, service.tokenizer) if max_request_bytes is None else max_request_bytes
    metrics, drain = Metrics(service.engine), Drain()
    service.engine.on_end = metrics.ended  # before the engine starts

    @asynccontextmanager
    async def lifespan(app):
        service.engine.start()
        log.info("serving %s: %d slots of %d tokens, a queue of %d, request bodies up to %d bytes",
                 service.model_name, service.engine.max_batch_size, service.window, service.engine.max_queue, limit)
        yield
        service.engine.stop()

    app = FastAPI(title="gptneox", lifespan=lifespan)
    app.state.metrics, app.state.drain = metrics, drain

    def error(e: APIError, **headers):
        if e.status == 503:
            headers["Retry-After"] = "1"
        return JSONResponse(e.body(), status_code=e.status, headers=headers or None)

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

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(service.completions, CompletionRequest, request)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        return await handle(service.chat, ChatRequest, request)

    async def handle(endpoint, schema, request):
        """The body is read as JSON whatever the Content-Type says (curl -d sends form-urlencoded)."""
        body = parse(schema, await request.body())
        try:
            return await endpoint(body, request)
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; nginx's "client closed request"

    if service.runtime:  # vLLM's endpoints; without --allow-runtime-adapters they do not exist (404)
        @app.post("/v1/load_lora_adapter")
        async def load_adapter(request: HTTPRequest):
            return await service.load_adapter(parse(LoadAdapterRequest, await request.body()))

        @app.post("/v1/unload_lora_adapter")
        async def unload_adapter(request: HTTPRequest):
            return await service.unload_adapter(parse(UnloadAdapterRequest, await request.body()))

    def parse(schema, raw: bytes):
        try:
            return schema.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e.errors()) from None

    @app.get("/metrics", include_in_schema=False)
    def prometheus():  # not behind the API key, as vLLM's
        body, content_type = metrics.scrape()
        return Response(body, media_type=content_type)

    app.get("/v1/models")(service.models)
    app.get("/health")(service.health)

    # the middleware, innermost first (add_middleware wraps what is there)
    app.add_middleware(BodyLimit, limit=limit, refusal=error(APIError(
        413, f"the request body is over this server's limit of {limit} bytes (--max-request-bytes)",
        code="request_too_large")))
    if api_key is not None:
        app.add_middleware(BearerKey, key=api_key, refusal=error(APIError(
            401, "invalid or missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")))
    app.add_middleware(DrainGate, drain=drain, refusal=error(APIError(
        503, "the server is shutting down; retry on another server", code="server_shutting_down"),
        Connection="close"))  # the client's next request opens a new connection, to wherever its balancer says
    endpoints = {route.path for route in app.routes if route.path.startswith("/v1")}
    app.add_middleware(Counted, metrics=metrics, endpoints=endpoints)
    return app
