"""``GET /v1/models``: the base model and every stored adapter the caller may use (``parent`` = the base model)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.api.auth import Key
from server.api.schemas import ModelCard, ModelList
from server.api.state import State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State, key: Key) -> ModelList:
    """The base model first, then adapters by name (with API keys: those the key may use)."""
    base = state.serving.model_name
    created = state.serving.created
    cards = [ModelCard(id=base, created=created, root=base)]
    for name in await asyncio.to_thread(state.serving.store.names):  # a shared store lists over the network
        if key is None or key.allows(name):
            cards.append(ModelCard(id=name, created=created, root=base, parent=base))
    return ModelList(data=cards)
