"""``loraplex serve`` flags from a Serve application's ``args``, and the Config they make (as the CLI builds it)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from server.cli import build_parser, config_from_args
from server.config import Config

# Serve's HTTP proxy binds the port (http_options in the Serve config), never a replica.
NOT_FLAGS = frozenset({"host", "port"})


def flags_from_args(args: Mapping[str, Any]) -> list[str]:
    """``{"adapter_store": "s3://b/p", "metrics": True}`` -> ``["--adapter-store", "s3://b/p", "--metrics", "on"]``.

    Keys are flag names without the dashes (``_`` or ``-`` between words). YAML
    reads ``on``/``off`` as booleans, so booleans become ``on``/``off`` again.
    """
    flags: list[str] = []
    for key, value in args.items():
        name = key.replace("_", "-")
        if name in NOT_FLAGS:
            raise ValueError(f"{key!r}: Serve's proxy listens for HTTP (set http_options in the Serve config)")
        if value is None:
            continue
        if isinstance(value, bool):
            value = "on" if value else "off"
        flags += [f"--{name}", str(value)]
    return flags


def config_from_flags(flags: Sequence[str]) -> Config:
    """The Config ``loraplex serve <flags>`` would run with (``LORAPLEX_*`` variables as fallback).

    Raises ValueError with argparse's message instead of exiting.
    """
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser(os.environ).parse_args(["serve", *flags])
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        raise ValueError(lines[-1] if lines else "invalid loraplex serve flags") from None
    return config_from_args(args)
