"""The async face of the engine for the HTTP side: submit, stream outputs, abort on close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from server.engine.engine import Engine
from server.engine.messages import RequestOutput
from server.engine.request import Request


class EngineClient:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def generate(self, request: Request, on_finish: Callable[[], None] | None = None) -> Outputs:
        """Submit ``request`` now; iterate the result for its outputs (see :meth:`generate_many`)."""
        return self.generate_many([request], on_finish, pairs=False)

    def generate_many(
        self, requests: Sequence[Request], on_finish: Callable[[], None] | None = None, pairs: bool = True
    ) -> Outputs:
        """Submit every request now; iterate ``(index, output)`` pairs, in the order the engine emits them.

        ``aclose()`` before they all finished aborts those still running, whether
        or not iteration began. ``on_finish`` runs on the engine thread once per
        request, when the engine is done with it, whatever the outcome, even if
        nobody iterates.
        """
        loop = asyncio.get_running_loop()
        outputs = Outputs(self.engine, [r.request_id for r in requests], pairs)

        def sink_for(index: int) -> Callable[[RequestOutput], None]:
            def sink(out: RequestOutput) -> None:
                if out.finished and on_finish is not None:
                    on_finish()
                if not loop.is_closed():  # the consumer may be gone already
                    loop.call_soon_threadsafe(outputs.queue.put_nowait, (index, out))

            return sink

        for index, request in enumerate(requests):
            self.engine.submit(request, sink_for(index))
        return outputs


class Outputs:
    """An async iterator over a submission's outputs; closing it aborts what has not finished."""

    def __init__(self, engine: Engine, request_ids: list[str], pairs: bool) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.pairs = pairs
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.unfinished = set(range(len(request_ids)))

    def __aiter__(self) -> Outputs:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput] | RequestOutput:
        if not self.unfinished:
            raise StopAsyncIteration
        try:
            index, out = await self.queue.get()
        except asyncio.CancelledError:
            await self.aclose()
            raise
        if out.finished:
            self.unfinished.discard(index)
        return (index, out) if self.pairs else out

    async def aclose(self) -> None:
        """Abort every request that has not finished (the engine frees them within a step)."""
        for index in sorted(self.unfinished):
            self.engine.abort(self.request_ids[index])
        self.unfinished.clear()
