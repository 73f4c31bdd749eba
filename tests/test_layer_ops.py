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


def bf16_model(path, quantization: str = "none"):
    """The checkpoint in bf16 on our kernels, its norms given weights of their own (a fresh model's are
    all ones, so a norm read from the wrong layer would go unseen)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    for name, weight in model.named_parameters():
        if name.endswith("norm.weight"):
            weight.data = (0.5 + torch.rand(weight.shape, generator=generator)).to(weight.dtype)
    prepare_linears(model.model, model, quantization)
    return model


def slot_cache(model) -> SlotCache:
    config = model.config
    return SlotCache(config.num_hidden_layers, 4, 128, config.num_key_value_heads, config.head_dim, torch.bfloat16,
                     "cpu")


@pytest.fixture(scope="module")
def decoders(random_text_ckpt):
    model = bf16_model(random_text_ckpt)
    ours = LayerOpsDecoder(model, False, slot_cache(model))
    assert available(model, False, ours.cache)
    return TextDecoder(model, False, slot_cache(model)), ours


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


@pytest.mark.parametrize("quantization", ["none", "int8"])
@torch.inference_mode()
def test_a_decode_step_in_one_call_equals_the_calls_one_by_one(random_text_ckpt, quantization):
    """`decode_layers` (the whole step without Python between layers) against the same calls made
    layer by layer from Python: the same logits and cache, bitwise."""
    model = bf16_model(random_text_ckpt, quantization)
    whole, by_layer = LayerOpsDecoder(model, False, slot_cache(model)), LayerOpsDecoder(model, False, slot_cache(model))
    assert whole.pointers is not None
    by_layer.pointers = None
    prompts, lengths = [[5, 9, 13, 17, 21, 25, 29], [30, 20, 10]], torch.tensor([7, 3])
    tokens = by_layer.prefill([0, 1], prompts, [0, 0]).argmax(-1)
    whole.prefill([0, 1], prompts, [0, 0])
    for _ in range(6):
        step = [decoder.decode(tokens, lengths, lengths, int(lengths.max()) + 1) for decoder in (whole, by_layer)]
        assert torch.equal(step[0], step[1])
        tokens, lengths = step[1].argmax(-1), lengths + 1
    for mine, theirs in zip(whole.cache.keys + whole.cache.values, by_layer.cache.keys + by_layer.cache.values):
        assert torch.equal(mine, theirs)


@torch.inference_mode()
def test_a_slot_between_decoding_rows_changes_nothing(random_text_ckpt):
    """Slot 1 holds no decoding row (its token writes to the sink and its output is dropped): the rows
    in slots 0 and 2 get what the torch ops give, and the same in one call as call by call."""
    model = bf16_model(random_text_ckpt)
    decoders = [TextDecoder(model, False, slot_cache(model))] + [LayerOpsDecoder(model, False, slot_cache(model))
                                                                  for _ in range(2)]
    decoders[2].pointers = None
    for decoder in decoders:
        decoder.prefill([0, 2], [[5, 6, 7, 8, 9, 10], [12, 11, 10, 9]], [0, 0])
    sink = decoders[0].cache.sink
    tokens, lengths = torch.tensor([14, 0, 15]), torch.tensor([6, sink, 4])
    torch_ops, whole, by_layer = [d.decode(tokens, lengths, lengths, 7)[[0, 2]] for d in decoders]
    assert torch.equal(whole, by_layer)
    assert close(whole, torch_ops)


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
