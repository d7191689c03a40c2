"""Errors in OpenAI's body shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store.errors import AdapterError, AdapterNotFound, StoreConflict, StoreUnavailable, UploadTooLarge
from server.adapters.errors import AdapterBusy, AdapterInUse, NameConflict, PinLimitReached
from server.api.request_errors import request_error

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout_error"}


_UNPARSABLE_BODY = "There was an error parsing the body"  # FastAPI's message when it cannot decode a body


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers


def unavailable(message: str, code: str, retry_after: int = 1) -> ApiError:
    """503 with ``Retry-After``: the server could not do it now but may shortly."""
    return ApiError(503, message, code, headers={"Retry-After": str(retry_after)})


_ADAPTER_STATUS: dict[type[AdapterError], int] = {
    AdapterNotFound: 404, UploadTooLarge: 413, StoreConflict: 409, NameConflict: 409, AdapterInUse: 409,
    PinLimitReached: 409,
}


def adapter_error(exc: AdapterError, param: str | None = None) -> ApiError:
    """The HTTP error for what the store or the adapter registry raised (400 unless it says otherwise)."""
    param = param or getattr(exc, "param", None)
    if isinstance(exc, StoreUnavailable | AdapterBusy):
        error = unavailable(str(exc), exc.code)
        error.param = param
        return error
    return ApiError(_ADAPTER_STATUS.get(type(exc), 400), str(exc), exc.code, param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, before_validation: Callable[[Request], ApiError | None]) -> None:
    """``before_validation``: an error that outranks a malformed body (e.g. a missing API key's 401)."""
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
        return await _api_error(request, adapter_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        earlier = before_validation(request)
        if earlier is not None:
            return error_response(earlier.status, earlier.message, earlier.code, earlier.param, earlier.headers)
        problem = request_error(exc.errors(), exc.body, request.headers.get("content-type"))
        return error_response(problem.status, problem.message, problem.code, problem.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:  # FastAPI's own, e.g. a body not UTF-8
            earlier = before_validation(request)
            if earlier is not None:
                return error_response(earlier.status, earlier.message, earlier.code, earlier.param, earlier.headers)
            return error_response(400, "the body is not valid JSON (it must be UTF-8 text)", "invalid_json")
        return error_response(
            exc.status_code, str(exc.detail), getattr(exc, "code", None), headers=getattr(exc, "headers", None)
        )
