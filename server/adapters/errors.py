"""What an operator action or a lookup can run into beyond the store's own errors (:mod:`adapters_store.errors`).

Each has the machine-readable ``code`` shown in API errors; the HTTP side maps them to status codes.
"""

from adapters_store.errors import AdapterError


class NameConflict(AdapterError):
    """The name would not reach the adapter: the base model's, or one that resolves to another adapter."""

    code = "adapter_name_conflict"

    def __init__(self, message: str, param: str = "name") -> None:
        super().__init__(message)
        self.param = param  # the request field that named it


class AdapterInUse(AdapterError):
    """Requests kept holding the adapter for longer than the operation's timeout."""

    code = "adapter_in_use"


class AdapterBusy(AdapterError):
    """A load did not finish, or no device slot came free, within the operation's timeout (retry later)."""

    code = "adapter_busy"


class PinLimitReached(AdapterError):
    """Pinning one more adapter would leave no slot for the others."""

    code = "pin_limit_reached"


class LoadFailed(AdapterError):
    """The adapter cannot be loaded (its files, or the store)."""

    code = "adapter_load_failed"
