"""KV-cache blocks as a free list; a sequence owns the blocks of its block table."""

from __future__ import annotations


class BlockManager:
    """Hands out fixed-size KV blocks. Pure Python: the tensors live in the runner."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, tokens: int) -> list[int]:
        """Blocks for ``tokens`` positions; raises if they do not fit (check ``can_allocate`` first)."""
        n = self.blocks_for(tokens)
        if n > len(self._free):
            raise MemoryError(f"{n} KV blocks requested, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
