"""The model side of a baseline: one worker thread owns the model and runs ``generate`` on batches of jobs.

The HTTP side (:mod:`loadtests.baselines.openai_http`) only builds :class:`Job` objects
and reads their events; everything that touches torch (loading included) runs on the
worker thread, so one OpenMP team serves the model, as in loraplex's engine thread.

A batch is one ``generate`` call over left-padded prompts (greedy, KV cache).
:class:`Rows` is its stopping criterion: after every step it hands each row's new
token to its job (text deltas stream as they are produced) and tells ``generate``
which rows are finished (``max_tokens``, EOS unless ``ignore_eos``, a stop string,
or a client that went away). Finished rows are still computed until the whole
batch ends: ``generate`` has no way to drop them (static batching).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from loadtests.bench.common import THREADS
from loadtests.bench.engine_vs_peft import hf_generate
from server.engine.builder import eos_ids
from server.engine.detokenizer import Detokenizer
from server.model.loading import LoadedModel, load_model

log = logging.getLogger(__name__)

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Event:
    """One message from the worker to the HTTP side: a text delta, the end (``finish_reason``), or an error."""

    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Job:
    """One completion request, owned by the HTTP side until submitted, then by the worker until finished."""

    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False  # set by the HTTP side when the client goes away
    detok: Detokenizer | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("empty prompt")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def post(self, event: Event) -> None:
        """Deliver ``event`` to the HTTP side (callable from any thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def advance(self, token: int, eos: frozenset[int]) -> None:
        """Worker thread: record one generated token; post its text, and the end when it is the last."""
        assert self.detok is not None
        self.output_ids.append(token)
        is_eos = token in eos and not self.ignore_eos
        if not is_eos:
            self.detok.push(token)
        reason = None
        if is_eos or self.detok.stopped:
            reason = "stop"
        elif len(self.output_ids) >= self.max_tokens:
            reason = "length"
        if reason is None:
            delta = self.detok.delta(final=False)
            if delta:
                self.post(Event(text=delta))
            return
        self.status = Status.FINISHED
        self.post(Event(text=self.detok.delta(final=True), finish_reason=reason))

    def fail(self, message: str) -> None:
        self.status = Status.FINISHED
        self.post(Event(error=message))


class Rows(StoppingCriteria):
    """``generate``'s stopping criterion for one batch: streams each step's tokens to the jobs, row by row."""

    def __init__(self, jobs: list[Job], eos: frozenset[int]) -> None:
        self.jobs, self.eos = jobs, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(len(self.jobs), dtype=torch.bool)
        for row, (job, token) in enumerate(zip(self.jobs, input_ids[:, -1].tolist(), strict=True)):
            if not job.finished:
                if job.cancelled:
                    job.status = Status.FINISHED
                else:
                    job.advance(token, self.eos)
            done[row] = job.finished
        return done


def oldest_adapter_group(waiting: list[Job], max_batch: int) -> list[Job]:
    """The waiting jobs of the adapter (or base) whose job has waited longest, oldest first, up to ``max_batch``."""
    adapter = waiting[0].adapter
    return [j for j in waiting if j.adapter == adapter][:max_batch]


def adapter_folders(store: Path) -> dict[str, Path]:
    """Every PEFT adapter in ``store``: subfolder name -> folder, sorted by name."""
    if not store.is_dir():
        raise FileNotFoundError(f"--adapters-dir {store}: not a directory")
    return {p.name: p for p in sorted(store.iterdir()) if (p / "adapter_config.json").is_file()}


class Worker(ABC, threading.Thread):
    """The thread that owns the model. Subclasses load it (:meth:`load`), choose batches and run them."""

    def __init__(self, model: str | None, adapters_dir: Path, cache_dir: Path, max_batch: int) -> None:
        super().__init__(name=f"{type(self).__name__}-model", daemon=True)
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model_arg, self.max_batch, self.cache_dir = model, max_batch, cache_dir
        self.adapter_paths = adapter_folders(adapters_dir)
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._waiting: list[Job] = []  # arrival order
        self._cond = threading.Condition()
        self._stopping = False
        # Set by load(), on this thread:
        self.loaded: LoadedModel | None = None
        self.eos: frozenset[int] = frozenset()
        self.pad_id = 0
        self.max_model_len = 0

    # -- the HTTP side's view ---------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self.adapter_paths)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self.join(30)

    # -- the worker thread --------------------------------------------------------------------------------------

    def run(self) -> None:
        torch.set_num_threads(THREADS)
        try:
            self.loaded = load_model(self.model_arg, self.cache_dir)
            self.eos = eos_ids(self.loaded)
            tok = self.loaded.tokenizer
            self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else min(self.eos, default=0)
            self.max_model_len = int(getattr(self.loaded.hf_model.config, "max_position_embeddings", 2048))
            self.load(self.loaded)
        except BaseException as exc:
            self.load_error = exc
            log.exception("loading failed")
            return
        finally:
            self.ready.set()
        log.info("%s ready: %d adapters, max batch %d", type(self).__name__, len(self.adapter_paths), self.max_batch)
        while (batch := self._next_batch()) is not None:
            try:
                with torch.inference_mode():
                    self.run_batch(batch)
            except Exception as exc:
                log.exception("batch failed")
                for job in batch:
                    if not job.finished:
                        job.fail(f"generation failed: {exc!r}")

    def _next_batch(self) -> list[Job] | None:
        """Block until something waits; take a batch (``pick``) out of the queue. None when stopping."""
        with self._cond:
            while True:
                self._waiting = [j for j in self._waiting if not j.cancelled]
                if self._stopping:
                    return None
                if self._waiting:
                    break
                self._cond.wait()
            batch = self.pick(self._waiting)
            chosen = {j.id for j in batch}
            self._waiting = [j for j in self._waiting if j.id not in chosen]
        log.debug("batch of %d (%s), %d left waiting", len(batch), batch[0].adapter, len(self._waiting))
        for job in batch:
            job.status = Status.RUNNING
            job.detok = Detokenizer(self.loaded.tokenizer, job.prompt_ids, job.stop)
        return batch

    def generate(self, model: PreTrainedModel, jobs: list[Job], **kwargs) -> None:
        """One greedy ``generate`` over ``jobs`` (left-padded), streaming through :class:`Rows`."""
        hf_generate(
            model,
            [j.prompt_ids for j in jobs],
            max(j.max_tokens for j in jobs),
            self.pad_id,
            stopping_criteria=StoppingCriteriaList([Rows(jobs, self.eos)]),
            **kwargs,
        )
        for job in jobs:  # only a row cancelled on the last step can be left
            job.status = Status.FINISHED

    @abstractmethod
    def load(self, loaded: LoadedModel) -> None:
        """Build the serving model(s) from the base model and ``adapter_paths`` (on this thread)."""

    @abstractmethod
    def pick(self, waiting: list[Job]) -> list[Job]:
        """The next batch, from the waiting jobs in arrival order (never empty)."""

    @abstractmethod
    def run_batch(self, jobs: list[Job]) -> None:
        """Generate for ``jobs`` until every one is finished."""

