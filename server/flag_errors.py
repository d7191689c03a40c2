"""Configuration errors in the words of the command line: the flag (or ``LORAPLEX_*`` variable) that set a value.

The config dataclasses validate themselves in ``__post_init__`` and name their
own fields (``max_loras must be 1..4096``); the user typed ``--max-loras``.
:func:`flag_error` finds the section that refused (from the traceback), the
fields to blame (those that fail on their own, else those the user set), and
rewrites the message with the flag, or the variable when the value came from
the environment: ``--max-loras: must be 1..4096, got 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

# Config fields whose flag is not "--" + the field's name with dashes (section class, field) -> flags.
FLAGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("ModelConfig", "served_name"): ("--served-model-name",),
    ("LoraConfig", "store_url"): ("--adapter-store",),
    ("LoraConfig", "store_cache_bytes"): ("--store-cache-size",),
    ("LoraConfig", "host_cache_bytes"): ("--host-cache",),
    ("LoraConfig", "backend"): ("--lora-backend",),
    ("LoraConfig", "dtype"): ("--lora-dtype",),
    ("LoraConfig", "modules"): ("--lora-modules",),
    ("CacheConfig", "prefix_caching"): ("--enable-prefix-caching", "--no-enable-prefix-caching"),
    ("HttpConfig", "max_request_bytes"): ("--max-request-size",),
    ("AdminConfig", "token"): ("--admin-token",),
    ("AdminConfig", "max_upload_bytes"): ("--max-upload-size",),
    ("AdminConfig", "operation_timeout"): ("--admin-timeout",),
    ("AuthConfig", "api_keys"): ("--api-keys", "--api-keys-file"),
    ("MetricsConfig", "enabled"): ("--metrics",),
    ("MetricsConfig", "adapter_allowlist"): ("--metrics-adapters",),
    ("MetricsConfig", "adapter_top_k"): ("--metrics-top-k",),
    ("MetricsConfig", "vllm_compatible"): ("--vllm-metrics",),
}


class RefusedAtStartup(ValueError):
    """Flags the loaded model cannot be served with (known only once its config is read), worded with the flags:
    the server stops with this message alone, not a traceback."""


def flags_of(section: type, field: str) -> tuple[str, ...]:
    """The flags that set ``section.field``."""
    return FLAGS.get((section.__name__, field), ("--" + field.replace("_", "-"),))


Parse = Callable[[Mapping[str, str], Sequence[str]], argparse.Namespace]


def flag_error(exc: ValueError, parse: Parse, argv: Sequence[str], env: Mapping[str, str]) -> str:
    """``exc``, raised while building the config from ``parse(env, argv)``, reworded with the flags or variables
    to blame. ``parse`` is the command line's parser, built with ``env`` as the variables it falls back to."""
    message = str(exc)
    section = _refusing_section(exc)
    if section is None:
        return message
    blamed = _blamed_fields(section, message)
    if not blamed:
        return message
    args = parse(env, argv)
    without_env = parse({}, argv)  # a value that differs here came from a variable
    defaults = parse({}, [args.command])  # a value that differs here was set by the user
    names: list[str] = []
    for field in blamed:
        given = [_given_as(flag, args, env, without_env, defaults) for flag in flags_of(type(section), field)]
        given = [name for name in given if name is not None]
        if given:
            message = re.sub(rf"^{re.escape(field)}\b:?\s*", "", message)  # "max_loras must be" -> "must be"
            message = _field_named(message, field, given[0])
            names += given
    for f in dataclasses.fields(section):  # other fields the message mentions (block_size beside kv_cache_tokens)
        message = _field_named(message, f.name, flags_of(type(section), f.name)[0])
    names = list(dict.fromkeys(names))
    if not names or all(name in message for name in names):  # none to name, or already named
        return message
    return f"{', '.join(names)}: {message}"


def _given_as(
    flag: str, args: argparse.Namespace, env: Mapping[str, str], without_env: argparse.Namespace,
    defaults: argparse.Namespace,
) -> str | None:
    """``flag`` if the command line set it, its ``LORAPLEX_*`` variable if the environment did, else None."""
    dest = flag.lstrip("-").replace("-", "_")
    value = getattr(args, dest, None)
    if value == getattr(defaults, dest, None):
        return None
    var = "LORAPLEX_" + dest.upper()
    return var if var in env and value != getattr(without_env, dest, None) else flag


def _refusing_section(exc: BaseException) -> object | None:
    """The config dataclass whose ``__post_init__`` raised ``exc`` (the innermost one), if any."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__post_init__" and dataclasses.is_dataclass(owner):
            found = owner
        tb = tb.tb_next
    return found


def _blamed_fields(section: object, message: str) -> Sequence[str]:
    """The fields that fail on their own with ``message`` (others at their defaults); else the fields set away
    from their defaults that the message mentions (by name or flag), or failing that all of them."""
    cls = type(section)
    try:
        default = cls()
    except (TypeError, ValueError):
        return ()
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.init}
    changed = [name for name, value in values.items() if value != getattr(default, name)]
    if any(dataclasses.is_dataclass(v) for v in values.values()):
        return ()  # a section of sections (the whole Config): its own message names what conflicts
    alone = []
    for name in changed:
        try:
            cls(**{name: values[name]})
        except ValueError as exc:
            if str(exc) == message:
                alone.append(name)
    if alone:
        return alone
    mentioned = [
        name for name in changed
        if re.search(rf"(?<![-\w]){re.escape(name)}\b", message)
        or any(flag in message for flag in flags_of(cls, name))
    ]
    return mentioned or changed


def _field_named(message: str, field: str, name: str) -> str:
    """Mentions of a snake_case ``field`` become ``name``; a one-word field (port, token) is also English."""
    return re.sub(rf"(?<![-\w]){re.escape(field)}\b", name, message) if "_" in field else message
