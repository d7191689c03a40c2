"""``loraplex serve`` start-up validation: bad flags and ``LORAPLEX_*`` values fail at once, with a message.

Each case runs ``python -m server.cli serve`` as a subprocess: argparse exits 2
and names the problem on stderr, before any model is loaded (the CLI imports
neither torch nor the model code until it serves). ``--help`` documents every
option with its variable and never shows a secret given through the environment.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import cli
from server.cli import build_parser, config_from_args, main
from tests.helpers.server_process import free_port

REPO = Path(__file__).resolve().parents[2]
QUICK_S = 10.0  # a refusal takes a Python start-up (~0.2 s idle); a model load would take far longer
ADMIN_SECRET = "admin-secret-value-0123456789"
KEY_SECRET = "sk-inference-secret-42"


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``serve`` with a private store and cache (and a free port unless the case sets one); (result, seconds)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    environ["LORAPLEX_PORT"] = str(free_port())  # a flag or the case's own variable overrides it
    environ.update(env or {})
    cmd = [
        sys.executable, "-m", "server.cli", "serve",
        "--adapters-dir", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), *args,
    ]
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=REPO, timeout=60)
    return result, time.monotonic() - started


def _refused(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run, assert a quick exit 2 with usage on stderr, return stderr."""
    result, seconds = _run(tmp_path, *args, env=env)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "usage: loraplex" in result.stderr
    assert seconds < QUICK_S, f"took {seconds:.1f} s to refuse"
    assert "loaded" not in result.stderr and "engine ready" not in result.stderr
    return result.stderr


BAD_VALUES = [
    # Values from the environment: the message names the variable.
    ((), {"LORAPLEX_MAX_LORAS": "abc"}, ["LORAPLEX_MAX_LORAS='abc'", "invalid literal for int()"]),
    ((), {"LORAPLEX_PORT": "70000"}, ["LORAPLEX_PORT: must be 0..65535, got 70000"]),
    ((), {"LORAPLEX_DTYPE": "x"}, ["LORAPLEX_DTYPE='x'", "choose from auto, float32"]),
    ((), {"LORAPLEX_LORA_BACKEND": "gpu"}, ["LORAPLEX_LORA_BACKEND='gpu'", "choose from"]),
    ((), {"LORAPLEX_HOST_CACHE": "lots"}, ["LORAPLEX_HOST_CACHE='lots'", "not a size"]),
    ((), {"LORAPLEX_REQUEST_TIMEOUT": "soon"}, ["LORAPLEX_REQUEST_TIMEOUT='soon'"]),
    ((), {"LORAPLEX_MAX_LORAS": "0"}, ["LORAPLEX_MAX_LORAS: must be 1..4096, got 0"]),
    ((), {"LORAPLEX_ALLOWED_LORA_DIRS": "/ok,relative/dir"},
     ["LORAPLEX_ALLOWED_LORA_DIRS: ", "must be absolute paths", "relative/dir"]),
    # Flags.
    (("--port", "70000"), {}, ["--port: must be 0..65535, got 70000"]),
    (("--port", "http"), {}, ["--port", "invalid int value: 'http'"]),
    (("--max-loras", "0"), {}, ["--max-loras: must be 1..4096, got 0"]),
    (("--max-lora-rank", "2048"), {}, ["--max-lora-rank: must be 1..1024, got 2048"]),
    (("--dtype", "x"), {}, ["--dtype", "invalid choice: 'x'"]),
    (("--device", "tpu"), {}, ["--device", "invalid choice: 'tpu'"]),
    (("--lora-dtype", "int8"), {}, ["--lora-dtype", "invalid choice: 'int8'"]),
    (("--quantization", "int3"), {}, ["--quantization", "invalid choice: 'int3'", "'auto', 'none', 'int8', 'int4'"]),
    (("--quantization", "int8", "--dtype", "bfloat16"), {},
     ["--quantization int8 keeps activations in float32", "--dtype float32", "not bfloat16"]),
    (("--quantization", "int4", "--device", "cuda"), {}, ["--quantization int4 runs on the CPU only"]),
    (("--activations", "int4"), {}, ["--activations", "invalid choice: 'int4'", "'exact', 'int8'"]),
    (("--activations", "int8", "--quantization", "none"), {},
     ["--activations int8 applies to quantized base weights", "--quantization auto"]),
    ((), {"LORAPLEX_QUANTIZATION": "fp8"}, ["LORAPLEX_QUANTIZATION='fp8'", "choose from auto, none"]),
    (("--log-level", "loud"), {}, ["--log-level", "invalid choice: 'loud'"]),
    (("--allowed-lora-dirs", "relative/dir"), {},
     ["--allowed-lora-dirs: ", "must be absolute paths", "'relative/dir'"]),
    (("--host-cache", "-1"), {}, ["--host-cache: must be >= 0"]),
    (("--host-cache", "2X"), {}, ["--host-cache", "not a size: '2X'"]),
    (("--host-cache", "infG"), {}, ["--host-cache", "'infG'"]),
    ((), {"LORAPLEX_MAX_UPLOAD_SIZE": "1e400G"}, ["LORAPLEX_MAX_UPLOAD_SIZE='1e400G'"]),
    (("--kv-cache-tokens", "8"), {}, ["--kv-cache-tokens: must be at least one block (--block-size 16), got 8"]),
    (("--block-size", "0"), {}, ["--block-size: must be at least 1, got 0"]),
    (("--max-num-seqs", "0"), {}, ["--max-num-seqs: scheduler limits must be positive"]),
    (("--max-num-batched-tokens", "0"), {}, ["--max-num-batched-tokens: scheduler limits must be positive"]),
    (("--max-model-len", "-1"), {}, ["--max-model-len: scheduler limits must be positive"]),
    (("--adapter-wait-timeout", "0"), {}, ["--adapter-wait-timeout: must be positive"]),
    (("--admin-timeout", "0"), {}, ["--admin-timeout: admin operation timeout must be positive"]),
    (("--max-queued-requests", "-1"), {}, ["--max-queued-requests: must be >= 0"]),
    (("--request-timeout", "-1"), {}, ["--request-timeout: must be a finite number of seconds >= 0"]),
    (("--shutdown-timeout", "-0.5"), {}, ["--shutdown-timeout: must be a finite number of seconds >= 0"]),
    (("--max-request-size", "100"), {}, ["--max-request-size: must be at least 1024"]),
    (("--max-upload-size", "0"), {}, ["--max-upload-size: must be positive"]),
    (("--model", "/nonexistent/model-dir"), {}, ["--model /nonexistent/model-dir: no such file or directory"]),
    (("--adapters-dir", "/proc/loraplex-store"), {}, ["--adapters-dir /proc/loraplex-store: cannot create it"]),
]


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    BAD_VALUES,
    ids=[" ".join(args) or " ".join(f"{k}={v}" for k, v in env.items()) for args, env, _ in BAD_VALUES],
)
def test_bad_value_is_refused_at_once_naming_the_problem(tmp_path, capsys, monkeypatch, args, env, fragments):
    stderr = _refused_in_process(capsys, monkeypatch, tmp_path, *args, env=env)
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize("case", [0, 14, len(BAD_VALUES) - 2], ids=["variable", "flag", "model-folder"])
def test_the_command_itself_refuses_quickly_with_exit_2(tmp_path, case):
    """A few of the cases above as the real process: exit status 2, usage, no model load."""
    args, env, fragments = BAD_VALUES[case]
    stderr = _refused(tmp_path, *args, env=env)
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize(
    ("args", "env", "secret", "fragment"),
    [
        (("--admin-token", "short-token"), {}, "short-token", "admin token must be at least 16 characters"),
        ((), {"LORAPLEX_ADMIN_TOKEN": "short-token"}, "short-token", "admin token must be at least 16 characters"),
        (("--api-keys", "sk-1234"), {}, "sk-1234", "API keys must be at least 8 printable ASCII characters"),
        ((), {"LORAPLEX_API_KEYS": f"{KEY_SECRET},sk-1234"}, "sk-1234", "at least 8 printable ASCII characters"),
        ((), {"LORAPLEX_API_KEYS": "sk-with space"}, "sk-with space", "without spaces or commas"),
        (
            ("--admin-token", ADMIN_SECRET),
            {"LORAPLEX_API_KEYS": f"{KEY_SECRET},{ADMIN_SECRET}"},
            ADMIN_SECRET,
            "the admin token must differ from every inference API key",
        ),
    ],
    ids=["short-admin-token-flag", "short-admin-token-env", "short-key-flag", "short-key-env", "key-with-space",
         "admin-token-is-an-api-key"],
)
def test_bad_secret_is_refused_without_echoing_it(tmp_path, capsys, monkeypatch, args, env, secret, fragment):
    stderr = _refused_in_process(capsys, monkeypatch, tmp_path, *args, env=env)
    assert fragment in stderr, stderr
    assert secret not in stderr
    assert KEY_SECRET not in stderr


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read the API keys file '{path}'"),
        ("", "the API keys file '{path}' lists no key"),
        ("# only a comment\n\n   \n", "the API keys file '{path}' lists no key"),
        (f"{KEY_SECRET} team-*\n# a comment\n{KEY_SECRET} other-*\n", "{path}:3: this key is listed twice"),
        (f"{KEY_SECRET}\nsk-1234 team-*\n", "{path}:2: API keys must be at least 8 characters"),
    ],
    ids=["missing", "empty", "comments-only", "duplicate", "short-key"],
)
def test_bad_api_keys_file_is_refused_naming_file_and_line(tmp_path, capsys, monkeypatch, content, fragment):
    path = tmp_path / "keys.txt"
    if content is not None:
        path.write_text(content)
    for given in (("--api-keys-file", str(path)), ()):  # as a flag, then as LORAPLEX_API_KEYS_FILE
        env = {} if given else {"LORAPLEX_API_KEYS_FILE": str(path)}
        stderr = _refused_in_process(capsys, monkeypatch, tmp_path, *given, env=env)
        assert fragment.format(path=path) in stderr, stderr
        assert KEY_SECRET not in stderr and "sk-1234" not in stderr


def _refused_in_process(capsys, monkeypatch, tmp_path: Path, *args: str, env: dict[str, str]) -> str:
    """:func:`_refused` through ``main`` in this process (the process's own exit: the test above): stderr."""
    for name in [n for n in os.environ if n.startswith("LORAPLEX_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def serve(*_args):
        raise AssertionError("not refused: the server would start")

    monkeypatch.setattr(cli, "serve", serve)
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--adapters-dir", str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), *args])
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert "usage: loraplex" in stderr
    return stderr


def test_port_in_use_is_refused_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        stderr = _refused(tmp_path, "--host", "127.0.0.1", "--port", str(port))
    assert f"cannot listen on 127.0.0.1:{port}" in stderr, stderr
    assert "Address already in use" in stderr, stderr


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help entry, whitespace collapsed (argparse wraps long entries over lines)."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(2)
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
    return {flag: " ".join(text.split()) for flag, text in blocks.items()}


def test_help_documents_every_option_with_its_variable_and_hides_secrets(tmp_path):
    env = {
        "LORAPLEX_ADMIN_TOKEN": ADMIN_SECRET,
        "LORAPLEX_API_KEYS": f"{KEY_SECRET},sk-other-secret-77",
        "LORAPLEX_MAX_LORAS": "32",
        "COLUMNS": "100",
    }
    result, _ = _run(tmp_path, "--help", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for secret in (ADMIN_SECRET, KEY_SECRET, "sk-other-secret-77"):
        assert secret not in out and secret not in result.stderr
    blocks = _option_blocks(out)
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]
    flags = [s for action in serve._actions for s in action.option_strings
             if s.startswith("--") and s not in ("--help", "--version")]
    assert len(flags) >= 30
    for flag in flags:
        if flag.startswith("--no-") and "--" + flag[5:] in flags:  # an on/off pair shares one entry
            assert flag in blocks["--" + flag[5:]]
            continue
        var = "LORAPLEX_" + flag[2:].upper().replace("-", "_")
        assert flag in blocks, f"{flag} missing from --help"
        assert f"[env {var}]" in blocks[flag], blocks[flag]
    assert "(default: 32)" in blocks["--max-loras"]  # a variable's value is the shown default ...
    for secret_flag in ("--admin-token", "--api-keys"):  # ... except a secret's
        assert "default" not in blocks[secret_flag].split("[env")[1], blocks[secret_flag]


@pytest.mark.parametrize("flag", ["--request-timeout", "--shutdown-timeout", "--adapter-wait-timeout",
                                  "--admin-timeout"])
def test_nan_timeout_is_refused(flag):
    # main() turns the config's ValueError into a usage error (exit 2); a NaN that passes would make every
    # request time out at once (--request-timeout) or the shutdown wait meaningless (--shutdown-timeout).
    with pytest.raises(ValueError, match="timeout"):
        _config([flag, "nan"], {})


def _config(argv: list[str], env: dict[str, str]):
    return config_from_args(build_parser(env).parse_args(["serve", *argv]))


def test_limit_flags_and_variables_reach_the_config_and_flags_win():
    limits = _config(["--request-timeout", "0.3", "--shutdown-timeout", "0.5", "--max-queued-requests", "2"], {}).limits
    assert (limits.request_timeout, limits.shutdown_timeout, limits.max_queued_requests) == (0.3, 0.5, 2)
    env = {"LORAPLEX_REQUEST_TIMEOUT": "7", "LORAPLEX_MAX_QUEUED_REQUESTS": "9", "LORAPLEX_MAX_LORAS": "32"}
    config = _config([], env)
    assert (config.limits.request_timeout, config.limits.max_queued_requests, config.lora.max_loras) == (7.0, 9, 32)
    config = _config(["--request-timeout", "1.5", "--max-loras", "4"], env)
    assert (config.limits.request_timeout, config.lora.max_loras) == (1.5, 4)
    assert _config([], {}).limits.request_timeout == 0  # no server-wide timeout unless asked


def test_a_model_folder_of_an_unsupported_family_is_refused_before_it_loads(tmp_path):
    from transformers import OlmoConfig

    folder = tmp_path / "olmo"
    folder.mkdir()
    OlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2).save_pretrained(folder)  # the config alone: no weights needed
    stderr = _refused(tmp_path, "--model", str(folder))
    supported = "llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text, olmo2, granite, smollm3"
    assert f"--model {folder}: model type 'olmo' is not supported; supported: {supported}" in stderr


def test_prefix_caching_is_on_by_default_and_turned_off_by_flag_or_variable():
    assert _config([], {}).cache.prefix_caching is True
    assert _config(["--no-enable-prefix-caching"], {}).cache.prefix_caching is False
    assert _config([], {"LORAPLEX_ENABLE_PREFIX_CACHING": "off"}).cache.prefix_caching is False
    assert _config(["--enable-prefix-caching"], {"LORAPLEX_ENABLE_PREFIX_CACHING": "off"}).cache.prefix_caching
    with pytest.raises(SystemExit):
        _config([], {"LORAPLEX_ENABLE_PREFIX_CACHING": "maybe"})
