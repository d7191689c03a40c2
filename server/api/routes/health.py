"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.errors import error_response

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    """The process is alive (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    """The model is loaded and warmed up; 503 until then."""
    state = getattr(request.app.state, "loraplex", None)
    if state is None or not state.ready:
        return error_response(503, "the model is still loading", "not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "model": state.serving.model_name}
