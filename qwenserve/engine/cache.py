"""The preallocated KV cache: one key and one value buffer per layer, shaped
[slots, kv_heads, tokens + 1, head_dim], allocated once at start-up. A row owns one slot: its tokens
sit at positions 0..length-1 of that slot, so joining writes a prefill into a free slot and leaving
frees it, with no copy of anyone else's keys. The extra last position is a sink for the writes of
padding tokens in a batched prefill."""

from __future__ import annotations

import heapq

import torch


class SlotCache:
    def __init__(self, layers: int, slots: int, tokens: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (slots, kv_heads, tokens + 1, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.tokens = slots, tokens
        self._free = list(range(slots))  # lowest first: running rows stay packed at the front

    @property
    def sink(self) -> int:
        return self.tokens

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self) -> int:
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def load(self, slot: int, dynamic_cache, length: int) -> None:
        """Copy one prompt's prefill (a Transformers cache of batch 1) into the slot."""
        for layer, keys, values in zip(dynamic_cache.layers, self.keys, self.values):
            keys[slot, :, :length] = layer.keys[0, :, -length:]
            values[slot, :, :length] = layer.values[0, :, -length:]

    def describe(self) -> dict:
        return {"slots": self.slots, "tokensPerSlot": self.tokens, "bytes": self.bytes,
                "freeSlots": self.free_slots}
