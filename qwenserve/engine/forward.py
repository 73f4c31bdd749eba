"""Qwen3's text decoder run over the slot cache, with the model's own modules and weights.

Decode steps and text prefill go through here; a prompt with media prefills through Transformers'
forward (vision tower, deepstack, multimodal positions) and is copied into its slot. After the prompt,
Qwen3-VL's three rope axes carry the same position (the row's position plus its rope delta), so the
text model's rotary embedding, given that position, is exactly what Transformers computes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cache import SlotCache


@dataclass
class Part:
    """Rows of a pass that attend together: `queries` consecutive tokens each, from the pass's token
    `first` on, against cache rows `rows` up to `span` (`mask`: [count, 1, queries, span])."""
    count: int
    queries: int
    rows: slice | torch.Tensor
    span: int
    mask: torch.Tensor
    first: int = 0


@dataclass
class Pass:
    """A forward pass as flat tokens: ids, rope positions, the slot and position each writes its key and
    value to, the parts that attend, and the tokens whose logits are returned (`picks`)."""
    ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    writes: torch.Tensor
    parts: list[Part]
    picks: torch.Tensor

    def followed_by(self, other: Pass) -> Pass:
        """One pass with this one's tokens first, then the other's."""
        shift = self.ids.shape[0]
        return Pass(ids=torch.cat([self.ids, other.ids]), positions=torch.cat([self.positions, other.positions]),
                    slots=torch.cat([self.slots, other.slots]), writes=torch.cat([self.writes, other.writes]),
                    parts=self.parts + [replace(part, first=part.first + shift) for part in other.parts],
                    picks=torch.cat([self.picks, other.picks + shift]))


class TextDecoder:
    def __init__(self, model, is_multimodal: bool, cache: SlotCache):
        text = model.model.language_model if is_multimodal else model.model
        self.embed, self.layers, self.norm, self.rotary = text.embed_tokens, text.layers, text.norm, text.rotary_emb
        self.owner = model  # its lm_head is read at call time: kernels.prepare_linears may swap it
        self.cache = cache
        self.apply_rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.decode_step = self.decode  # replaced by the compiled step when COMPILE is on

    @property
    def folds(self) -> bool:
        """Whether a prefill chunk rides along a decode step (`decode_and_prefill`): not when the step
        is compiled, whose graphs are for decode shapes alone."""
        return self.decode_step == self.decode

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
               span: int) -> torch.Tensor:
        """One token for each of the first B slots (B = len(tokens)): row r's token goes to position
        lengths[r] of slot r and attends to positions 0..lengths[r]. Returns fp32 logits [B, vocab]."""
        return self._run(self._decode_pass(tokens, positions, lengths, span))

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """The next chunk of each row's prompt into its slot, after the `starts[r]` tokens already
        there (rows right-padded to the longest chunk; padding writes go to the sink). Returns fp32
        logits [B, vocab] at each row's last chunk token."""
        return self._run(self._prefill_pass(slots, chunks, starts))

    def decode_and_prefill(self, step: tuple, chunk: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step (`decode`'s arguments) and a prefill chunk (`prefill`'s) in one pass: every
        weight is read once for both, so the chunk costs the running rows only its own tokens' work
        instead of a second pass. Each row's result is that of the separate calls (the projections are
        per token; each part attends on its own). Returns (decode logits, prefill logits)."""
        decoding, prefilling = self._decode_pass(*step), self._prefill_pass(*chunk)
        logits = self._run(decoding.followed_by(prefilling))
        return logits[: decoding.picks.shape[0]], logits[decoding.picks.shape[0]:]

    def _decode_pass(self, tokens, positions, lengths, span) -> Pass:
        device = tokens.device
        mask = (torch.arange(span, device=device)[None, :] <= lengths[:, None])[:, None, None, :]
        rows = torch.arange(tokens.shape[0], device=device)
        part = Part(count=tokens.shape[0], queries=1, rows=slice(0, tokens.shape[0]), span=span, mask=mask)
        return Pass(ids=tokens, positions=positions, slots=rows, writes=lengths, parts=[part], picks=rows)

    def _prefill_pass(self, slots, chunks, starts) -> Pass:
        device = self.cache.keys[0].device
        width = max(len(chunk) for chunk in chunks)
        ids = torch.tensor([chunk + [0] * (width - len(chunk)) for chunk in chunks], device=device)
        lengths = torch.tensor([len(chunk) for chunk in chunks], device=device)
        start = torch.tensor(starts, device=device)
        offsets = torch.arange(width, device=device)
        positions = start[:, None] + offsets[None, :]
        writes = torch.where(offsets[None, :] < lengths[:, None], positions, self.cache.sink)
        span = int((start + lengths).max())
        mask = (torch.arange(span, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        slot_index = torch.tensor(slots, device=device)
        part = Part(count=len(chunks), queries=width, rows=_slot_rows(slots, slot_index), span=span, mask=mask)
        picks = torch.arange(len(chunks), device=device) * width + lengths - 1
        return Pass(ids=ids.view(-1), positions=positions.view(-1), writes=writes.view(-1),
                    slots=slot_index.repeat_interleave(width), parts=[part], picks=picks)

    def _run(self, plan: Pass) -> torch.Tensor:
        """Every token of the pass as one flat batch through the projections; attention per part."""
        hidden = self.embed(plan.ids[None])
        cos, sin = self.rotary(hidden, plan.positions[None])
        for i, layer in enumerate(self.layers):
            keys, values = self.cache.keys[i], self.cache.values[i]
            q, k, v = self._project(layer, hidden, cos, sin)  # [1, heads, tokens, head_dim]
            keys[plan.slots, :, plan.writes] = k[0].transpose(0, 1)
            values[plan.slots, :, plan.writes] = v[0].transpose(0, 1)
            outs = [self._attend(layer, part, q, keys, values) for part in plan.parts]
            hidden = self._finish(layer, hidden, (outs[0] if len(outs) == 1 else torch.cat(outs))[None])
        return self._logits(hidden[0, plan.picks])

    def _project(self, layer, hidden, cos, sin):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k, v = layer.qkv(x)  # kernels.Fused
        q = attn.q_norm(q.reshape(shape)).transpose(1, 2)
        k = attn.k_norm(k.reshape(shape)).transpose(1, 2)
        v = v.reshape(shape).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        return q, k, v

    @staticmethod
    def _attend(layer, part: Part, q, keys, values) -> torch.Tensor:
        """One part's queries (a slice of the pass's tokens) against its rows' cache: [tokens, heads x dim]."""
        heads, dim = q.shape[1], q.shape[3]
        queries = q[0, :, part.first:part.first + part.count * part.queries]
        queries = queries.reshape(heads, part.count, part.queries, dim).transpose(0, 1)
        out = F.scaled_dot_product_attention(queries, keys[part.rows, :, :part.span], values[part.rows, :, :part.span],
                                             attn_mask=part.mask, scale=layer.self_attn.scaling, enable_gqa=True)
        return out.transpose(1, 2).reshape(part.count * part.queries, heads * dim)

    @staticmethod
    def _finish(layer, hidden, attended):
        hidden = hidden + layer.self_attn.o_proj(attended)
        gate, up = layer.gate_up(layer.post_attention_layernorm(hidden))  # kernels.Fused
        return hidden + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.owner.lm_head(self.norm(hidden)).float()


def _slot_rows(slots: list[int], slot_index: torch.Tensor) -> slice | torch.Tensor:
    """The index of these slots' rows in a cache buffer: a slice (a view) where they are consecutive
    (one row, always), the index tensor (a gather) otherwise. The gather copies every layer's keys up
    to the span: at 3,000 tokens it was a fifth of a 16-token chunk's time."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return slot_index
