"""``--lora-modules`` (vLLM's flag, both its forms) and the per-adapter metrics label's default top-K."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args
from server.config import LoraModule
from tests.helpers.server_process import free_port

REPO = Path(__file__).resolve().parents[2]


def _config(argv: list[str], env: dict[str, str] | None = None):
    return config_from_args(build_parser(env or {}).parse_args(["serve", *argv]))


# -- --lora-modules -------------------------------------------------------------------------------------------


def test_lora_modules_take_name_path_and_vllms_json_form():
    modules = _config([
        "--lora-modules", "sql=/models/sql-lora", "eq=/path/with=sign",
        '{"name": "chat", "path": "~/chat-lora", "base_model_name": "tiny"}',
        '{"name": "nobase", "path": "/x", "base_model_name": null}',
        "--max-loras", "4",  # the list ends at the next flag
    ]).lora.modules
    assert modules == (
        LoraModule("sql", Path("/models/sql-lora")),
        LoraModule("eq", Path("/path/with=sign")),
        LoraModule("chat", Path("~/chat-lora").expanduser(), "tiny"),
        LoraModule("nobase", Path("/x")),
    )
    assert _config([]).lora.modules == ()


def test_lora_modules_from_the_environment_are_shell_quoted():
    env = {"LORAPLEX_LORA_MODULES": """a=/x/a 'b=/x/with space' '{"name": "c", "path": "/x/c"}'"""}
    assert [(m.name, str(m.path)) for m in _config([], env).lora.modules] == [
        ("a", "/x/a"), ("b", "/x/with space"), ("c", "/x/c")]
    assert [m.name for m in _config(["--lora-modules", "z=/z"], env).lora.modules] == ["z"]  # the flag wins


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("sql", "expected name=path or a JSON object"),
        ("=/x", "adapter name must be a non-empty string"),
        ("../up=/x", "invalid adapter name '../up'"),
        ("a=", "the path is empty"),
        ('{"name": "a"}', "name and path required"),
        ('{"name": "a", "path": "/x", "lora_int_id": 3}', "unknown: lora_int_id"),
        ('{"name": "a", "path": 5}', "must be strings"),
        ('["a", "/x"]', "expected name=path or a JSON object"),
        ('{"name": "a", "path": ""}', "the path is empty"),
        ('{"name": "a", "path": "/x"', "not valid JSON"),
    ],
)
def test_a_bad_lora_module_is_refused_naming_the_flag_and_the_entry(entry, fragment):
    with pytest.raises(ValueError, match="--lora-modules") as caught:
        _config(["--lora-modules", entry])
    assert fragment in str(caught.value) and repr(entry)[1:-1][:20] in str(caught.value)


def test_a_name_given_twice_is_refused():
    with pytest.raises(ValueError, match="--lora-modules names an adapter twice: a"):
        _config(["--lora-modules", "a=/x", "b=/y", '{"name": "a", "path": "/z"}'])


def test_a_missing_path_fails_the_start_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--adapters-dir",
         str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), "--lora-modules", f"sql={missing}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60,
    )
    assert done.returncode == 2
    assert f"--lora-modules sql={missing}: no such file or directory" in done.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


# -- the per-adapter metrics label ------------------------------------------------------------------------------


def test_the_adapter_label_is_on_by_default_with_top_10():
    metrics = _config([]).metrics
    assert metrics.adapter_label and metrics.top_k == 10 and metrics.adapter_allowlist == ()


def test_metrics_top_k_0_turns_the_label_off_and_a_k_is_taken():
    assert not _config(["--metrics-top-k", "0"]).metrics.adapter_label
    assert _config(["--metrics-top-k", "3"]).metrics.top_k == 3
    assert _config([], {"LORAPLEX_METRICS_TOP_K": "0"}).metrics.adapter_label is False


def test_an_allow_list_alone_replaces_the_default_top_k():
    metrics = _config(["--metrics-adapters", "a, b"]).metrics
    assert metrics.adapter_allowlist == ("a", "b") and metrics.top_k == 0 and metrics.adapter_label
    assert _config(["--metrics-adapters", "a", "--metrics-top-k", "0"]).metrics.adapter_allowlist == ("a",)


def test_an_allow_list_with_a_top_k_is_refused_naming_both_flags():
    with pytest.raises(ValueError, match=r"--metrics-adapters .* or --metrics-top-k, not both"):
        _config(["--metrics-adapters", "a", "--metrics-top-k", "5"])
