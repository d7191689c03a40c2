"""Operator actions and request holds, as typed messages on the engine's inbox.

Each command that answers carries a future the engine resolves (or fails); a
sender that stops waiting cancels it. Only the engine thread runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from adapters_store.backend import StoredAdapter
from server.adapters.residency import Residency, Snapshot

T = TypeVar("T")


@dataclass(frozen=True)
class Hold:
    """A request looked ``adapters`` up: their versions are held until the matching :class:`Release`."""

    adapters: tuple[StoredAdapter, ...]


@dataclass(frozen=True)
class Release:
    adapters: tuple[StoredAdapter, ...]


@dataclass(frozen=True)
class Load:
    """Onto a device slot (pinned: kept there until unpinned); resolves once there."""

    adapter: StoredAdapter
    pin: bool
    done: Future[None] = field(default_factory=Future)


@dataclass(frozen=True)
class Unpin:
    name: str
    done: Future[bool] = field(default_factory=Future)


@dataclass(frozen=True)
class Evict:
    """Out of host memory and device slots once no request holds it; resolves then."""

    name: str
    version: str | None = None
    reason: str = "admin"
    done: Future[None] = field(default_factory=Future)


@dataclass(frozen=True)
class Retire:
    """A version replaced or deleted: it leaves once no request holds it; resolves then."""

    adapter: StoredAdapter
    reason: str
    done: Future[None] = field(default_factory=Future)


@dataclass(frozen=True)
class Revive:
    """A retiring version is a name's current one again: it stays."""

    adapter: StoredAdapter


@dataclass(frozen=True)
class TakeSnapshot:
    done: Future[Snapshot] = field(default_factory=Future)


AdapterCommand = Hold | Release | Load | Unpin | Evict | Retire | Revive | TakeSnapshot


def run(command: AdapterCommand, residency: Residency, busy: Callable[[], Mapping[int, int]]) -> None:
    """Carry ``command`` out on the engine thread; an error fails its future (or is raised, for holds).
    ``busy``: the running requests per device slot, asked for only by the commands that need it."""
    match command:
        case Hold(adapters):
            for adapter in adapters:
                residency.hold(adapter)
        case Release(adapters):
            for adapter in adapters:
                residency.release(adapter)
        case Load(adapter, pin, done):
            residency.load(adapter, pin, busy(), done)
        case Unpin(name, done):
            _answer(done, lambda: residency.unpin(name))
        case Evict(name, version, reason, done):
            residency.evict(name, version, reason, done)
        case Retire(adapter, reason, done):
            residency.retire(adapter, reason, done)
        case Revive(adapter):
            residency.revive(adapter)
        case TakeSnapshot(done):
            _answer(done, lambda: residency.snapshot(busy()))


def fail(command: AdapterCommand, error: Exception) -> None:
    """The engine will not run ``command`` (it stopped)."""
    done = getattr(command, "done", None)
    if done is not None and done.set_running_or_notify_cancel():
        done.set_exception(error)


def _answer(done: Future[T], fn: Callable[[], T]) -> None:
    if not done.set_running_or_notify_cancel():
        return
    try:
        done.set_result(fn())
    except Exception as exc:
        done.set_exception(exc)
