"""The async face of the engine for the HTTP side: submit, stream outputs, abort on cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine.engine import Engine
from server.engine.messages import RequestOutput
from server.engine.request import Request


class EngineClient:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes; abort it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:
            if not loop.is_closed():  # the consumer may be gone already
                loop.call_soon_threadsafe(outputs.put_nowait, out)

        self.engine.submit(request, sink)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(request.request_id)
