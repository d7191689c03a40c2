"""Upload packaging: direct PEFT files or one .tar.gz/.zip, refused unless safe, never written outside dest."""

from __future__ import annotations

import gzip
import io
import os
import random
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from adapters_store.errors import InvalidAdapter, InvalidUpload, UploadTooLarge
from adapters_store.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, read_manifest
from adapters_store.upload import MAX_ARCHIVE_MEMBERS, place_files

CONFIG = b'{"peft_type": "LORA", "r": 4}'
WEIGHTS = bytes(range(256)) * 8
ADAPTER = {CONFIG_FILE: CONFIG, WEIGHTS_FILE: WEIGHTS}
LIMIT = 1 << 20
REG, DIR, LINK, FIFO = 0o100644, 0o040755, 0o120777, 0o010644


# -- archive builders ------------------------------------------------------------------


def tar_entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    return (name, data, kind, linkname)


def tar_gz(files: dict[str, bytes], extra: tuple = (), dirs: tuple[str, ...] = ()) -> bytes:
    """A .tar.gz of regular files (plus directory and special entries)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data, kind, linkname in [tar_entry(n, d) for n, d in files.items()] + list(extra):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def zip_entry(name: str, data: bytes = b"", mode: int = REG) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info, data


def zip_bytes(files: dict[str, bytes], extra: tuple = (), dirs: tuple[str, ...] = ()) -> bytes:
    """A .zip whose entries carry Unix modes (as `zip` and ZipFile.write make them)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in dirs:
            zf.writestr(*zip_entry(name, mode=DIR))
        for info, data in [zip_entry(n, d) for n, d in files.items()] + list(extra):
            zf.writestr(info, data)
    return buf.getvalue()


def archive(kind: str, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> tuple[str, bytes]:
    """``(client file name, bytes)`` of an archive of ``kind`` ("tar" or "zip") holding regular files."""
    return (
        ("adapter.tar.gz", tar_gz(files, dirs=dirs)) if kind == "tar" else ("adapter.zip", zip_bytes(files, dirs=dirs))
    )


def patch_zip(raw: bytes, member: str, local_offset: int, central_offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of ``member``'s local and central headers (offsets from each header's signature)."""
    out = bytearray(raw)
    (central,) = struct.unpack_from("<I", raw, len(raw) - 22 + 16)  # end of central directory, no comment
    while raw[central + 46 : central + 46 + len(member)] != member.encode():
        name_len, extra_len, comment_len = struct.unpack_from("<3H", raw, central + 28)
        central += 46 + name_len + extra_len + comment_len
    (local,) = struct.unpack_from("<I", raw, central + 42)
    struct.pack_into(fmt, out, local + local_offset, value)
    struct.pack_into(fmt, out, central + central_offset, value)
    return bytes(out)


# -- the destination and its surroundings -------------------------------------------------------


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    """``tmp_path/staging/dest``: anything written beside it would show in :func:`outside`."""
    path = tmp_path / "staging" / "dest"
    path.mkdir(parents=True)
    return path


def written(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def outside(dest: Path) -> list[str]:
    """Every path under the test's tmp dir that is neither ``dest``, one of its parents, nor inside it."""
    top = dest.parent.parent
    found = []
    for folder, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(folder) / name
            if path not in (dest, dest.parent) and dest not in path.parents:
                found.append(str(path.relative_to(top)))
    return found


def place(dest: Path, *files: tuple[str, bytes], max_bytes: int = LIMIT) -> dict[str, bytes]:
    place_files([(name, io.BytesIO(data)) for name, data in files], dest, max_bytes)
    assert outside(dest) == []
    return written(dest)


def refused(dest: Path, *files: tuple[str, bytes], match: str, error: type = InvalidUpload, max_bytes: int = LIMIT):
    with pytest.raises(error, match=match) as caught:
        place_files([(name, io.BytesIO(data)) for name, data in files], dest, max_bytes)
    assert outside(dest) == []
    return caught.value


# -- direct uploads -----------------------------------------------------------------------


def test_the_two_files_sent_directly_are_written_under_their_own_names(dest):
    got = place(dest, ("some/dir/adapter_config.json", CONFIG), ("C:\\Users\\me\\adapter_model.safetensors", WEIGHTS))
    assert got == ADAPTER


def test_readme_and_training_args_beside_the_files_are_ignored(dest):
    got = place(
        dest, (CONFIG_FILE, CONFIG), ("README.md", b"# hi"), ("training_args.bin", b"pickle!"), (WEIGHTS_FILE, WEIGHTS)
    )
    assert got == ADAPTER


@pytest.mark.parametrize("name", ["notes.txt", "optimizer.pt", "Adapter_Config.json", "../adapter_config.json.bak", ""])
def test_an_unexpected_file_is_refused_by_name(dest, name):
    error = refused(dest, (CONFIG_FILE, CONFIG), (name, b"x"), match="unexpected file")
    assert repr(name.rsplit("/", 1)[-1]) in str(error)


def test_an_empty_upload_is_refused(dest):
    refused(dest, match="no files in the upload")
    assert written(dest) == {}


@pytest.mark.parametrize("second", ["adapter_config.json", "other/dir/adapter_config.json"])
def test_a_file_sent_twice_is_refused(dest, second):
    refused(
        dest,
        (CONFIG_FILE, CONFIG),
        (WEIGHTS_FILE, WEIGHTS),
        (second, b"{}"),
        match="adapter_config.json was sent twice",
    )
    assert written(dest)[CONFIG_FILE] == CONFIG


def test_a_pickle_bin_is_only_marked_never_read_and_validation_then_names_pickle(dest):
    config, pickle = io.BytesIO(CONFIG), io.BytesIO(b"\x80\x04 arbitrary code")
    place_files([(CONFIG_FILE, config), (PICKLE_FILE, pickle)], dest, LIMIT)
    assert pickle.tell() == 0
    assert (dest / PICKLE_FILE).stat().st_size == 0
    assert written(dest) == {CONFIG_FILE: CONFIG, PICKLE_FILE: b""}
    with pytest.raises(InvalidAdapter, match="pickle"):
        read_manifest(dest)


def test_a_pickle_bin_sent_twice_is_refused(dest):
    refused(dest, (PICKLE_FILE, b"a"), (PICKLE_FILE, b"b"), match="adapter_model.bin was sent twice")


@pytest.mark.parametrize("archive_first", [True, False])
def test_an_archive_mixed_with_another_file_is_refused(dest, archive_first):
    files = [("x.zip", zip_bytes(ADAPTER)), (CONFIG_FILE, CONFIG)]
    if not archive_first:
        files.reverse()
    refused(dest, *files, match="'x.zip'.*must be the only file")
    assert WEIGHTS_FILE not in written(dest)


def test_direct_files_larger_than_the_limit_are_refused(dest):
    refused(
        dest,
        (CONFIG_FILE, CONFIG),
        (WEIGHTS_FILE, WEIGHTS),
        match="larger than the limit",
        error=UploadTooLarge,
        max_bytes=len(WEIGHTS) - 1,
    )


def test_the_limit_counts_both_direct_files_together(dest):
    limit = len(CONFIG) + len(WEIGHTS)
    assert place(dest, (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS), max_bytes=limit) == ADAPTER
    for path in dest.iterdir():
        path.unlink()
    refused(
        dest, (CONFIG_FILE, CONFIG), (WEIGHTS_FILE, WEIGHTS), match="larger", error=UploadTooLarge, max_bytes=limit - 1
    )
    assert len(written(dest).get(WEIGHTS_FILE, b"")) <= limit - 1 - len(CONFIG)


# -- accepted archives ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize("folder", ["", "my-adapter/", "./"])
def test_an_archive_with_the_files_at_the_top_or_in_one_folder_is_unpacked_exactly(dest, kind, folder):
    files = {folder + name: data for name, data in ADAPTER.items()}
    files[folder + "README.md"] = b"readme"
    files["checkpoint-10/optimizer.pt"] = b"junk"
    name, data = archive(kind, files, dirs=(folder, "checkpoint-10/") if folder not in ("", "./") else ())
    assert place(dest, ("uploads/" + name, data)) == ADAPTER


@pytest.mark.parametrize("name", ["a.tgz", "A.TAR.GZ", "dir\\x.tar.gz"])
def test_tar_archive_suffixes_are_recognised_whatever_the_case(dest, name):
    assert place(dest, (name, tar_gz(ADAPTER))) == ADAPTER


def test_a_zip_entry_without_unix_mode_bits_is_a_regular_file(dest):
    infos = [zip_entry(n, d, mode=0) for n, d in ADAPTER.items()]
    assert place(dest, ("x.ZIP", zip_bytes({}, extra=tuple(infos)))) == ADAPTER


def test_a_zip_made_with_zipfile_writestr_is_accepted(dest):
    """Permission bits without a file type (ZipFile.writestr writes 0o600 << 16) mean a regular file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in ADAPTER.items():
            zf.writestr(name, data)
    assert stat.S_IFMT(zf.getinfo(CONFIG_FILE).external_attr >> 16) == 0
    assert place(dest, ("adapter.zip", buf.getvalue())) == ADAPTER


def test_safetensors_is_taken_when_a_pickle_bin_sits_beside_it(dest):
    assert place(dest, ("x.tar.gz", tar_gz({**ADAPTER, PICKLE_FILE: b"pickle"}))) == ADAPTER


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_of_exactly_the_member_limit_is_accepted(dest, kind):
    files = {**ADAPTER, **{f"junk/{i}": b"" for i in range(MAX_ARCHIVE_MEMBERS - len(ADAPTER))}}
    assert place(dest, archive(kind, files)) == ADAPTER


# -- refused archives --------------------------------------------------------------------------


UNSAFE_PATHS = [
    ("../evil", "outside the archive"),
    ("../adapter_config.json", "outside the archive"),
    ("a/../../x", "outside the archive"),
    ("a/../adapter_model.safetensors", "outside the archive"),
    ("..", "outside the archive"),
    ("a\\adapter_config.json", "unsafe path"),
    ("..\\..\\evil", "unsafe path"),
]


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize(("member", "message"), UNSAFE_PATHS)
def test_an_archive_with_an_unsafe_member_path_is_refused_before_anything_is_written(dest, kind, member, message):
    error = refused(dest, archive(kind, {**ADAPTER, member: b"evil"}), match=message)
    assert repr(member) in str(error)
    assert written(dest) == {}


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_with_an_absolute_member_path_is_refused(dest, kind):
    target = str(dest.parent.parent / "escaped" / CONFIG_FILE)
    for member in (target, "/etc/x"):
        refused(dest, archive(kind, {**ADAPTER, member: b"evil"}), match="outside the archive")
    assert written(dest) == {}
    assert not (dest.parent.parent / "escaped").exists()


TAR_SPECIALS = [
    (tar_entry(WEIGHTS_FILE, kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "holds a link"),
    (tar_entry("x", kind=tarfile.SYMTYPE, linkname="../../outside"), "holds a link"),
    (tar_entry("y", kind=tarfile.LNKTYPE, linkname=CONFIG_FILE), "holds a link"),
    (tar_entry("fifo", kind=tarfile.FIFOTYPE), "special file"),
    (tar_entry("null", kind=tarfile.CHRTYPE), "special file"),
    (tar_entry("disk", kind=tarfile.BLKTYPE), "special file"),
]


@pytest.mark.parametrize(
    ("entry", "message"), TAR_SPECIALS, ids=["symlink-weights", "symlink", "hardlink", "fifo", "chardev", "blockdev"]
)
def test_a_tar_with_a_link_or_device_member_is_refused(dest, entry, message):
    files = {k: v for k, v in ADAPTER.items() if k != entry[0]}
    error = refused(dest, ("x.tar.gz", tar_gz(files, extra=(entry,))), match=message)
    assert repr(entry[0]) in str(error)
    assert written(dest) == {}


@pytest.mark.parametrize(("mode", "message"), [(LINK, "holds a link"), (FIFO, "special file")], ids=["symlink", "fifo"])
def test_a_zip_member_whose_mode_is_a_link_or_device_is_refused(dest, mode, message):
    data = zip_bytes({CONFIG_FILE: CONFIG}, extra=(zip_entry(WEIGHTS_FILE, b"/etc/passwd", mode=mode),))
    refused(dest, ("x.zip", data), match=message)
    assert written(dest) == {}


def test_an_encrypted_zip_member_is_refused(dest):
    data = patch_zip(zip_bytes(ADAPTER), WEIGHTS_FILE, 6, 8, "<H", 0x1)
    assert zipfile.ZipFile(io.BytesIO(data)).getinfo(WEIGHTS_FILE).flag_bits & 0x1
    refused(dest, ("x.zip", data), match="encrypted")
    assert written(dest) == {}


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_with_more_members_than_the_limit_is_refused(dest, kind):
    files = {**ADAPTER, **{f"junk/{i}": b"" for i in range(MAX_ARCHIVE_MEMBERS - len(ADAPTER) + 1)}}
    refused(dest, archive(kind, files), match=f"more than {MAX_ARCHIVE_MEMBERS} entries")
    assert written(dest) == {}


BAD_LAYOUTS = [
    (
        {**{f"a/{k}": v for k, v in ADAPTER.items()}, **{f"b/{k}": v for k, v in ADAPTER.items()}},
        "more than one adapter",
    ),
    ({**ADAPTER, **{f"b/{k}": v for k, v in ADAPTER.items()}}, "more than one adapter"),
    ({f"a/b/{k}": v for k, v in ADAPTER.items()}, "'a/b/adapter_.*nested too deep"),
    ({WEIGHTS_FILE: WEIGHTS, "README.md": b"x"}, "no adapter_config.json"),
    ({}, "no adapter_config.json"),
    ({CONFIG_FILE: CONFIG}, "no adapter_model.safetensors beside"),
    ({CONFIG_FILE: CONFIG, f"sub/{WEIGHTS_FILE}": WEIGHTS}, "no adapter_model.safetensors beside"),
    ({CONFIG_FILE: CONFIG, PICKLE_FILE: b"pickle"}, "adapter_model.bin, a pickle file"),
    ({PICKLE_FILE: b"pickle"}, "no adapter_config.json"),
]


@pytest.mark.parametrize("kind", ["tar", "zip"])
@pytest.mark.parametrize(
    ("files", "message"),
    BAD_LAYOUTS,
    ids=[
        "two-folders",
        "top-and-folder",
        "two-deep",
        "no-config",
        "empty",
        "no-weights",
        "weights-apart",
        "pickle-instead-of-safetensors",
        "pickle-only",
    ],
)
def test_an_archive_without_exactly_one_adapter_at_the_top_or_in_one_folder_is_refused(dest, kind, files, message):
    refused(dest, archive(kind, files), match=message)
    assert written(dest) == {}


@pytest.mark.parametrize("name", ["x.tar.gz", "x.tgz", "x.zip"])
@pytest.mark.parametrize(
    "data",
    [random.Random(0).randbytes(4096), b"", gzip.compress(b"not a tar" * 100), b"PK\x03\x04" + bytes(100)],
    ids=["random", "empty", "gzip-of-junk", "zip-magic"],
)
def test_a_corrupt_archive_is_refused_as_unreadable(dest, name, data):
    refused(dest, (name, data), match="not a readable")
    assert written(dest) == {}


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_truncated_archive_is_refused_as_unreadable(dest, kind):
    _, data = archive(kind, {**ADAPTER, "big": random.Random(1).randbytes(50_000)})
    refused(dest, ("x.tar.gz" if kind == "tar" else "x.zip", data[: len(data) // 2]), match="not a readable")
    assert set(written(dest)) <= set(ADAPTER)


# -- size limits on archives ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_declaring_more_than_the_limit_is_refused_before_extraction(dest, kind):
    files = {**ADAPTER, "README.md": bytes(10_000)}
    limit = len(CONFIG) + len(WEIGHTS) + 10_000
    assert place(dest, archive(kind, files), max_bytes=limit) == ADAPTER
    for path in dest.iterdir():
        path.unlink()
    refused(
        dest,
        archive(kind, files),
        match=f"unpacks to more than the limit of {limit - 1} bytes",
        error=UploadTooLarge,
        max_bytes=limit - 1,
    )
    assert written(dest) == {}


def test_a_zip_whose_header_understates_a_size_is_still_bounded(dest):
    """A bomb: 1 MB of zeros whose headers claim 100 bytes. Nothing past the claimed size is ever written."""
    raw = zip_bytes({CONFIG_FILE: CONFIG, WEIGHTS_FILE: bytes(1 << 20)})
    lying = patch_zip(raw, WEIGHTS_FILE, 22, 24, "<I", 100)
    assert zipfile.ZipFile(io.BytesIO(lying)).getinfo(WEIGHTS_FILE).file_size == 100
    limit = 1000
    refused(dest, ("bomb.zip", lying), match="Bad CRC-32", max_bytes=limit)
    assert sum(len(data) for data in written(dest).values()) <= limit
    assert len(written(dest).get(WEIGHTS_FILE, b"")) <= 100


# -- suspected bugs ------------------------------------------------------------------------------


def _corrupt_deflate_zip() -> bytes:
    """A zip whose weights member's deflate stream starts with a block of the reserved type 3."""
    raw = bytearray(zip_bytes(ADAPTER))
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo(WEIGHTS_FILE)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start] = 0xFF
    return bytes(raw)


def _corrupt_deflate_tar_gz() -> bytes:
    """A .tar.gz of two gzip members: the first ends inside the weights' data, the second is invalid deflate."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {**ADAPTER, "README.md": b"readme"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    plain = buf.getvalue()
    cut = plain.index(WEIGHTS) + 100
    second = bytearray(gzip.compress(plain[cut:]))
    second[10] = 0xFF  # first deflate block header: BTYPE = 3 (reserved)
    return gzip.compress(plain[:cut]) + bytes(second)


@pytest.mark.parametrize(("name", "build"), [("x.zip", _corrupt_deflate_zip), ("x.tar.gz", _corrupt_deflate_tar_gz)])
def test_a_corrupt_deflate_stream_is_refused_as_invalid_upload(dest, name, build):
    refused(dest, (name, build()), match="not a readable")


def test_a_tar_gz_whose_bytes_do_not_match_its_crc_is_refused(dest):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in ADAPTER.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stored = bytearray(gzip.compress(buf.getvalue(), compresslevel=0))  # stored blocks: bytes appear verbatim
    assert stored.count(WEIGHTS) == 1
    stored[stored.index(WEIGHTS) + 10] ^= 0x01
    try:
        got = place(dest, ("x.tar.gz", bytes(stored)))
    except InvalidUpload:
        return
    assert got[WEIGHTS_FILE] == WEIGHTS, "the weights were stored with a flipped byte"
