"""``GET /version``: the server's version (vLLM's route), open like ``/health`` and answered while starting."""

from __future__ import annotations

from fastapi import APIRouter

from server.version import package_version

router = APIRouter()


@router.get("/version")
async def get_version() -> dict:
    """``{"version": "<loraplex's package version>"}``."""
    return {"version": package_version()}
