"""Builds small Qwen3 checkpoints offline, for tests, the demo and the benchmark.

Weights are *designed*, not trained: every layer's `o_proj` and `down_proj` are zero, so the
residual stream carries the current token's one-hot embedding to the head unchanged, and the
head maps each token to the token we want next. The model therefore follows a fixed chain of
tokens, whatever it is sampled with. Checkpoints are saved with `save_pretrained` and loaded back
through the same `from_pretrained` path users take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .logprobs import bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
THINK_TOKENS = ["<think>", "</think>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- elif message.content -%}{%- for part in message.content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "THINKING_PROMPT"
    "{%- endif -%}"
)
# Thinking templates open <think> in the prompt; instruct ones never mention it (as Qwen3-*-Instruct).
THINKING_PROMPT = (
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- else -%}{{- '<think>\\n' -}}{%- endif -%}"
)

# Replies of the designed checkpoints, as tokens. "\n" ends every generation prompt, so it starts
# each chain; "\n\n" (one token) follows "</think>" and also ends the enable_thinking=false prompt.
THINKING_REPLY = ["Let", " me", " think", " briefly", "</think>", "\n\n",
                  "Hello", "!", " I", " am", " a", " demo", " model", "."]
TEXT_REPLY = ["Hello", " from", " a", " text", " model", "."]
ENDLESS_CYCLE = [" tick", " tock"]
WORDS = sorted({w for w in THINKING_REPLY + TEXT_REPLY + ENDLESS_CYCLE + [" tack"]
                if w not in THINK_TOKENS} | {"\n\n"})


def _byte_level(text: str) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def build_tokenizer(words: list[str] = WORDS, thinking: bool = True, added: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = _byte_level(word)
        for end in range(2, len(symbols) + 1):
            if symbols[:end] not in vocab:
                vocab[symbols[:end]] = len(vocab)
                merges.append((symbols[:end - 1], symbols[end - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(THINK_TOKENS + list(added))
    template = CHAT_TEMPLATE.replace("THINKING_PROMPT", THINKING_PROMPT if thinking else "")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=template)


def token_id(tokenizer, text: str) -> int:
    ids = tokenizer.convert_tokens_to_ids(text if text in SPECIAL_TOKENS + THINK_TOKENS else _byte_level(text))
    if ids is None or ids == tokenizer.unk_token_id:
        raise KeyError(text)
    return ids


def chain_from(tokenizer, words: list[str], end: str | None = "<|im_end|>") -> dict[int, int]:
    """Successor map: "\n" -> words[0] -> ... -> end (or back to words[0] when end is None)."""
    ids = [token_id(tokenizer, "\n")] + [token_id(tokenizer, w) for w in words]
    ids.append(token_id(tokenizer, end) if end else ids[1])
    return dict(zip(ids[:-1], ids[1:]))


def _vocab_size(tokenizer) -> int:
    return len(tokenizer)


def _text_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 intermediate: int, context: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, max_position_embeddings=context, rms_norm_eps=1e-6,
                tie_word_embeddings=False)


def design_weights(model, successors: dict[int, int], margin: float = 100.0,
                   alternatives: dict[int, tuple[int, float]] | None = None) -> None:
    """Make the model follow `successors`; optional weaker `alternatives` (token -> (other, logit))."""
    text = model.model.language_model if hasattr(model.model, "language_model") else model.model
    hidden = text.config.hidden_size
    vocab = text.config.vocab_size
    if hidden < vocab:
        raise ValueError("designed weights need hidden_size >= vocab_size")
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.embed_tokens.weight.zero_()
        text.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        # RMSNorm of a one-hot vector is sqrt(hidden) times it; scale back so logits equal the head's entries.
        text.norm.weight.fill_(1.0 / hidden ** 0.5)
        head = model.lm_head.weight
        head.zero_()
        for src, dst in successors.items():
            head[dst, src] = margin
        for src, (dst, logit) in (alternatives or {}).items():
            head[dst, src] = logit


def build_vl_checkpoint(path: str | Path, reply: list[str] | None = THINKING_REPLY, *,
                        endless: bool = False, random: bool = False, hidden: int | None = None, layers: int = 2,
                        heads: int = 4, kv_heads: int = 2, head_dim: int = 32, context: int = 32768,
                        intermediate: int = 64, seed: int = 0, tokenizer=None) -> Path:
    """A Qwen3-VL checkpoint (thinking template) with processor; designed reply, endless cycle or random."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = build_tokenizer(thinking=True) if tokenizer is None else tokenizer
    vocab = _vocab_size(tokenizer)
    hidden = hidden or ((vocab + 63) // 64) * 64
    text_cfg = _text_config(vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, context)
    half = head_dim // 2
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0,
                                   "mrope_section": [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16],
                                   "mrope_interleaved": True}
    vision_cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text_cfg, vision_config=vision_cfg,
                           image_token_id=token_id(tokenizer, "<|image_pad|>"),
                           video_token_id=token_id(tokenizer, "<|video_pad|>"),
                           vision_start_token_id=token_id(tokenizer, "<|vision_start|>"),
                           vision_end_token_id=token_id(tokenizer, "<|vision_end|>"),
                           tie_word_embeddings=False)
    config.text_config.eos_token_id = token_id(tokenizer, "<|im_end|>")
    model = Qwen3VLForConditionalGeneration(config).eval()
    if not random:
        _design(model, tokenizer, reply, endless)
    model.generation_config.eos_token_id = [token_id(tokenizer, "<|im_end|>")]
    model.generation_config.pad_token_id = token_id(tokenizer, "<|endoftext|>")
    model.save_pretrained(path)
    pixels = dict(shortest_edge=32 * 32, longest_edge=256 * 256)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, size=pixels),
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              size=dict(shortest_edge=32 * 32, longest_edge=64 * 64 * 16)),
        tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    processor.save_pretrained(path)
    return path


def build_text_checkpoint(path: str | Path, reply: list[str] | None = TEXT_REPLY, *, random: bool = False,
                          endless: bool = False, context: int = 32768, seed: int = 0, tokenizer=None) -> Path:
    """A Qwen3 text-only checkpoint (instruct template, no thinking); designed or random weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = build_tokenizer(thinking=False) if tokenizer is None else tokenizer
    vocab = _vocab_size(tokenizer)
    hidden = ((vocab + 63) // 64) * 64
    config = Qwen3Config(**_text_config(vocab, hidden, 2, 4, 2, 32, 64, context),
                         eos_token_id=token_id(tokenizer, "<|im_end|>"),
                         pad_token_id=token_id(tokenizer, "<|endoftext|>"))
    model = Qwen3ForCausalLM(config).eval()
    if not random:
        _design(model, tokenizer, reply, endless)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _design(model, tokenizer, reply, endless) -> None:
    if endless:
        successors = chain_from(tokenizer, ENDLESS_CYCLE, end=None)
        tick, tock, tack = (token_id(tokenizer, w) for w in (" tick", " tock", " tack"))
        successors[tack] = tick
        # A weaker alternative lets penalty tests see the sampler change the chain.
        design_weights(model, successors, margin=50.0, alternatives={tick: (tack, 49.0)})
    else:
        design_weights(model, chain_from(tokenizer, reply))


# ---- tool calling: replies made of Qwen3 tool calls, with the real Qwen3 chat templates ----------
# The model is a bigram chain, so a token appears once per reply: a repeated tag (the second call of
# PARALLEL_CALLS_REPLY) is spelled with other tokens ("\n<tool" + "_call>..."), which also makes the
# tag straddle tokens. "\n" starts every chain (both real templates' generation prompts end with it),
# so a newline inside a reply is always part of a longer word.
TOOL_TOKENS = ("<tool_call>", "</tool_call>")  # added, not special, as in the real Qwen3 vocabulary
WEATHER_OPEN = '\n{"name": "get_weather", "arguments": '
PARIS_ARGS = '{"city": "Paris"}}\n'
# <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
TOOL_CALL_REPLY = ["<tool_call>", WEATHER_OPEN, PARIS_ARGS, "</tool_call>"]
# Checking both.\n<tool_call>...get_weather...</tool_call>\n<tool_call>\n{"name": "get_time", "arguments":
# {"timezone": "Europe/Paris"}}\n</tool_call>: content "Checking both.", then two calls.
PARALLEL_CALLS_REPLY = ["Checking", " both", ".\n", *TOOL_CALL_REPLY,
                        "\n<tool", '_call>\n{"name": "get_time", "arguments": ',
                        '{"timezone": "Europe/Paris"}}\n</tool', "_call>"]
# VL thinking: reasoning "The user asks about Paris.\n", then `</think>` and the get_weather call as content.
THINK_THEN_CALL_REPLY = ["The", " user", " asks", " about", " Paris", ".\n", "</think>", "\n\n", *TOOL_CALL_REPLY]
# VL thinking: the get_weather call inside the reasoning, before `</think>`; no content.
CALL_IN_REASONING_REPLY = ["I", " need", " the", " weather", ".\n", *TOOL_CALL_REPLY, "</think>", "\n\n"]
# A tool without parameters, called with `{}`: arguments "{}".
NO_ARGS_CALL_REPLY = ["<tool_call>", '\n{"name": "get_server_time", "arguments": ', "{}}\n", "</tool_call>"]
TOOL_REPLIES = [TOOL_CALL_REPLY, PARALLEL_CALLS_REPLY, THINK_THEN_CALL_REPLY, CALL_IN_REASONING_REPLY,
                NO_ARGS_CALL_REPLY]
TOOL_WORDS = sorted(set(WORDS) | {w for reply in TOOL_REPLIES for w in reply
                                  if w not in THINK_TOKENS and w not in TOOL_TOKENS})

# The tools these replies call, in the OpenAI request shape.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}
SERVER_TIME_TOOL = {"type": "function", "function": {
    "name": "get_server_time", "description": "The server's clock.",
    "parameters": {"type": "object", "properties": {}}}}


def tool_tokenizer(template_path: str | Path):
    """The designed vocabulary plus the tool words and tags, with a real Qwen3 chat template."""
    tokenizer = build_tokenizer(TOOL_WORDS, added=TOOL_TOKENS)
    tokenizer.chat_template = Path(template_path).read_text()
    return tokenizer


def _check_tool_chain(tokenizer, reply: list[str]) -> None:
    """A bigram chain needs each token once, and the rendered prompt must end with its first token."""
    if len(set(reply)) != len(reply) or "\n" in reply:
        raise ValueError("a designed reply must use each token once, and never a lone newline")
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    prompt = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True,
                                           tokenize=False)
    if tokenizer(prompt, add_special_tokens=False)["input_ids"][-1] != token_id(tokenizer, "\n"):
        raise ValueError("the template's generation prompt does not end with the chain's first token")


def build_tool_text_checkpoint(path: str | Path, template_path: str | Path,
                               reply: list[str] = TOOL_CALL_REPLY) -> Path:
    """A Qwen3 text checkpoint with a real text template (e.g. `qwen3.chat_template.jinja`)
    answering `reply` (one of the tool replies above) after the generation prompt."""
    tokenizer = tool_tokenizer(template_path)
    _check_tool_chain(tokenizer, reply)
    return build_text_checkpoint(path, reply, tokenizer=tokenizer)


def build_tool_vl_checkpoint(path: str | Path, template_path: str | Path,
                             reply: list[str] = THINK_THEN_CALL_REPLY) -> Path:
    """A Qwen3-VL checkpoint with a real thinking template (`qwen3-vl-thinking.chat_template.jinja`,
    whose prompt opens `<think>`) answering `reply` after the generation prompt."""
    tokenizer = tool_tokenizer(template_path)
    _check_tool_chain(tokenizer, reply)
    return build_vl_checkpoint(path, reply, tokenizer=tokenizer)


# ---- structured outputs: what a designed model writes where a token mask leaves it free ----------
# Under a mask the reply chain is mostly refused, and tokens without a designed preference tie at
# logit 0: greedy decoding takes the lowest allowed id, so forced JSON text comes out in single bytes
# unless the vocabulary has its longer tokens (see `structured_words`). Weaker preferences (below
# the chain's 100, from every token) decide the free parts so that every constrained reply is exact
# and short: a string holds the value word, a number is "7", each value closes its object or array
# as soon as the schema allows, and the turn ends as soon as the grammar allows (else a free object
# or array, or "required" tool calls, would go on until max_tokens).
NUMBER = "7"
STRING_CLOSERS = ('"}', '"]', '"')  # after the value word, best first
NUMBER_CLOSERS = ("}", "]", ",")  # after a digit, best first
# The value word beats the end, which beats a digit: inside a string the word, after a top-level number the end.
VALUE_LOGIT, END_LOGIT, NUMBER_LOGIT = 5.0, 4.0, 3.0

# Text: the model prefers the get_weather call (TOOL_CALL_REPLY); its free strings say "Paris".
STRUCTURED_TEXT_VALUE = "Paris"
# VL thinking: reasoning, then a JSON answer that misses most KTP fields; its free strings say "BUDI".
KTP_VALUE = "BUDI"
KTP_REASONING = ["Reading", " the", " card", "."]
KTP_REPLY = [*KTP_REASONING, "</think>", "\n\n", '{"nama": "', KTP_VALUE, '"}']


def prefer_free_values(model, tokenizer, value: str) -> None:
    """Write the preferences above into a designed model's head (after `design_weights`), only where
    the reply chain decides nothing."""
    head = model.lm_head.weight
    with torch.no_grad():
        for src, closers in ((value, STRING_CLOSERS), (NUMBER, NUMBER_CLOSERS)):
            column = head[:, token_id(tokenizer, src)]
            for rank, dst in enumerate(token_id(tokenizer, c) for c in closers):
                column[dst] = column[dst] or 20.0 - 5 * rank
        for word, logit in ((value, VALUE_LOGIT), ("<|im_end|>", END_LOGIT), (NUMBER, NUMBER_LOGIT)):
            row = head[token_id(tokenizer, word)]
            row[row == 0] = logit  # from every token


def structured_words(value: str, schema: dict | None = None) -> list[str]:
    """The value word and closers, and a schema's property names (nested ones too) with JSON's
    separators: forced JSON then takes a few tokens per field, as with a real vocabulary, not one per byte."""
    words = [value, *STRING_CLOSERS[:2]]  # '"' and the number closers are single bytes already
    if schema:
        words += ['{"', '": "', '", "', *_property_names(schema)]
    return words


def _property_names(schema) -> list[str]:
    if isinstance(schema, list):
        return [name for item in schema for name in _property_names(item)]
    if not isinstance(schema, dict):
        return []
    names = list(schema.get("properties") or {})
    return names + [name for value in schema.values() for name in _property_names(value)]


def build_structured_text_checkpoint(path: str | Path, template_path: str | Path) -> Path:
    """The tool checkpoint that prefers the get_weather call (real Qwen3 text template), plus the
    free-value preferences: JSON schemas, JSON objects and forced calls of other tools come out exact."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(sorted(set(TOOL_WORDS) | set(structured_words(STRUCTURED_TEXT_VALUE))),
                                added=TOOL_TOKENS)
    tokenizer.chat_template = Path(template_path).read_text()
    _check_tool_chain(tokenizer, TOOL_CALL_REPLY)
    path = build_text_checkpoint(path, TOOL_CALL_REPLY, tokenizer=tokenizer)
    _add_preferences(path, AutoModelForCausalLM, tokenizer, STRUCTURED_TEXT_VALUE)
    return path


def build_ktp_vl_checkpoint(path: str | Path, schema: dict | None = None) -> Path:
    """A Qwen3-VL thinking checkpoint (designed template, prompt opens `<think>`) that reasons
    "Reading the card." and answers `{"nama": "BUDI"}`, plus the free-value preferences; `schema`'s
    property names are words of its vocabulary."""
    from transformers import AutoModelForImageTextToText

    words = {w for w in KTP_REPLY if w not in THINK_TOKENS} | set(structured_words(KTP_VALUE, schema))
    tokenizer = build_tokenizer(sorted(set(WORDS) | words), thinking=True)
    path = build_vl_checkpoint(path, KTP_REPLY, tokenizer=tokenizer)
    _add_preferences(path, AutoModelForImageTextToText, tokenizer, KTP_VALUE)
    return path


def _add_preferences(path: Path, model_class, tokenizer, value: str) -> None:
    """Reload the saved designed model, add the value preferences, save it again."""
    model = model_class.from_pretrained(path)
    prefer_free_values(model, tokenizer, value)
    model.save_pretrained(path)


def describe(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def main(argv: list[str]) -> None:
    """`python -m qwenserve.checkpoints demo|endless|text DIR`: build a checkpoint into DIR."""
    kind, out = argv[0], argv[1]
    builders = {"demo": lambda: build_vl_checkpoint(out), "endless": lambda: build_vl_checkpoint(out, endless=True),
                "text": lambda: build_text_checkpoint(out)}
    print(f"built {kind} checkpoint in {builders[kind]()}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
