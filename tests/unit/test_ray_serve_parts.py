"""The Ray Serve package's parts that need no cluster: Serve args to ``loraplex serve`` flags, the in-process
ASGI bridge a replica runs requests through, and how the ingress reads the adapter a request names."""

from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.ray_serve.asgi import AsgiBridge, HttpCall, ResponseHead
from server.ray_serve.flags import config_from_flags, flags_from_args
from server.ray_serve.routing import adapter_named


def test_serve_args_become_the_cli_flags_and_config():
    args = {"adapter_store": "s3://bucket/p", "s3-endpoint-url": "http://s3:9000", "max_loras": 4,
            "metrics": True, "vllm_metrics": False, "api_keys": None}
    flags = flags_from_args(args)
    assert flags == ["--adapter-store", "s3://bucket/p", "--s3-endpoint-url", "http://s3:9000", "--max-loras", "4",
                     "--metrics", "on", "--vllm-metrics", "off"]
    config = config_from_flags(flags)
    assert config.lora.store_url == "s3://bucket/p" and config.lora.s3_endpoint_url == "http://s3:9000"
    assert config.lora.max_loras == 4 and config.metrics.enabled and not config.metrics.vllm_compatible


@pytest.mark.parametrize(("flags", "message"), [
    (["--max-loras", "many"], "invalid int value: 'many'"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag 1"),
    (["--max-loras", "0"], "max_loras must be 1..4096"),
    (["--adapter-store", "http://not-s3"], "not an s3:// URL"),
])
def test_bad_flags_are_a_value_error_with_the_cli_message(flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_flags(flags)


def test_the_bind_address_is_serves_not_a_flag():
    for key in ("host", "port"):
        with pytest.raises(ValueError, match="http_options"):
            flags_from_args({key: "x"})


def _app(disconnected: asyncio.Event) -> Starlette:
    async def echo(request: Request):
        body = await request.json()
        return JSONResponse({"got": body, "query": request.url.query, "auth": request.headers.get("authorization")},
                            status_code=201, headers={"x-a": "1"})

    async def endless(request: Request):
        async def ticks():
            n = 0
            while True:
                yield f"data: {n}\n\n".encode()
                n += 1
                await asyncio.sleep(0.01)

        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        request.state.watch = asyncio.ensure_future(watch())
        return StreamingResponse(ticks(), media_type="text/event-stream")

    async def broken(request: Request):
        raise RuntimeError("boom")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/endless", endless),
                             Route("/broken", broken)])


async def _all(bridge: AsgiBridge, call: HttpCall) -> tuple[ResponseHead, bytes]:
    items = [item async for item in bridge.exchange(call)]
    assert isinstance(items[0], ResponseHead) and all(isinstance(i, bytes) for i in items[1:])
    return items[0], b"".join(items[1:])


def test_the_bridge_runs_a_request_through_the_app():
    async def run():
        bridge = AsgiBridge(_app(asyncio.Event()))
        call = HttpCall("POST", "/echo", b"x=1", ((b"authorization", b"Bearer k"),
                                                  (b"content-type", b"application/json")), b'{"a": [1]}')
        head, body = await _all(bridge, call)
        assert head.status == 201 and head.header("X-A") == "1" and head.header("content-type") == "application/json"
        assert body == b'{"got":{"a":[1]},"query":"x=1","auth":"Bearer k"}'
        head, _ = await _all(bridge, HttpCall("GET", "/missing"))
        assert head.status == 404

    asyncio.run(run())


def test_closing_the_exchange_early_is_a_client_disconnect():
    async def run():
        disconnected = asyncio.Event()
        bridge = AsgiBridge(_app(disconnected))
        replies = bridge.exchange(HttpCall("GET", "/endless"))
        head = await anext(replies)
        assert head.status == 200 and head.header("content-type").startswith("text/event-stream")
        assert await anext(replies) == b"data: 0\n\n"
        await replies.aclose()  # what a cancelled Ray call does to the replica's generator
        await asyncio.wait_for(disconnected.wait(), 5)
        await bridge.aclose(5)

    asyncio.run(run())


def test_an_unhandled_error_is_a_500_response():
    async def run():
        head, body = await _all(AsgiBridge(_app(asyncio.Event())), HttpCall("GET", "/broken"))
        assert head.status == 500 and body == b"Internal Server Error"

    asyncio.run(run())


def test_the_ingress_routes_by_the_adapter_model_names():
    assert adapter_named(b'{"model": "sql", "prompt": "x"}', "tiny") == "sql"
    assert adapter_named(b'{"model": "tiny:sql"}', "tiny") == "sql"
    for base in (b'{"model": "tiny"}', b'{"model": ""}', b'{"prompt": "x"}', b'{"model": 3}', b"[1]", b"{not json",
                 b'{"model": "tiny:"}'):
        assert adapter_named(base, "tiny") is None, base
