"""Inference API keys: who may call the completion routes, and with which adapters.

Keys come from ``LORAPLEX_API_KEYS`` (comma-separated, every adapter allowed)
and from a keys file, one key per line::

    # key            adapters it may use (glob patterns; none listed = every adapter)
    sk-team-a        team-a-*  shared-*
    sk-admin-tools

The base model is open to every valid key. Keys are compared in constant time
(the digest of the given key against each stored key's, all of them).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from server.config import MIN_API_KEY_LENGTH


@dataclass(frozen=True)
class ApiKey:
    """One key's rights: ``patterns`` empty means every adapter."""

    digest: bytes
    patterns: tuple[str, ...] = ()

    def allows(self, adapter: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(adapter, p) for p in self.patterns)


class ApiKeys:
    """The configured keys (see :class:`server.config.AuthConfig`, which validates them)."""

    def __init__(self, keys: dict[str, tuple[str, ...]]) -> None:
        self._keys = tuple(ApiKey(_digest(key), patterns) for key, patterns in keys.items())

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, given: str) -> ApiKey | None:
        """The key matching ``given``, or None. Looks at every key whatever matches, in constant time each."""
        digest = _digest(given)
        found = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found



def load_keys(env_keys: str | None, keys_file: Path | None) -> dict[str, tuple[str, ...]]:
    """Keys from the comma-separated list (every adapter) and the keys file (its patterns win)."""
    keys: dict[str, tuple[str, ...]] = {key.strip(): () for key in (env_keys or "").split(",") if key.strip()}
    if keys_file is not None:
        keys.update(parse_keys_file(keys_file))
    return keys


def parse_keys_file(path: Path) -> dict[str, tuple[str, ...]]:
    """``key [pattern ...]`` per line; ``#`` starts a comment. Raises ValueError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: not UTF-8 text") from None
    keys: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, patterns = words[0], tuple(words[1:])
        if key in keys:
            raise ValueError(f"{path}:{number}: this key is listed twice")
        if len(key) < MIN_API_KEY_LENGTH:
            raise ValueError(f"{path}:{number}: API keys must be at least {MIN_API_KEY_LENGTH} characters")
        keys[key] = patterns
    if not keys:
        raise ValueError(f"the API keys file {str(path)!r} lists no key")
    return keys


def _digest(key: str) -> bytes:
    # Fixed-length digests: compare_digest then takes the same time for any given key length.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
