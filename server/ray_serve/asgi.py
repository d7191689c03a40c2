"""One HTTP exchange with an ASGI app in this process, without a server in between.

A Ray replica receives a request as a small picklable :class:`HttpCall`, runs
it through our FastAPI app with :class:`AsgiBridge`, and streams back the
response's :class:`ResponseHead` and then its body chunks. Nothing here imports
Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

log = logging.getLogger(__name__)

Headers = tuple[tuple[bytes, bytes], ...]  # raw ASGI headers: lower-case names, in order, repeats kept


@dataclass(frozen=True)
class HttpCall:
    """An HTTP request, body included (the ingress has read it)."""

    method: str
    path: str
    query: bytes = b""
    headers: Headers = ()
    body: bytes = b""


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: Headers

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k == key), None)


class AsgiBridge:
    """Runs :class:`HttpCall` s through ``app``, the way a server would, one task per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._running: set[asyncio.Task] = set()

    async def exchange(self, call: HttpCall) -> AsyncIterator[ResponseHead | bytes]:
        """Yields the response head, then each non-empty body chunk, until the app ends the response.

        Closing the iterator early (the caller went away) tells the app the client
        disconnected; the app then finishes on its own (our routes abort the request).
        """
        replies: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if not gone.is_set():
                replies.put_nowait(message)

        task = asyncio.create_task(self.app(self._scope(call), receive, send))
        self._running.add(task)
        task.add_done_callback(self._finished)
        task.add_done_callback(lambda _: replies.put_nowait(None))
        try:
            start = await replies.get()
            if start is None or start["type"] != "http.response.start":
                raise RuntimeError(f"{call.method} {call.path}: the app ended without a response")
            yield ResponseHead(start["status"], tuple((bytes(k), bytes(v)) for k, v in start.get("headers", ())))
            while (message := await replies.get()) is not None:
                if message["type"] != "http.response.body":
                    continue
                if chunk := message.get("body", b""):
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    break
        finally:
            gone.set()

    async def aclose(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for requests still running (their callers are gone)."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    def _finished(self, task: asyncio.Task) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Starlette re-raises an unhandled error after it has sent the 500 response.
            log.error("unhandled error in a request", exc_info=task.exception())

    @staticmethod
    def _scope(call: HttpCall) -> dict:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": call.method,
            "scheme": "http",
            "path": call.path,
            "raw_path": call.path.encode(),
            "query_string": call.query,
            "root_path": "",
            "headers": list(call.headers),
            "client": None,
            "server": None,
        }
