"""The version: one source (pyproject.toml, through the installed distribution), shown by the CLI and ``/version``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from importlib.metadata import version
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.version import package_version

REPO = Path(__file__).resolve().parents[2]


def test_the_package_version_is_pyprojects():
    declared = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert package_version() == version("loraplex") == declared
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", declared)


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"]])
def test_the_cli_prints_the_version_and_exits_0(argv):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    done = subprocess.run([sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"loraplex {package_version()}\n"


def test_version_route_answers_while_the_model_loads():
    release = threading.Event()

    def never_loaded():
        release.wait(60)
        raise RuntimeError("stopped by the test")

    app = create_app(never_loaded, on_startup_failure=lambda exc: None)
    try:
        with TestClient(app) as client:
            assert client.get("/ready").status_code == 503
            r = client.get("/version")
            assert r.status_code == 200 and r.json() == {"version": package_version()}
            assert client.get("/openapi.json").json()["info"]["version"] == package_version()
            release.set()
    finally:
        release.set()
