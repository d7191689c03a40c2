"""One HTTP generation request on the engine: admission, its prompts' engine requests, and their outputs.

Shared by completions and chat completions. The engine requests of one HTTP
request are aborted, and their KV cache, slots and adapter leases freed, when
the client disconnects (noticed within one engine step while outputs flow),
when the request's timeout passes, or when anything else ends the response early.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError, error_body, unavailable
from server.api.schemas import GenerationFields, PromptTokensDetails, Usage
from server.api.state import AppState
from server.api.targets import Target
from server.engine.client import Outputs
from server.engine.messages import RequestOutput
from server.engine.request import ErrorKind, Request, SamplingParams

TIMEOUT_STATUS = 504


@dataclass
class Choice:
    """One prompt's result so far."""

    text: str = ""
    last: RequestOutput | None = None

    @property
    def finish_reason(self) -> str | None:
        out = self.last
        return out.finish_reason.value if out and out.finished and out.finish_reason else None


def sampling_params(
    body: GenerationFields, prompt_len: int, max_tokens: int | None, max_model_len: int
) -> SamplingParams:
    """``max_tokens`` None means the rest of the context. 400 naming the limit when it does not fit."""
    if prompt_len >= max_model_len:
        raise ApiError(
            400,
            f"the prompt has {prompt_len} tokens; the context limit is {max_model_len} tokens (prompt + max_tokens)",
            "context_length_exceeded",
            "prompt",
        )
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context limit of "
            f"{max_model_len} tokens",
            "context_length_exceeded",
            "max_tokens",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_sampling_parameters") from None


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, param: str, **kwargs) -> list[int]:
    """Token ids of ``text``; 400 if the tokenizer refuses it."""
    try:
        return tokenizer(text, **kwargs)["input_ids"]
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"{param} cannot be tokenized: {exc}", "invalid_prompt", param) from None


def request_timeout(state: AppState, body: GenerationFields) -> float | None:
    """The request's own ``timeout``, never longer than the server's ``--request-timeout`` (0 = none)."""
    limit = state.serving.config.limits.request_timeout or None
    if body.timeout is None or limit is None:
        return body.timeout or limit
    return min(body.timeout, limit)


def request_error(out: RequestOutput) -> ApiError:
    """The HTTP error for a request the engine failed."""
    message = out.error or "the request failed"
    kind = out.error_kind or ErrorKind.INVALID
    if kind is ErrorKind.UNAVAILABLE:
        return unavailable(message, kind.value, retry_after=5)
    return ApiError(500 if kind is ErrorKind.INTERNAL else 400, message, kind.value)


class Generation:
    """The engine requests made for one HTTP request (one per prompt), sharing one target."""

    def __init__(
        self,
        state: AppState,
        target: Target,
        prompts: list[list[int]],
        params: list[SamplingParams],
        id_prefix: str,
        http: HttpRequest,
        timeout: float | None,
    ) -> None:
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.target = target
        self.choices = [Choice() for _ in prompts]
        self._http = http
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._pending: list[tuple[int, RequestOutput]] = []  # outputs read before the response started
        requests = [
            Request(
                request_id=f"{self.id}-{i}",
                prompt_ids=ids,
                params=p,
                selection=target.selection,
            )
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))
        ]
        try:
            state.admission.enter(len(requests))  # 429 past the queue bound: nothing submitted, nothing held
        except ApiError as exc:
            if exc.status in (429, 503) and state.serving.metrics is not None:  # a 400 is not a rejection
                for request in requests:
                    state.serving.metrics.rejected(request.selection.kind)
            raise
        self._outputs: Outputs = state.client.generate_many(requests, on_finish=state.admission.leave)
        target.lease.release()  # after the submissions: the engine holds the versions for each request now
        self._gone = asyncio.ensure_future(_disconnected(http))

    @classmethod
    def start(cls, state: AppState, target: Target, *args, **kwargs) -> Generation:
        """Submit; on any failure before submission the target's lease is released."""
        try:
            return cls(state, target, *args, **kwargs)
        except BaseException:
            target.lease.release()
            raise

    async def first_output(self) -> tuple[str, ...]:
        """Wait for the first output (of any prompt); raise its HTTP error if it failed at once.

        Returns where the adapters were found (``x-loraplex-adapter-cache``).
        Whatever ends it early aborts the request.
        """
        try:
            index, out = await self._next()
            self._pending.append((index, out))
            if out.error is not None:
                raise request_error(out)
        except BaseException:
            await self.close()
            raise
        return out.adapter_tiers

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output, the one read by :meth:`first_output` first; raises ApiError on timeout or disconnect."""
        while self._pending:
            yield self._pending.pop(0)
        while self._outputs.unfinished:
            yield await self._next()

    async def collect(self) -> list[Choice]:
        """Run to the end (non-streaming); raise the HTTP error of a failed prompt."""
        try:
            async for index, out in self.events():
                self._record(index, out)
                if out.error is not None:
                    raise request_error(out)
        finally:
            await self.close()
        return self.choices

    def stream(
        self,
        render: Callable[[Generation, int, RequestOutput], list[dict]],
        usage_chunk: Callable[[Usage], dict] | None,
        headers: dict[str, str],
    ) -> StreamingResponse:
        """An SSE response: ``render`` turns each output into chunks; a usage chunk last when asked."""

        async def body() -> AsyncIterator[bytes]:
            try:
                async for index, out in self.events():
                    self._record(index, out)
                    if out.error is not None:
                        err = request_error(out)
                        yield _sse(error_body(err.status, err.message, err.code))
                        continue
                    for chunk in render(self, index, out):
                        yield _sse(chunk)
                if usage_chunk is not None:
                    yield _sse(usage_chunk(self.usage()))
            except ApiError as exc:  # the timeout: an error event, then the end of the stream
                yield _sse(error_body(exc.status, exc.message, exc.code))
            yield b"data: [DONE]\n\n"

        return _ClosingStream(body(), self.close, media_type="text/event-stream", headers=headers)

    def usage(self) -> Usage:
        prompt = sum(c.last.prompt_tokens for c in self.choices if c.last)
        completion = sum(c.last.completion_tokens for c in self.choices if c.last)
        cached = sum(c.last.cached_tokens for c in self.choices if c.last)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    async def close(self) -> None:
        """Abort whatever has not finished; stop watching the connection."""
        self._gone.cancel()
        await self._outputs.aclose()

    def _record(self, index: int, out: RequestOutput) -> None:
        choice = self.choices[index]
        choice.text += out.text
        choice.last = out

    async def _next(self) -> tuple[int, RequestOutput]:
        """The next output; ApiError when the client went away (499) or the timeout passed (504) first."""
        nxt = asyncio.ensure_future(anext(self._outputs))
        remaining = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
        try:
            await asyncio.wait({nxt, self._gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not nxt.done():
                nxt.cancel()  # cancelling a pending read aborts the unfinished requests
                await asyncio.gather(nxt, return_exceptions=True)
        if not nxt.cancelled():
            return nxt.result()
        await self.close()
        if self._gone.done():
            raise ApiError(499, "client disconnected", "client_closed_request")
        raise ApiError(
            TIMEOUT_STATUS,
            f"the request did not finish within its timeout of {self._timeout:g} s",
            "request_timeout",
            headers={"x-should-retry": "false"},  # openai clients retry 5xx otherwise; the same request would too
        )


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client disconnects (the body has been read, so the next message says so)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends, even if its body never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], object], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
