"""The admin bearer token. Without one, admin routes answer only when the server is bound to loopback."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.api.errors import ApiError
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
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes time independent of where the strings differ
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(
            401,
            "a valid admin token is required (Authorization: Bearer <token>)",
            "invalid_admin_token",
            headers={"WWW-Authenticate": "Bearer"},
        )


Admin = Annotated[None, Depends(require_admin)]
