"""What the routes share: set on the app by the lifespan, read through FastAPI dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from server.adapters.registry import AdapterRegistry
from server.api.admission import Admission
from server.api.errors import unavailable
from server.api.keys import ApiKeys
from server.api.schemas import MAX_COMPOSED
from server.engine.builder import Serving
from server.engine.client import EngineClient


@dataclass
class AppState:
    serving: Serving
    client: EngineClient
    registry: AdapterRegistry
    keys: ApiKeys
    admission: Admission
    ready: bool = False

    @property
    def max_composed(self) -> int:
        """Adapters one request may compose: each needs its own device slot."""
        return min(MAX_COMPOSED, self.serving.config.lora.max_loras)


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "loraplex", None)
    if state is None or not state.ready:
        raise unavailable("the server is starting; retry shortly", "not_ready", retry_after=5)
    return state


State = Annotated[AppState, Depends(get_state)]
