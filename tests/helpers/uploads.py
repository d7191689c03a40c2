"""Build adapter uploads the way clients send them, and snapshot a store to prove it did not change."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def files_of(folder: Path, names: tuple[str, ...] = ADAPTER_FILES) -> list[tuple[str, tuple[str, bytes]]]:
    """Multipart ``files`` parts for the named files of ``folder`` that exist."""
    return [("files", (n, (folder / n).read_bytes())) for n in names if (folder / n).exists()]


def tar_gz(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def folder_members(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + n: (folder / n).read_bytes() for n in ADAPTER_FILES if (folder / n).exists()}


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root``: file bytes, symlink targets, and directories (as ``"<dir>"``)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "<dir>"
            else:
                out[rel] = path.read_bytes()
    return out


def version_of(folder: Path) -> str:
    """The version the store must give these files, computed here independently of the store's code."""
    h = hashlib.sha256()
    for n in ADAPTER_FILES:
        data = (folder / n).read_bytes()
        h.update(n.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()
