"""One HTTP request's engine requests (its choices), seen from the event loop: a Call submits them together and
turns the engine's events, which arrive from the engine's thread, into an asyncio stream; sse() writes a server-sent
event. app.py's endpoints use it."""

import asyncio
import json

from ..generation.batching import Engine, Event, Request
from .api import APIError

ENGINE_ERRORS = {"timeout": (504, "request_timeout"), "shutdown": (503, "server_shutting_down")}  # else 500
POLL_S = 0.25  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client closed its connection while its request was running."""


class Call:
    """The engine requests of one HTTP request (its choices) seen from the event loop: their events arrive in one
    asyncio queue as (choice index, Event), from the engine's thread. They are queued all together or not at all
    (503); an error in one, a client that goes away (checked every POLL_S while waiting) or close() cancels them
    all. choices: the keyword arguments of each choice's Request."""

    def __init__(self, engine: Engine, http, choices: list[dict]):
        loop, self.events = asyncio.get_running_loop(), asyncio.Queue()

        def emitter(i: int):
            def emit(event: Event):
                try:
                    loop.call_soon_threadsafe(self.events.put_nowait, (i, event))
                except RuntimeError:  # the event loop has closed: the server is stopping
                    pass
            return emit
        self.engine, self.http, self._get = engine, http, None
        self.requests = [Request(emit=emitter(i), **kw) for i, kw in enumerate(choices)]
        self.running = len(self.requests)  # choices not done yet
        if not engine.submit_all(self.requests):
            raise APIError(503, f"the server is at capacity ({engine.max_batch_size} running, {engine.max_queue} "
                           "waiting); retry later", code="server_busy")

    @property
    def finished(self) -> bool:
        return self.running == 0

    async def next(self) -> tuple[int, Event]:
        """The next (choice index, event) of any choice; "error" raises an APIError: 504 request_timeout past the
        server's --request-timeout, 503 server_shutting_down when the server stops, else 500 model_error."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.events.get())
        while True:
            done, _ = await asyncio.wait({self._get}, timeout=POLL_S)
            if done:
                (i, event), self._get = self._get.result(), None
                if event.kind == "error":
                    status, code = ENGINE_ERRORS.get(event.code, (500, "model_error"))
                    raise APIError(status, event.message, code=code)
                self.running -= event.kind == "done"
                return i, event
            if await self.http.is_disconnected():
                raise ClientGone

    async def first(self) -> tuple[int, Event]:
        """The first event of any choice (one admitted and prefilled); on any failure every choice is cancelled."""
        try:
            return await self.next()
        except BaseException:
            self.close()
            raise

    async def texts(self, first: tuple[int, Event], feed=None) -> list[str]:
        """Every choice's whole text (each piece through feed(i, text) when given), once all are done."""
        texts, (i, event) = [""] * len(self.requests), first
        try:
            while True:
                texts[i] += feed(i, event.text) if feed else event.text
                if self.finished:
                    return texts
                i, event = await self.next()
        finally:
            self.close()

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()
        for r in self.requests:
            if r.finish_reason is None:
                self.engine.cancel(r)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"
