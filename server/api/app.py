"""The app factory. The lifespan builds the serving stack, starts the engine, and stops it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Scope

from server.adapters.catalog import Catalog
from server.adapters.registry import AdapterRegistry
from server.api.admission import Admission
from server.api.auth import unauthorized
from server.api.body_limit import BodySizeLimit
from server.api.errors import install_error_handlers
from server.api.keys import ApiKeys
from server.api.lora_modules import LoraModuleError, register_lora_modules
from server.api.routes import admin, chat, completions, health, lora_compat, metrics, models, tokenize, version
from server.api.state import AppState
from server.config import AdminConfig, HttpConfig
from server.engine.builder import Serving
from server.engine.client import EngineClient
from server.flag_errors import RefusedAtStartup
from server.native import cpu_isa
from server.version import package_version

log = logging.getLogger(__name__)
MULTIPART_OVERHEAD = 1 << 20  # room for form fields and part headers beside the adapter's files


def create_app(
    make_serving: Callable[[], Serving],
    on_startup_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """``make_serving`` loads the model and builds an engine; it runs at start-up, off the event loop.

    With ``on_startup_failure`` the model loads in the background: the server
    answers at once, ``/health`` with 200 and ``/ready`` and every API route
    with 503 until the model is loaded; a failed load is handed to it. Without
    it, start-up waits for the load (in-process use, tests).
    """

    async def start(app: FastAPI) -> None:
        # make_serving builds on its own short-lived thread; this worker only waits for it.
        serving = await asyncio.to_thread(make_serving)
        config = serving.config
        registry = AdapterRegistry(
            serving.store,
            Catalog(serving.store, serving.spec, serving.model_name, serving.max_lora_rank),
            serving.engine.send,
            config.admin.max_upload_bytes,
            config.admin.operation_timeout,
        )
        state = AppState(
            serving=serving,
            client=EngineClient(serving.engine),
            registry=registry,
            keys=ApiKeys(config.auth.api_keys),
            admission=Admission(config.scheduler.max_num_seqs, config.limits.max_queued_requests),
        )
        serving.engine.start()
        try:
            await register_lora_modules(registry, config.lora.modules)
        except BaseException:
            registry.close()
            await asyncio.to_thread(serving.stop)
            raise
        app.state.loraplex = state
        registry.start_store_report(config.lora.store_url or str(config.lora.adapters_dir))  # /ready does not wait
        state.ready = True
        if config.admin.token is None:
            if config.http.loopback:
                log.info("admin API open on the loopback bind (no admin token set)")
            else:
                log.warning("admin API disabled: bound to %s without LORAPLEX_ADMIN_TOKEN", config.http.host)
        if state.keys.enabled:
            log.info("inference API keys required (%d keys)", len(state.keys))
        log.info(_ready_line(serving))

    def loaded(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and on_startup_failure is not None:
            exc = task.exception()
            if isinstance(exc, LoraModuleError | RefusedAtStartup):
                log.error("start-up failed: %s", exc)
            else:
                log.error("the model could not be loaded", exc_info=exc)
            on_startup_failure(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading: asyncio.Task | None = None
        if on_startup_failure is None:
            await start(app)
        else:
            loading = asyncio.create_task(start(app))
            loading.add_done_callback(loaded)
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                log.info("shutting down: waiting for the model load under way to finish")
                await asyncio.gather(loading, return_exceptions=True)
            state: AppState | None = getattr(app.state, "loraplex", None)
            if state is not None:
                state.ready = False
                state.admission.closed = True
                state.registry.close()
                await asyncio.to_thread(state.serving.stop)

    def body_limit(scope: Scope) -> int:
        state: AppState | None = getattr(app.state, "loraplex", None)
        http = state.serving.config.http if state else HttpConfig()
        admin_config = state.serving.config.admin if state else AdminConfig()
        if scope["path"].rstrip("/") == "/admin/adapters":
            return admin_config.max_upload_bytes + MULTIPART_OVERHEAD
        return http.max_request_bytes

    app = FastAPI(title="loraplex", version=package_version(), lifespan=lifespan)
    install_error_handlers(app, before_validation=unauthorized)
    app.add_middleware(BodySizeLimit, limit_for=body_limit)
    app.include_router(health.router)
    app.include_router(version.router)
    app.include_router(metrics.router)
    app.include_router(models.router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.include_router(admin.router)
    app.include_router(lora_compat.router)
    return app


def _ready_line(serving: Serving) -> str:
    """Where the server listens and what it serves, in one line."""
    config, model = serving.config, serving.engine.runner.model
    host = f"[{config.http.host}]" if ":" in config.http.host else config.http.host
    return (
        f"ready: listening on http://{host}:{config.http.port}, model {serving.model_name} "
        f"({model.weights_summary()} on {model.device}), CPU ISA {cpu_isa()}, "
        f"LoRA backend {serving.engine.runner.backend.value}, adapter store "
        f"{config.lora.store_url or config.lora.adapters_dir}"
    )
