"""The S3 store against a real S3-compatible server on loopback (rclone serve s3): two replicas share one bucket."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from adapters_store.backend import content_digest
from adapters_store.errors import AdapterNotFound, InvalidAdapter, InvalidAdapterName, StoreUnavailable
from adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE
from adapters_store.s3 import S3AdapterStore, parse_url, s3_client
from tests.helpers.s3_server import S3Server, running_s3
from tests.unit.test_local_store import INVALID_NAMES, put, read_files

URL = "s3://adapters/team-a"


class ClientProxy:
    """A boto3 client with some calls changed by a subclass; every other call goes through unchanged."""

    def __init__(self, client) -> None:
        self._client = client

    def __getattr__(self, name):
        return getattr(self._client, name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def bucket(s3, request) -> str:
    """A fresh prefix per test in the shared bucket."""
    return f"{URL}/{request.node.name.replace('[', '-').replace(']', '')}"


def replica(s3: S3Server, url: str, cache: Path, **kw) -> S3AdapterStore:
    return S3AdapterStore(url, cache, s3.client(), **kw)


def keys(s3: S3Server, url: str) -> list[str]:
    bucket, prefix = parse_url(url)
    root = s3.root / bucket / prefix
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_an_upload_through_one_replica_is_served_by_the_other(s3, bucket, tmp_path):
    a, b = replica(s3, bucket, tmp_path / "a"), replica(s3, bucket, tmp_path / "b")
    result, files = put(a, "sql", weights=b"w" * 100_000)
    assert result.previous is None and result.changed
    got = b.get("sql")
    assert got.version == result.adapter.version == content_digest(a.locate(result.adapter))
    folder = b.locate(got)
    assert folder.is_relative_to(tmp_path / "b") and read_files(folder) == files
    assert b.names() == ["sql"]
    version = got.version
    assert keys(s3, bucket) == [
        "adapters/sql.json", f"objects/{version}/{CONFIG_FILE}", f"objects/{version}/{WEIGHTS_FILE}",
        f"touched/{version}",
    ]
    _, prefix = parse_url(bucket)
    manifest = json.loads((s3.root / "adapters" / prefix / "adapters" / "sql.json").read_text())
    assert manifest == {"format": 1, "name": "sql", "version": version,
                        "files": {CONFIG_FILE: len(files[CONFIG_FILE]), WEIGHTS_FILE: 100_000}}


def test_a_delete_or_reupload_reaches_the_other_replica_within_refresh(s3, bucket, tmp_path):
    clock = Clock()
    a = replica(s3, bucket, tmp_path / "a", clock=clock)
    b = replica(s3, bucket, tmp_path / "b", refresh=2.0, clock=clock)
    first, _ = put(a, "x", weights=b"one")
    assert b.get("x").version == first.adapter.version
    second, _ = put(a, "x", weights=b"two")
    assert second.previous == first.adapter and second.changed
    clock.now += 1.9
    assert b.get("x").version == first.adapter.version  # trusted for `refresh` seconds
    clock.now += 0.2
    assert b.get("x").version == second.adapter.version
    a.delete("x")
    clock.now += 2.1
    with pytest.raises(AdapterNotFound, match="'x' not found"):
        b.get("x")
    assert b.names() == [] and a.names() == []


def test_refresh_zero_checks_the_bucket_on_every_use(s3, bucket, tmp_path):
    a, b = replica(s3, bucket, tmp_path / "a"), replica(s3, bucket, tmp_path / "b", refresh=0.0)
    with pytest.raises(AdapterNotFound):
        b.get("late")
    put(a, "late")
    assert b.get("late").name == "late"  # a miss is not remembered either
    a.delete("late")
    with pytest.raises(AdapterNotFound):
        b.get("late")


def test_the_same_content_is_stored_once_and_a_reput_changes_nothing(s3, bucket, tmp_path):
    a = replica(s3, bucket, tmp_path / "a")
    one, _ = put(a, "p", weights=b"same")
    two, _ = put(a, "q", weights=b"same")
    again, _ = put(a, "p", weights=b"same")
    assert one.adapter.version == two.adapter.version == again.adapter.version
    assert not again.changed
    assert len([k for k in keys(s3, bucket) if k.startswith("objects/")]) == 2


def test_an_upload_that_dies_before_its_manifest_is_not_visible(s3, bucket, tmp_path):
    """The files reach the bucket, the manifest write fails: nothing is served, the old version stays."""
    a, b = replica(s3, bucket, tmp_path / "a"), replica(s3, bucket, tmp_path / "b", refresh=0.0)
    old, _ = put(a, "keep", weights=b"old")

    class FailingManifest(ClientProxy):
        def put_object(self, **kw):
            if kw["Key"].endswith(".json"):
                raise KeyboardInterrupt("killed")  # not an error the store handles: like a kill
            return self._client.put_object(**kw)

    crashing = S3AdapterStore(bucket, tmp_path / "c", FailingManifest(s3.client()))
    for name in ("keep", "new"):
        with pytest.raises(KeyboardInterrupt), crashing.staging() as staged:
            (staged / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 2}')
            (staged / WEIGHTS_FILE).write_bytes(b"half-way " + name.encode())
            crashing.put(name, staged)
    assert b.get("keep").version == old.adapter.version
    with pytest.raises(AdapterNotFound):
        b.get("new")
    assert b.names() == ["keep"]
    assert len([k for k in keys(s3, bucket) if k.startswith("objects/")]) == 6  # orphans, until collected


def test_collection_waits_a_grace_period_and_keeps_versions_in_use(s3, bucket, tmp_path):
    clock = Clock()
    a = replica(s3, bucket, tmp_path / "a", orphan_grace=3600, clock=clock)
    first, _ = put(a, "g", weights=b"v1")
    second, _ = put(a, "g", weights=b"v2")
    v1, v2 = first.adapter.version, second.adapter.version
    for version in (v1, v2):  # cached a while ago (a folder placed during a collection is spared)
        os.utime(tmp_path / "a" / "objects" / version, (time.time() - 60, time.time() - 60))
    assert a.collect_garbage(()) == [f"removed cached version {v1[:12]}"]  # recent in the bucket: kept there
    assert f"touched/{v1}" in keys(s3, bucket)
    eager = replica(s3, bucket, tmp_path / "a", orphan_grace=0)
    assert eager.collect_garbage({v1}) == []  # in use here
    assert eager.collect_garbage(()) == [f"removed unreferenced version {v1[:12]} from the bucket"]
    assert keys(s3, bucket) == [
        "adapters/g.json", f"objects/{v2}/{CONFIG_FILE}", f"objects/{v2}/{WEIGHTS_FILE}", f"touched/{v2}"
    ]
    assert eager.get("g").version == v2 and read_files(eager.locate(eager.get("g")))[WEIGHTS_FILE] == b"v2"
    with pytest.raises(AdapterNotFound, match="no longer stored"):
        replica(s3, bucket, tmp_path / "fresh").locate(first.adapter)


class AgingClient(ClientProxy):
    """The bucket as seen hours later for keys under ``aged`` (their LastModified moved back by ``by``)."""

    def __init__(self, client, by: timedelta) -> None:
        super().__init__(client)
        self.by, self.aged = by, set()

    def _age(self, item: dict) -> dict:
        if any(item["Key"].startswith(p) for p in self.aged):
            item = {**item, "LastModified": item["LastModified"] - self.by}
        return item

    def list_objects_v2(self, **kw):
        page = self._client.list_objects_v2(**kw)
        return {**page, "Contents": [self._age(o) for o in page.get("Contents", [])]}

    def head_object(self, **kw):
        return self._age({**self._client.head_object(**kw), "Key": kw["Key"]})


def test_a_recent_touch_keeps_an_old_unnamed_version_until_the_grace_period_has_passed(s3, bucket, tmp_path):
    client = AgingClient(s3.client(), timedelta(hours=2))
    a = S3AdapterStore(bucket, tmp_path / "a", client, orphan_grace=3600)
    first, _ = put(a, "t", weights=b"t1")
    put(a, "t", weights=b"t2")  # v1 unnamed (touched) now
    v1 = first.adapter.version
    _, prefix = parse_url(bucket)
    client.aged.add(f"{prefix}objects/{v1}/")  # uploaded two hours ago, unnamed just now: kept
    assert all("from the bucket" not in line for line in a.collect_garbage(()))
    assert f"objects/{v1}/{WEIGHTS_FILE}" in keys(s3, bucket)
    client.aged.add(f"{prefix}touched/{v1}")  # and unnamed two hours ago: collected
    assert f"removed unreferenced version {v1[:12]} from the bucket" in a.collect_garbage(())
    assert not [k for k in keys(s3, bucket) if v1 in k]


def test_a_reupload_repairs_a_damaged_object_of_the_same_size(s3, bucket, tmp_path):
    a = replica(s3, bucket, tmp_path / "a")
    result, files = put(a, "r", weights=b"r" * 1000)
    _, prefix = parse_url(bucket)
    (s3.root / "adapters" / prefix / "objects" / result.adapter.version / WEIGHTS_FILE).write_bytes(b"x" * 1000)
    put(a, "r", weights=b"r" * 1000)  # the same content again
    fresh = replica(s3, bucket, tmp_path / "fresh")
    assert read_files(fresh.locate(fresh.get("r"))) == files


def test_an_upload_sends_again_what_a_concurrent_collection_removed(s3, bucket, tmp_path):
    """A collection on another replica decided to remove an old unnamed version just before this replica
    re-uploaded the same content: the objects go between the upload and the manifest; put notices."""
    old, files = put(replica(s3, bucket, tmp_path / "old"), "c1", weights=b"same")
    replica(s3, bucket, tmp_path / "old").delete("c1")
    _, prefix = parse_url(bucket)
    version_dir = s3.root / "adapters" / prefix / "objects" / old.adapter.version

    class CollectingMeanwhile(ClientProxy):
        def put_object(self, **kw):
            if kw["Key"].endswith("c2.json"):  # just before the manifest: the other replica's removal lands
                for f in (CONFIG_FILE, WEIGHTS_FILE):
                    self._client.delete_object(Bucket="adapters", Key=f"{prefix}objects/{old.adapter.version}/{f}")
                assert not version_dir.exists() or not any(version_dir.iterdir())
            return self._client.put_object(**kw)

    writer = S3AdapterStore(bucket, tmp_path / "w", CollectingMeanwhile(s3.client()))
    put(writer, "c2", weights=b"same")
    fresh = replica(s3, bucket, tmp_path / "fresh")
    assert read_files(fresh.locate(fresh.get("c2"))) == files


def test_the_disk_cache_stays_under_its_bound_least_recently_used_first(s3, bucket, tmp_path):
    writer = replica(s3, bucket, tmp_path / "w")
    for name in "abcd":
        put(writer, name, weights=name.encode() * 1000)
    clock = Clock()
    size = len(b"a" * 1000) + len('{"peft_type": "LORA", "r": 4}')  # one version's files (write_adapter's)
    b = replica(s3, bucket, tmp_path / "b", cache_bytes=2 * size + 10, clock=clock)
    cached = lambda: sorted(p.name for p in (tmp_path / "b" / "objects").iterdir())  # noqa: E731
    version = {n: b.get(n).version for n in "abcd"}
    for n in "abc":  # a at t=0, b at 100, c at 200: three over a bound of two, a is the oldest
        b.locate(b.get(n))
        clock.now += 100
    assert cached() == sorted([version["b"], version["c"]])
    assert read_files(b.locate(b.get("a")))[WEIGHTS_FILE] == b"a" * 1000  # fetched again; b goes now
    assert cached() == sorted([version["c"], version["a"]])
    b.locate(b.get("d"))  # a was located just now (a load may be reading it), c 100 s ago: c goes
    assert cached() == sorted([version["a"], version["d"]])
    clock.now += 1
    b.locate(b.get("c"))  # everything recent: the bound is exceeded for now rather than a file pulled away
    assert len(cached()) == 3


def test_a_corrupted_object_is_refused_and_not_cached(s3, bucket, tmp_path):
    a = replica(s3, bucket, tmp_path / "a")
    result, _ = put(a, "c", weights=b"x" * 1000)
    version = result.adapter.version
    _, prefix = parse_url(bucket)
    (s3.root / "adapters" / prefix / "objects" / version / WEIGHTS_FILE).write_bytes(b"y" * 1000)
    b = replica(s3, bucket, tmp_path / "b")
    with pytest.raises(InvalidAdapter, match="does not match its version"):
        b.locate(b.get("c"))
    assert not (tmp_path / "b" / "objects" / version).exists()
    assert list((tmp_path / "b" / ".staging").iterdir()) == []


def test_a_malformed_manifest_is_named_in_the_error(s3, bucket, tmp_path):
    a = replica(s3, bucket, tmp_path / "a")
    put(a, "m")
    _, prefix = parse_url(bucket)
    (s3.root / "adapters" / prefix / "adapters" / "m.json").write_text('{"name": "m", "version": "../../etc"}')
    with pytest.raises(InvalidAdapter, match=r"manifest of 'm'.*malformed"):
        replica(s3, bucket, tmp_path / "b").get("m")


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused_before_any_request(s3, bucket, tmp_path, name):
    store = replica(s3, bucket, tmp_path / "a")
    with pytest.raises(InvalidAdapterName):
        store.get(name)
    with pytest.raises(InvalidAdapterName), store.staging() as staged:
        store.put(name, staged)
    assert keys(s3, bucket) == []


def test_an_unreachable_store_is_a_retryable_error_naming_the_url(tmp_path, monkeypatch):
    from tests.helpers.server_process import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = S3AdapterStore(URL, tmp_path, s3_client(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StoreUnavailable, match=r"s3://adapters/team-a: could not read the manifest of 'x'"):
        store.get("x")
    assert store.recover()[-1].startswith("garbage collection skipped: adapter store s3://adapters/team-a")


def test_while_the_store_is_down_known_names_keep_their_last_version(s3, bucket, tmp_path, monkeypatch):
    clock = Clock()
    a = replica(s3, bucket, tmp_path / "a", clock=clock)
    put(a, "known")
    b = replica(s3, bucket, tmp_path / "b", clock=clock)
    known = b.get("known")
    b.locate(known)
    from tests.helpers.server_process import free_port

    b.client = s3_client(f"http://127.0.0.1:{free_port()}", "k", "s")  # the bucket is gone from B's view
    clock.now += 10
    assert b.get("known") == known and content_digest(b.locate(known)) == known.version
    with pytest.raises(StoreUnavailable):
        b.get("never-seen")


def test_replicas_given_one_cache_folder_never_remove_each_others_files(s3, bucket, tmp_path):
    import gc

    shared = tmp_path / "node-cache"
    first = replica(s3, bucket, shared)
    result, files = put(first, "n", weights=b"n" * 500)
    second = replica(s3, bucket, shared)  # another process on the node, same --adapters-dir
    assert first.cache_dir == shared and second.cache_dir.parent == shared / ".replicas"
    folder = second.locate(second.get("n"))
    assert folder.is_relative_to(second.cache_dir) and read_files(folder) == files
    first.delete("n")
    os.utime(shared / "objects" / result.adapter.version, (time.time() - 60, time.time() - 60))
    first.collect_garbage(())  # removes its own copy, not the other process's
    assert read_files(folder) == files and not (shared / "objects" / result.adapter.version).exists()
    (shared / ".replicas" / "crashed").mkdir()  # a replica that died without cleaning up
    private = second.cache_dir
    del second
    gc.collect()
    assert not private.exists()  # a replica that stops removes its private cache
    assert first.recover()[0] == "removed an unfinished replica cache (0 bytes): crashed"


def test_recover_clears_a_crashed_download(s3, bucket, tmp_path):
    (tmp_path / "a" / ".staging" / "dead").mkdir(parents=True)
    (tmp_path / "a" / ".staging" / "dead" / WEIGHTS_FILE).write_bytes(b"12345")
    assert replica(s3, bucket, tmp_path / "a").recover() == ["removed an unfinished upload or download (5 bytes): dead"]


@pytest.mark.parametrize(
    ("url", "parsed"),
    [("s3://bkt", ("bkt", "")), ("s3://bkt/", ("bkt", "")), ("s3://my.bkt/a/b/", ("my.bkt", "a/b/"))],
)
def test_parse_url(url, parsed):
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", ["http://bkt/x", "s3://", "s3://B/x", "s3://a/x", "bkt/x"])
def test_parse_url_refuses(url):
    with pytest.raises(ValueError, match=r"s3://|bucket name"):
        parse_url(url)
