"""The local-directory store: one folder per adapter name under a root directory."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters_store.errors import AdapterNotFound
from adapters_store.names import check_name
from adapters_store.peft_format import CONFIG_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class StoredAdapter:
    name: str
    path: Path
    version: str  # sha256 of the config and weights files

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version[:12]}"


class LocalAdapterStore:
    """Adapters as folders ``root/<name>/`` in PEFT format."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._digests: dict[Path, tuple[tuple[int, int, int, int], str]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> StoredAdapter:
        """The stored adapter called ``name``; :class:`AdapterNotFound` if there is none."""
        check_name(name)
        path = self.root / name
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            raise AdapterNotFound(f"adapter {name!r} not found")
        return StoredAdapter(name=name, path=path, version=self._digest(path))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".") and p.is_dir() and (p / CONFIG_FILE).is_file()
        )

    def _digest(self, path: Path) -> str:
        files = [path / CONFIG_FILE, path / WEIGHTS_FILE]
        stats = [f.stat() if f.exists() else None for f in files]
        key = tuple(v for s in stats for v in ((s.st_size, s.st_mtime_ns) if s else (-1, -1)))
        with self._lock:
            cached = self._digests.get(path)
            if cached and cached[0] == key:
                return cached[1]
        h = hashlib.sha256()
        for f in files:
            if f.exists():
                h.update(f.name.encode() + b"\0")
                with f.open("rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._digests[path] = (key, digest)  # type: ignore[assignment]
        return digest
