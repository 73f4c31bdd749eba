"""Loading a checkpoint (image-text or text-only), and what the rest of the engine needs to know
about it: context, vocabulary, end tokens, template variables, and how prompts are built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..config import Settings
from ..constraints import ConstraintFactory
from ..logprobs import TokenBytes
from .jobs import Prompt

log = logging.getLogger("qwenserve.engine")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    processor: Any
    is_multimodal: bool
    context_length: int
    vocab_size: int
    eos_ids: set[int]
    template_variables: frozenset[str] | None
    constraints: ConstraintFactory | None  # None: structured outputs unavailable (logged at load)
    quantization: str = "none"  # what runtime.build_decoder applied
    kernels: str = "torch"  # "amx" where runtime.build_decoder packed the projections (kernels.py)

    @property
    def may_think(self) -> bool:
        """The model may open `<think>` itself: its vocabulary has the token and its template speaks of
        it (Qwen3 hybrids do; Qwen3-*-Instruct templates never mention it)."""
        template = getattr(self.processor or self.tokenizer, "chat_template", None)
        return bool(self.constraints and self.constraints.may_think and isinstance(template, str)
                    and "<think>" in template)

    @property
    def device(self):
        return self.model.device

    @cached_property
    def token_bytes(self) -> TokenBytes:
        """Token texts and bytes for logprobs, built on first use."""
        return TokenBytes(self.tokenizer)

    def build_prompt(self, messages: list[dict], template_kwargs: dict[str, Any],
                     images: list | None = None, videos: list | None = None,
                     video_metadata: list | None = None, tools: list[dict] | None = None) -> Prompt:
        """Chat template and tokenization (thread-safe; called off the event loop)."""
        if self.is_multimodal:
            text = self.processor.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True, **template_kwargs)
            kwargs: dict[str, Any] = {}
            if images:
                kwargs["images"] = images
            if videos:
                kwargs["videos"] = videos
                kwargs["video_metadata"] = video_metadata
                kwargs["do_sample_frames"] = False  # frames were sampled by media.decode_video
                kwargs["cap_pixels_per_frame"] = True
            encoded = self.processor(text=[text], return_tensors="pt", **kwargs)
            ids = encoded.pop("input_ids")[0].tolist()
            encoded.pop("attention_mask", None)
            media = {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}
            if not images and not videos:
                media = {}
            return Prompt(ids, text, media)
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=True, **template_kwargs)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Prompt(ids, text)



def load_model(s: Settings) -> LoadedModel:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)

    common = dict(token=s.hf_token, trust_remote_code=s.trust_remote_code)
    config = AutoConfig.from_pretrained(s.model_repo_id, **common)
    is_multimodal = getattr(config, "vision_config", None) is not None
    dtype = "auto" if s.torch_dtype == "auto" else getattr(torch, s.torch_dtype)
    load = dict(dtype=dtype, device_map=None if s.device_map in ("", "none") else s.device_map, **common)
    processor = None
    if is_multimodal:
        processor = AutoProcessor.from_pretrained(s.model_repo_id, **common)
        tokenizer = processor.tokenizer
        model = AutoModelForImageTextToText.from_pretrained(s.model_repo_id, **load)
    else:
        tokenizer = AutoTokenizer.from_pretrained(s.model_repo_id, **common)
        model = AutoModelForCausalLM.from_pretrained(s.model_repo_id, **load)
    model.eval()
    text_config = config.get_text_config()
    log.info("model %s loaded (%s)", s.model_repo_id, "image-text" if is_multimodal else "text")
    return LoadedModel(model=model, tokenizer=tokenizer, processor=processor, is_multimodal=is_multimodal,
                       context_length=int(getattr(text_config, "max_position_embeddings", 0) or 32768),
                       vocab_size=int(text_config.vocab_size),
                       eos_ids=_eos_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id),
                       template_variables=_template_variables(processor or tokenizer),
                       constraints=_constraint_factory(tokenizer, int(text_config.vocab_size), model))


def _constraint_factory(tokenizer, vocab_size: int, model) -> ConstraintFactory | None:
    """Indexing the vocabulary once at load keeps it off requests; a tokenizer the library cannot use
    disables constrained requests (a 400 each), not the server."""
    try:
        return ConstraintFactory(tokenizer, vocab_size,
                                 _eos_ids(model.generation_config.eos_token_id, tokenizer.eos_token_id))
    except Exception:
        log.exception("structured outputs are unavailable for this model")
        return None


def _template_variables(owner) -> frozenset[str] | None:
    """Names the model's chat template reads from its context: the only request kwargs worth passing."""
    template = getattr(owner, "chat_template", None)
    if not isinstance(template, str):
        return None
    from jinja2 import Environment, meta

    try:
        parsed = Environment(extensions=["jinja2.ext.loopcontrols", "jinja2.ext.do"]).parse(template)
    except Exception:  # a tag of Transformers' own (e.g. {% generation %}): pass every allowed kwarg
        return None
    return frozenset(meta.find_undeclared_variables(parsed))


def _eos_ids(*values) -> set[int]:
    ids: set[int] = set()
    for value in values:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
