"""The store's interface: what the server needs of any backend (local directory now, S3-compatible later).

Invariants every backend keeps:

- A name maps to exactly one complete version or to nothing. Writes are staged
  elsewhere and made visible by one atomic step, so a crash at any moment
  leaves the old state or the new one, never a half-written adapter.
- A version is the sha256 of the adapter's files (see :func:`content_digest`);
  the files of a version never change once visible.
- An old version's files stay readable until :meth:`AdapterStore.collect_garbage`
  is told nothing uses them any more.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
VERSION = re.compile(r"[0-9a-f]{64}")  # what content_digest gives


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    version: str  # sha256 of the adapter's files
    path: Path  # a local folder holding this version's files when it was looked up
    # A folder an operator placed in the store: its files were never checked on their way in (an upload's are)
    hand_placed: bool = field(default=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version[:12]}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)


@dataclass(frozen=True)
class PutResult:
    adapter: StoredAdapter
    previous: StoredAdapter | None  # the version the name had before, if any

    @property
    def changed(self) -> bool:
        return self.previous is None or self.previous.version != self.adapter.version


class AdapterStore(Protocol):
    def names(self) -> list[str]:
        """Every stored adapter name, sorted."""

    def strays(self) -> list[tuple[str, str]]:
        """What sits in the store but is not an adapter (a folder without its config, a stray file), with why:
        ignored, and reported at start-up."""

    def get(self, name: str) -> StoredAdapter:
        """The current version of ``name``; :class:`~adapters_store.errors.AdapterNotFound` if none."""

    def locate(self, adapter: StoredAdapter) -> Path:
        """A local folder with the files of exactly ``adapter.version`` (fetched if need be)."""

    def cached(self, adapter: StoredAdapter) -> bool:
        """Whether :meth:`locate` can answer from local files, without a download."""

    def staging(self) -> AbstractContextManager[Path]:
        """An empty scratch folder to assemble an upload in; removed on exit unless :meth:`put` took it."""

    def put(self, name: str, staged: Path) -> PutResult:
        """Make the files in ``staged`` the new version of ``name``, atomically."""

    def delete(self, name: str) -> StoredAdapter:
        """Remove ``name`` atomically; its files stay until :meth:`collect_garbage`."""

    def collect_garbage(self, in_use: Collection[str]) -> list[str]:
        """Remove the files of versions no name refers to, except ``in_use``; returns what was removed."""

    def recover(self) -> list[str]:
        """At start-up: finish or undo what a crash interrupted; returns one line per leftover handled."""


def content_digest(folder: Path) -> str:
    """The version of the adapter in ``folder``: sha256 over each file's name, size (8 bytes LE) and bytes."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = folder / name
        if not path.exists():
            continue
        h.update(name.encode() + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        with path.open("rb") as f:
            for chunk in _chunks(f):
                h.update(chunk)
    return h.hexdigest()


def _chunks(f) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk
