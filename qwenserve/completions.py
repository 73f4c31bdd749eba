"""From a validated request to engine inputs: the template's messages, tools and variables, media,
admission, tokenization, sampling parameters and the stream that will shape the outputs."""

from __future__ import annotations

import asyncio
import time
from functools import partial

from .chat_stream import DONE, ChatStream, ChunkEvent
from .config import Settings
from .constraints import ConstraintError, reasoning_mode, response_format_spec, tool_call_spec
from .engine import Engine, Prompt
from .protocol import APIError, ChatCompletionRequest, bad_request
from .sampling import SamplingParams
from .tools import tool_fields

__all__ = ["DONE", "ChatStream", "ChunkEvent", "open_stream", "prepare", "sampling_params"]


def sampling_params(request: ChatCompletionRequest, settings: Settings, prompt_tokens: int,
                    context_length: int) -> SamplingParams:
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(f"the prompt has {prompt_tokens} tokens, which does not fit the model's context of "
                          f"{context_length} tokens", "messages", "context_length_exceeded")
    requested = request.requested_max_tokens()
    if requested and requested > room:
        raise bad_request(f"the prompt's {prompt_tokens} tokens plus max_tokens exceed the {context_length} tokens "
                          f"one request may hold (the model's context or KV_CACHE_TOKENS); at most "
                          f"{room} tokens can be generated", "max_tokens", "context_length_exceeded")
    stops = request.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise bad_request(f"at most {settings.max_stop_sequences} stop sequences are allowed", "stop")
    temperature = settings.temperature if request.temperature is None else request.temperature
    if 0 < temperature < settings.min_temperature:
        raise bad_request(f"temperature must be 0 (greedy) or at least {settings.min_temperature:g} "
                          "(MIN_TEMPERATURE)", "temperature", "invalid_value")
    return SamplingParams(
        max_new_tokens=requested or min(settings.max_tokens, room),
        temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0), seed=request.seed, stop=stops,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty, logprobs=bool(request.logprobs),
        top_logprobs=request.top_logprobs or 0)


def check_choices(request: ChatCompletionRequest, settings: Settings) -> None:
    if request.n > settings.max_n:
        raise bad_request(f"n is {request.n}; at most {settings.max_n} choices per request (MAX_N)", "n",
                          "invalid_value")


def open_stream(engine: Engine, request: ChatCompletionRequest, completion_id: str, model: str,
                prompt_text: str, created: int | None = None) -> ChatStream:
    """The object that will shape this request's outputs into chunks or a reply."""
    return ChatStream(completion_id, int(time.time()) if created is None else created, model, prompt_text,
                      request.include_usage, n=request.n, parse_tools=request.tool_mode != "none",
                      token_bytes=engine.token_bytes if request.logprobs else None)


def template_messages(request: ChatCompletionRequest, multimodal: bool) -> list[dict]:
    """Messages in the shape the chat template expects; media parts become placeholders."""
    messages = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part["type"]
                if kind in ("text", "input_text"):
                    parts.append({"type": "text", "text": part["text"]})
                elif not multimodal:
                    raise bad_request("this model is text-only: it does not accept images or videos",
                                      f"messages[{i}].content[{j}]", "unsupported_media")
                else:
                    parts.append({"type": "video" if "video" in kind else "image"})
            content = parts if multimodal else "\n".join(p["text"] for p in parts)
        messages.append({"role": role, "content": content if content is not None else "",
                         **tool_fields(message.model_dump(exclude_none=True))})
    return messages


def template_tools(request: ChatCompletionRequest) -> list[dict] | None:
    """Tools for the template (it puts them in the system turn), unless tool_choice is "none"."""
    if request.tool_mode == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in request.tools]


async def prepare(engine: Engine, settings: Settings, request: ChatCompletionRequest,
                  media_loader=None, continuing: bool = False, rows: int | None = None) -> tuple[Prompt, SamplingParams]:
    """Cheap refusals first (size, admission), then media, template and tokenization off the event
    loop. The prompt holds the admission slot until it is submitted."""
    engine.require_ready()
    check_prompt_size(request, settings)
    check_choices(request, settings)
    messages = template_messages(request, engine.is_multimodal)
    spec = constraint_spec(request)
    slot = engine.reserve(force=continuing, rows=request.n if rows is None else rows)
    try:
        grammar = await _compile(engine, spec) if spec else None
        prompt = await _build_prompt(engine, request, messages, media_loader)
        params = sampling_params(request, settings, len(prompt.input_ids), engine.context_length)
        if grammar is not None:
            params.constraint = partial(grammar.matcher, reasoning_mode(prompt.text, engine.may_think))
    except BaseException:
        slot.release()
        raise
    prompt.slot = slot
    return prompt, params


def constraint_spec(request: ChatCompletionRequest) -> dict | None:
    """What the output must match: forced tool calls ("required" or a named function) or the
    response_format's JSON; None for free text. The reasoning of thinking models is never constrained."""
    try:
        if request.tool_mode in ("required", "named"):
            choice = request.tool_choice if isinstance(request.tool_choice, str) else request.tool_choice.model_dump()
            return tool_call_spec([t.model_dump(exclude_none=True) for t in request.tools], choice,
                                  request.parallel_tool_calls is not False)
        form = request.response_format
        return response_format_spec(form.model_dump(by_alias=True, exclude_none=True) if form else None)
    except ConstraintError as exc:
        raise bad_request(str(exc), exc.param, "invalid_constraint")


async def _compile(engine: Engine, spec: dict):
    if engine.constraints is None:
        raise bad_request("structured outputs and forced tool calls are not available for this model "
                          "(its tokenizer could not be indexed; see the server log)", None, "unsupported_constraint")
    try:
        return await asyncio.to_thread(engine.constraints.compile, spec)
    except ConstraintError as exc:
        raise bad_request(str(exc), exc.param, "invalid_constraint")


async def _build_prompt(engine: Engine, request: ChatCompletionRequest, messages: list[dict],
                        media_loader) -> Prompt:
    media = await media_loader(request) if media_loader else None
    kwargs = template_kwargs(request, engine.template_variables)
    try:
        prompt = await asyncio.to_thread(engine.build_prompt, messages, kwargs,
                                         *(media.processor_args() if media else ()), tools=template_tools(request))
    except APIError:
        raise
    except Exception as exc:
        raise bad_request(f"could not build the prompt: {type(exc).__name__}: {str(exc)[:300]}", "messages")
    if not prompt.input_ids:
        raise bad_request("the chat template rendered an empty prompt for these messages", "messages",
                          "empty_prompt")
    return prompt


def template_kwargs(request: ChatCompletionRequest, variables: frozenset[str] | None) -> dict:
    """The request's template variables that the model's template reads (reserved keywords were refused
    at validation); others are dropped, so that no keyword reaches apply_chat_template itself."""
    kwargs = request.chat_template_kwargs or {}
    return {k: v for k, v in kwargs.items() if variables is None or k in variables}


def check_prompt_size(request: ChatCompletionRequest, settings: Settings) -> None:
    """Refuse a prompt too large to be worth tokenizing, by its characters (MAX_PROMPT_CHARS)."""
    chars = request.text_chars()
    if chars > settings.max_prompt_chars:
        raise bad_request(f"the messages hold {chars} characters of text; at most {settings.max_prompt_chars} "
                          "are accepted (MAX_PROMPT_CHARS)", "messages", "context_length_exceeded")
