"""The engine loop: one thread owns the model and runs one step at a time."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from server.adapters import commands
from server.adapters.commands import AdapterCommand
from server.engine.detokenizer import Detokenizer
from server.engine.logprobs import TokenLogprob, prompt_logprobs
from server.engine.messages import Abort, Call, Message, OutputSink, RequestOutput, Stop, Submit, Wake
from server.engine.request import ErrorKind, FinishReason, Request
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler
from server.engine.telemetry import Telemetry
from server.model.runner import ModelRunner, SeqStep

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_POLL_S = 0.5  # how often an idle loop looks again (adapter wait bounds are checked then)
SHUTDOWN = "the server is shutting down"


def _refuse(req: Request, sink: OutputSink) -> None:
    """The only output of a request the engine will never run."""
    sink(
        RequestOutput(
            request_id=req.request_id,
            text="",
            token_ids=(),
            finished=True,
            finish_reason=FinishReason.ABORT,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=0,
            error=SHUTDOWN,
            error_kind=ErrorKind.UNAVAILABLE,
        )
    )


class Engine:
    """Continuous batching: requests join and leave the running batch between steps."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: frozenset[int],
        telemetry: Telemetry | None = None,
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(runner.device, eos_token_ids)
        self.telemetry = telemetry  # None: no metrics (their cost is measured against this)
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._sinks: dict[str, OutputSink] = {}
        self._detok: dict[str, Detokenizer] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closing = threading.Lock()
        self._closed = False  # the loop has ended: nothing submitted now would ever run
        self.steps = 0

    # -- called from any thread ---------------------------------------------

    def submit(self, request: Request, sink: OutputSink) -> None:
        """Queue ``request``; its outputs go to ``sink``. Once the engine has stopped, it is refused at once."""
        with self._closing:
            if not self._closed:
                self.inbox.put(Submit(request, sink))
                return
        _refuse(request, sink)

    def abort(self, request_id: str) -> None:
        self.inbox.put(Abort(request_id))

    def wake(self) -> None:
        self.inbox.put(Wake())

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine thread between two steps (tests and benchmarks look at engine state so;
        operators' actions are adapter commands: :meth:`send`)."""
        future: Future[T] = Future()
        if self._thread is None or not self._thread.is_alive() or self._stopping:
            future.set_exception(RuntimeError("the engine is not running"))
            return future
        self.inbox.put(Call(fn, future))
        return future

    def send(self, command: AdapterCommand) -> Future[Any] | None:
        """Queue an adapter command for the engine thread; its future (None for holds), failed at once when the
        engine is not running."""
        done = getattr(command, "done", None)
        with self._closing:
            if not self._closed and self._thread is not None and not self._stopping:
                self.inbox.put(command)
                return done
        commands.fail(command, RuntimeError("the engine is not running"))
        return done

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.inbox.put(Stop())
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._drain(block=not self.scheduler.has_work)
            if self._stopping:
                break
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing the running requests")
                for req in list(self.scheduler.running):
                    self._finish(req, FinishReason.ERROR, "internal error in the engine step", kind=ErrorKind.INTERNAL)
        for req in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(req, FinishReason.ABORT, error=SHUTDOWN, kind=ErrorKind.UNAVAILABLE)
        with self._closing:
            self._closed = True
        while True:  # nobody will run what is still queued: tell each sender
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, Submit):
                _refuse(msg.request, msg.sink)
            elif isinstance(msg, Call):
                msg.future.set_exception(RuntimeError("the engine stopped"))
            elif not isinstance(msg, Abort | Wake | Stop):
                commands.fail(msg, RuntimeError("the engine stopped"))

    def _drain(self, block: bool) -> None:
        """Take new messages, waiting a little for the first one when ``block``."""
        while not self._stopping:
            try:
                msg = self.inbox.get(timeout=IDLE_POLL_S) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if isinstance(msg, Stop):
                self._stopping = True
            elif isinstance(msg, Submit):
                self._accept(msg.request, msg.sink)
            elif isinstance(msg, Abort):
                req = self.scheduler.find(msg.request_id)
                if req is not None:
                    self._finish(req, FinishReason.ABORT)
            elif isinstance(msg, Call):
                if msg.future.set_running_or_notify_cancel():
                    try:
                        msg.future.set_result(msg.fn())
                    except Exception as exc:
                        msg.future.set_exception(exc)
            elif not isinstance(msg, Wake):
                try:
                    commands.run(msg, self.scheduler.residency, self.scheduler.busy_slots)
                except Exception:
                    log.exception("adapter command %s failed", type(msg).__name__)

    def _accept(self, req: Request, sink: OutputSink) -> None:
        self._sinks[req.request_id] = sink
        try:
            self.scheduler.add(req)
        except ValueError as exc:
            req.finish_reason = FinishReason.ERROR
            if self.telemetry:  # counted before the client hears of it, as every ending is
                self.telemetry.finished(req, FinishReason.ERROR)
            self._emit(req, "", (), finished=True, error=str(exc), kind=ErrorKind.INVALID)
            self._sinks.pop(req.request_id, None)
            return
        self._detok[req.request_id] = Detokenizer(
            self.tokenizer, req.prompt_ids, req.params.stop, req.params.include_stop_str
        )
        if self.telemetry:
            self.telemetry.accepted(req)

    def step(self) -> None:
        """Schedule, run one forward pass, sample, and emit outputs."""
        telemetry = self.telemetry
        started = time.perf_counter()
        if self.scheduler.residency.loads_waiting:  # operators' loads waiting for a slot
            self.scheduler.residency.retry_loads(self.scheduler.busy_slots())
        batch = self.scheduler.schedule()
        if telemetry and batch.preempted:
            telemetry.preempted(len(batch.preempted))
        for req in batch.failed:
            if telemetry:
                telemetry.finished(req, FinishReason.ERROR)
            self._emit(req, "", (), finished=True, error=req.error, kind=req.error_kind)
            self._forget(req)
        if batch.empty:
            if telemetry:
                telemetry.state()
            if self.scheduler.has_work and not self._stopping:
                self._drain(block=True)  # wait for an adapter load or a new request
            return
        if telemetry:
            telemetry.scheduled(batch, time.monotonic())
        scheduled = time.perf_counter()
        seqs: list[SeqStep] = []
        sampled: list[Request] = []
        sample_rows: list[int] = []  # each sampled request's row of the logits
        prompt_rows: list[tuple[Request, int, int, int]] = []  # (request, first row, start, tokens): prompt log-probs
        rows = 0
        for req, n in batch.steps:
            start = req.num_computed
            done_prompt = start + n >= req.num_tokens
            seq = SeqStep(req.next_tokens(n), start, req.blocks, req.lora_terms, done_prompt, req.num_tokens,
                          all_logits=req.wants_prompt_logprobs)
            seqs.append(seq)
            if seq.all_logits:
                prompt_rows.append((req, rows, start, n))
            rows += seq.logit_rows
            if done_prompt:
                sampled.append(req)
                sample_rows.append(rows - 1)
        logits = self.runner.execute(seqs)
        forwarded = time.perf_counter()
        self.scheduler.computed(batch.steps)
        if prompt_rows:
            prompt_logprobs(logits, prompt_rows)
            logits = logits.index_select(0, torch.tensor(sample_rows, dtype=torch.int64, device=logits.device))
        result = self.sampler.sample(logits, sampled)
        sampled_at = time.perf_counter()
        now = time.monotonic()
        for i, (req, token) in enumerate(zip(sampled, result.tokens, strict=True)):
            if telemetry:
                telemetry.token(req, now)
            self._advance(req, token, result.logprobs.get(i))
        self.steps += 1
        if telemetry:
            done = time.perf_counter()
            phases = {"schedule": scheduled - started, "forward": forwarded - scheduled,
                      "sample": sampled_at - forwarded, "emit": done - sampled_at}
            telemetry.stepped(batch, phases)

    def _advance(self, req: Request, token: int, logprob: TokenLogprob | None) -> None:
        req.output_ids.append(token)
        params = req.params
        detok = self._detok[req.request_id]
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if not is_eos:  # stop strings count from min_tokens on (the sampler keeps EOS out before it)
            detok.push(token, check_stop=len(req.output_ids) >= params.min_tokens)
        if logprob is not None and req.track_logprob:
            req.cumulative_logprob += logprob.logprob
        grammar_done = False
        if req.grammar is not None:  # a token outside the grammar (only when every token was masked) ends it
            grammar_done = not req.grammar.accept_token(token) or req.grammar.is_terminated()
        logprobs = (logprob,) if logprob is not None and params.logprobs is not None and not is_eos else ()
        reason = None
        if is_eos or detok.stopped or token in params.stop_token_ids or grammar_done:
            reason = FinishReason.STOP
        elif len(req.output_ids) >= params.max_tokens:
            reason = FinishReason.LENGTH
        if reason is None:
            self._emit(req, detok.delta(final=False), (token,), finished=False, logprobs=logprobs)
        else:
            self._finish(req, reason, last_token=token, logprobs=logprobs)

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        error: str | None = None,
        last_token: int | None = None,
        kind: ErrorKind | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> None:
        self.scheduler.finish(req, reason)
        if self.telemetry:
            self.telemetry.finished(req, reason)
        detok = self._detok.get(req.request_id)
        text = detok.delta(final=True) if detok and reason is not FinishReason.ABORT else ""
        self._emit(req, text, () if last_token is None else (last_token,), True, error, kind, logprobs)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        self._sinks.pop(req.request_id, None)
        self._detok.pop(req.request_id, None)
        self.sampler.forget(req.request_id)

    def _emit(
        self,
        req: Request,
        text: str,
        token_ids: tuple[int, ...],
        finished: bool,
        error: str | None = None,
        kind: ErrorKind | None = None,
        logprobs: tuple[TokenLogprob, ...] = (),
    ) -> None:
        sink = self._sinks.get(req.request_id)
        if sink is None:
            return
        first = len(req.output_ids) <= 1
        out = RequestOutput(
            request_id=req.request_id,
            text=text,
            token_ids=token_ids,
            finished=finished,
            finish_reason=req.finish_reason if finished else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens or 0,
            adapter_tiers=req.tiers if first else (),
            logprobs=logprobs,
            prompt_logprobs=tuple(req.prompt_logprobs) if first and req.params.prompt_logprobs is not None else None,
            cumulative_logprob=req.cumulative_logprob if finished and req.track_logprob else None,
            error=error,
            error_kind=kind,
        )
        try:
            sink(out)
        except Exception:  # a consumer that went away must never take the engine down
            log.warning("dropping output of request %s: its consumer failed", req.request_id, exc_info=True)
            self._sinks.pop(req.request_id, None)
