"""The async face of the engine for the HTTP side: submit, stream outputs, abort on cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from server.engine.engine import Engine
from server.engine.messages import RequestOutput
from server.engine.request import Request


class EngineClient:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, request: Request, on_finish: Callable[[], None] | None = None) -> AsyncIterator[RequestOutput]:
        """Submit ``request`` now; iterate the result for its outputs.

        Closing the iterator before the request finished aborts it. ``on_finish``
        runs on the engine thread once the engine is done with the request,
        whatever the outcome, even if nobody iterates.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:
            if out.finished and on_finish is not None:
                on_finish()
            if not loop.is_closed():  # the consumer may be gone already
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.engine.submit(request, sink)
        return self._stream(request.request_id, outputs)

    async def _stream(self, request_id: str, outputs: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(request_id)
