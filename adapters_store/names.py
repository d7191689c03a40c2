"""Adapter names: a restricted alphabet so a name can never be a path trick."""

from __future__ import annotations

import re

from adapters_store.errors import InvalidAdapterName

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise :class:`InvalidAdapterName`.

    Letters, digits, ``-``, ``_`` and ``.``; at most 128 characters; not starting with a dot.
    """
    if not isinstance(name, str) or not name:
        raise InvalidAdapterName("adapter name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidAdapterName(f"adapter name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name[:64]!r}: use letters, digits, '-', '_' and '.', not starting with '.'"
        )
    return name


def is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidAdapterName:
        return False
    return True
