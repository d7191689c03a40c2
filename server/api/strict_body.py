"""The base of every request object: unknown keys are refused, and so are known options this server does not
implement (:mod:`server.api.unsupported`)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from server.api import unsupported


class StrictBody(BaseModel):
    """A request object: unknown keys are refused, and so are the ``UNSUPPORTED`` options set to anything but
    their neutral values (see :mod:`server.api.unsupported`)."""

    model_config = ConfigDict(extra="forbid")
    UNSUPPORTED: ClassVar[unsupported.Table] = {}

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        return unsupported.drop_neutral(data, cls.UNSUPPORTED)
