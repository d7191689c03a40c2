"""``GET /v1/models``: the base model and every stored adapter the caller may use (``parent`` = the base model)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from server.api.auth import Key
from server.api.errors import ApiError
from server.api.schemas import ModelCard, ModelList
from server.api.state import AppState, State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State, key: Key) -> ModelList:
    """The base model first, then adapters by name (with API keys: those the key may use). Adapters a
    request could not use are left out: those found invalid, and any whose name is the base model's."""
    base = state.serving.model_name
    cards = [model_card(state, base)]
    seen = {base}
    for name in await asyncio.to_thread(state.registry.offered_names):  # a shared store lists over the network
        if name not in seen and (key is None or key.allows(name)):
            seen.add(name)
            cards.append(model_card(state, name))
    return ModelList(data=cards)


@router.get("/v1/models/{name:path}", response_model=ModelCard)
async def retrieve_model(name: str, state: State, key: Key, http: Request) -> ModelCard | RedirectResponse:
    """One model's card, as ``/v1/models`` lists it: ``name`` is the base model's id, or an adapter's
    (``base:adapter`` names it too). 404 for an unknown id or an adapter found invalid; 403 for an adapter
    outside the API key's, as generation answers."""
    if not name:  # "/v1/models/": the listing, as the trailing slash was redirected before this route
        return RedirectResponse(str(http.url.replace(path="/v1/models")), status_code=307)
    adapter_name = state.registry.base_alias(name)
    if adapter_name is None:
        return model_card(state, state.serving.model_name)
    if key is not None and not key.allows(adapter_name):
        raise ApiError(403, f"this API key may not use adapter {adapter_name[:200]!r}", "adapter_not_allowed", "model")
    adapter = await asyncio.to_thread(state.registry.find, adapter_name, "model")  # 404 naming it
    problem = state.registry.known(adapter)
    if isinstance(problem, str):
        raise ApiError(404, f"adapter {adapter_name[:200]!r} cannot be served: {problem}", "invalid_adapter", "model")
    return model_card(state, adapter_name)


def model_card(state: AppState, model_id: str) -> ModelCard:
    """The card of the base model (its served name) or of an adapter (any other name; not looked up here)."""
    base = state.serving.model_name
    parent = None if model_id == base else base
    return ModelCard(id=model_id, created=state.serving.created, root=base, parent=parent)
