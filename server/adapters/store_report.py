"""The start-up report of the adapter store: every stored adapter checked in the background, each invalid one named.

The store may hold adapters placed by hand in ``--adapters-dir``, or stored while
another base model was served. At start-up each is checked as an upload is
(every tensor value read), on a thread of its own, so ``/ready`` never waits for
a large store. The log says how many adapters were found, then names each
invalid one with its reason (one line each) and each entry that is not an
adapter at all; the admin list shows the progress and every adapter's state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from adapters_store.errors import AdapterError, AdapterNotFound

log = logging.getLogger(__name__)


@dataclass
class StoreCheck:
    """How far the report got, as the admin list shows it."""

    state: str = "running"  # running | done | stopped (the server shut down first) | failed (see the log)
    found: int = 0  # adapters in the store
    checked: int = 0  # of those, checked so far (valid or not)
    invalid: int = 0  # of those checked, the ones that cannot be served
    not_checked: int = 0  # no copy on this replica (a shared store's: checked on first use), or unreadable now
    ignored: int = 0  # entries of the store that are not adapters


class StoreReport:
    """Checks every adapter of the store once, on a daemon thread.

    ``verify(name)`` checks one adapter: its summary when it is valid, a string saying why it cannot be
    served, or None when there is no local copy to check.
    """

    def __init__(
        self,
        where: str,
        names: Callable[[], list[str]],
        strays: Callable[[], list[tuple[str, str]]],
        verify: Callable[[str], object],
    ) -> None:
        self.where = where
        self._names, self._strays, self._verify = names, strays, verify
        self._check = StoreCheck()
        self._stop = threading.Event()
        self.done = threading.Event()

    @property
    def check(self) -> StoreCheck:
        return dataclasses.replace(self._check)

    def start(self) -> None:
        threading.Thread(target=self._run, name="loraplex-store-report", daemon=True).start()

    def stop(self) -> None:
        """Stop after the adapter being checked now (at shut-down)."""
        self._stop.set()

    def _run(self) -> None:
        try:
            self._report()
        except Exception:
            self._check.state = "failed"
            log.exception("adapter store %s: the start-up check failed; adapters are checked when used", self.where)
        finally:
            self.done.set()

    def _report(self) -> None:
        started = time.monotonic()
        try:
            names, strays = self._names(), self._strays()
        except AdapterError as exc:  # a shared store that cannot be reached now: adapters are checked when used
            self._check.state = "failed"
            log.warning("adapter store %s: cannot be listed for the start-up check: %s", self.where, exc)
            return
        check = self._check
        check.found, check.ignored = len(names), len(strays)
        log.info("adapter store %s: %d adapters found; checking them in the background", self.where, len(names))
        for entry, why in strays:
            log.warning("adapter store %s: %r is not an adapter, ignored: %s", self.where, entry, why)
        for name in names:
            if self._stop.is_set():
                check.state = "stopped"
                return
            try:
                result = self._verify(name)
            except AdapterNotFound:
                check.found -= 1  # deleted meanwhile
                continue
            except (AdapterError, OSError) as exc:
                log.warning("adapter %r could not be checked now: %s", name, exc)
                result = None
            if result is None:
                check.not_checked += 1
                continue
            check.checked += 1
            if isinstance(result, str):
                check.invalid += 1
                log.warning("adapter %r is invalid and not served: %s", name, " ".join(result.split()))
        check.state = "done"
        unchecked = f"; {check.not_checked} not checked (no copy here yet: checked on first use)"
        log.info(
            "adapter store %s: %d adapters checked in %.1f s: %d valid, %d invalid%s",
            self.where, check.checked, time.monotonic() - started, check.checked - check.invalid, check.invalid,
            unchecked if check.not_checked else "",
        )
