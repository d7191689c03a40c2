"""Scratch folders (uploads being assembled, downloads being verified) and the file-system steps the stores share.

A scratch folder ``<area>/<token>`` is owned by the process holding an
exclusive lock on ``<area>/<token>.lock``. A crashed process's locks die
with it, so :func:`clear_abandoned` can tell its leftovers from another live
process's work in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_folder(area: Path) -> Iterator[Path]:
    """An empty folder under ``area``, removed on exit unless it was renamed away."""
    area.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    path, lock_path = area / token, area / f"{token}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def clear_abandoned(area: Path, what: str = "upload") -> list[str]:
    """Remove scratch folders (and stray locks) no live process owns; one report line per folder removed."""
    report: list[str] = []
    area.mkdir(parents=True, exist_ok=True)
    for p in sorted(area.iterdir()):
        if p.suffix == ".lock":
            if not (area / p.stem).exists() and unowned(p):
                p.unlink(missing_ok=True)
            continue
        if not unowned(area / f"{p.name}.lock"):
            continue
        report.append(f"removed an unfinished {what} ({tree_size(p)} bytes): {p.name}")
        remove(p)
        (area / f"{p.name}.lock").unlink(missing_ok=True)
    return report


def unowned(lock_path: Path) -> bool:
    """True unless a live process holds the lock (a crashed one's lock is gone with it)."""
    if not lock_path.exists():
        return True
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
