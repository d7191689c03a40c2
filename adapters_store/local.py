"""The local-directory store.

Layout under ``root``::

    <name> -> .objects/<version>     a name written through the store: a symlink, swapped atomically
    <name>/                          a folder an operator placed by hand (read as is)
    .objects/<version>/              the files of one version, content-addressed, never modified
    .staging/<random>/               uploads being assembled (+ <random>.lock while a process works on it)
    .trash/                          things on their way out
    .lock                            serialises writers, across processes too

An upload is assembled and fsynced under ``.staging``, renamed into
``.objects/<version>`` (atomic), and published by renaming a new symlink over
``<name>`` (atomic). A crash before the last rename leaves the old state; after
it, the new one. :meth:`LocalAdapterStore.recover` removes what a crash left.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

from adapters_store.backend import ADAPTER_FILES, VERSION, PutResult, StoredAdapter, content_digest
from adapters_store.errors import AdapterNotFound, StoreConflict
from adapters_store.names import check_name
from adapters_store.peft_format import CONFIG_FILE
from adapters_store.scratch import clear_abandoned, fsync, remove, scratch_folder

OBJECTS, STAGING, TRASH, LOCK = ".objects", ".staging", ".trash", ".lock"
_REPLACED = ".replaced"  # suffix of a hand-placed folder moved aside while a symlink replaces it


class LocalAdapterStore:
    """Adapters as folders under ``root`` in PEFT format; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._objects = self.root / OBJECTS
        self._write_mutex = threading.Lock()  # with the flock on .lock: one writer at a time
        self._digest_lock = threading.Lock()
        self._digests: dict[Path, tuple[tuple[int, ...], str]] = {}

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())

    def strays(self) -> list[tuple[str, str]]:
        """Entries an operator placed here that are not adapters: a folder without its config, a file."""
        if not self.root.is_dir():
            return []
        found = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or (p / CONFIG_FILE).is_file() or (p.is_symlink() and not p.exists()):
                continue  # an adapter, the store's own, or a broken link that recover() reports
            if not p.is_dir():
                found.append((p.name, "a file, not an adapter folder (upload archives through the admin API)"))
                continue
            nested = sorted(c.name for c in p.iterdir() if (c / CONFIG_FILE).is_file())
            where = f"; {nested[0]}/ holds one: an adapter's files go at the top of its folder" if nested else ""
            found.append((p.name, f"a folder without {CONFIG_FILE}{where}"))
        return found

    def get(self, name: str) -> StoredAdapter:
        """The current version of ``name``; :class:`AdapterNotFound` if there is none."""
        check_name(name)
        adapter = self._lookup(name)
        if adapter is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return adapter

    def locate(self, adapter: StoredAdapter) -> Path:
        obj = self._objects / adapter.version
        if (obj / CONFIG_FILE).is_file():
            return obj
        path = self.root / adapter.name
        if self._linked_version(path) is None and path.is_dir() and self._digest(path) == adapter.version:
            return path
        raise AdapterNotFound(f"version {adapter.version[:12]} of adapter {adapter.name!r} is no longer stored")

    def cached(self, adapter: StoredAdapter) -> bool:
        return True  # every version is on this disk

    # -- writing --------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        with scratch_folder(self.root / STAGING) as path:
            yield path

    def put(self, name: str, staged: Path) -> PutResult:
        check_name(name)
        path = self.root / name
        if path.exists() and not path.is_symlink() and not (path / CONFIG_FILE).is_file():
            raise StoreConflict(f"the store holds a folder {name!r} that is not an adapter; remove it first")
        version = content_digest(staged)
        for f in ADAPTER_FILES:
            if (staged / f).exists():
                fsync(staged / f)
        with self._write_lock():
            obj = self._objects / version
            if obj.exists():
                shutil.rmtree(staged)
            else:
                self._objects.mkdir(exist_ok=True)
                os.rename(staged, obj)
                fsync(self._objects)
            previous = self._lookup(name)
            if previous is not None and self._linked_version(path) == version:
                return PutResult(StoredAdapter(name, version, obj), previous)
            link = self.root / STAGING / f"link-{uuid.uuid4().hex}"
            os.symlink(f"{OBJECTS}/{version}", link)
            aside = None
            if previous is not None and self._linked_version(path) is None:
                aside = self._move_aside(path, name + _REPLACED)
            os.replace(link, path)
            fsync(self.root)
            if aside is not None and previous is not None:
                self._retire_folder(aside, previous.version)
        return PutResult(StoredAdapter(name, version, obj), previous)

    def delete(self, name: str) -> StoredAdapter:
        check_name(name)
        with self._write_lock():
            adapter = self._lookup(name)
            if adapter is None:
                raise AdapterNotFound(f"adapter {name!r} not found")
            path = self.root / name
            if path.is_symlink():
                path.unlink()
            else:
                self._retire_folder(path, adapter.version)
            fsync(self.root)
        return adapter

    def collect_garbage(self, in_use: Collection[str]) -> list[str]:
        with self._write_lock():
            return self._collect(set(in_use))

    def recover(self) -> list[str]:
        """Remove unfinished uploads, undo an interrupted replacement, drop unreferenced versions."""
        report: list[str] = []
        with self._write_lock():
            report += clear_abandoned(self.root / STAGING)
            trash = self.root / TRASH
            for p in sorted(trash.iterdir()) if trash.is_dir() else []:
                name = p.name.removesuffix(_REPLACED)
                target = self.root / name
                if p.name.endswith(_REPLACED) and not target.exists() and not target.is_symlink():
                    os.rename(p, target)
                    report.append(f"restored adapter {name!r}: its replacement was interrupted")
                else:
                    remove(p)
                    report.append(f"finished removing {p.name}")
            for p in sorted(self.root.iterdir()):
                if not p.name.startswith(".") and p.is_symlink() and not p.exists():
                    report.append(f"adapter {p.name!r} points to missing files ({os.readlink(p)}); not served")
            report += self._collect(set())
            fsync(self.root)
        return report

    # -- internals ------------------------------------------------------------

    def _lookup(self, name: str) -> StoredAdapter | None:
        path = self.root / name
        version = self._linked_version(path)
        if version is not None:
            obj = self._objects / version
            return StoredAdapter(name, version, obj) if (obj / CONFIG_FILE).is_file() else None
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            return StoredAdapter(name, self._digest(path), path, hand_placed=True)
        return None

    def _linked_version(self, path: Path) -> str | None:
        """The version a name's symlink points to, or None if ``path`` is not one of our symlinks."""
        if not path.is_symlink():
            return None
        target = os.readlink(path)
        head, _, version = target.partition("/")
        return version if head == OBJECTS and VERSION.fullmatch(version) else None

    def _move_aside(self, path: Path, as_name: str) -> Path:
        trash = self.root / TRASH
        trash.mkdir(exist_ok=True)
        aside = trash / as_name
        remove(aside)
        os.rename(path, aside)
        return aside

    def _retire_folder(self, folder: Path, version: str) -> None:
        """Keep a hand-placed folder's files readable as ``.objects/<version>`` until garbage collection."""
        obj = self._objects / version
        if obj.exists():
            remove(self._move_aside(folder, f"{version}-{uuid.uuid4().hex}"))
        else:
            self._objects.mkdir(exist_ok=True)
            os.rename(folder, obj)
            fsync(self._objects)

    def _collect(self, in_use: set[str]) -> list[str]:
        if not self._objects.is_dir():
            return []
        referenced = {v for p in self.root.iterdir() if (v := self._linked_version(p)) is not None}
        removed = []
        for obj in sorted(self._objects.iterdir()):
            if obj.name in referenced or obj.name in in_use:
                continue
            remove(self._move_aside(obj, f"{obj.name}-{uuid.uuid4().hex}"))
            removed.append(f"removed unreferenced version {obj.name[:12]}")
        return removed

    def _digest(self, folder: Path) -> str:
        stats = [(folder / f).stat() if (folder / f).exists() else None for f in ADAPTER_FILES]
        key = tuple(v for s in stats for v in ((s.st_ino, s.st_size, s.st_mtime_ns) if s else (-1, -1, -1)))
        with self._digest_lock:
            cached = self._digests.get(folder)
        if cached and cached[0] == key:
            return cached[1]
        digest = content_digest(folder)
        with self._digest_lock:
            self._digests[folder] = (key, digest)
        return digest

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._write_mutex, (self.root / LOCK).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
