"""``/admin/adapters``: upload, list, inspect, load (and pin), unpin, evict and delete adapters.

Every route needs the admin token (see :mod:`server.api.auth`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

from fastapi import APIRouter, Body, Query
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from adapters_store.backend import StoredAdapter
from adapters_store.errors import AdapterError, AdapterNotFound, InvalidAdapterName
from adapters_store.validation import AdapterSummary
from server.adapters.residency import AdapterRecord, Snapshot
from server.api.admin_schemas import AdapterInfo, AdapterList, LoadRequest, StoreCheckInfo, UploadResult
from server.api.auth import Admin
from server.api.errors import ApiError
from server.api.state import AppState, State
from server.api.upload_log import UploadAttempt

router = APIRouter(prefix="/admin/adapters", tags=["admin"])
MAX_FORM_PARTS = 16


@router.post("", response_model=UploadResult, status_code=201)
async def upload_adapter(
    _: Admin, state: State, http: HttpRequest, dry_run: Annotated[bool, Query()] = False
) -> JSONResponse:
    """Upload an adapter: multipart with a ``name`` field and ``files`` (the two PEFT files, or one
    ``.tar.gz``/``.zip`` archive). Fully validated before anything is stored; ``dry_run=true`` stores
    nothing. Re-uploading a name makes a new version; running requests keep the old one.
    """
    with UploadAttempt("upload") as attempt:
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(415, "send multipart/form-data: a 'name' field and 'files' parts", "invalid_upload")
        try:
            form = await http.form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
        except (MultiPartException, MultipartParseError) as exc:
            raise ApiError(400, f"malformed multipart body: {exc}", "invalid_upload") from None
        try:
            name = attempt.name = form.get("name")
            if not isinstance(name, str) or not name:
                raise ApiError(400, "the upload needs a 'name' field", "invalid_upload", "name")
            files = [(f.filename or "", f.file) for _, f in form.multi_items() if isinstance(f, UploadFile)]
            uploaded = await state.registry.upload(name, files, dry_run)
        finally:
            await form.close()
    if dry_run:
        info = _info(uploaded.adapter, uploaded.summary, None, None)
        body = UploadResult(**info.model_dump(), created=False, dry_run=True)
        return JSONResponse(body.model_dump(), status_code=200)
    [info] = await _describe(state, [uploaded.adapter.name])
    body = UploadResult(**info.model_dump(), created=uploaded.created)
    return JSONResponse(body.model_dump(), status_code=201 if uploaded.created else 200)


@router.get("", response_model=AdapterList)
async def list_adapters(_: Admin, state: State) -> AdapterList:
    """Every stored adapter with its tier, pin, in-flight requests and load history; invalid ones with why.
    ``store_check``: how far the start-up check of the store has got."""
    names = await asyncio.to_thread(state.serving.store.names)
    snapshot = await state.registry.snapshot()
    report = state.registry.report
    return AdapterList(
        data=await _describe(state, names, single=False, snapshot=snapshot),
        slots_total=snapshot.slots_total,
        slots_in_use=snapshot.slots_in_use,
        host_bytes=snapshot.host_bytes,
        host_bytes_limit=snapshot.host_bytes_limit,
        store_check=StoreCheckInfo(**dataclasses.asdict(report.check)) if report else None,
    )


@router.get("/{name}", response_model=AdapterInfo)
async def get_adapter(name: str, _: Admin, state: State) -> AdapterInfo:
    await asyncio.to_thread(state.registry.find, name)
    [info] = await _describe(state, [name])
    return info


@router.post("/{name}/load", response_model=AdapterInfo)
async def load_adapter(
    name: str, _: Admin, state: State, body: Annotated[LoadRequest | None, Body()] = None
) -> AdapterInfo:
    """Bring the adapter onto a device slot now; ``{"pin": true}`` keeps it there until unpinned."""
    await state.registry.load(name, pin=bool(body and body.pin))
    [info] = await _describe(state, [name])
    return info


@router.post("/{name}/unpin", response_model=AdapterInfo)
async def unpin_adapter(name: str, _: Admin, state: State) -> AdapterInfo:
    await state.registry.unpin(name)
    [info] = await _describe(state, [name])
    return info


@router.post("/{name}/evict", response_model=AdapterInfo)
async def evict_adapter(name: str, _: Admin, state: State) -> AdapterInfo:
    """Drop the adapter from device slots and host memory (unpinning it); it stays in the store.
    Waits for running requests that use it; 409 if they do not finish in time."""
    await state.registry.evict(name)
    [info] = await _describe(state, [name])
    return info


@router.delete("/{name}")
async def delete_adapter(name: str, _: Admin, state: State) -> dict:
    """New requests for it get 404 at once; waits for running ones (409 if they do not finish in time),
    then removes it from every tier and the store."""
    adapter = await state.registry.delete(name)
    return {"id": adapter.name, "version": adapter.version, "object": "adapter", "deleted": True}


async def _describe(
    state: AppState, names: list[str], single: bool = True, snapshot: Snapshot | None = None
) -> list[AdapterInfo]:
    """``single``: one adapter asked for by name (its errors are the answer) rather than a listing."""
    registry, catalog = state.registry, state.registry.catalog
    snapshot = snapshot or await registry.snapshot()

    def gather() -> list[AdapterInfo]:
        rows = []
        for name in names:
            try:
                adapter = registry.store.get(name)
            except AdapterNotFound:
                continue  # deleted meanwhile
            except AdapterError as exc:
                if single:
                    raise
                # e.g. a folder placed by hand under a name no request can use: listed, with why
                kind = "invalid" if isinstance(exc, InvalidAdapterName) else "failed"
                rows.append(AdapterInfo(name=name, version=None, state=kind, tier="disk", error=str(exc)))
                continue
            try:
                # A shared store's adapters that this replica never used have no local files: listed from
                # what is known of them, not downloaded for the listing.
                cached = single or registry.store.cached(adapter)
                summary = catalog.summary(adapter) if cached else catalog.known(adapter)
            except AdapterNotFound:
                continue  # deleted meanwhile
            except AdapterError as exc:
                if single:
                    raise
                summary = str(exc)  # one adapter's problem does not fail the whole list
            rows.append(_info(adapter, summary, snapshot.records.get(adapter.key), snapshot))
        return rows

    return await asyncio.to_thread(gather)


def _info(
    adapter: StoredAdapter, summary: AdapterSummary | str | None, where: AdapterRecord | None, snapshot: Snapshot | None
) -> AdapterInfo:
    """``where``: the version's record; ``snapshot``: what the engine knows of every version of the name."""
    fields = summary.as_dict() if isinstance(summary, AdapterSummary) else {}
    state = "invalid" if isinstance(summary, str) else where.state.value if where else "stored"
    error = summary if isinstance(summary, str) else where.error if where else None
    return AdapterInfo(
        name=adapter.name,
        version=adapter.version,
        state=state,
        tier=where.tier if where else "disk",
        pinned=bool(where and where.pinned),
        in_flight=snapshot.in_flight(adapter.name) if snapshot else 0,
        last_used=snapshot.last_used(adapter.name) if snapshot else None,
        load_count=where.loads if where else 0,
        activations=where.activations if where else 0,
        last_load_ms=_ms(where.last_load_s) if where else None,
        last_activation_ms=_ms(where.last_activation_s) if where else None,
        error=error,
        **fields,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
