"""``GET /v1/models``: the base model and every stored adapter the caller may use (``parent`` = the base model);
adapters that cannot be served are listed as such (``status: "invalid"`` and the ``error``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse

from adapters_store.errors import AdapterError
from server.api.auth import Key
from server.api.errors import ApiError, adapter_error
from server.api.schemas import ModelCard, ModelList
from server.api.state import AppState, State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State, key: Key) -> ModelList:
    """The base model first, then adapters by name (with API keys: those the key may use), each name once.
    An adapter a request cannot use (found invalid at the version stored, or a name no request can reach)
    carries ``status: "invalid"`` and the ``error``; one stored under the base model's name is left out."""
    base = state.serving.model_name
    cards = [model_card(state, base)]
    seen = {base}
    for name, problem in await asyncio.to_thread(state.registry.listed):  # a shared store lists over the network
        if name not in seen and (key is None or key.allows(name)):
            seen.add(name)
            cards.append(model_card(state, name, problem))
    return ModelList(data=cards)


@router.get("/v1/models/{name:path}", response_model=ModelCard)
async def retrieve_model(name: str, state: State, key: Key, http: Request) -> ModelCard | RedirectResponse:
    """One model's card, as ``/v1/models`` lists it: ``name`` is the base model's id, or an adapter's
    (``base:adapter`` names it too; one found invalid has ``status: "invalid"`` and the ``error``). 404 for an
    unknown id; 403 for an adapter outside the API key's, as generation answers."""
    if not name:  # "/v1/models/": the listing, as the trailing slash was redirected before this route
        return RedirectResponse(str(http.url.replace(path="/v1/models")), status_code=307)
    adapter_name = state.registry.adapter_named_by(name)
    if adapter_name is None:
        return model_card(state, state.serving.model_name)
    if key is not None and not key.allows(adapter_name):
        raise ApiError(403, f"this API key may not use adapter {adapter_name[:200]!r}", "adapter_not_allowed", "model")
    try:
        adapter = await asyncio.to_thread(state.registry.find, adapter_name)
    except AdapterError as exc:
        raise adapter_error(exc, "model") from None  # 404 naming it
    problem = state.registry.catalog.known(adapter)
    return model_card(state, adapter_name, problem if isinstance(problem, str) else None)


def model_card(state: AppState, model_id: str, problem: str | None = None) -> ModelCard:
    """The card of the base model (its served name) or of an adapter (any other name; not looked up here),
    marked invalid with ``problem`` when a request cannot use it."""
    base = state.serving.model_name
    parent = None if model_id == base else base
    card = ModelCard(id=model_id, created=state.serving.created, root=base, parent=parent)
    if problem is not None:
        card = ModelCard(**card.model_dump(), status="invalid", error=" ".join(problem.split()))
    return card
