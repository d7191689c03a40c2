"""The S3-compatible store: one bucket is the source of truth for every replica; each replica keeps a disk cache.

Layout under ``s3://<bucket>/<prefix>``::

    objects/<version>/adapter_config.json         the files of one version, content-addressed, never modified
    objects/<version>/adapter_model.safetensors
    adapters/<name>.json                          the manifest: {"name", "version", "files": {file: size}}
    touched/<version>                             the time; rewritten whenever the version is uploaded or unnamed

An upload sends the files first and the manifest last, in one PUT, which S3
makes visible atomically: a crash before it leaves no visible adapter (only
orphan objects); after it, the new version. A delete removes the manifest.
Garbage collection removes a version no manifest names once it has been
untouched (uploaded, re-uploaded or unnamed) for longer than a grace period,
so other replicas still serving, fetching or uploading it have time to finish.

A replica trusts what it last read of a manifest for ``refresh`` seconds, then
reads it again when the name is next used; so a delete or re-upload made
through any replica reaches every other within ``refresh`` seconds. While the
bucket cannot be reached, names the replica has read before keep their last
known version (their files are in the cache); others fail as unavailable.

The cache under ``cache_dir``::

    objects/<version>/    versions fetched on first use, each checked against its digest before it is kept
    .staging/             uploads being assembled and downloads being checked
    .lock                 held by the process using the cache; another one on the same folder caches in
    .replicas/<random>/   (same layout), so replicas on one node never remove each other's files
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from adapters_store.backend import ADAPTER_FILES, VERSION, PutResult, StoredAdapter, content_digest
from adapters_store.errors import AdapterNotFound, InvalidAdapter, StoreUnavailable
from adapters_store.names import check_name, is_valid_name
from adapters_store.peft_format import CONFIG_FILE
from adapters_store.scratch import clear_abandoned, fsync, remove, scratch_folder, tree_size

log = logging.getLogger(__name__)

OBJECTS, MANIFESTS, TOUCHED, STAGING, REPLICAS = "objects/", "adapters/", "touched/", ".staging", ".replicas"
MANIFEST_FORMAT = 1
MAX_MANIFEST_BYTES = 64 << 10
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
RECENT_S = 60.0  # a cached version located this recently is never removed to bound the cache
_SEEN_LIMIT = 65536  # names remembered (found or not) before the memory is cleared


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def s3_client(endpoint_url: str | None = None, access_key: str | None = None, secret_key: str | None = None) -> Any:
    """A boto3 S3 client; credentials (unless given) and region from the usual AWS variables and files.

    With ``endpoint_url`` (MinIO, Ceph, rclone, ...) requests use path-style addressing.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise RuntimeError("the S3 adapter store needs boto3: pip install 'loraplex[s3]'") from None
    config = Config(
        s3={"addressing_style": "path"} if endpoint_url else {},
        retries={"max_attempts": 3, "mode": "standard"},  # a store that is down answers 503 in seconds
        connect_timeout=5,
        read_timeout=60,
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client(
        "s3", endpoint_url=endpoint_url or None, region_name=region, config=config,
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
    )


class S3AdapterStore:
    """Adapters in an S3-compatible bucket; see the module docstring for the layout and guarantees."""

    def __init__(
        self,
        url: str,
        cache_dir: Path,
        client: Any,
        refresh: float = 1.0,
        orphan_grace: float = 3600.0,
        cache_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.cache_dir = self._claim_cache(Path(cache_dir))
        self.client = client
        self.refresh = refresh
        self.orphan_grace = orphan_grace  # orphan objects younger than this may be an upload in progress
        self.cache_bytes = cache_bytes  # bound on the disk cache (0: none); see _bound_cache
        self._used: dict[str, float] = {}  # version -> when it was last located (self._clock)
        self._bounding = threading.Lock()
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, StoredAdapter | None]] = {}
        self._names: tuple[float, list[str]] | None = None
        self._manifests: dict[str, tuple[str, str]] = {}  # manifest key -> (ETag, version), for collection
        self._fetching: dict[str, threading.Lock] = {}
        self._last_stale_warning = float("-inf")
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        self._client_error, self._errors = ClientError, (BotoCoreError, ClientError, Boto3Error)

    # -- reading --------------------------------------------------------------

    def names(self) -> list[str]:
        now = self._clock()
        with self._lock:
            if self._names is not None and now - self._names[0] < self.refresh:
                return list(self._names[1])
        names = sorted(
            name
            for key, _, _ in self._list(MANIFESTS)
            if key.endswith(".json") and is_valid_name(name := key.removesuffix(".json"))
        )
        with self._lock:
            self._names = (now, names)
        return list(names)

    def strays(self) -> list[tuple[str, str]]:
        """Keys under ``adapters/`` that are not ``<valid name>.json``: written by hand (the store never does)."""
        return [
            (MANIFESTS + key, "not an adapter manifest (adapters/<name>.json with a valid adapter name)")
            for key, _, _ in self._list(MANIFESTS)
            if not (key.endswith(".json") and is_valid_name(key.removesuffix(".json")))
        ]

    def get(self, name: str) -> StoredAdapter:
        check_name(name)
        now = self._clock()
        with self._lock:
            seen = self._seen.get(name)
        if seen is not None and now - seen[0] < self.refresh:
            adapter = seen[1]
        else:
            try:
                adapter = self._read_manifest(name)
            except StoreUnavailable:
                if seen is None:
                    raise
                adapter = seen[1]  # the store is down: keep serving what this replica last knew,
                self._remember(name, adapter, now)  # and ask again only after another `refresh`
                self._warn_stale(name)
            else:
                self._remember(name, adapter, now)
        if adapter is None:
            raise AdapterNotFound(f"adapter {name!r} not found")
        return adapter

    def locate(self, adapter: StoredAdapter) -> Path:
        local = self._local(adapter.version)
        with self._lock:
            self._used[adapter.version] = self._clock()
        if (local / CONFIG_FILE).is_file():
            return local
        with self._fetch_lock(adapter.version):
            if not (local / CONFIG_FILE).is_file():
                self._fetch(adapter, local)
        self._bound_cache()
        return local

    def cached(self, adapter: StoredAdapter) -> bool:
        """Whether this replica holds the version's files already (reading it needs no download)."""
        return (self._local(adapter.version) / CONFIG_FILE).is_file()

    # -- writing --------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        with scratch_folder(self.cache_dir / STAGING) as path:
            yield path

    def put(self, name: str, staged: Path) -> PutResult:
        check_name(name)
        version = content_digest(staged)
        sizes = {f: (staged / f).stat().st_size for f in ADAPTER_FILES if (staged / f).exists()}
        previous = self._read_manifest(name)
        adapter = StoredAdapter(name, version, self._local(version))
        changed = previous is None or previous.version != version
        # Touch both versions first: garbage collection spares a version touched within the grace period,
        # and the old one may still be in use on other replicas.
        self._touch(version)
        if previous is not None and changed:
            self._touch(previous.version)
        for f in sizes:  # always sent: this also repairs a damaged object and refreshes an old one's age
            self._upload(staged / f, self._object_key(version, f))
        if changed:
            manifest = {"format": MANIFEST_FORMAT, "name": name, "version": version, "files": sizes}
            body = json.dumps(manifest, sort_keys=True).encode()
            self._call(
                f"write the manifest of {name!r}",
                self.client.put_object, Bucket=self.bucket, Key=self._manifest_key(name), Body=body,
                ContentType="application/json",
            )
        for f, size in sizes.items():  # a collection that decided before the touch: send again what it removed
            key = self._object_key(version, f)
            if self._size_of(key) != size:
                self._upload(staged / f, key)
        self._keep_locally(staged, adapter.path)
        with self._lock:
            self._used[version] = self._clock()
        self._bound_cache()
        self._remember(name, adapter, self._clock(), names_changed=previous is None)
        return PutResult(adapter, previous)

    def delete(self, name: str) -> StoredAdapter:
        check_name(name)
        adapter = self._read_manifest(name)
        if adapter is None:
            self._remember(name, None, self._clock())
            raise AdapterNotFound(f"adapter {name!r} not found")
        self._touch(adapter.version)  # first: replicas still using it keep it for the grace period
        self._call(
            f"delete the manifest of {name!r}",
            self.client.delete_object, Bucket=self.bucket, Key=self._manifest_key(name),
        )
        self._remember(name, None, self._clock(), names_changed=True)
        return adapter

    def collect_garbage(self, in_use: Collection[str]) -> list[str]:
        """Remove versions no manifest names, except ``in_use``: from this replica's cache, and from the bucket
        once untouched (uploaded, re-uploaded or unnamed) for ``orphan_grace`` seconds, since other replicas
        may still be serving or fetching them, or uploading them."""
        started = time.time()
        keep = self._referenced_versions() | set(in_use)
        removed: list[str] = []
        cached = self.cache_dir / OBJECTS.rstrip("/")
        for folder in sorted(cached.iterdir()) if cached.is_dir() else []:
            # a folder placed after the manifests were listed may be a version just fetched for a request
            if folder.name not in keep and folder.stat().st_mtime < started - 1:
                remove(folder)
                removed.append(f"removed cached version {folder.name[:12]}")
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.orphan_grace)
        touched = {key: modified for key, _, modified in self._list(TOUCHED)}
        keys: dict[str, list[str]] = {}
        last: dict[str, datetime] = {}
        for key, _, modified in self._list(OBJECTS):
            version = key.partition("/")[0]
            if VERSION.fullmatch(version) and version not in keep:
                keys.setdefault(version, []).append(self.prefix + OBJECTS + key)
                last[version] = max(modified, last.get(version, modified), touched.get(version, modified))
        for version in sorted(keys):
            if last[version] > cutoff or self._touched_since(version, cutoff):
                continue  # recently in use, or an upload that may still be in progress
            for key in [*keys[version], self.prefix + TOUCHED + version]:
                self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=key)
            removed.append(f"removed unreferenced version {version[:12]} from the bucket")
        for version in touched.keys() - keys.keys() - keep:
            if touched[version] < cutoff:  # a marker whose objects are gone
                key = self.prefix + TOUCHED + version
                self._call(f"delete {key}", self.client.delete_object, Bucket=self.bucket, Key=key)
        return removed

    def recover(self) -> list[str]:
        """At start-up: clear what a crash left in the cache's staging area, then collect garbage if the
        bucket answers (a store that is down now is retried on use, not fatal)."""
        report = clear_abandoned(self.cache_dir / STAGING, "upload or download")
        report += clear_abandoned(self._shared_dir / REPLICAS, "replica cache")  # lock-checked: live ones stay
        try:
            report += self.collect_garbage(())
        except StoreUnavailable as exc:
            report.append(f"garbage collection skipped: {exc}")
        return report

    # -- internals ------------------------------------------------------------

    def _claim_cache(self, folder: Path) -> Path:
        """``folder`` if no other live process uses it as its cache, else a private sub-folder of it.

        Replicas on one node (Ray Serve's, for one) may be given the same folder. The first keeps it (and
        what it cached across restarts); the others each get a folder under ``.replicas`` owned through a
        lock like a scratch folder, so one process's garbage collection never removes another's files and
        a dead replica's folder is cleared by the next :meth:`recover`.
        """
        folder.mkdir(parents=True, exist_ok=True)
        self._shared_dir = folder
        self._owner = (folder / ".lock").open("a")
        try:
            fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._private = None
            return folder
        except BlockingIOError:
            self._owner.close()
        self._private = scratch_folder(folder / REPLICAS)
        private = self._private.__enter__()  # held for the store's life; removed when it is collected
        log.info("adapter cache %s is in use by another process: this one caches in %s", folder, private)
        return private

    def _read_manifest(self, name: str) -> StoredAdapter | None:
        key = self._manifest_key(name)
        try:
            response = self._call(f"read the manifest of {name!r}", self.client.get_object, Bucket=self.bucket, Key=key)
        except _Missing:
            return None
        if response.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
            raise InvalidAdapter(f"the store's manifest of {name!r} is larger than {MAX_MANIFEST_BYTES} bytes")
        body = self._call(f"read the manifest of {name!r}", response["Body"].read, MAX_MANIFEST_BYTES + 1)
        try:
            manifest = json.loads(body)
            version = manifest["version"]
            ok = manifest.get("name") == name and isinstance(version, str) and VERSION.fullmatch(version)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            ok = False
        if not ok:
            raise InvalidAdapter(f"the store's manifest of {name!r} ({key}) is malformed")
        with self._lock:
            self._manifests[key] = (response.get("ETag", ""), version)
        return StoredAdapter(name, version, self._local(version))

    def _fetch(self, adapter: StoredAdapter, local: Path) -> None:
        with self.staging() as scratch:
            for f in ADAPTER_FILES:
                key = self._object_key(adapter.version, f)
                try:
                    self._call(f"download {key}", self.client.download_file, self.bucket, key, str(scratch / f))
                except _Missing:
                    with self._lock:
                        self._seen.pop(adapter.name, None)  # the name has probably moved on: look again next time
                    raise AdapterNotFound(
                        f"version {adapter.version[:12]} of adapter {adapter.name!r} is no longer stored"
                    ) from None
            if content_digest(scratch) != adapter.version:
                raise InvalidAdapter(f"the store's copy of {adapter.ref} does not match its version (corrupted)")
            self._keep_locally(scratch, local)
        log.info("fetched %s from %s", adapter.ref, self.url)

    def _keep_locally(self, folder: Path, local: Path) -> None:
        """Move a complete, checked version into the cache (atomic rename), unless it is already there."""
        if (local / CONFIG_FILE).is_file():
            return
        for f in ADAPTER_FILES:
            if (folder / f).exists():
                fsync(folder / f)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(folder, local)
        except OSError:
            if not (local / CONFIG_FILE).is_file():
                raise  # not "someone placed the same version first"

    def _bound_cache(self) -> None:
        """Keep the disk cache under ``cache_bytes``: remove the least recently located versions first, but never
        one located in the last ``RECENT_S`` seconds (a load may be reading it), so the bound can be exceeded
        for that long. A removed version is fetched again when next used; the bucket keeps it."""
        if not self.cache_bytes:
            return
        with self._bounding:  # one pass at a time (locate runs on several worker threads)
            cached = self.cache_dir / OBJECTS.rstrip("/")
            folders = [f for f in cached.iterdir() if VERSION.fullmatch(f.name)] if cached.is_dir() else []
            sizes: dict[Path, int] = {}
            for f in folders:
                with suppress(FileNotFoundError):  # a collection may remove it meanwhile
                    sizes[f] = tree_size(f)
            total, now = sum(sizes.values()), self._clock()
            with self._lock:
                used = {f: self._used.get(f.name, float("-inf")) for f in sizes}
            for folder in sorted(sizes, key=used.__getitem__):  # least recently located first
                if total <= self.cache_bytes:
                    return
                if now - used[folder] < RECENT_S:
                    continue
                with suppress(FileNotFoundError):
                    remove(folder)
                total -= sizes[folder]
                log.info("adapter cache over %d bytes: removed version %s (fetched again on use)",
                         self.cache_bytes, folder.name[:12])

    def _touch(self, version: str) -> None:
        """Mark ``version`` as in use now (collection waits ``orphan_grace`` after the last mark)."""
        key = self.prefix + TOUCHED + version
        now = datetime.now(timezone.utc).isoformat(timespec="seconds").encode()  # not empty: rclone's S3 server
        self._call(f"write {key}", self.client.put_object, Bucket=self.bucket, Key=key, Body=now)  # stalls after one

    def _touched_since(self, version: str, cutoff: datetime) -> bool:
        """Checked again just before a removal: an upload may have touched the version since the listing."""
        key = self.prefix + TOUCHED + version
        try:
            head = self._call(f"check {key}", self.client.head_object, Bucket=self.bucket, Key=key)
        except _Missing:
            return False
        return head["LastModified"] > cutoff

    def _upload(self, path: Path, key: str) -> None:
        self._call(f"upload {key}", self.client.upload_file, str(path), self.bucket, key)

    def _referenced_versions(self) -> set[str]:
        """The versions every manifest names; unchanged manifests (same ETag) are not read again."""
        versions: set[str] = set()
        for rel, etag, _ in self._list(MANIFESTS):
            key = self.prefix + MANIFESTS + rel
            with self._lock:
                known = self._manifests.get(key)
            if known is not None and known[0] == etag:
                versions.add(known[1])
                continue
            name = rel.removesuffix(".json")
            if not is_valid_name(name):
                continue
            try:
                adapter = self._read_manifest(name)
            except InvalidAdapter as exc:
                log.warning("%s", exc)
                continue
            if adapter is not None:
                versions.add(adapter.version)
        return versions

    def _list(self, under: str) -> Iterator[tuple[str, str, datetime]]:
        """(key relative to ``prefix + under``, ETag, last modified) of every object there."""
        token: str | None = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self.prefix + under}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"list {self.prefix + under}", self.client.list_objects_v2, **kw)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix + under) :], obj.get("ETag", ""), obj["LastModified"]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _size_of(self, key: str) -> int | None:
        try:
            return self._call(f"check {key}", self.client.head_object, Bucket=self.bucket, Key=key)["ContentLength"]
        except _Missing:
            return None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run one client call; a missing key raises :class:`_Missing`, any other failure StoreUnavailable."""
        try:
            return fn(*args, **kw)
        except self._client_error as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise _Missing from None
            raise StoreUnavailable(f"adapter store {self.url}: could not {what}: {exc}") from None
        except self._errors as exc:
            raise StoreUnavailable(f"adapter store {self.url}: could not {what}: {exc}") from None

    def _remember(self, name: str, adapter: StoredAdapter | None, at: float, names_changed: bool = False) -> None:
        with self._lock:
            if len(self._seen) >= _SEEN_LIMIT:
                self._seen.clear()
            self._seen[name] = (at, adapter)
            if names_changed:
                self._names = None

    def _warn_stale(self, name: str) -> None:
        now = self._clock()
        if now - self._last_stale_warning >= 60:
            self._last_stale_warning = now
            log.warning("adapter store %s unreachable: serving what was last read (e.g. of %r)", self.url, name)

    def _fetch_lock(self, version: str) -> threading.Lock:
        with self._lock:
            return self._fetching.setdefault(version, threading.Lock())

    def _local(self, version: str) -> Path:
        return self.cache_dir / OBJECTS / version

    def _object_key(self, version: str, file: str) -> str:
        return f"{self.prefix}{OBJECTS}{version}/{file}"

    def _manifest_key(self, name: str) -> str:
        return f"{self.prefix}{MANIFESTS}{name}.json"


class _Missing(Exception):
    """The key does not exist (internal: callers turn it into their own answer)."""

