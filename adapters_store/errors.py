"""Errors the store raises; each message names the problem for the client."""


class AdapterError(Exception):
    """Base class; ``code`` is the machine-readable reason shown in API errors."""

    code = "adapter_error"


class AdapterNotFound(AdapterError):
    code = "adapter_not_found"


class InvalidAdapterName(AdapterError):
    code = "invalid_adapter_name"


class InvalidAdapter(AdapterError):
    """The adapter's files are malformed, unsafe, or do not fit the served base model."""

    code = "invalid_adapter"


class InvalidUpload(AdapterError):
    """The upload itself is malformed: missing or unexpected files, an unsafe archive."""

    code = "invalid_upload"


class UploadTooLarge(AdapterError):
    code = "upload_too_large"


class StoreConflict(AdapterError):
    """The store's state does not allow the change (e.g. a foreign folder under the name)."""

    code = "store_conflict"


class StoreUnavailable(AdapterError):
    """The store could not be reached or answered with an error; the request may succeed if retried."""

    code = "store_unavailable"
