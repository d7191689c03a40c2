"""``loraplex serve`` names the flag (or ``LORAPLEX_*`` variable) behind a refused value, not the config field.

In process, through the real parser and ``main`` (it stops at the refusal, long
before a model would load); ``tests/unit/test_cli_flags.py`` runs the same
refusals as a subprocess.
"""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from server.cli import build_parser, main
from server.config import Config
from server.flag_errors import flags_of


def refusal(capsys, monkeypatch, tmp_path, *flags: str, env: dict[str, str] | None = None) -> str:
    """``serve`` with ``flags`` and ``env`` as the only LORAPLEX_* variables: exit 2; the error line."""
    for name in [n for n in os.environ if n.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--adapters-dir", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), *flags])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("flags", "env", "line"),
    [
        (("--max-loras", "0"), {}, "--max-loras: must be 1..4096, got 0"),
        ((), {"LORAPLEX_MAX_LORAS": "0"}, "LORAPLEX_MAX_LORAS: must be 1..4096, got 0"),
        (("--max-loras", "0"), {"LORAPLEX_MAX_LORAS": "0"}, "--max-loras: must be 1..4096, got 0"),  # flags win
        (("--max-loras", "0"), {"LORAPLEX_MAX_LORAS": "8"}, "--max-loras: must be 1..4096, got 0"),
        (("--host-c", "-1"), {}, "--host-cache: must be >= 0"),  # an abbreviation argparse accepts
        (("--port", "70000"), {}, "--port: must be 0..65535, got 70000"),
        (("--max-lora-rank", "2048", "--max-loras", "0"), {}, "--max-lora-rank: must be 1..1024, got 2048"),
        (("--host-cache", "-1"), {}, "--host-cache: must be >= 0"),
        ((), {"LORAPLEX_MAX_REQUEST_SIZE": "100"}, "LORAPLEX_MAX_REQUEST_SIZE: must be at least 1024"),
        (("--block-size", "0"), {}, "--block-size: must be at least 1, got 0"),
        (("--kv-cache-tokens", "8"), {}, "--kv-cache-tokens: must be at least one block (--block-size 16), got 8"),
        (("--kv-cache-tokens", "32", "--block-size", "64"), {},  # neither alone: both named
         "--kv-cache-tokens, --block-size: must be at least one block (--block-size 64), got 32"),
        (("--request-timeout", "-1"), {}, "--request-timeout: must be a finite number of seconds >= 0, got -1.0"),
        (("--adapter-store", "http://bucket"), {}, "--adapter-store: not an s3:// URL: 'http://bucket'"),
        (("--max-num-seqs", "0"), {}, "--max-num-seqs: scheduler limits must be positive"),
    ],
)
def test_a_refused_value_is_reported_by_the_flag_or_variable_that_set_it(
    capsys, monkeypatch, tmp_path, flags, env, line
):
    assert refusal(capsys, monkeypatch, tmp_path, *flags, env=env) == f"loraplex: error: {line}"


def test_no_config_field_name_reaches_the_user(capsys, monkeypatch, tmp_path):
    """max_upload_bytes, kv_cache_tokens, ...: names of our code, not of the command line."""
    fields = _snake_fields()
    for flags in (("--max-loras", "0"), ("--kv-cache-tokens", "8"), ("--max-upload-size", "0"),
                  ("--max-queued-requests", "-1"), ("--store-refresh", "-1"), ("--default-max-tokens", "-1")):
        line = refusal(capsys, monkeypatch, tmp_path, *flags)
        assert flags[0] in line, line
        assert not any(re.search(rf"(?<![-\w]){f}\b", line) for f in fields), line


def test_every_config_field_maps_to_a_flag_of_serve():
    """A field added to the config without its flag in server/flag_errors.py fails here."""
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]
    options = {option for action in serve._actions for option in action.option_strings}
    config = Config()
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for field in dataclasses.fields(part):
            for flag in flags_of(type(part), field.name):
                assert flag in options, f"{type(part).__name__}.{field.name} -> {flag} is not a flag of serve"


def _snake_fields() -> set[str]:
    config = Config()
    return {f.name for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))
            if "_" in f.name}
