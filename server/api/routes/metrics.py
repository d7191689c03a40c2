"""``GET /metrics``: the Prometheus exposition of :mod:`server.metrics` (no API key needed)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.errors import ApiError
from server.api.state import State

router = APIRouter()
log = logging.getLogger(__name__)


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Every ``loraplex_`` metric (and the ``vllm:`` subset when enabled)."""
    m = state.serving.metrics
    if m is None:
        raise ApiError(404, "metrics are disabled (--metrics off)", "metrics_disabled")
    try:
        m.stored.set(len(await asyncio.to_thread(state.serving.store.names)))
    except OSError:
        log.warning("metrics: could not count the stored adapters; keeping the last count", exc_info=True)
    # Rendering takes milliseconds with many series: off the event loop, so streams do not stall.
    return Response(await asyncio.to_thread(generate_latest, m.registry), media_type=CONTENT_TYPE_LATEST)
