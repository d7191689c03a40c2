"""A bound on the requests in the server: past it, new ones get 429 with ``Retry-After``.

The engine runs up to ``--max-num-seqs`` requests and queues the rest; this
caps the queue at ``--max-queued-requests``, counting every engine request
from submission until the engine finishes it (one per prompt of a request).
"""

from __future__ import annotations

import threading

from server.api.errors import ApiError

RETRY_AFTER_S = 1


class Admission:
    def __init__(self, max_running: int, max_queued: int) -> None:
        self.limit = max_running + max_queued
        self.max_queued = max_queued
        self._lock = threading.Lock()  # left on the engine thread
        self._in_flight = 0
        self.closed = False  # set when the server shuts down: nothing new is admitted

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self, n: int) -> None:
        """Count ``n`` more requests in, or raise 429 (503 while shutting down) without counting any."""
        if n > self.limit:  # could never be admitted: retrying would not help
            raise ApiError(
                400,
                f"this request has {n} prompts; the server admits at most {self.limit} requests at once "
                "(--max-num-seqs + --max-queued-requests)",
                "too_many_prompts",
                "prompt",
            )
        if self.closed:
            raise ApiError(
                503,
                "the server is shutting down",
                "shutting_down",
                headers={"Connection": "close", "Retry-After": str(RETRY_AFTER_S)},
            )
        with self._lock:
            if self._in_flight + n > self.limit:
                raise ApiError(
                    429,
                    f"the server is at capacity ({self.limit} requests running or queued, "
                    f"--max-queued-requests {self.max_queued}); retry shortly",
                    "server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._in_flight += n

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
