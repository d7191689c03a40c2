"""One HTTP generation request on the engine: admission, its prompts' engine requests, and their outputs.

Shared by completions and chat completions. The engine requests of one HTTP
request are aborted, and their KV cache, slots and adapter leases freed, when
the client disconnects (noticed within one engine step while outputs flow),
when the request's timeout passes, or when anything else ends the response early.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import xgrammar as xgr
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from server.api.errors import ApiError, error_body, unavailable
from server.api.schemas import GenerationFields, PromptTokensDetails, Usage
from server.api.state import AppState
from server.api.targets import Target
from server.engine.client import Outputs
from server.engine.grammar import Grammars
from server.engine.logprobs import TokenLogprob
from server.engine.messages import RequestOutput
from server.engine.request import MAX_SEED, ErrorKind, Request, SamplingParams

TIMEOUT_STATUS = 504


@dataclass
class Choice:
    """One prompt's result so far."""

    text: str = ""
    last: RequestOutput | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def finish_reason(self) -> str | None:
        out = self.last
        return out.finish_reason.value if out and out.finished and out.finish_reason else None


def sampling_params(
    body: GenerationFields,
    prompt_len: int,
    max_tokens: int | None,
    max_model_len: int,
    vocab_size: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """``max_tokens`` None means the rest of the context. 400 naming the limit when it does not fit, or the
    field whose token ids the model does not have."""
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
    if body.min_tokens and body.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({body.min_tokens}) is more than max_tokens ({max_tokens})",
                       "invalid_sampling_parameters", "min_tokens")
    stop_ids = _token_ids(body.stop_token_ids, vocab_size, "stop_token_ids")
    allowed = _token_ids(body.allowed_token_ids, vocab_size, "allowed_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=body.seed,
            stop=stop,
            include_stop_str=body.include_stop_str_in_output,
            ignore_eos=body.ignore_eos,
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens or 0,
            logit_bias=_logit_bias(body.logit_bias, vocab_size),
            stop_token_ids=stop_ids,
            allowed_token_ids=allowed or None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc), "invalid_sampling_parameters") from None


def _token_ids(ids: list[int] | None, vocab_size: int, param: str) -> tuple[int, ...]:
    """``ids`` as a tuple; 400 naming ``param`` when one is not a token id of the model."""
    if any(not 0 <= t < vocab_size for t in ids or ()):
        raise ApiError(400, f"{param} must be token ids in [0, {vocab_size})", "invalid_sampling_parameters", param)
    return tuple(ids or ())


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}``; 400 naming the entry that is not a token id of the model or not in
    [-100, 100]."""
    out = []
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id in [0, {vocab_size})",
                           "invalid_logit_bias", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, f"logit_bias: the bias of token {token} must be in [-100, 100]",
                           "invalid_logit_bias", "logit_bias")
        out.append((token, value))
    return tuple(out)


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
        copies: int = 1,
        grammar: xgr.CompiledGrammar | None = None,
        rank_by_logprob: bool = False,
    ) -> None:
        """``copies`` engine requests per prompt (``n``, or ``best_of``), the later ones started from the first's
        cached prompt blocks; a seeded prompt's copy ``j`` draws with ``seed + j``. ``grammar``: every copy's
        output follows it. ``rank_by_logprob``: each sums its tokens' log-probs (best_of)."""
        self.id = f"{id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.target = target
        self._copies = copies
        self._http = http
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._pending: list[tuple[int, RequestOutput]] = []  # outputs read before the response started
        requests: list[Request] = []
        for ids, p in zip(prompts, params, strict=True):
            lead: Request | None = None
            for j in range(copies):
                seeded = p if j == 0 or p.seed is None else dataclasses.replace(p, seed=(p.seed + j) % (MAX_SEED + 1))
                req = Request(
                    request_id=f"{self.id}-{len(requests)}",
                    prompt_ids=ids,
                    params=seeded,
                    selection=target.selection,
                    grammar=None if grammar is None else Grammars.matcher(grammar),
                    follows=lead,
                    track_logprob=rank_by_logprob,
                )
                lead = lead or req
                requests.append(req)
        self.choices = [Choice() for _ in requests]
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
        """Each prompt counted once, however many copies ran it (as OpenAI and vLLM count ``n``); its cached
        tokens are the most any copy found. Every copy's output tokens count (``best_of`` included)."""
        groups = [self.choices[i : i + self._copies] for i in range(0, len(self.choices), self._copies)]
        prompt = sum(max((c.last.prompt_tokens for c in g if c.last), default=0) for g in groups)
        cached = sum(max((c.last.cached_tokens for c in g if c.last), default=0) for g in groups)
        completion = sum(c.last.completion_tokens for c in self.choices if c.last)
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
        choice.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs

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
