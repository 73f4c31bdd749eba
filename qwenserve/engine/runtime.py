"""What the inference loop runs on, set up once at start-up: the projections' kernels (bf16 or int8),
the KV cache allocated for every slot, and the decode step, compiled when COMPILE says so."""

from __future__ import annotations

import logging
import time

import torch

from ..config import Settings
from . import layer_ops
from .cache import SlotCache
from .forward import TextDecoder
from .kernels import in_use, prepare_linears
from .loading import LoadedModel

log = logging.getLogger("qwenserve.engine")


def build_decoder(loaded: LoadedModel, settings: Settings) -> TextDecoder:
    model = loaded.model
    text = model.model.language_model if loaded.is_multimodal else model.model
    loaded.quantization = prepare_linears(text, model, settings.quantization)
    loaded.kernels = in_use(model)
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = SlotCache(config.num_hidden_layers, settings.max_concurrent_requests, settings.kv_cache_tokens,
                      config.num_key_value_heads, head_dim, text.norm.weight.dtype, loaded.device)
    log.info("KV cache: %d slots x %d tokens, %.1f MiB", cache.slots, cache.tokens, cache.bytes / 2 ** 20)
    compiling = wants_compile(settings.compile, loaded.device)
    # a compiled step traces torch ops; our library's calls would only break its graph
    fused = not compiling and layer_ops.available(model, loaded.is_multimodal, cache)
    decoder = (layer_ops.LayerOpsDecoder if fused else TextDecoder)(model, loaded.is_multimodal, cache)
    loaded.kernels += "+layer-ops" if fused else ""
    if compiling:
        compile_decode(decoder)
    return decoder


def wants_compile(setting: str, device) -> bool:
    """auto: on a GPU only. On the development CPU compiling the step measured no faster than the
    eager step (whose projections already read at the memory rate) and costs minutes at start-up."""
    if setting == "auto":
        return torch.device(device).type == "cuda"
    return setting == "1"


def compile_decode(decoder: TextDecoder) -> None:
    """Compile the decode step with dynamic batch and span, and run it once at start-up so that no
    user waits for compilation; any failure leaves the eager step in place (logged once)."""
    try:
        compiled = torch.compile(decoder.decode, dynamic=True)
        started = time.monotonic()
        _warm(decoder, compiled)
        decoder.decode_step = compiled
        log.info("decode step compiled in %.1f s", time.monotonic() - started)
    except Exception:
        log.exception("compiling the decode step failed; decoding runs eagerly")
        decoder.decode_step = decoder.decode


def _warm(decoder: TextDecoder, step) -> None:
    """Shapes seen at start-up: one row and two (dynamic sizes specialise on 1), short and longer spans.
    Writes go to the sink position; no slot holds a row yet."""
    cache = decoder.cache
    device = cache.keys[0].device
    with torch.inference_mode():
        for rows in (1, min(2, cache.slots)):
            for span in (2, min(64, cache.tokens)):
                zeros = torch.zeros(rows, dtype=torch.long, device=device)
                step(zeros, zeros, torch.full((rows,), cache.sink, device=device), span)
