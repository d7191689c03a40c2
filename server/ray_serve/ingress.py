"""The OpenAI-compatible front door: reads ``model`` from the body and lets Ray's router pick the replica.

A request naming an adapter goes to the engine deployment with the adapter's
name as Ray's multiplexed model id, so Ray prefers a replica that already holds
it; base-model requests carry no id. Responses (status, headers, error bodies,
SSE streams) are the replica's, unchanged, plus ``x-loraplex-replica``.
Admin routes and /metrics are per replica and not served here.
"""

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from server.api.errors import ApiError, install_error_handlers, unavailable
from server.ray_serve.asgi import HttpCall, ResponseHead
from server.ray_serve.routing import adapter_named

log = logging.getLogger(__name__)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"upgrade"})


def _replica_failed(exc: Exception, what: str) -> ApiError:
    log.error("a replica failed to answer %s", what, exc_info=exc)
    return ApiError(502, f"the replica failed to answer ({type(exc).__name__})", "replica_error")


async def _rest(replies: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in replies:
            yield chunk
        finished = True
    finally:
        if not finished:
            replies.cancel()  # the client went away: the replica's app sees a disconnect and aborts


api = FastAPI(title="loraplex on Ray Serve", version="0.1.0")  # Serve binds these routes to the class below
install_error_handlers(api, before_validation=lambda _: None)
# Serve pickles the routes when the class is decorated: everything they use is defined above.


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
        return await self._generate(request, "/v1/completions")

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        """OpenAI chat completions, routed by the adapter ``model`` names."""
        return await self._generate(request, "/v1/chat/completions")

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        """The base model and every adapter in the shared store (from any replica)."""
        return await self._forward(request, "/v1/models")

    @api.get("/health")
    async def health(self, request: Request) -> Response:
        return await self._forward(request, "/health")

    @api.get("/ready")
    async def ready(self, request: Request) -> Response:
        return await self._forward(request, "/ready")

    async def _generate(self, request: Request, path: str) -> Response:
        body = await self._read(request)
        if self._base_model is None:
            try:
                self._base_model = await self.engine.base_model.remote()
            except Exception as exc:
                raise _replica_failed(exc, "base_model") from None
        return await self._forward(request, path, body, adapter_named(body, self._base_model))

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

    async def _forward(self, request: Request, path: str, body: bytes = b"", adapter: str | None = None) -> Response:
        """``path`` on a replica (one that holds ``adapter``, if Ray knows one); its response, as it is."""
        headers = tuple((k, v) for k, v in request.scope["headers"] if k not in HOP_BY_HOP)
        call = HttpCall(request.method, path, request.scope.get("query_string", b""), headers, body)
        options = {"stream": True} | ({"multiplexed_model_id": adapter} if adapter else {})
        replies: DeploymentResponseGenerator = self.engine.options(**options).forward.remote(call)
        try:
            head: ResponseHead = await replies.__anext__()
            if (head.header("content-type") or "").startswith("text/event-stream"):
                response: Response = StreamingResponse(_rest(replies), status_code=head.status)
            else:
                response = Response(b"".join([chunk async for chunk in replies]), status_code=head.status)
        except asyncio.CancelledError:
            replies.cancel()  # the client went away: the replica's app sees a disconnect and aborts
            raise
        except BackPressureError:
            raise unavailable("every replica is at its request limit; retry shortly", "replicas_busy") from None
        except Exception as exc:
            raise _replica_failed(exc, f"{request.method} {path}") from None
        response.raw_headers.extend((k, v) for k, v in head.headers if k not in HOP_BY_HOP)
        return response
