"""The app factory. The lifespan builds the serving stack, starts the engine, and stops it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.adapters import AdapterResolver
from server.api.errors import install_error_handlers
from server.api.routes import completions, health, models
from server.api.state import AppState
from server.engine.builder import Serving
from server.engine.client import EngineClient

log = logging.getLogger(__name__)


def create_app(make_serving: Callable[[], Serving]) -> FastAPI:
    """``make_serving`` loads the model and builds an engine; it runs at start-up, off the event loop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # make_serving builds on its own short-lived thread; this worker only waits for it.
        serving = await asyncio.to_thread(make_serving)
        resolver = AdapterResolver(serving.store, serving.spec, serving.model_name, serving.max_lora_rank)
        state = AppState(serving=serving, client=EngineClient(serving.engine), adapters=resolver)
        app.state.loraplex = state
        serving.engine.start()
        state.ready = True
        log.info("ready: serving %s", serving.model_name)
        try:
            yield
        finally:
            state.ready = False
            await asyncio.to_thread(serving.stop)

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(completions.router)
    return app
