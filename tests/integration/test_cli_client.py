"""``loraplex adapters list|show|upload|delete`` against a real ``loraplex serve`` process on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from server.cli import main
from tests.helpers.server_process import free_port, running_server
from tests.helpers.tiny import AdapterSpec, make_adapter
from tests.helpers.tiny_server import save_tiny_model_with_adapters
from tests.helpers.uploads import folder_members, snapshot, zip_bytes

TOKEN = "admin-token-for-the-cli-0001"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-client")
    model_dir, base, _, adapters = save_tiny_model_with_adapters(root, {"folder": 1, "zipped": 2})
    archive = root / "zipped.zip"
    archive.write_bytes(zip_bytes(folder_members(adapters["zipped"])))
    too_big = make_adapter(base, AdapterSpec("rank-32", 32, 32, ("q_proj",)), root / "src-big", seed=3)
    store = root / "store"
    with running_server(["--model", str(model_dir), "--adapters-dir", str(store), "--max-lora-rank", "16"],
                        root / "server.log", env={"LORAPLEX_ADMIN_TOKEN": TOKEN}) as url:
        yield url, store, adapters["folder"], archive, too_big


def cli(capsys, url: str, *argv: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    """``loraplex adapters <argv> --url <url> [--admin-token ...]`` in this process: (status, stdout, stderr)."""
    auth = ["--admin-token", token] if token else []
    status = main(["adapters", *argv, "--url", url, *auth])
    out = capsys.readouterr()
    return status, out.out, out.err


def _admin(url: str, path: str = "") -> httpx.Response:
    return httpx.get(f"{url}/admin/adapters{path}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_upload_list_show_delete(world, capsys):
    url, _, folder, archive, _ = world
    status, out, err = cli(capsys, url, "upload", "from-folder", str(folder))
    assert status == 0, err
    version = _admin(url, "/from-folder").json()["version"]
    assert out == f"from-folder@{version}: stored\n"
    assert cli(capsys, url, "upload", "from-folder", str(folder))[1] == f"from-folder@{version}: unchanged\n"
    status, out, err = cli(capsys, url, "upload", "from-zip", str(archive))
    assert status == 0 and out.startswith("from-zip@") and out.endswith(": stored\n"), (out, err)
    status, out, _ = cli(capsys, url, "upload", "dry", str(folder), "--dry-run")
    assert status == 0 and out == f"dry@{version}: valid (dry run, nothing stored)\n"

    status, out, _ = cli(capsys, url, "list")
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["NAME", "VERSION", "STATE", "TIER", "RANK", "PINNED", "IN_FLIGHT",
                                                "ERROR"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"from-folder", "from-zip"}  # the dry run stored nothing
    assert rows["from-folder"][1:] == [version[:12], "stored", "disk", "8", "no", "0", "-"]
    status, out, _ = cli(capsys, url, "list", "--json")
    assert status == 0 and json.loads(out) == _admin(url).json()
    status, out, _ = cli(capsys, url, "show", "from-zip")
    assert status == 0 and json.loads(out) == _admin(url, "/from-zip").json()

    status, out, _ = cli(capsys, url, "delete", "from-folder")
    assert status == 0 and out == f"from-folder@{version}: deleted\n"
    assert [a["name"] for a in _admin(url).json()["data"]] == ["from-zip"]


def test_the_servers_refusal_is_printed_and_changes_nothing(world, capsys):
    url, store, _, _, too_big = world
    before = snapshot(store)
    status, out, err = cli(capsys, url, "upload", "big", str(too_big))
    assert status == 1 and out == ""
    assert err.startswith("loraplex adapters upload: 400: ") and "rank 32" in err, err
    assert snapshot(store) == before
    status, _, err = cli(capsys, url, "show", "no-such-adapter")
    assert status == 1 and err == "loraplex adapters show: 404: The model or adapter 'no-such-adapter' does not exist\n"
    status, _, err = cli(capsys, url, "delete", "no-such-adapter")
    assert status == 1 and "404" in err
    status, _, err = cli(capsys, url, "list", token="wrong-token-0000000000")
    assert status == 1 and err.startswith("loraplex adapters list: 401: a valid admin token is required"), err
    assert snapshot(store) == before


def test_local_problems_and_an_unreachable_server_exit_1(world, tmp_path, capsys):
    url, _, _, _, _ = world
    status, _, err = cli(capsys, url, "upload", "x", str(tmp_path / "nowhere"))
    assert status == 1 and "no such file or folder" in err
    status, _, err = cli(capsys, url, "upload", "x", str(tmp_path))
    assert status == 1 and "no adapter_config.json or adapter_model.safetensors in this folder" in err
    status, _, err = cli(capsys, f"http://127.0.0.1:{free_port()}", "list")
    assert status == 1 and err.startswith("loraplex adapters list: cannot reach http://127.0.0.1:"), err
    status, _, err = cli(capsys, "127.0.0.1:8000", "list")
    assert status == 1 and "give the server's http:// or https:// URL" in err


def test_a_server_that_is_not_loraplex_is_reported(capsys):
    class Html(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>not an API</html>")

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Html) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            status, out, err = cli(capsys, f"http://127.0.0.1:{httpd.server_port}", "list")
        finally:
            httpd.shutdown()
    assert status == 1 and out == "" and "answered with something other than JSON: is it loraplex?" in err


def test_the_console_command_reads_the_admin_token_from_the_environment(world):
    url, _, _, _, _ = world
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    command = [sys.executable, "-m", "server.cli", "adapters", "list", "--json", "--url", url]
    done = subprocess.run(command, capture_output=True, text=True, env=env | {"LORAPLEX_ADMIN_TOKEN": TOKEN},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == _admin(url).json()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "401" in done.stderr and done.stdout == ""
