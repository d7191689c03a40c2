"""The local-directory store: atomic puts, old versions kept until collected, hand-placed folders, crash recovery."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters_store.backend import ADAPTER_FILES, PutResult, StoredAdapter, content_digest
from adapters_store.errors import AdapterError, AdapterNotFound, InvalidAdapterName
from adapters_store.local import LocalAdapterStore
from adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE

INVALID_NAMES = ["../x", ".hidden", "a/b", "", "x" * 129]


def write_adapter(folder: Path, rank: int = 4, weights: bytes = b"weights-1") -> dict[str, bytes]:
    """Write the two PEFT files into ``folder`` and return what was written (name -> bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {CONFIG_FILE: json.dumps({"peft_type": "LORA", "r": rank}).encode(), WEIGHTS_FILE: weights}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def digest_of(files: dict[str, bytes], tmp: Path) -> str:
    """The version the store should give these files, computed on a scratch copy."""
    scratch = tmp / "digest-scratch"
    scratch.mkdir()
    for name, data in files.items():
        (scratch / name).write_bytes(data)
    version = content_digest(scratch)
    shutil.rmtree(scratch)
    return version


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` (relative): file -> bytes, symlink -> ("link", target), folder -> "dir"."""
    tree: dict[str, object] = {}

    def walk(folder: Path) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            rel = str(path.relative_to(root))
            if entry.is_symlink():
                tree[rel] = ("link", os.readlink(path))
            elif entry.is_dir():
                tree[rel] = "dir"
                walk(path)
            else:
                tree[rel] = path.read_bytes()

    if root.exists():
        walk(root)
    return tree


def read_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES if (folder / name).exists()}


def put(store: LocalAdapterStore, name: str, **adapter) -> tuple[PutResult, dict[str, bytes]]:
    """Upload the way real callers do: assemble in ``store.staging()``, then ``put``."""
    with store.staging() as staged:
        files = write_adapter(staged, **adapter)
        result = store.put(name, staged)
    return result, files


def assert_consistent(store: LocalAdapterStore) -> None:
    """Every listed name is served, and its files hash to its version."""
    for name in store.names():
        adapter = store.get(name)
        assert content_digest(store.locate(adapter)) == adapter.version
        assert content_digest(adapter.path) == adapter.version


def returns_within(seconds: float, fn: Callable[[], object]) -> object:
    """``fn()`` run on a daemon thread; fails the test if it has not returned after ``seconds`` (a deadlock)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def store(tmp_path: Path) -> LocalAdapterStore:
    return LocalAdapterStore(tmp_path / "store")


# -- put, get, locate -------------------------------------------------------------


def test_put_of_a_new_name_publishes_a_symlink_to_a_content_addressed_object(store, tmp_path):
    with store.staging() as staged:
        files = write_adapter(staged)
        expected = content_digest(staged)
        result = store.put("alpha", staged)
        assert not staged.exists()
    root = store.root
    assert result.previous is None and result.changed
    assert result.adapter == StoredAdapter("alpha", expected, root / ".objects" / expected)
    assert expected == digest_of(files, tmp_path)
    assert store.get("alpha") == result.adapter
    assert store.names() == ["alpha"]
    assert (root / "alpha").is_symlink() and os.readlink(root / "alpha") == f".objects/{expected}"
    assert store.locate(result.adapter) == root / ".objects" / expected
    assert read_files(store.locate(result.adapter)) == files
    assert list((root / ".staging").iterdir()) == []


def test_names_of_a_store_that_does_not_exist_yet_is_empty_and_creates_nothing(store):
    assert store.names() == []
    assert not store.root.exists()
    with pytest.raises(AdapterNotFound):
        store.get("alpha")


def test_reput_with_other_content_keeps_the_old_version_until_garbage_collection(store):
    first, old_files = put(store, "alpha", weights=b"old")
    second, new_files = put(store, "alpha", weights=b"new")
    old, new = first.adapter, second.adapter
    assert new.version != old.version
    assert second.previous == old and second.changed
    assert store.get("alpha") == new
    assert read_files(store.locate(new)) == new_files
    assert read_files(store.locate(old)) == old_files

    assert store.collect_garbage(in_use=[old.version]) == []
    assert read_files(store.locate(old)) == old_files

    assert store.collect_garbage(in_use=[]) == [f"removed unreferenced version {old.version[:12]}"]
    with pytest.raises(AdapterNotFound, match="no longer stored"):
        store.locate(old)
    assert read_files(store.locate(store.get("alpha"))) == new_files
    assert sorted(p.name for p in (store.root / ".objects").iterdir()) == [new.version]
    assert list((store.root / ".trash").iterdir()) == []


def test_reput_of_identical_content_is_not_a_change(store):
    first, _ = put(store, "alpha")
    before = snapshot(store.root)
    second, _ = put(store, "alpha")
    assert not second.changed
    assert second.previous == first.adapter and second.adapter == first.adapter
    assert snapshot(store.root) == before


def test_two_names_with_the_same_content_share_one_object(store):
    a, _ = put(store, "a")
    b, _ = put(store, "b")
    assert a.adapter.version == b.adapter.version
    assert len(list((store.root / ".objects").iterdir())) == 1
    store.delete("a")
    assert store.collect_garbage(in_use=[]) == []
    assert store.get("b").version == a.adapter.version


def test_garbage_collection_never_removes_a_version_a_name_points_to(store):
    put(store, "alpha", weights=b"1")
    put(store, "beta", weights=b"2")
    assert store.collect_garbage(in_use=[]) == []
    assert store.names() == ["alpha", "beta"]
    assert_consistent(store)


# -- hand-placed folders --------------------------------------------------------


def test_a_hand_placed_folder_is_listed_and_served_with_its_digest_as_version(store, tmp_path):
    files = write_adapter(store.root / "manual", weights=b"by hand")
    version = digest_of(files, tmp_path)
    adapter = store.get("manual")
    assert adapter == StoredAdapter("manual", version, store.root / "manual")
    assert store.names() == ["manual"]
    assert store.locate(adapter) == store.root / "manual"


def test_a_hand_placed_folder_changed_in_place_is_no_longer_located_under_its_old_version(store):
    write_adapter(store.root / "manual", weights=b"v1")
    old = store.get("manual")
    (store.root / "manual" / WEIGHTS_FILE).write_bytes(b"v2, longer")
    with pytest.raises(AdapterNotFound, match="no longer stored"):
        store.locate(old)
    assert store.get("manual").version != old.version


def test_a_folder_without_config_is_not_an_adapter(store):
    (store.root / "notes").mkdir(parents=True)
    (store.root / "notes" / WEIGHTS_FILE).write_bytes(b"x")
    assert store.names() == []
    with pytest.raises(AdapterNotFound):
        store.get("notes")


def test_replacing_a_hand_placed_folder_moves_its_old_version_under_objects(store, tmp_path):
    old_files = write_adapter(store.root / "manual", weights=b"by hand")
    old = store.get("manual")
    result, new_files = put(store, "manual", weights=b"uploaded")
    assert result.previous == old and result.changed
    assert (store.root / "manual").is_symlink()
    assert read_files(store.locate(result.adapter)) == new_files
    assert store.locate(old) == store.root / ".objects" / old.version
    assert read_files(store.locate(old)) == old_files
    assert list((store.root / ".trash").iterdir()) == []

    assert store.collect_garbage(in_use=[old.version]) == []
    assert read_files(store.locate(old)) == old_files
    assert store.collect_garbage(in_use=[]) == [f"removed unreferenced version {old.version[:12]}"]
    with pytest.raises(AdapterNotFound):
        store.locate(old)
    assert store.names() == ["manual"]
    assert_consistent(store)


def test_replacing_a_hand_placed_folder_with_identical_content_is_not_a_change(store):
    write_adapter(store.root / "manual")
    old = store.get("manual")
    result, files = put(store, "manual")
    assert not result.changed and result.adapter.version == old.version
    assert (store.root / "manual").is_symlink()
    assert read_files(store.locate(result.adapter)) == files
    assert list((store.root / ".trash").iterdir()) == []
    assert sorted(p.name for p in (store.root / ".objects").iterdir()) == [old.version]


# -- delete ---------------------------------------------------------------------


def test_delete_of_a_symlinked_name_keeps_its_files_until_garbage_collection(store):
    result, files = put(store, "alpha")
    assert store.delete("alpha") == result.adapter
    assert not (store.root / "alpha").exists() and not (store.root / "alpha").is_symlink()
    assert store.names() == []
    with pytest.raises(AdapterNotFound):
        store.get("alpha")
    assert read_files(store.locate(result.adapter)) == files
    assert store.collect_garbage(in_use=[]) == [f"removed unreferenced version {result.adapter.version[:12]}"]
    with pytest.raises(AdapterNotFound):
        store.locate(result.adapter)


def test_delete_of_a_hand_placed_folder_keeps_its_files_until_garbage_collection(store):
    files = write_adapter(store.root / "manual")
    adapter = store.get("manual")
    assert store.delete("manual") == adapter
    assert not (store.root / "manual").exists()
    assert store.names() == []
    assert store.locate(adapter) == store.root / ".objects" / adapter.version
    assert read_files(store.locate(adapter)) == files
    assert store.collect_garbage(in_use=[adapter.version]) == []
    assert store.collect_garbage(in_use=[]) == [f"removed unreferenced version {adapter.version[:12]}"]
    with pytest.raises(AdapterNotFound):
        store.locate(adapter)


def test_delete_of_an_unknown_name_raises_not_found_and_changes_nothing(store, tmp_path):
    put(store, "alpha")
    before = snapshot(tmp_path)
    with pytest.raises(AdapterNotFound):
        store.delete("beta")
    assert snapshot(tmp_path) == before


def test_a_deleted_name_can_be_put_again(store):
    put(store, "alpha")
    store.delete("alpha")
    second, files = put(store, "alpha")
    assert second.previous is None and second.changed
    assert read_files(store.locate(store.get("alpha"))) == files


# -- names that are path tricks ----------------------------------------------------


@pytest.fixture
def decoy(tmp_path: Path) -> Path:
    """An adapter folder beside the store's root, where ``../x`` would lead if names were paths."""
    write_adapter(tmp_path / "x", weights=b"outside")
    write_adapter(tmp_path / "store" / "a" / "b", weights=b"nested")
    return tmp_path / "x"


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_get_and_delete_refuse_invalid_names_without_touching_anything(store, tmp_path, decoy, name):
    before = snapshot(tmp_path)
    with pytest.raises(InvalidAdapterName):
        store.get(name)
    with pytest.raises(InvalidAdapterName):
        store.delete(name)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_put_refuses_invalid_names_without_touching_anything(store, tmp_path, decoy, name):
    with store.staging() as staged:
        write_adapter(staged, weights=b"upload")
        before = snapshot(tmp_path)
        with pytest.raises(InvalidAdapterName):
            store.put(name, staged)
        assert snapshot(tmp_path) == before
    assert list((store.root / ".staging").iterdir()) == []
    assert read_files(decoy)[WEIGHTS_FILE] == b"outside"


# -- staging --------------------------------------------------------------------


def test_staging_removes_its_folder_and_lock_when_the_upload_is_abandoned(store):
    with pytest.raises(RuntimeError), store.staging() as staged:
        write_adapter(staged)
        assert {p.name for p in (store.root / ".staging").iterdir()} == {staged.name, f"{staged.name}.lock"}
        raise RuntimeError("client went away")
    assert list((store.root / ".staging").iterdir()) == []
    assert store.names() == []


# -- recover ----------------------------------------------------------------------


def test_recover_of_an_empty_store_reports_nothing(store):
    assert store.recover() == []
    assert store.root.is_dir()
    assert store.recover() == []


@pytest.mark.parametrize("stale_lock", [False, True], ids=["no-lock-file", "unheld-lock-file"])
def test_recover_removes_an_unfinished_upload_nobody_owns(store, stale_lock):
    put(store, "alpha")
    before = snapshot(store.root)
    staging = store.root / ".staging"
    (staging / "abc123").mkdir()
    (staging / "abc123" / WEIGHTS_FILE).write_bytes(b"half an upl")
    if stale_lock:
        (staging / "abc123.lock").touch()
    assert store.recover() == ["removed an unfinished upload (11 bytes): abc123"]
    assert snapshot(store.root) == before
    assert_consistent(store)


def test_recover_keeps_an_upload_whose_lock_a_live_process_holds(store):
    staging = store.root / ".staging"
    (staging / "abc123").mkdir(parents=True)
    (staging / "abc123" / WEIGHTS_FILE).write_bytes(b"in progress")
    with (staging / "abc123.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = snapshot(store.root)
        assert store.recover() == []
        assert snapshot(store.root) == {**before, ".lock": b""}
    assert store.recover() == ["removed an unfinished upload (11 bytes): abc123"]
    assert list(staging.iterdir()) == []


def test_recover_keeps_an_upload_being_staged_right_now(store):
    with store.staging() as staged:
        files = write_adapter(staged)
        assert store.recover() == []
        assert read_files(staged) == files
        result = store.put("alpha", staged)
    assert store.get("alpha") == result.adapter


def test_recover_removes_a_stale_lock_file_silently_but_keeps_a_held_one(store):
    staging = store.root / ".staging"
    staging.mkdir(parents=True)
    (staging / "dead.lock").touch()
    with (staging / "live.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert store.recover() == []
        assert sorted(p.name for p in staging.iterdir()) == ["live.lock"]


def test_recover_removes_a_temporary_symlink_left_by_a_put(store):
    result, _ = put(store, "alpha")
    before = snapshot(store.root)
    link = store.root / ".staging" / ("link-" + "f" * 32)
    os.symlink(f".objects/{result.adapter.version}", link)
    assert store.recover() == [f"removed an unfinished upload (0 bytes): {link.name}"]
    assert snapshot(store.root) == before


def test_recover_restores_a_hand_placed_folder_whose_replacement_was_interrupted(store):
    old_files = write_adapter(store.root / ".trash" / "manual.replaced", weights=b"by hand")
    assert store.names() == []
    assert store.recover() == ["restored adapter 'manual': its replacement was interrupted"]
    assert not (store.root / "manual").is_symlink()
    assert read_files(store.root / "manual") == old_files
    assert store.names() == ["manual"]
    assert list((store.root / ".trash").iterdir()) == []
    assert_consistent(store)


def test_recover_after_a_crash_between_move_aside_and_publish_gives_back_the_old_state(store):
    """The exact leftovers of a put over a hand-placed folder that died just before the symlink swap."""
    old_files = write_adapter(store.root / "manual", weights=b"by hand")
    old = store.get("manual")
    with store.staging() as staged:
        write_adapter(staged, weights=b"uploaded")
        new_version = content_digest(staged)
        (store.root / ".objects").mkdir()
        os.rename(staged, store.root / ".objects" / new_version)
    link = store.root / ".staging" / ("link-" + "0" * 32)
    os.symlink(f".objects/{new_version}", link)
    (store.root / ".trash").mkdir()
    os.rename(store.root / "manual", store.root / ".trash" / "manual.replaced")

    assert store.recover() == [
        f"removed an unfinished upload (0 bytes): {link.name}",
        "restored adapter 'manual': its replacement was interrupted",
        f"removed unreferenced version {new_version[:12]}",
    ]
    assert store.get("manual") == old
    assert read_files(store.root / "manual") == old_files
    assert snapshot(store.root / ".objects") == {}
    assert snapshot(store.root / ".staging") == {}
    assert snapshot(store.root / ".trash") == {}
    assert_consistent(store)


def test_recover_finishes_removing_a_replaced_folder_once_the_new_version_is_published(store):
    """A put over a hand-placed folder that died after the symlink swap, before retiring the old folder."""
    result, files = put(store, "manual", weights=b"uploaded")
    write_adapter(store.root / ".trash" / "manual.replaced", weights=b"by hand")
    assert store.recover() == ["finished removing manual.replaced"]
    assert store.get("manual") == result.adapter
    assert read_files(store.locate(result.adapter)) == files
    assert list((store.root / ".trash").iterdir()) == []


def test_recover_removes_an_orphan_object_and_leftover_trash(store):
    result, _ = put(store, "alpha")
    before = snapshot(store.root)
    orphan = store.root / ".objects" / ("e" * 64)
    write_adapter(orphan, weights=b"orphan")
    write_adapter(store.root / ".trash" / f"{'d' * 64}-0123", weights=b"half removed")
    assert store.recover() == [f"finished removing {'d' * 64}-0123", f"removed unreferenced version {'e' * 12}"]
    assert snapshot(store.root) == {**before, ".trash": "dir"}
    assert store.get("alpha") == result.adapter


def test_recover_reports_a_dangling_name_and_the_store_does_not_serve_it(store):
    put(store, "alpha")
    missing = "c" * 64
    os.symlink(f".objects/{missing}", store.root / "ghost")
    assert store.recover() == [f"adapter 'ghost' points to missing files (.objects/{missing}); not served"]
    assert store.names() == ["alpha"]
    with pytest.raises(AdapterNotFound):
        store.get("ghost")
    with pytest.raises(AdapterNotFound):
        store.delete("ghost")
    result, files = put(store, "ghost")
    assert result.previous is None
    assert read_files(store.locate(store.get("ghost"))) == files


def test_recover_of_every_leftover_at_once_leaves_a_consistent_store(store):
    put(store, "alpha", weights=b"a")
    put(store, "beta", weights=b"b1")
    put(store, "beta", weights=b"b2")
    write_adapter(store.root / "manual", weights=b"by hand")
    root = store.root
    (root / ".staging" / "dead").mkdir()
    (root / ".staging" / "dead" / CONFIG_FILE).write_bytes(b"{")
    os.symlink(f".objects/{'1' * 64}", root / ".staging" / ("link-" + "2" * 32))
    write_adapter(root / ".trash" / "restored.replaced", weights=b"old by hand")
    write_adapter(root / ".objects" / ("3" * 64), weights=b"orphan")
    os.symlink(f".objects/{'4' * 64}", root / "ghost")

    report = store.recover()
    assert len(report) == 6
    assert store.names() == ["alpha", "beta", "manual", "restored"]
    assert_consistent(store)
    assert sorted(p.name for p in (root / ".objects").iterdir()) == sorted(
        {store.get("alpha").version, store.get("beta").version}
    )
    assert list((root / ".staging").iterdir()) == []
    assert list((root / ".trash").iterdir()) == []

    after = snapshot(root)
    assert store.recover() == [f"adapter 'ghost' points to missing files (.objects/{'4' * 64}); not served"]
    assert snapshot(root) == after


# -- regressions (each was a bug) ----------------------------------------------------


def test_put_over_a_hand_placed_folder_returns(store):
    write_adapter(store.root / "manual", weights=b"by hand")
    old = store.get("manual")
    with store.staging() as staged:
        write_adapter(staged, weights=b"uploaded")
        result = returns_within(1.0, lambda: store.put("manual", staged))
    assert result.previous == old and result.changed


def test_delete_of_a_hand_placed_folder_returns(store):
    write_adapter(store.root / "manual")
    adapter = store.get("manual")
    assert returns_within(1.0, lambda: store.delete("manual")) == adapter


def test_put_over_a_folder_that_is_not_an_adapter_is_handled(store):
    (store.root / "alpha").mkdir(parents=True)
    with pytest.raises(AdapterNotFound):
        store.get("alpha")
    with store.staging() as staged:
        write_adapter(staged)
        try:
            store.put("alpha", staged)
        except AdapterError:
            return  # refusing with a store error is an acceptable answer
    assert store.get("alpha").version == content_digest(store.locate(store.get("alpha")))


def test_different_files_never_share_a_version(tmp_path):
    config = b'{"peft_type": "LORA"}'
    one = tmp_path / "one"
    one.mkdir()
    (one / CONFIG_FILE).write_bytes(config + WEIGHTS_FILE.encode() + b"\0" + b"W")
    two = tmp_path / "two"
    two.mkdir()
    (two / CONFIG_FILE).write_bytes(config)
    (two / WEIGHTS_FILE).write_bytes(b"W")
    assert content_digest(one) != content_digest(two)
