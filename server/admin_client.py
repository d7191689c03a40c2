"""``loraplex adapters list|show|upload|delete``: a thin client of a running server's admin API.

Standard library only (urllib), so a serving install needs nothing more. The
server's error message goes to stderr and the command exits 1; a server it
cannot reach is reported the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

from adapters_store.peft_format import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 600.0  # an upload of a large adapter, and a delete waiting for running requests
CHUNK = 1 << 20
COLUMNS = ("name", "version", "state", "tier", "rank", "pinned", "in_flight", "error")


class ClientError(Exception):
    """What the server answered (or why it could not be reached), ready to show to the user."""


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT_S) -> None:
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def list(self) -> dict:
        return self._call("GET", "/admin/adapters")

    def show(self, name: str) -> dict:
        return self._call("GET", f"/admin/adapters/{_quote(name)}")

    def delete(self, name: str) -> dict:
        return self._call("DELETE", f"/admin/adapters/{_quote(name)}")

    def upload(self, name: str, path: Path, dry_run: bool = False) -> dict:
        """Upload a PEFT folder (its adapter files) or one ``.tar.gz``/``.zip`` archive under ``name``."""
        files = _upload_files(path)
        boundary = uuid.uuid4().hex
        parts: list[bytes | Path] = [_part_header(boundary, "name"), name.encode(), b"\r\n"]
        for file in files:
            parts += [_part_header(boundary, "files", file.name), file, b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        size = sum(p.stat().st_size if isinstance(p, Path) else len(p) for p in parts)
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(size)}
        query = "?dry_run=true" if dry_run else ""
        return self._call("POST", f"/admin/adapters{query}", _stream(parts), headers)

    def _call(self, method: str, path: str, body=None, headers: Mapping[str, str] | None = None) -> dict:
        if not self.url.startswith(("http://", "https://")):
            raise ClientError(f"--url {self.url!r}: give the server's http:// or https:// URL")
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise ClientError(f"{exc.code}: {_error_message(exc)}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach {self.url}: {reason}") from None
        try:
            return json.loads(text or b"{}")
        except ValueError:
            raise ClientError(f"{self.url}{path} answered with something other than JSON: is it loraplex?") from None


def add_parser(sub: argparse._SubParsersAction, env: Mapping[str, str]) -> None:
    """``loraplex adapters ...``; ``--url`` and ``--admin-token`` go after the action."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=env.get("LORAPLEX_URL", DEFAULT_URL),
                        help="the server's base URL [env LORAPLEX_URL] (default: %(default)s)")
    common.add_argument("--admin-token", default=env.get("LORAPLEX_ADMIN_TOKEN"),
                        help="the server's admin token [env LORAPLEX_ADMIN_TOKEN]; not needed on a loopback "
                        "server started without one")
    adapters = sub.add_parser("adapters", help="manage a running server's adapters (admin API)",
                              description="Manage the adapters of a running loraplex server through its admin API.")
    actions = adapters.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="every stored adapter, one per line")
    listing.add_argument("--json", action="store_true", help="print the server's JSON answer")
    show = actions.add_parser("show", parents=[common], help="one adapter's details (JSON)")
    show.add_argument("name")
    upload = actions.add_parser("upload", parents=[common], help="validate and store a PEFT adapter")
    upload.add_argument("name", help="the name requests will use as `model`")
    upload.add_argument("path", type=Path, help="a PEFT folder (adapter_config.json, adapter_model.safetensors) "
                        "or a .tar.gz/.zip archive of one")
    upload.add_argument("--dry-run", action="store_true", help="validate only; store nothing")
    delete = actions.add_parser("delete", parents=[common], help="delete an adapter (waits for its running requests)")
    delete.add_argument("name")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Do ``args.action``; 0 on success, 1 (the server's message on ``err``) when it failed."""
    out, err = out or sys.stdout, err or sys.stderr
    client = AdminClient(args.url, args.admin_token)
    try:
        if args.action == "list":
            answer = client.list()
            out.write(json.dumps(answer, indent=2) + "\n" if args.json else _table(answer["data"]))
        elif args.action == "show":
            out.write(json.dumps(client.show(args.name), indent=2) + "\n")
        elif args.action == "upload":
            answer = client.upload(args.name, args.path, args.dry_run)
            what = "valid (dry run, nothing stored)" if args.dry_run else "stored" if answer["created"] else "unchanged"
            out.write(f"{answer['name']}@{answer['version']}: {what}\n")
        elif args.action == "delete":
            answer = client.delete(args.name)
            out.write(f"{answer['id']}@{answer['version']}: deleted\n")
    except ClientError as exc:
        err.write(f"loraplex adapters {args.action}: {exc}\n")
        return 1
    return 0


def _upload_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [path / n for n in (CONFIG_FILE, WEIGHTS_FILE) if (path / n).is_file()]
        if (path / PICKLE_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
            files.append(path / PICKLE_FILE)  # the server names why it refuses it
        if not files:
            raise ClientError(f"{path}: no {CONFIG_FILE} or {WEIGHTS_FILE} in this folder")
        return files
    if path.is_file():
        return [path]
    raise ClientError(f"{path}: no such file or folder")


def _table(rows: list[dict]) -> str:
    cells = [[_cell(c, row.get(c)) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = [[c.upper() for c in COLUMNS], *cells]
    return "".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in lines)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "version":
        return str(value)[:12]
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _part_header(boundary: str, field: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{field}"'
    if filename is not None:
        disposition += f'; filename="{filename.replace(chr(34), "%22")}"'
        return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n" \
               f"Content-Type: application/octet-stream\r\n\r\n".encode()
    return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def _stream(parts: list[bytes | Path]) -> Iterator[bytes]:
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        with part.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's text, else the HTTP reason."""
    body = exc.read().decode("utf-8", "replace")
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:2000] or str(exc.reason)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
