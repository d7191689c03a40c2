"""The engine deployment: each replica runs our whole serving stack (the app, its engine, its adapter tiers).

Requests reach a replica through :meth:`LoraplexReplica.forward` and go through
our own FastAPI app, so validation, auth, errors, streaming and metrics are the
same as under ``loraplex serve``. A request for an adapter carries the adapter's
name as Ray's multiplexed model id; once this replica has answered one (2xx),
Ray's multiplexed loader makes the adapter resident here and Ray's router sends
the next requests for it to this replica.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

from ray import serve

from server.api.app import create_app
from server.api.state import AppState
from server.engine.builder import build_serving_in_fresh_thread
from server.ray_serve.asgi import AsgiBridge, HttpCall, ResponseHead
from server.ray_serve.flags import config_from_flags

log = logging.getLogger(__name__)
REPLICA_HEADER = b"x-loraplex-replica"


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
class LoraplexReplica:
    async def __init__(self, flags: list[str], max_adapters: int) -> None:
        """``flags``: those of ``loraplex serve``; ``max_adapters``: adapters this replica claims for routing
        (Ray forgets the least recently used past it; our own tiers decide what stays in memory)."""
        config = config_from_flags(flags)
        _log_to_stderr(config.http.log_level.upper())
        for folder in (config.lora.adapters_dir, config.model.cache_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._shutdown_timeout = config.limits.shutdown_timeout
        self.app = create_app(lambda: build_serving_in_fresh_thread(config))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # loads the model and starts the engine
        self._state: AppState = self.app.state.loraplex
        self._bridge = AsgiBridge(self.app)
        self._name = serve.get_replica_context().replica_tag
        self._claims: set[asyncio.Task] = set()

        async def make_resident(adapter: str) -> str:
            # Ray's multiplexed loader: returns something cheap; the weights live in our adapter tiers.
            return (await self._state.registry.load(adapter, pin=False)).ref

        self._claim = serve.multiplexed(max_num_models_per_replica=max_adapters)(make_resident)

    async def base_model(self) -> str:
        """The base model's served name: requests naming it (or no model) carry no multiplexed id."""
        return self._state.serving.model_name

    async def forward(self, call: HttpCall) -> AsyncIterator[ResponseHead | bytes]:
        """Run ``call`` through our app: the response head (naming this replica), then the body's chunks."""
        adapter = serve.get_multiplexed_model_id()
        async for item in self._bridge.exchange(call):
            if isinstance(item, ResponseHead):
                if adapter and item.status < 400:
                    self._spawn_claim(adapter)
                item = ResponseHead(item.status, (*item.headers, (REPLICA_HEADER, self._name.encode())))
            yield item

    def check_health(self) -> None:
        if not self._state.ready:
            raise RuntimeError("the engine is not serving")

    async def __del__(self) -> None:
        """Serve calls this when the replica stops, after its requests drained (graceful_shutdown_timeout_s)."""
        await self._bridge.aclose(self._shutdown_timeout)
        await self._lifespan.__aexit__(None, None, None)  # aborts what still runs, stops the engine
        log.info("replica %s stopped", self._name)

    def _spawn_claim(self, adapter: str) -> None:
        """Tell Ray (in the background: the response does not wait) that ``adapter`` is resident here.
        Only after our app accepted a request for it, so unknown names and callers without a valid key
        make nothing resident."""
        task = asyncio.create_task(self._claim(adapter))
        self._claims.add(task)
        task.add_done_callback(self._claimed)

    def _claimed(self, task: asyncio.Task) -> None:
        self._claims.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not keep an adapter resident for routing: %s", task.exception())


def _log_to_stderr(level: str) -> None:
    """Our packages' logs to the worker's stderr (Ray keeps it in the replica's log file)."""
    for name in ("server", "adapters_store"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(level)
