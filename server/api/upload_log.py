"""Why an adapter upload was refused, in the log: the access log only shows its status."""

from __future__ import annotations

import logging
from types import TracebackType

from adapters_store.errors import AdapterError, StoreUnavailable
from server.api.errors import ApiError

log = logging.getLogger(__name__)


class UploadAttempt:
    """One upload (``POST /admin/adapters``, vLLM's ``load_lora_adapter``), as a ``with`` block around it: an
    error leaving the block is logged as a warning with the adapter's name (once known) and the reason."""

    def __init__(self, route: str, name: object = None) -> None:
        self.route = route
        self.name = name  # set once the request's name is read

    def __enter__(self) -> UploadAttempt:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not isinstance(exc, ApiError | AdapterError):
            return
        failed = isinstance(exc, StoreUnavailable) or (isinstance(exc, ApiError) and exc.status >= 500)
        name = repr(self.name[:200]) if isinstance(self.name, str) else "(no name)"
        outcome = "failed" if failed else "refused"
        log.warning("%s of adapter %s %s: %s", self.route, name, outcome, " ".join(str(exc).split()))
