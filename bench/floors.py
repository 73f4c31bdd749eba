"""The bandwidth floor: the best memory read rate measured now, and the bytes a decode step reads.

A decode step of one stream reads every text weight once (the decoder layers, the final norm and
`lm_head`); the embedding is a gather of one row per token, so only `lm_head` reads the full
vocabulary matrix (tied embeddings count once, as `lm_head`). The KV cache read is not counted
(a few percent at these lengths), so the floor is optimistic, which is what a floor should be.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_rates(repeats: int = 8) -> dict:
    """GB/s (1e9 bytes) of an fp32 sum over ~1.07 GB, an fp32 matrix-vector product over a 268 MB
    matrix, and (for information) torch's stock bf16 matrix-vector product over 134 MB."""
    import torch

    def sum_rate() -> float:
        x = torch.ones(256 * 1024 * 1024)  # 1 GiB of fp32
        return x.numel() * 4 / _best_seconds(x.sum, repeats) / 1e9

    def mv_rate(dtype) -> float:
        w = torch.randn(8192, 8192).to(dtype)  # 268 MB in fp32
        v = torch.randn(8192).to(dtype)
        return w.numel() * w.element_size() / _best_seconds(lambda: torch.mv(w, v), repeats) / 1e9

    rates = {"fp32 sum, 1.07 GB": sum_rate(), "fp32 matrix-vector, 268 MB": mv_rate(torch.float32),
             "bf16 matrix-vector, 134 MB (stock torch)": mv_rate(torch.bfloat16)}
    gc.collect()
    return {"rates": rates, "best": max(rates["fp32 sum, 1.07 GB"], rates["fp32 matrix-vector, 268 MB"]),
            "threads": torch.get_num_threads()}


def weight_bytes(path: Path) -> dict:
    """Bytes of text weights one decode step reads, per dtype: fp32, bf16, and int8 (1 byte per decoder
    linear weight; lm_head stays bf16 under QUANTIZATION=int8, as do norms; per-channel scales, <0.1%,
    ignored)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = model.model.language_model
    linear = other = 0
    for module in list(text.layers.modules()) + [text.norm]:
        for param in module.parameters(recurse=False):
            if isinstance(module, torch.nn.Linear):
                linear += param.numel()
            else:
                other += param.numel()
    head = model.lm_head.weight.numel()
    tied = model.lm_head.weight is text.embed_tokens.weight or bool(getattr(config, "tie_word_embeddings", False))
    return {"float32": 4 * (linear + head + other), "bfloat16": 2 * (linear + head + other),
            "int8": linear + 2 * (head + other), "parameters": linear + head + other, "lm_head": model.lm_head.weight.numel(), "tied": tied,
            "all_parameters": sum(p.numel() for p in model.parameters())}  # vision tower included
