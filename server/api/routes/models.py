"""``GET /v1/models``: the base model and every stored adapter (``parent`` = the base model)."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.schemas import ModelCard, ModelList
from server.api.state import State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    """The base model first, then adapters by name."""
    base = state.serving.model_name
    created = state.serving.created
    cards = [ModelCard(id=base, created=created, root=base)]
    for name in state.serving.store.names():
        cards.append(ModelCard(id=name, created=created, root=base, parent=base))
    return ModelList(data=cards)
