"""What the routes share: set on the app by the lifespan, read through FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import ApiError
from server.api.registry import AdapterRegistry
from server.engine.builder import Serving
from server.engine.client import EngineClient


@dataclass
class AppState:
    serving: Serving
    client: EngineClient
    registry: AdapterRegistry
    ready: bool = False


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "loraplex", None)
    if state is None or not state.ready:
        raise ApiError(503, "the server is starting; retry shortly", "not_ready")
    return state


State = Annotated[AppState, Depends(get_state)]
