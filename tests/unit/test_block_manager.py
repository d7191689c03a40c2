"""The KV block pool: reference counts, content keys, and which free block goes first."""

from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, extend_keys


def keys_of(tokens: list[int], salt: bytes = b"", size: int = 4) -> list[bytes]:
    keys: list[bytes] = []
    extend_keys(keys, tokens, size, salt, len(tokens))
    return keys


def test_keys_chain_every_token_before_them_and_the_salt():
    a = keys_of(list(range(12)))
    assert len(a) == 3 and len(set(a)) == 3
    assert keys_of(list(range(12)))[:2] == a[:2]  # deterministic
    changed_first = keys_of([99, *range(1, 12)])
    assert all(x != y for x, y in zip(changed_first, a, strict=True))  # one token early changes every later key
    salted = keys_of(list(range(12)), salt=b"digest*0x1.0p+0")
    assert not set(salted) & set(a)
    assert keys_of(list(range(10)))[:2] == a[:2] and len(keys_of(list(range(10)))) == 2  # only full blocks


def test_references_and_release_order():
    pool = BlockManager(4, 4)
    first = pool.allocate(2)
    assert first is not None and pool.free_blocks == 2
    assert pool.allocate(3) is None and pool.free_blocks == 2  # nothing taken when it does not fit
    key = keys_of([1, 2, 3, 4])[0]
    pool.register(first[0], key)
    pool.take([first[0]])
    assert pool.refs(first[0]) == 2
    pool.release(first)
    assert pool.refs(first[0]) == 1 and pool.free_blocks == 3
    pool.release([first[0]])
    assert pool.free_blocks == 4 and pool.cached_blocks == 1 and pool.match([key]) == [first[0]]
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([first[0]])


def test_unkeyed_free_blocks_go_before_cached_ones_and_cached_ones_least_recently_released_first():
    pool = BlockManager(3, 4)
    blocks = pool.allocate(3)
    assert blocks is not None
    keys = keys_of(list(range(12)))
    for b, k in zip(blocks, keys, strict=True):
        pool.register(b, k)
    pool.release([blocks[0]])
    pool.release([blocks[2]])
    pool.release([blocks[1]])
    assert pool.allocate(1) == [blocks[0]]  # released first
    assert pool.match(keys) == []  # its key is gone, and with it the chain's start
    assert pool.cached_blocks == 2


def test_a_key_already_registered_keeps_its_block_and_the_duplicate_stays_private():
    pool = BlockManager(4, 4)
    a, b = pool.allocate(1), pool.allocate(1)
    assert a is not None and b is not None
    key = keys_of([5, 6, 7, 8])[0]
    pool.register(a[0], key)
    pool.register(b[0], key)
    assert pool.match([key]) == a
    pool.release(b)
    assert pool.cached_blocks == 1  # b went back as a plain free block


def test_caching_off_registers_and_finds_nothing():
    pool = BlockManager(2, 4, caching=False)
    blocks = pool.allocate(1)
    assert blocks is not None
    key = keys_of([1, 2, 3, 4])[0]
    pool.register(blocks[0], key)
    assert pool.match([key]) == [] and pool.cached_blocks == 0
