"""The bench's checkpoints, built locally once into .cache/ and reused.

bench     the small designed Qwen3-VL model (140M text parameters, an endless " tick tock" chain)
realsize  the exact architecture and sizes of Qwen/Qwen3-VL-2B with random bf16 weights: the same
          compute and bytes per token as the real model. The tokenizer is the small byte-level one
          of qwenserve.checkpoints; the model's vocabulary stays 151,936 (lm_head reads all of it).
          Embedding rows (tied to lm_head) of every token except letters, digits, space and the
          tokenizer's merged words are zero, so their logit is exactly 0 and greedy decoding (whose
          best random logit is positive) never picks the end token, a special token, a byte that is
          half a UTF-8 character, or an id past the tokenizer: every generated token is one chunk
          of visible text, and streams run to max_tokens. Same bytes and compute as without.
tiny      a 2-layer endless model for the session-store measure (events/s, not model speed)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .plan import CACHE

BENCH = CACHE / "bench-checkpoint"
REALSIZE = CACHE / "bench-realsize"
TINY = CACHE / "bench-tiny"

# Qwen/Qwen3-VL-2B (Instruct and Thinking share it), field names as transformers' Qwen3VLConfig.
REALSIZE_TEXT = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                 "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                 "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                 "attention_bias": False,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                     "mrope_section": [24, 20, 20], "mrope_interleaved": True}}
REALSIZE_VISION = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "in_channels": 3,
                   "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2,
                   "temporal_patch_size": 2, "out_hidden_size": 2048, "num_position_embeddings": 2304,
                   "deepstack_visual_indexes": [5, 11, 17]}
MARKER = "bench-realsize.json"  # written last: a checkpoint without it is incomplete and rebuilt


def bench_checkpoint() -> Path:
    if not (BENCH / "config.json").exists():
        from qwenserve.checkpoints import build_vl_checkpoint

        build_vl_checkpoint(BENCH, endless=True, hidden=1024, layers=11, heads=16, kv_heads=8, head_dim=64,
                            intermediate=3072)
    return BENCH


def tiny_checkpoint() -> Path:
    if not (TINY / "config.json").exists():
        from qwenserve.checkpoints import build_vl_checkpoint

        build_vl_checkpoint(TINY, endless=True)
    return TINY


def _visible_ids(tokenizer) -> list[int]:
    """Ids whose text is letters, digits and spaces only (never a tag, a special token or half a character)."""
    ids = []
    for index in tokenizer.get_vocab().values():
        text = tokenizer.decode([index])
        if text and all(ch.isascii() and (ch.isalnum() or ch == " ") for ch in text) and text.strip():
            ids.append(index)
    return sorted(ids)


def realsize_checkpoint() -> Path:
    """Builds (once) the Qwen3-VL-2B-shaped checkpoint; about 4.3 GB of bf16 safetensors."""
    wanted = {"text": REALSIZE_TEXT, "vision": REALSIZE_VISION, "version": 1}
    marker = REALSIZE / MARKER
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return REALSIZE
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from qwenserve.checkpoints import build_tokenizer, token_id

    print(f"building the real-size checkpoint in {REALSIZE} (once)", flush=True)
    torch.manual_seed(0)
    tokenizer = build_tokenizer(thinking=True)
    end, pad = token_id(tokenizer, "<|im_end|>"), token_id(tokenizer, "<|endoftext|>")
    text_cfg = {**REALSIZE_TEXT, "eos_token_id": end, "pad_token_id": pad, "bos_token_id": pad}
    config = Qwen3VLConfig(text_config=text_cfg, vision_config=dict(REALSIZE_VISION),
                           image_token_id=token_id(tokenizer, "<|image_pad|>"),
                           video_token_id=token_id(tokenizer, "<|video_pad|>"),
                           vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
                           vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
                           tie_word_embeddings=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: half the memory and time of fp32
    try:
        model = Qwen3VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    embed = model.model.language_model.embed_tokens.weight
    if model.lm_head.weight.data_ptr() != embed.data_ptr():
        raise RuntimeError("expected lm_head tied to the embeddings")
    keep = torch.zeros(embed.shape[0], dtype=torch.bool)
    keep[_visible_ids(tokenizer)] = True
    with torch.no_grad():
        embed[~keep] = 0
    model.generation_config.eos_token_id = [end]
    model.generation_config.pad_token_id = pad
    partial = REALSIZE.with_name(REALSIZE.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    del model
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    processor.save_pretrained(partial)
    (partial / MARKER).write_text(json.dumps(wanted))
    shutil.rmtree(REALSIZE, ignore_errors=True)
    partial.rename(REALSIZE)
    return REALSIZE


def kv_bytes_per_token(path: Path, dtype: str) -> int:
    """KV cache bytes one token of one row takes (keys and values of every layer)."""
    text = json.loads((path / "config.json").read_text())["text_config"]
    size = 4 if dtype == "float32" else 2
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * size


def weights_file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))
