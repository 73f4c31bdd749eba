"""Running rows and their merged, left-padded KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..decoding import TextPipeline
from ..sampling import RowSampler
from .jobs import Generation


@dataclass
class Row:
    """One running job inside the batch."""
    job: Generation
    sampler: RowSampler | None
    pipeline: TextPipeline | None
    last_token: int
    next_position: int
    rope_delta: int
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)  # with logprobs: one entry per pending id
    constraint: Any = None  # the row's matcher (constraints), when its request is constrained
    done: bool = False


class Batch:
    """Running rows with one merged, left-padded KV cache."""

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def add(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Merge newly prefilled rows (their cache and left-padded mask) into the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)], dim=0)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])
            mine.values = torch.cat([_pad_left(mine.values, width, dim=2),
                                     _pad_left(theirs.values, width, dim=2)])
        self.rows.extend(rows)

    def drop_done(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        self.rows = [self.rows[i] for i in keep]
        self.mask = _keep_rows(self.cache, self.mask, keep)
        used = int(torch.nonzero(self.mask.sum(dim=0))[0])  # leading columns that are padding for all
        self.mask = self.mask[:, used:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, used:], layer.values[:, :, used:]


def _keep_rows(cache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only the given batch rows of a cache (in place) and return the matching mask rows."""
    index = torch.tensor(keep, device=mask.device)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
    return mask.index_select(0, index)


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
