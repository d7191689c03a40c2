"""The OpenAI-compatible front door: reads ``model`` from the body and lets Ray's router pick the replica.

A request naming an adapter goes to the engine deployment with the adapter's
name as Ray's multiplexed model id, so Ray prefers a replica that already holds
it; base-model requests carry no id. Responses (status, headers, error bodies,
SSE streams) are the replica's, unchanged, plus ``x-loraplex-replica``.
Admin routes and /metrics are per replica and not served here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.api.errors import ApiError, install_error_handlers, unavailable
from server.ray_serve.asgi import HttpCall, ResponseHead

log = logging.getLogger(__name__)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"})

api = FastAPI(title="loraplex on Ray Serve", version="0.1.0")  # Serve binds these routes to the class below
install_error_handlers(api, before_validation=lambda _: None)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, max_request_bytes: int) -> None:
        self.engine = engine
        self.max_request_bytes = max_request_bytes
        self._base_model: str | None = None

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI completions, routed by the adapter ``model`` names."""
        return await self._generate(request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions, routed by the adapter ``model`` names."""
        return await self._generate(request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The base model and every adapter in the shared store (from any replica)."""
        return await self._forward(request, b"", adapter=None)

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        return await self._forward(request, b"", adapter=None)

    @api.get("/ready")
    async def ready(self, request: Request) -> Response:
        return await self._forward(request, b"", adapter=None)

    async def _generate(self, request: Request) -> Response:
        body = await self._read(request)
        return await self._forward(request, body, adapter=adapter_named(body, await self._base()))

    async def _base(self) -> str:
        if self._base_model is None:
            self._base_model = await self.engine.base_model.remote()
        return self._base_model

    async def _read(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"the request body is larger than the limit of {self.max_request_bytes} bytes",
                             "request_too_large")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        return bytes(body)

    async def _forward(self, request: Request, body: bytes, adapter: str | None) -> Response:
        headers = tuple((k, v) for k, v in request.scope["headers"] if k not in HOP_BY_HOP)
        call = HttpCall(request.method, request.url.path, request.scope.get("query_string", b""), headers, body)
        options = {"stream": True} | ({"multiplexed_model_id": adapter} if adapter else {})
        replies: DeploymentResponseGenerator = self.engine.options(**options).forward.remote(call)
        try:
            head: ResponseHead = await replies.__anext__()
        except BackPressureError:
            raise unavailable("every replica is at its request limit; retry shortly", "replicas_busy") from None
        except Exception as exc:
            log.exception("a replica failed to answer %s %s", request.method, request.url.path)
            raise ApiError(502, f"the replica failed to answer ({type(exc).__name__})", "replica_error") from None
        if (head.header("content-type") or "").startswith("text/event-stream"):
            response: Response = StreamingResponse(_rest(replies), status_code=head.status)
        else:
            response = Response(b"".join([chunk async for chunk in replies]), status_code=head.status)
        response.raw_headers.extend((k, v) for k, v in head.headers if k not in HOP_BY_HOP)
        return response


def adapter_named(body: bytes, base_model: str) -> str | None:
    """The adapter a request's ``model`` names, as the replica's registry reads it: None for the base model
    ('' or its name, or no ``model``), the part after ``<base>:`` otherwise. An unreadable body: None
    (the replica answers with the error)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(model, str) or model in ("", base_model):
        return None
    return model.removeprefix(base_model + ":") or None


async def _rest(replies: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in replies:
            yield chunk
        finished = True
    finally:
        if not finished:
            replies.cancel()  # the client went away: the replica's app sees a disconnect and aborts
