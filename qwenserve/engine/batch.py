"""Running rows, each in its own slot of the preallocated KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..decoding import TextPipeline
from ..sampling import RowSampler
from .cache import SlotCache
from .jobs import Generation


@dataclass
class Row:
    """One running job: its slot, the prompt tokens still to prefill, and its decoding state."""
    job: Generation
    slot: int
    prefill: list[int]  # tokens not yet in the cache (chunked prefill); empty once decoding
    sampler: RowSampler | None = None
    pipeline: TextPipeline | None = None
    length: int = 0  # tokens in the slot's cache
    last_token: int = 0  # sampled, not yet in the cache: the next decode step's input
    rope_delta: int = 0  # Qwen3-VL: multimodal rope offset of the prompt (0 for text)
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)  # with logprobs: one entry per pending id
    constraint: Any = None  # the row's matcher (constraints), when its request is constrained
    done: bool = False

    @property
    def decoding(self) -> bool:
        return not self.prefill and not self.done


class Batch:
    """The rows holding slots; decode steps run over the slots' prefix that holds decoding rows."""

    def __init__(self, cache: SlotCache):
        self.cache = cache
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def prefilling(self) -> list[Row]:
        return [row for row in self.rows if row.prefill and not row.done]

    def decoding(self) -> list[Row]:
        return [row for row in self.rows if row.decoding]

    def drop_done(self) -> None:
        for row in self.rows:
            if row.done:
                self.cache.release(row.slot)
        self.rows = [row for row in self.rows if not row.done]

    def release_all(self) -> None:
        for row in self.rows:
            row.done = True
        self.drop_done()

    def step_inputs(self, rows: list[Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Tokens, rope positions and write positions for slots 0..B-1 (B: the highest decoding slot + 1),
        and the attention span. Slots between them that hold no decoding row write to the sink."""
        width = max(row.slot for row in rows) + 1
        tokens, positions, lengths = [0] * width, [0] * width, [self.cache.sink] * width
        for row in rows:
            tokens[row.slot], positions[row.slot], lengths[row.slot] = (row.last_token, row.length + row.rope_delta,
                                                                        row.length)
        span = max(row.length for row in rows) + 1
        tensors = (torch.tensor(values, device=device) for values in (tokens, positions, lengths))
        return (*tensors, span)
