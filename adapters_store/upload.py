"""Turn an upload (the PEFT files, or one ``.tar.gz``/``.zip`` archive) into an adapter folder.

Only the two PEFT files are ever written, under their own names, into the
destination folder: a client's file names and archive paths never become paths
here. An archive is checked whole before anything is extracted: no absolute or
``..`` paths, no links or device files, no encryption, a bounded number of
members and a bounded total size; the extracted bytes are counted again while
written, since a header may lie.
"""

from __future__ import annotations

import io
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, BinaryIO, TypeVar

from adapters_store.backend import ADAPTER_FILES
from adapters_store.errors import InvalidUpload, UploadTooLarge
from adapters_store.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
IGNORED_FILES = frozenset({"README.md", "training_args.bin"})  # what PEFT and Trainer put beside an adapter
MAX_ARCHIVE_MEMBERS = 256
_EXPECTED = f"send {CONFIG_FILE} and {WEIGHTS_FILE}, or one .tar.gz or .zip archive holding them"

M = TypeVar("M")  # an archive member (tarfile.TarInfo, zipfile.ZipInfo)


def folder_files(
    folder: Path, stack: ExitStack, open_file: Callable[[Path], BinaryIO] = lambda path: path.open("rb")
) -> list[tuple[str, BinaryIO]]:
    """A PEFT folder on this machine as an upload's ``(file name, stream)`` pairs, opened in ``stack``: the
    config and safetensors weights where present, and pickle weights as an empty stand-in (never read:
    validation refuses them by name). ``open_file`` may check each path before opening it."""
    present = [name for name in ADAPTER_FILES if (folder / name).is_file()]
    files = [(name, stack.enter_context(open_file(folder / name))) for name in present]
    if (folder / PICKLE_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        files.append((PICKLE_FILE, io.BytesIO()))
    return files


def place_files(files: list[tuple[str, BinaryIO]], dest: Path, max_bytes: int) -> None:
    """Write the uploaded ``(file name, stream)`` pairs into ``dest`` as the PEFT files."""
    if not files:
        raise InvalidUpload(f"no files in the upload: {_EXPECTED}")
    names = [_basename(name) for name, _ in files]
    if len(files) == 1 and names[0].lower().endswith(ARCHIVE_SUFFIXES):
        extract_archive(names[0], files[0][1], dest, max_bytes)
        return
    budget = _Budget(max_bytes)
    for name, (_, stream) in zip(names, files, strict=True):
        if name.lower().endswith(ARCHIVE_SUFFIXES):
            raise InvalidUpload(f"an archive ({name!r}) must be the only file of its upload")
        if name in IGNORED_FILES:
            continue
        if name not in ADAPTER_FILES and name != PICKLE_FILE:
            raise InvalidUpload(f"unexpected file {name[:100]!r}: {_EXPECTED}")
        if (dest / name).exists():
            raise InvalidUpload(f"{name} was sent twice")
        if name == PICKLE_FILE:
            (dest / name).touch()  # recorded so validation names the problem; never read
            continue
        budget.copy(stream, dest / name)


def extract_archive(name: str, stream: BinaryIO, dest: Path, max_bytes: int) -> None:
    if name.lower().endswith(".zip"):
        _extract_zip(stream, dest, max_bytes)
    else:
        _extract_tar(stream, dest, max_bytes)


def _extract_tar(stream: BinaryIO, dest: Path, max_bytes: int) -> None:
    try:
        with tarfile.open(fileobj=stream, mode="r:gz") as tar:
            members, declared = [], 0
            for i, m in enumerate(tar):
                if i >= MAX_ARCHIVE_MEMBERS:
                    raise InvalidUpload(f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries")
                declared += max(m.size, 0)
                if declared > max_bytes:  # stop walking (and decompressing) as soon as it is too big
                    raise UploadTooLarge(f"the archive unpacks to more than the limit of {max_bytes} bytes")
                path = _check_path(m.name)
                if m.issym() or m.islnk():
                    raise InvalidUpload(f"the archive holds a link ({m.name[:100]!r}); links are not accepted")
                if not (m.isfile() or m.isdir()):
                    raise InvalidUpload(f"the archive holds a special file ({m.name[:100]!r})")
                if m.isfile():
                    members.append((path, m.size, m))
            # The walk stopped at the end-of-archive block; read on so gzip checks its CRC and length.
            rest = max_bytes  # what follows the last member is bounded like the files
            while chunk := tar.fileobj.read(1 << 20):
                rest -= len(chunk)
                if rest < 0:
                    raise UploadTooLarge(f"the archive unpacks to more than the limit of {max_bytes} bytes")
            chosen = _choose(members, max_bytes)
            budget = _Budget(max_bytes)
            for file_name, member in chosen.items():
                source = tar.extractfile(member)
                if source is None:
                    raise InvalidUpload(f"cannot read {member.name[:100]!r} from the archive")
                budget.copy(source, dest / file_name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise InvalidUpload(f"not a readable .tar.gz archive: {exc}") from None


def _extract_zip(stream: BinaryIO, dest: Path, max_bytes: int) -> None:
    try:
        with zipfile.ZipFile(stream) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ARCHIVE_MEMBERS:
                raise InvalidUpload(f"the archive has more than {MAX_ARCHIVE_MEMBERS} entries")
            members = []
            for info in infos:
                path = _check_path(info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no file type
                if kind == stat.S_IFLNK:
                    raise InvalidUpload(f"the archive holds a link ({info.filename[:100]!r}); links are not accepted")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise InvalidUpload(f"the archive holds a special file ({info.filename[:100]!r})")
                if info.flag_bits & 0x1:
                    raise InvalidUpload("encrypted archives are not accepted")
                if not info.is_dir():
                    members.append((path, info.file_size, info))
            chosen = _choose(members, max_bytes)
            budget = _Budget(max_bytes)
            for file_name, info in chosen.items():
                with zf.open(info) as source:
                    budget.copy(source, dest / file_name)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, zlib.error) as exc:
        raise InvalidUpload(f"not a readable .zip archive: {exc}") from None


def _choose(members: Iterable[tuple[str, int, M]], max_bytes: int) -> dict[str, M]:
    """The archive's two PEFT files: at its top or in one folder, side by side; sizes within the limit."""
    by_dir: dict[str, dict[str, M]] = {}
    total = 0
    for path, size, member in members:
        total += size
        folder, base = posixpath.split(path)
        if base in (*ADAPTER_FILES, PICKLE_FILE):
            if folder.count("/") > 0:
                raise InvalidUpload(f"{path[:100]!r} is nested too deep: put the adapter at the top or in one folder")
            by_dir.setdefault(folder, {})[base] = member
    if total > max_bytes:
        raise UploadTooLarge(f"the archive unpacks to more than the limit of {max_bytes} bytes ({total} bytes)")
    with_config = [d for d, files in by_dir.items() if CONFIG_FILE in files]
    if len(with_config) > 1:
        raise InvalidUpload("the archive holds more than one adapter; upload one per request")
    if not with_config:
        raise InvalidUpload(f"the archive has no {CONFIG_FILE}")
    files = by_dir[with_config[0]]
    if WEIGHTS_FILE not in files:
        if PICKLE_FILE in files:
            raise InvalidUpload(
                f"the archive holds {PICKLE_FILE}, a pickle file, which can execute code when loaded; "
                f"convert it to {WEIGHTS_FILE} (safetensors)"
            )
        raise InvalidUpload(f"the archive has no {WEIGHTS_FILE} beside its {CONFIG_FILE}")
    return {name: files[name] for name in ADAPTER_FILES}


def _check_path(name: str) -> str:
    if "\\" in name or "\0" in name:
        raise InvalidUpload(f"the archive holds an unsafe path ({name[:100]!r})")
    path = posixpath.normpath(name)
    if name.startswith("/") or path == ".." or path.startswith("../") or "/../" in f"/{name}/":
        raise InvalidUpload(f"the archive holds a path outside the archive ({name[:100]!r})")
    return path.removeprefix("./")


def _basename(name: str) -> str:
    return (name or "").replace("\\", "/").rsplit("/", 1)[-1]


class _Budget:
    """Copies streams into files while counting bytes against one limit."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.limit = max_bytes

    def copy(self, source: IO[bytes], target: Path) -> None:
        with target.open("xb") as out:
            while chunk := source.read(1 << 20):
                self.left -= len(chunk)
                if self.left < 0:
                    raise UploadTooLarge(f"the adapter's files are larger than the limit of {self.limit} bytes")
                out.write(chunk)
