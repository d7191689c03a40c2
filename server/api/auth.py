"""Who may call what.

The admin bearer token guards ``/admin``; without one, admin routes answer
only when the server is bound to loopback. Inference API keys (when any are
configured) guard the completion and model routes; see :mod:`server.api.keys`.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import ApiError
from server.api.keys import ApiKey
from server.api.state import State


def require_admin(request: Request, state: State) -> None:
    config = state.serving.config
    token = config.admin.token
    if token is None:
        if not config.http.loopback:
            raise ApiError(
                403,
                "the admin API is disabled: the server is not bound to loopback and no admin token is set "
                "(set LORAPLEX_ADMIN_TOKEN)",
                "admin_disabled",
            )
        return
    given = _bearer(request)
    # compare_digest takes time independent of where the strings differ
    if given is None or not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode()):
        raise ApiError(
            401,
            "a valid admin token is required (Authorization: Bearer <token>)",
            "invalid_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )


Admin = Annotated[None, Depends(require_admin)]


def require_key(request: Request, state: State) -> ApiKey | None:
    """The caller's API key when keys are configured (401 without a valid one); None when they are not."""
    if not state.keys.enabled:
        return None
    given = _bearer(request) or request.headers.get("x-api-key")
    key = state.keys.check(given) if given else None
    if key is None:
        raise ApiError(
            401,
            "a valid API key is required (Authorization: Bearer <key>)",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return key


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


Key = Annotated[ApiKey | None, Depends(require_key)]
