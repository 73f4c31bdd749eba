"""From a validated request to engine inputs, and from engine outputs to OpenAI chunks or a reply."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from .config import Settings
from .engine import Engine, EngineOutput, Prompt
from .protocol import (APIError, ChatCompletionRequest, bad_request, chunk_body, completion_body,
                       error_body, make_usage, usage_chunk_body)
from .reasoning import ReasoningSplitter, prompt_opens_reasoning
from .sampling import SamplingParams

DONE = "[DONE]"


def sampling_params(request: ChatCompletionRequest, settings: Settings, prompt_tokens: int,
                    context_length: int) -> SamplingParams:
    room = context_length - prompt_tokens
    if room <= 0:
        raise bad_request(f"the prompt has {prompt_tokens} tokens, which does not fit the model's context of "
                          f"{context_length} tokens", "messages", "context_length_exceeded")
    stops = request.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise bad_request(f"at most {settings.max_stop_sequences} stop sequences are allowed", "stop")
    temperature = settings.temperature if request.temperature is None else request.temperature
    return SamplingParams(
        max_new_tokens=min(request.requested_max_tokens() or settings.max_tokens, room),
        temperature=temperature, top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0), seed=request.seed, stop=stops,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty)


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
        messages.append({"role": role, "content": content if content is not None else ""})
    return messages


async def prepare(engine: Engine, settings: Settings, request: ChatCompletionRequest,
                  media_loader=None) -> tuple[Prompt, SamplingParams]:
    """Template, media and tokenization run off the event loop."""
    engine.require_ready()
    messages = template_messages(request, engine.is_multimodal)
    media = await media_loader(request) if media_loader else None
    kwargs = dict(request.chat_template_kwargs or {})
    try:
        prompt = await asyncio.to_thread(engine.build_prompt, messages, kwargs,
                                         *(media.processor_args() if media else ()))
    except APIError:
        raise
    except Exception as exc:
        raise bad_request(f"could not build the prompt: {type(exc).__name__}: {str(exc)[:300]}", "messages")
    return prompt, sampling_params(request, settings, len(prompt.input_ids), engine.context_length)


@dataclass
class ChunkEvent:
    """One SSE event: a chunk (or `[DONE]`) and the token ids produced since the previous event."""
    payload: dict | str
    token_ids: list[int] = field(default_factory=list)

    def data(self) -> str:
        return self.payload if isinstance(self.payload, str) else json.dumps(self.payload, separators=(",", ":"))


class ChatStream:
    """Turns one generation's engine outputs into chunks; the same object builds non-stream replies."""

    def __init__(self, completion_id: str, created: int, model: str, prompt_text: str,
                 include_usage: bool = False):
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.splitter = ReasoningSplitter(prompt_opens_reasoning(prompt_text))
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.error: str | None = None
        self._ids: list[int] = []

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        body = chunk_body(self.completion_id, self.created, self.model, delta, finish_reason)
        if self.include_usage:
            body["usage"] = None
        return body

    def start(self) -> list[ChunkEvent]:
        return [ChunkEvent(self._chunk({"role": "assistant", "content": ""}))]

    def feed(self, output: EngineOutput) -> list[ChunkEvent]:
        self._ids.extend(output.token_ids)
        if output.kind == "replay":
            self._split(output.text)
            return []
        if output.kind == "delta":
            return self._delta_events(*self._split(output.text))
        if output.kind == "error":
            self.error = output.error
            return [ChunkEvent(error_body(output.error or "generation failed", "server_error", None,
                                          "generation_failed"), self._take_ids()), ChunkEvent(DONE)]
        return self._finish_events(output)

    def _split(self, text: str) -> tuple[str, str]:
        reasoning, content = self.splitter.feed(text)
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content

    def _take_ids(self) -> list[int]:
        ids, self._ids = self._ids, []
        return ids

    def _delta_events(self, reasoning: str, content: str) -> list[ChunkEvent]:
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return [ChunkEvent(self._chunk(delta), self._take_ids())] if delta else []

    def _finish_events(self, output: EngineOutput) -> list[ChunkEvent]:
        reasoning, content = self.splitter.flush()
        self.reasoning.append(reasoning)
        self.content.append(content)
        events = self._delta_events(reasoning, content)
        self.finish_reason = output.finish_reason
        # OpenAI has no "cancelled" reason; the session's state tells a cancel apart.
        reason = "stop" if output.finish_reason == "cancelled" else output.finish_reason
        self.usage = make_usage(output.prompt_tokens, output.completion_tokens)
        events.append(ChunkEvent(self._chunk({}, reason), self._take_ids()))
        if self.include_usage:
            events.append(ChunkEvent(usage_chunk_body(self.completion_id, self.created, self.model, self.usage)))
        events.append(ChunkEvent(DONE))
        return events

    def reply(self) -> dict:
        reason = "stop" if self.finish_reason == "cancelled" else self.finish_reason
        reasoning = "".join(self.reasoning) if self.splitter.reasoning_used else None
        return completion_body(self.completion_id, self.created, self.model, "".join(self.content),
                               reasoning, reason or "stop", self.usage or make_usage(0, 0))
