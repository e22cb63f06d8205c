"""Prefix caching for the serving engine: the keys and values of prompt prefixes already computed, kept in blocks of
BLOCK tokens and copied into a new request's cache slot instead of being computed again.

    prefix = PrefixCache(model.config, capacity_blocks=256, dtype=..., device=...)
    hit = prefix.load(prompt, adapter, cache, slot, limit=len(prompt) - 1)   # tokens now in the slot: columns 0..hit-1
    prefix.store(tokens, adapter, cache, slot)                               # the slot's full blocks, kept for later

A block is found by everything before its end, as vLLM's automatic prefix caching finds it: its key is (the
block before it, its own BLOCK token ids, the LoRA tune), so a block is reused only after the very same tokens from
position 0 under the very same weights. Keys are compared exactly (a dict of tuples), never by a hash alone.
The tune is named by the AdapterBank's serial of that load (a tune unloaded and loaded again under the same name
gets new blocks). A block holds what a recomputation writes: rotary is applied to keys by their position, and a
block sits at the same positions in every prompt that reaches it. Memory is bounded: capacity_blocks blocks,
allocated once; when full, the least recently used block that no other block continues is evicted. Shapes: per layer
k, v [capacity_blocks, nh, BLOCK, hs]; a slot's cache [slots, nh, max_len, hs].
"""

import itertools
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per block (vLLM's default block size)


@dataclass(eq=False)
class _Block:
    key: tuple
    parent: "_Block | None"
    index: int  # its row of the pool
    children: int = 0
    used: int = 0  # the clock tick of its last use


class PrefixCache:
    """capacity_blocks blocks of BLOCK tokens' keys and values per layer. hits / queries count tokens (queries: the
    prompt tokens looked up; hits: those found)."""

    def __init__(self, config, capacity_blocks: int, *, dtype, device):
        if capacity_blocks < 1:
            raise ValueError(f"a prefix cache needs at least one block, got {capacity_blocks}")
        nh, hs = config.num_attention_heads, config.head_size
        shape = (capacity_blocks, nh, BLOCK, hs)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity_blocks
        self.blocks: dict[tuple, _Block] = {}
        self.free = list(range(capacity_blocks))[::-1]
        self.clock = itertools.count(1)
        self.hits = self.queries = 0

    def __len__(self) -> int:
        return len(self.blocks)

    def _chain(self, tokens, adapter):
        """The cached blocks that begin `tokens`, in order (stops at the first block not cached)."""
        parent, out = None, []
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            block = self.blocks.get((parent, tuple(tokens[start:start + BLOCK]), adapter))
            if block is None:
                break
            out.append(block)
            parent = block
        return out

    @torch.no_grad()
    def load(self, tokens, adapter, cache, slot: int, limit: int) -> int:
        """Copy the cached blocks that begin tokens (at most `limit` tokens of them) into cache slot `slot`'s first
        columns; returns how many tokens that is (a multiple of BLOCK)."""
        chain = self._chain(list(tokens[:limit]), adapter)
        self.queries += len(tokens)
        if not chain:
            return 0
        tick = next(self.clock)
        for block in chain:
            block.used = tick
        n = len(chain) * BLOCK
        idx = torch.tensor([b.index for b in chain], device=self.k[0].device)
        for layer, k, v in zip(cache, self.k, self.v):  # [n_blocks, nh, BLOCK, hs] -> [nh, n, hs]
            layer.k_cache[slot, :, :n] = k[idx].transpose(0, 1).flatten(1, 2)
            layer.v_cache[slot, :, :n] = v[idx].transpose(0, 1).flatten(1, 2)
        self.hits += n
        return n

    @torch.no_grad()
    def store(self, tokens, adapter, cache, slot: int) -> None:
        """Keep the full blocks of tokens, which cache slot `slot` holds at columns 0..len(tokens)-1 (those not
        cached yet are copied; a full pool evicts its least recently used leaves, never this chain's blocks)."""
        tokens, parent, tick = list(tokens), None, next(self.clock)
        chain = set()
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            key = (parent, tuple(tokens[start:start + BLOCK]), adapter)
            block = self.blocks.get(key)
            if block is None:
                index = self._allocate(chain)
                if index is None:
                    return
                block = self.blocks[key] = _Block(key, parent, index)
                if parent is not None:
                    parent.children += 1
                for layer, k, v in zip(cache, self.k, self.v):
                    k[index] = layer.k_cache[slot, :, start:start + BLOCK]
                    v[index] = layer.v_cache[slot, :, start:start + BLOCK]
            block.used = tick
            chain.add(block)
            parent = block

    def _allocate(self, keep) -> int | None:
        """A free row of the pool, evicting the least recently used leaf outside `keep` when none is free."""
        if self.free:
            return self.free.pop()
        leaves = [b for b in self.blocks.values() if b.children == 0 and b not in keep]
        if not leaves:
            return None
        victim = min(leaves, key=lambda b: b.used)
        del self.blocks[victim.key]
        if victim.parent is not None:
            victim.parent.children -= 1
        return victim.index

    def clear(self) -> None:
        self.blocks.clear()
        self.free = list(range(self.capacity))[::-1]
