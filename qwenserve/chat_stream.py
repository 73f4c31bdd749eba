"""The one place that turns engine outputs into OpenAI chat events: chunks for a stream, or one
`chat.completion` for a non-stream reply. One state per choice (reasoning split, tool calls,
logprobs, its token ids); usage is summed over the choices; `[DONE]` ends the stream once every
choice has finished (or at the first error)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .engine import EngineOutput
from .logprobs import TokenBytes
from .protocol import chunk_body, completion_body, error_body, make_usage, usage_chunk_body
from .reasoning import THINK_END, THINK_START, ReasoningSplitter, prompt_opens_reasoning
from .tools import ToolCallParser, message_tool_calls, tool_call_deltas

DONE = "[DONE]"


@dataclass
class ChunkEvent:
    """One SSE event: a chunk (or `[DONE]`) and the token ids produced since the previous event."""
    payload: dict | str
    token_ids: list[int] = field(default_factory=list)

    def data(self) -> str:
        return self.payload if isinstance(self.payload, str) else json.dumps(self.payload, separators=(",", ":"))


class AnswerTokens:
    """Which generated tokens belong to the answer (logprobs cover those): not the reasoning, not its
    `<think>`/`</think>` tags, not the separator before the answer's first text, not end tokens."""

    def __init__(self, in_reasoning: bool, token_bytes: TokenBytes):
        self.in_reasoning = in_reasoning
        self.token_bytes = token_bytes
        self.seen_any = False
        self.started = False

    def take(self, token_id: int) -> bool:
        text = self.token_bytes.text(token_id)
        first, self.seen_any = not self.seen_any, True
        if first and not self.in_reasoning and text.strip() == THINK_START:
            self.in_reasoning = True
            return False
        if self.in_reasoning:
            self.in_reasoning = THINK_END not in text
            return False
        if token_id in self.token_bytes.special or (not self.started and not text.strip()):
            return False
        self.started = True
        return True


class ChoiceState:
    """One choice's text state: reasoning/content split, tool calls, logprobs, token ids."""

    def __init__(self, index: int, opens_reasoning: bool, call_seed: str, parse_tools: bool,
                 token_bytes: TokenBytes | None):
        self.index = index
        self.splitter = ReasoningSplitter(opens_reasoning)
        self.tools = ToolCallParser(call_seed) if parse_tools else None
        self.answer = AnswerTokens(opens_reasoning, token_bytes) if token_bytes else None
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.logprobs: list[dict] = []  # every entry, for the non-stream reply
        self.unsent_logprobs: list[dict] = []  # entries not yet attached to a chunk
        self.ids: list[int] = []  # token ids not yet attached to an event
        self.raw_reason: str | None = None
        self.completion_tokens = 0

    def take_ids(self) -> list[int]:
        ids, self.ids = self.ids, []
        return ids

    def take_logprobs(self) -> list[dict]:
        entries, self.unsent_logprobs = self.unsent_logprobs, []
        return entries

    def observe(self, output: EngineOutput, numbers: list | None) -> None:
        """Keep the output's token ids; classify them for logprobs (replayed ones only update state)."""
        self.ids.extend(output.token_ids)
        if self.answer is None:
            return
        for i, token_id in enumerate(output.token_ids):
            if self.answer.take(token_id) and numbers is not None and i < len(numbers):
                entry = self.answer.token_bytes.entry(*numbers[i])
                self.logprobs.append(entry)
                self.unsent_logprobs.append(entry)

    def split(self, text: str) -> tuple[str, str, list]:
        return self._parse(*self.splitter.feed(text))

    def flush(self) -> tuple[str, str, list]:
        reasoning, content, calls = self._parse(*self.splitter.flush())
        if self.tools is not None:  # an unclosed block is text after all
            held_reasoning, held_content = self.tools.flush("reasoning"), self.tools.flush("content")
            self.reasoning.append(held_reasoning)
            self.content.append(held_content)
            reasoning, content = reasoning + held_reasoning, content + held_content
        return reasoning, content, calls

    def _parse(self, reasoning: str, content: str) -> tuple[str, str, list]:
        if self.tools is None:
            calls = []
        else:
            reasoning, calls = self.tools.feed(reasoning, "reasoning")
            if not self.splitter.in_reasoning:  # a block left open in the reasoning stays reasoning text
                reasoning += self.tools.flush("reasoning")
            content, more = self.tools.feed(content, "content")
            calls = calls + more
        self.reasoning.append(reasoning)
        self.content.append(content)
        return reasoning, content, calls

    @property
    def calls(self) -> list:
        return self.tools.calls if self.tools is not None else []

    @property
    def finish_reason(self) -> str:
        # OpenAI has no "cancelled" reason; the session's state tells a cancel apart.
        if self.raw_reason in (None, "cancelled"):
            return "stop"
        return "tool_calls" if self.calls and self.raw_reason == "stop" else self.raw_reason

    def message(self) -> dict:
        content = "".join(self.content)
        message = {"role": "assistant", "content": content if content or not self.calls else None,
                   "reasoning_content": "".join(self.reasoning) if self.splitter.reasoning_used else None}
        if self.calls:
            message["tool_calls"] = message_tool_calls(self.calls)
        return message


class ChatStream:
    """Turns one request's engine outputs (all its choices) into chunks; also builds the reply."""

    def __init__(self, completion_id: str, created: int, model: str, prompt_text: str,
                 include_usage: bool = False, n: int = 1, parse_tools: bool = False,
                 token_bytes: TokenBytes | None = None):
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        self.with_logprobs = token_bytes is not None
        opens = prompt_opens_reasoning(prompt_text)
        self.choices = [ChoiceState(i, opens, f"{completion_id}:{i}", parse_tools, token_bytes) for i in range(n)]
        self.prompt_tokens = 0
        self.usage: dict | None = None
        self.error: str | None = None
        self.ended = False

    @property
    def finish_reason(self) -> str | None:
        """"cancelled" when any choice was cancelled, else the first choice's own reason."""
        reasons = [c.raw_reason for c in self.choices]
        return "cancelled" if "cancelled" in reasons else reasons[0]

    def _chunk(self, choice: ChoiceState, delta: dict, finish_reason: str | None = None,
               logprobs: list[dict] | None = None) -> dict:
        body = chunk_body(self.completion_id, self.created, self.model, delta, finish_reason, choice.index,
                          {"content": logprobs} if logprobs else None)
        if self.include_usage:
            body["usage"] = None
        return body

    def start(self) -> list[ChunkEvent]:
        return [ChunkEvent(self._chunk(c, {"role": "assistant", "content": ""})) for c in self.choices]

    def mark_finished(self, index: int, reason: str, token_count: int) -> None:
        """A choice whose final chunk was stored before a restart: it only counts for usage and [DONE]."""
        choice = self.choices[index]
        choice.raw_reason, choice.completion_tokens = reason, token_count

    def feed(self, output: EngineOutput) -> list[ChunkEvent]:
        if self.ended:
            return []
        choice = self.choices[output.choice]
        choice.observe(output, output.logprobs)
        if output.kind == "replay":
            choice.split(output.text)
            return []
        if output.kind == "delta":
            return self._delta_events(choice, *choice.split(output.text))
        if output.kind == "error":
            self.error, self.ended = output.error or "generation failed", True
            return [ChunkEvent(error_body(self.error, "server_error", None, "generation_failed"),
                               choice.take_ids()), ChunkEvent(DONE)]
        return self._finish_events(choice, output)

    def _delta_events(self, choice: ChoiceState, reasoning: str, content: str, calls: list) -> list[ChunkEvent]:
        delta = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        events = [ChunkEvent(self._chunk(choice, delta, logprobs=choice.take_logprobs() if content else None))] \
            if delta else []
        for call in calls:
            events.extend(ChunkEvent(self._chunk(choice, {"tool_calls": [d]})) for d in tool_call_deltas(call))
        if events:
            events[0].token_ids = choice.take_ids()
        return events

    def _finish_events(self, choice: ChoiceState, output: EngineOutput) -> list[ChunkEvent]:
        events = self._delta_events(choice, *choice.flush())
        choice.raw_reason, choice.completion_tokens = output.finish_reason, output.completion_tokens
        self.prompt_tokens = output.prompt_tokens
        events.append(ChunkEvent(self._chunk(choice, {}, choice.finish_reason, choice.take_logprobs()),
                                 choice.take_ids()))
        if all(c.raw_reason is not None for c in self.choices):
            self.usage = make_usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))
            if self.include_usage:
                events.append(ChunkEvent(usage_chunk_body(self.completion_id, self.created, self.model, self.usage)))
            events.append(ChunkEvent(DONE))
            self.ended = True
        return events

    def reply(self) -> dict:
        choices = [{"index": c.index, "message": c.message(), "finish_reason": c.finish_reason,
                    "logprobs": {"content": c.logprobs} if self.with_logprobs else None} for c in self.choices]
        return completion_body(self.completion_id, self.created, self.model, choices,
                               self.usage or make_usage(self.prompt_tokens, 0))


def choice_progress(events: list) -> dict[int, tuple[list[int], str | None]]:
    """From a session's stored events: each choice's token ids and, if its final chunk was stored,
    its finish reason (what a continuation after a restart needs)."""
    progress: dict[int, tuple[list[int], str | None]] = {}
    for event in events:
        if event.data == DONE:
            continue
        choices = json.loads(event.data).get("choices") or []
        if len(choices) != 1:
            continue
        ids, reason = progress.get(choices[0]["index"], ([], None))
        progress[choices[0]["index"]] = (ids + list(event.token_ids), choices[0].get("finish_reason") or reason)
    return progress
