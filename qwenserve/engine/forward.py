"""Qwen3's text decoder run over the slot cache, with the model's own modules and weights.

Decode steps and text prefill go through here; a prompt with media prefills through Transformers'
forward (vision tower, deepstack, multimodal positions) and is copied into its slot. After the prompt,
Qwen3-VL's three rope axes carry the same position (the row's position plus its rope delta), so the
text model's rotary embedding, given that position, is exactly what Transformers computes."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .cache import SlotCache


class TextDecoder:
    def __init__(self, model, is_multimodal: bool, cache: SlotCache):
        text = model.model.language_model if is_multimodal else model.model
        self.embed, self.layers, self.norm, self.rotary = text.embed_tokens, text.layers, text.norm, text.rotary_emb
        self.owner = model  # its lm_head is read at call time: kernels.prepare_linears may swap it
        self.cache = cache
        self.apply_rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.decode_step = self.decode  # replaced by the compiled step when COMPILE is on

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
               span: int) -> torch.Tensor:
        """One token for each of the first B slots (B = len(tokens)): row r's token goes to position
        lengths[r] of slot r and attends to positions 0..lengths[r]. Returns fp32 logits [B, vocab]."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        hidden = self.embed(tokens[:, None])
        cos, sin = self.rotary(hidden, positions[:, None])
        columns = torch.arange(span, device=tokens.device)
        mask = (columns[None, :] <= lengths[:, None])[:, None, None, :]
        for i, layer in enumerate(self.layers):
            keys, values = self.cache.keys[i], self.cache.values[i]
            q, k, v = self._project(layer, hidden, cos, sin)
            keys[rows, :, lengths] = k[:, :, 0]
            values[rows, :, lengths] = v[:, :, 0]
            out = self._attend(layer, q, keys[: len(rows), :, :span], values[: len(rows), :, :span], mask)
            hidden = self._finish(layer, hidden, out)
        return self._logits(hidden[:, -1])

    def prefill(self, slots: list[int], chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """The next chunk of each row's prompt into its slot, after the `starts[r]` tokens already
        there (rows right-padded to the longest chunk; padding writes go to the sink). Returns fp32
        logits [B, vocab] at each row's last chunk token."""
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
        rows = _slot_rows(slots, slot_index)
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)
        for i, layer in enumerate(self.layers):
            keys, values = self.cache.keys[i], self.cache.values[i]
            q, k, v = self._project(layer, hidden, cos, sin)
            keys[slot_index[:, None], :, writes] = k.transpose(1, 2)
            values[slot_index[:, None], :, writes] = v.transpose(1, 2)
            out = self._attend(layer, q, keys[rows, :, :span], values[rows, :, :span], mask)
            hidden = self._finish(layer, hidden, out)
        last = hidden[torch.arange(len(chunks), device=device), lengths - 1]
        return self._logits(last)

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
    def _attend(layer, q, keys, values, mask):
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.self_attn.scaling,
                                              enable_gqa=True)

    @staticmethod
    def _finish(layer, hidden, attended):
        out = attended.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        hidden = hidden + layer.self_attn.o_proj(out)
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
