"""KV-cache blocks: reference-counted, and with prefix caching, content-addressed.

A block holds the K/V of ``block_size`` consecutive positions of one sequence.
Running sequences own their blocks through a reference count; a full block
whose K/V are computed may be *registered* under its key, so that another
sequence with the same tokens computed by the same weights takes it instead of
computing it again. A registered block nobody references stays cached until a
fresh block is needed: free blocks without a key go first, then cached ones,
least recently released first.

A full block's key is a hash chain over the sequence, so it names every token
before it too::

    key(i) = sha256(key(i-1) | salt | tokens of block i)      key(-1) = b""

where the salt names what computed the K/V (the adapter versions' digests and
weights, or nothing for the base model; see ``Selection.kv_salt``). Blocks are
only ever written by the sequence that allocated them, before they are
registered: a shared block is read-only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockKey = bytes


def extend_keys(keys: list[BlockKey], tokens: Sequence[int], block_size: int, salt: bytes, upto: int) -> None:
    """Extend ``keys`` (the chain of ``tokens``' first full blocks) to the full blocks of ``tokens[:upto]``."""
    for i in range(len(keys), upto // block_size):
        h = hashlib.sha256(keys[-1] if keys else b"")
        h.update(len(salt).to_bytes(4, "little"))
        h.update(salt)
        h.update(array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        keys.append(h.digest())


class BlockManager:
    """Hands out fixed-size KV blocks. Pure Python: the tensors live in the runner."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._refs = [0] * num_blocks
        self._key: list[BlockKey | None] = [None] * num_blocks
        self._by_key: dict[BlockKey, int] = {}
        self._empty = list(range(num_blocks - 1, -1, -1))  # free, no key: handed out first
        self._idle: OrderedDict[int, None] = OrderedDict()  # free, registered: least recently released first

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence references (cached ones included: they are reused when needed)."""
        return len(self._empty) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered blocks, referenced or not."""
        return len(self._by_key)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """The registered blocks of the longest prefix of ``keys`` (no reference taken: see :meth:`take`)."""
        found: list[int] = []
        if self.caching:
            for key in keys:
                block = self._by_key.get(key)
                if block is None:
                    break
                found.append(block)
        return found

    def idle_among(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` nobody references (taking them lowers :attr:`free_blocks`)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """One more reference to each of ``blocks`` (registered blocks found by :meth:`match`)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._idle[b]
            self._refs[b] += 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks, or None (nothing taken) when fewer are free. Cached blocks are dropped for them,
        least recently released first."""
        if n > self.free_blocks:
            return None
        out: list[int] = []
        for _ in range(n):
            if self._empty:
                block = self._empty.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                key = self._key[block]
                self._key[block] = None
                if key is not None:
                    del self._by_key[key]
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of ``blocks``. A sequence's tail is released first, so its prefix, which
        more sequences share, stays cached longest."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] < 0:
                raise RuntimeError(f"KV block {b} released more often than taken")
            if self._refs[b] == 0:
                if self._key[b] is None:
                    self._empty.append(b)
                else:
                    self._idle[b] = None

    def register(self, block: int, key: BlockKey) -> None:
        """``block``'s K/V are computed and match ``key``: later sequences may share it. A key already held
        by another block keeps that one (this block stays private and is freed plainly)."""
        if self.caching and self._key[block] is None and key not in self._by_key:
            self._by_key[key] = block
            self._key[block] = key
