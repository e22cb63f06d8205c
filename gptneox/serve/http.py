"""The HTTP side of the server: the FastAPI app over a Service (app.py), its error bodies and the API key check.
FastAPI and Starlette are the serve extra's, imported when the app is made."""

import hmac
import logging
from contextlib import asynccontextmanager

from .api import APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, validation_error
from .app import ClientGone, Service

log = logging.getLogger("gptneox.serve")


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

    app.get("/v1/models")(service.models)
    app.get("/health")(service.health)
    return app
