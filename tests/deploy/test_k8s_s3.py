"""deploy/k8s/overlays/s3: the store settings reach the server as flags it accepts, and each pod caches locally.

The settings are rendered by kustomize, then parsed by the server's own command line (``LORAPLEX_*``
variables), so a misspelt variable or an invalid store URL fails here rather than in a crashing pod.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import build_parser, config_from_args
from tests.deploy.test_k8s import K8S, by_kind, render

OVERLAY = K8S / "overlays" / "s3"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return render(OVERLAY)


def container(docs: list[dict]) -> dict:
    [deployment] = by_kind(docs, "Deployment")
    [server] = deployment["spec"]["template"]["spec"]["containers"]
    return server


def store_settings(docs: list[dict]) -> dict[str, str]:
    refs = [e["configMapRef"]["name"] for e in container(docs)["envFrom"] if "configMapRef" in e]
    maps = {m["metadata"]["name"]: m["data"] for m in by_kind(docs, "ConfigMap")}
    assert refs and all(r in maps for r in refs), (refs, list(maps))  # kustomize rewrote the hashed name
    return {k: v for r in refs for k, v in maps[r].items()}


def unknown_settings(settings: dict[str, str]) -> set[str]:
    """``LORAPLEX_*`` variables that name no flag of ``loraplex serve`` (the server would ignore them)."""
    flags = {"LORAPLEX_" + k.upper() for k in vars(build_parser({}).parse_args(["serve"]))}
    return {k for k in settings if k.startswith("LORAPLEX_")} - flags


def test_the_store_settings_are_flags_the_server_accepts(docs):
    settings = store_settings(docs)
    assert unknown_settings(settings) == set()
    config = config_from_args(build_parser(settings).parse_args(["serve"]))
    assert config.lora.store_url == settings["LORAPLEX_ADAPTER_STORE"].strip()
    assert config.lora.store_url.startswith("s3://")
    assert config.lora.store_refresh == float(settings["LORAPLEX_STORE_REFRESH"])
    [deployment] = by_kind(docs, "Deployment")
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "adapters"]
    limit_gi = int(volume["emptyDir"]["sizeLimit"].removesuffix("Gi"))
    assert 0 < config.lora.store_cache_bytes < limit_gi << 30  # the cache bound keeps the pod from eviction


def test_a_misspelt_setting_is_caught(docs):
    settings = store_settings(docs)
    bad = {**settings, "LORAPLEX_ADAPTER_STORE": "s3://Not_A_Bucket/x"}
    with pytest.raises(ValueError, match="not a valid bucket name"):
        config_from_args(build_parser(bad).parse_args(["serve"]))
    assert unknown_settings({**settings, "LORAPLEX_ADAPTERS_STORE": "s3://b"}) == {"LORAPLEX_ADAPTERS_STORE"}


def test_credentials_come_from_a_secret_and_the_shared_volume_is_gone(docs):
    assert not by_kind(docs, "PersistentVolumeClaim")
    assert {"secretRef": {"name": "loraplex-s3"}} in container(docs)["envFrom"]
    [deployment] = by_kind(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert set(volumes["adapters"]) == {"name", "emptyDir"}  # per-pod cache, no claim left behind
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    assert f"LORAPLEX_ADAPTERS_DIR={mounts['adapters']}" in dockerfile  # the cache is where the server looks
