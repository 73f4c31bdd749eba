"""The layer's small operations in our C library (engine/layer_ops.c) give Transformers' values: the
whole decoder against the torch ops it replaces, attention against SDPA, each row on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from qwenserve.engine import native
from qwenserve.engine.cache import SlotCache
from qwenserve.engine.forward import TextDecoder
from qwenserve.engine.kernels import prepare_linears
from qwenserve.engine.layer_ops import LayerOpsDecoder, available

pytestmark = pytest.mark.skipif(native.library() is None, reason="no AMX (or no C compiler) on this machine")


@pytest.fixture(scope="module")
def decoders(random_text_ckpt):
    model = AutoModelForCausalLM.from_pretrained(random_text_ckpt, dtype=torch.bfloat16).eval()
    prepare_linears(model.model, model, "none")
    config = model.config

    def cache():
        return SlotCache(config.num_hidden_layers, 4, 128, config.num_key_value_heads, config.head_dim,
                         torch.bfloat16, "cpu")

    ours = LayerOpsDecoder(model, False, cache())
    assert available(model, False, ours.cache)
    return TextDecoder(model, False, cache()), ours


def close(mine: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal but for bf16 rounding where a sum's order differs."""
    return torch.allclose(mine.float(), theirs.float(), rtol=0.02, atol=0.02 * float(theirs.float().abs().max()))


@torch.inference_mode()
def test_the_decoder_gives_the_values_of_the_torch_ops(decoders):
    reference, ours = decoders
    prompts = [[(7 * i + 3 * r) % 50 + 5 for i in range(n)] for r, n in enumerate((23, 9, 40))]
    logits = [decoder.prefill([0, 1, 2], prompts, [0, 0, 0]) for decoder in decoders]
    assert close(logits[1], logits[0])
    tokens, lengths = logits[0].argmax(-1), torch.tensor([23, 9, 40])
    for _ in range(12):  # the same tokens into both: each step compares one step's values
        step = [decoder.decode(tokens, lengths, lengths, int(lengths.max()) + 1) for decoder in decoders]
        assert close(step[1], step[0])
        tokens, lengths = step[0].argmax(-1), lengths + 1
    for mine, theirs in zip(ours.cache.keys + ours.cache.values, reference.cache.keys + reference.cache.values):
        assert close(mine[:3, :, :52], theirs[:3, :, :52])


@torch.inference_mode()
def test_a_row_decodes_the_same_alone_or_in_a_batch(decoders):
    _, ours = decoders
    ours.prefill([0, 1], [[5, 6, 7, 8, 9], [9, 8, 7]], [0, 0])
    tokens, lengths = torch.tensor([11, 12]), torch.tensor([5, 3])
    both = ours.decode(tokens, lengths, lengths, 6)
    alone = ours.decode(tokens[:1], lengths[:1], lengths[:1], 6)
    assert torch.equal(alone[0], both[0])


@pytest.mark.parametrize("dim", [32, 64, 128])
def test_decode_attention_matches_sdpa(dim):
    torch.manual_seed(dim)
    heads, kv_heads, positions = 8, 2, 300
    keys = torch.randn(3, kv_heads, positions, dim).to(torch.bfloat16)
    values = torch.randn(3, kv_heads, positions, dim).to(torch.bfloat16)
    q = torch.randn(3, heads, dim).to(torch.bfloat16)
    lengths = torch.tensor([0, 17, 250])  # attend to positions 0..length: 1, 18 and 251 keys
    slots = torch.tensor([2, 0, 1])
    out = torch.empty(3, heads * dim, dtype=torch.bfloat16)
    assert native.library().decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), slots.data_ptr(),
                                             lengths.data_ptr(), 3, heads, kv_heads, dim, positions, dim ** -0.5,
                                             out.data_ptr()) == 0
    for row in range(3):
        span, slot = int(lengths[row]) + 1, int(slots[row])
        expected = F.scaled_dot_product_attention(q[row, :, None], keys[slot, :, :span], values[slot, :, :span],
                                                  scale=dim ** -0.5, enable_gqa=True)
        assert close(out[row], expected.reshape(-1))
