"""The decoder's layers with their small operations as single calls of our C library (layer_ops.c):
the norms (each fused with the residual add before it), q/k norms with rope and the cache write, one
query's attention per decoding row, and the MLP's gate. The projections stay the model's modules. A
decode pass makes all of these calls, every layer's, in one call (`decode_layers`) where every
projection is on our kernel.

Used for bf16 on a CPU where our library loaded (native.py); elsewhere `TextDecoder` runs the torch
ops. Each token's values are those of Transformers' modules but for the order of a sum (CLAUDE.md,
"Layer ops"), and each row is computed on its own, so batched decoding still equals solo decoding."""

from __future__ import annotations

import ctypes

import torch

from . import native
from .forward import Pass, TextDecoder
from .kernels import PackedLinear


def available(model, is_multimodal: bool, cache) -> bool:
    """Whether these operations fit this model and cache: bf16 on the CPU, our library loaded, Qwen3's
    SiLU MLP and per-head q/k norms, widths in whole AVX-512 vectors."""
    config = model.config.get_text_config()
    attn = (model.model.language_model if is_multimodal else model.model).layers[0].self_attn
    widths = (config.hidden_size, config.intermediate_size, attn.head_dim // 2)
    return (native.library() is not None and cache.keys[0].dtype == torch.bfloat16
            and cache.keys[0].device.type == "cpu" and config.hidden_act == "silu" and hasattr(attn, "q_norm")
            and attn.head_dim % 32 == 0 and all(width % 16 == 0 for width in widths))


class LayerOpsDecoder(TextDecoder):
    def __init__(self, model, is_multimodal: bool, cache):
        super().__init__(model, is_multimodal, cache)
        config = model.config.get_text_config()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.sizes = torch.tensor([config.hidden_size, self.heads, self.kv_heads, self.head_dim,
                                   config.intermediate_size], dtype=torch.int64)
        self.pointers = _layer_pointers(self.layers, cache)  # None: a projection is not on our kernel

    def _run(self, plan: Pass) -> torch.Tensor:
        hidden = self.embed(plan.ids[None])[0].contiguous()
        cos, sin = (t[0].contiguous() for t in self.rotary(hidden[None], plan.positions[None]))
        # held for the whole pass: C reads them after data_ptr()
        slots, writes = _int64(plan.slots), _int64(plan.writes)
        lengths = self._attended(writes)
        if self.pointers is not None and all(part.queries == 1 for part in plan.parts):
            normed = self._decode_layers(hidden, cos, sin, slots, writes, lengths)
            return self.owner.lm_head(normed[plan.picks]).float()
        normed = rms_norm(hidden, self.layers[0].input_layernorm)
        for i, layer in enumerate(self.layers):
            keys, values = self.cache.keys[i], self.cache.values[i]
            q = self._store_keys(layer, normed, cos, sin, keys, values, slots, writes)
            outs = [self._attend_part(layer, part, q, keys, values, slots, lengths) for part in plan.parts]
            attended = outs[0] if len(outs) == 1 else torch.cat(outs)
            hidden, normed = add_rms_norm(hidden, layer.self_attn.o_proj(attended), layer.post_attention_layernorm)
            gated = silu_mul(layer.gate_up.projection(normed))
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            hidden, normed = add_rms_norm(hidden, layer.mlp.down_proj(gated), after)
        return self.owner.lm_head(normed[plan.picks]).float()

    def _decode_layers(self, hidden, cos, sin, slots, writes, lengths) -> torch.Tensor:
        """A decode pass (one token per row) through every layer in one call of ours (`decode_layers`):
        the same operations as `_run`, without Python between them. Returns the final norm's output."""
        first = self.layers[0]
        normed = torch.empty_like(hidden)
        if native.library().decode_layers(
                self.pointers, len(self.layers), hidden.data_ptr(), normed.data_ptr(), self.norm.weight.data_ptr(),
                hidden.shape[0], self.sizes.data_ptr(), first.input_layernorm.variance_epsilon,
                first.self_attn.q_norm.variance_epsilon, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
                writes.data_ptr(), lengths.data_ptr(), self.cache.keys[0].shape[2], first.self_attn.scaling,
                torch.get_num_threads()):
            raise MemoryError("the decode step could not allocate its buffers")
        return normed

    def _attended(self, writes: torch.Tensor) -> torch.Tensor:
        """The last position each one-token row attends to (rows of longer chunks: unused): its write
        position, except a slot between
        decoding rows (writing to the sink; its output is dropped), which attends to its first position
        only: up to the sink would read the whole slot in every layer."""
        return torch.where(writes == self.cache.sink, 0, writes).contiguous()

    def _store_keys(self, layer, normed, cos, sin, keys, values, slots, writes) -> torch.Tensor:
        """q of every token [tokens, heads, head_dim]; k and v written to the cache."""
        attn = layer.self_attn
        qkv = layer.qkv.projection(normed).contiguous()
        q = torch.empty(qkv.shape[0], self.heads, self.head_dim, dtype=qkv.dtype)
        native.library().qk_rope_store(
            qkv.data_ptr(), qkv.shape[0], self.heads, self.kv_heads, self.head_dim, attn.q_norm.weight.data_ptr(),
            attn.k_norm.weight.data_ptr(), attn.q_norm.variance_epsilon, cos.data_ptr(), sin.data_ptr(),
            q.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(), writes.data_ptr(), keys.shape[2])
        return q

    def _attend_part(self, layer, part, q, keys, values, slots, lengths) -> torch.Tensor:
        """One token per row (a decode step): our attention; longer chunks: SDPA, as TextDecoder."""
        if part.queries != 1:
            return self._attend(layer, part, q.transpose(0, 1)[None], keys, values)
        rows = slice(part.first, part.first + part.count)
        out = torch.empty(part.count, self.heads * self.head_dim, dtype=q.dtype)
        if native.library().decode_attention(
                q[rows].data_ptr(), keys.data_ptr(), values.data_ptr(), slots[rows].data_ptr(),
                lengths[rows].data_ptr(), part.count, self.heads, self.kv_heads, self.head_dim, keys.shape[2],
                layer.self_attn.scaling, out.data_ptr()):
            raise MemoryError("decode attention could not allocate its buffers")
        return out


class LayerPointers(ctypes.Structure):
    """One layer as layer_ops.c's `layer_pointers` reads it."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "qkv", "o", "gate_up", "down", "qkv_scales", "o_scales", "gate_up_scales", "down_scales",
        "input_norm", "post_norm", "q_norm", "k_norm", "keys", "values")]


def _layer_pointers(layers, cache) -> ctypes.Array | None:
    """Every layer's pointers for `decode_layers`, or None where a projection is not a bias-free one
    on our kernel (decode passes then run `_run`'s calls one by one)."""
    entries = []
    for layer, keys, values in zip(layers, cache.keys, cache.values):
        projections = [layer.qkv.projection, layer.self_attn.o_proj, layer.gate_up.projection, layer.mlp.down_proj]
        if not all(isinstance(p, PackedLinear) and p.bias is None for p in projections):
            return None
        norms = [layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm]
        entries.append(LayerPointers(*[p.packed.data_ptr() for p in projections],
                                     *[p.scales.data_ptr() if p.scales is not None else None for p in projections],
                                     *[norm.weight.data_ptr() for norm in norms], keys.data_ptr(), values.data_ptr()))
    return (LayerPointers * len(entries))(*entries)


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    out = torch.empty_like(x)
    native.library().rms_norm(x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                              norm.variance_epsilon)
    return out


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, its norm), each [tokens, hidden]."""
    delta = delta.reshape(hidden.shape).contiguous()
    total, normed = torch.empty_like(hidden), torch.empty_like(hidden)
    native.library().add_rms_norm(hidden.data_ptr(), delta.data_ptr(), norm.weight.data_ptr(), total.data_ptr(),
                                  normed.data_ptr(), hidden.shape[0], hidden.shape[1], norm.variance_epsilon)
    return total, normed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection's output [tokens, 2 x width]."""
    gate_up = gate_up.contiguous()
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    native.library().silu_mul(gate_up.data_ptr(), out.data_ptr(), out.shape[0], out.shape[1])
    return out


def _int64(index: torch.Tensor) -> torch.Tensor:
    return index.to(torch.int64).contiguous()
