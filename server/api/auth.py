"""Who may call what.

The admin bearer token guards ``/admin``; without one, admin routes answer
only when the server is bound to loopback. Inference API keys (when any are
configured) guard the completion and model routes; see :mod:`server.api.keys`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import ApiError
from server.api.keys import ApiKey
from server.api.state import State

KEYED_OUTSIDE_V1 = ("/tokenize", "/detokenize")  # vLLM's paths; they need an API key like /v1 routes


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
    # Digests of equal length: the comparison's time depends on neither where nor whether the lengths differ.
    if given is None or not hmac.compare_digest(_digest(given), _digest(token)):
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


def unauthorized(request: Request) -> ApiError | None:
    """The 401 an inference route would answer, for errors raised before its dependencies run (a malformed body)."""
    state = getattr(request.app.state, "loraplex", None)
    path = request.url.path
    keyed = path.startswith("/v1/") or path in KEYED_OUTSIDE_V1
    if state is None or not keyed or "lora_adapter" in path:
        return None
    try:
        require_key(request, state)
    except ApiError as exc:
        return exc
    return None


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _bearer(request: Request) -> str | None:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" and given.strip() else None


Key = Annotated[ApiKey | None, Depends(require_key)]
