"""Qwen3 tool calls: parse `<tool_call>` blocks out of the model's text, incrementally, and shape
OpenAI tool-call history for the Qwen3 chat templates.

Qwen3 writes each call as `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. A block
becomes a call when it closes and holds a JSON object with a string `name` and `arguments` that is
an object (or a JSON string holding one, or absent / null / empty, which become `{}`). Any other
block stays text, exactly as written; so does a block still open at `flush()`.

Whitespace touching a call is dropped (the newline before the first call, between calls, after the
last); it is the separator the template writes back when the history is rendered again. All other
text passes through unchanged, so text without calls comes out exactly as it went in. Streaming
holds back a possible partial `<tool_call>` and the whitespace before it until later text decides,
and a whole block until it closes: no tag, or part of one, ever reaches the text of a call's stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
CHANNELS = ("reasoning", "content")


def call_id(seed: str, index: int) -> str:
    """Deterministic: a generation continued after a crash replays its text and gets the same ids."""
    return "call_" + hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, serialized


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _loads(text: str):
    return json.loads(text, parse_constant=_reject_constant)


def parse_call(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one block's inner text, or None when it is not a call."""
    try:
        call = _loads(block)
        arguments = call.get("arguments") if isinstance(call, dict) else None
        if isinstance(arguments, str):
            arguments = _loads(arguments) if arguments.strip() else None
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None
    return call["name"], json.dumps(arguments, ensure_ascii=False)


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `<tool_call>`."""
    for size in range(min(len(CALL_START) - 1, len(text)), 0, -1):
        if CALL_START.startswith(text[-size:]):
            return size
    return 0


class _Channel:
    """One text stream's state: outside or inside a block, and what is held back."""

    def __init__(self):
        self.pending = ""     # undecided text: outside a block, trailing whitespace and a partial tag
        self.block: str | None = None  # text after an open tag, None outside a block
        self.lead = ""        # whitespace before the open block, returned with it if it is no call
        self.after_call = False  # drop whitespace until other text follows a call

    def text(self, text: str) -> str:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        return text


class ToolCallParser:
    """Feed text deltas, get (text, calls). One parser per generation, fed both its channels:
    `reasoning` (Qwen3 sometimes calls a tool before `</think>`; such a call counts) and `content`.
    Calls are numbered in the order their blocks close, across channels; ids come from `seed`.
    Flush a channel when it ends (the reasoning at `</think>`, everything at the end of generation).
    """

    def __init__(self, seed: str):
        self.seed = seed
        self.calls: list[ToolCall] = []
        self._channels = {name: _Channel() for name in CHANNELS}

    def feed(self, text: str, channel: str = "content") -> tuple[str, list[ToolCall]]:
        state = self._channels[channel]
        state.pending += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while state.pending:
            if state.block is None and not self._outside(state, out):
                break
            if state.block is not None and not self._inside(state, out, calls):
                break
        return "".join(out), calls

    def _outside(self, state: _Channel, out: list[str]) -> bool:
        """Text up to an open tag; False when the rest must wait (it may be a tag's start)."""
        at = state.pending.find(CALL_START)
        if at < 0:
            # Hold a partial tag and the whitespace before it: both may belong to a call.
            keep = _partial_tag(state.pending)
            body = state.pending[:len(state.pending) - keep].rstrip()
            out.append(state.text(body))
            state.pending = state.pending[len(body):]
            return False
        before = state.pending[:at]
        body = before.rstrip()
        out.append(state.text(body))
        state.lead = before[len(body):]
        state.block = ""
        state.pending = state.pending[at + len(CALL_START):]
        return True

    def _inside(self, state: _Channel, out: list[str], calls: list[ToolCall]) -> bool:
        """A block's text up to its close tag; False while the block is still open."""
        text = state.block + state.pending
        # The close tag may straddle deltas: search from where it could begin.
        at = text.find(CALL_END, max(0, len(state.block) - len(CALL_END) + 1))
        if at < 0:
            state.block, state.pending = text, ""
            return False
        block, state.pending, state.block = text[:at], text[at + len(CALL_END):], None
        parsed = parse_call(block)
        if parsed is None:
            out.append(state.text(state.lead + CALL_START + block + CALL_END))
        else:
            calls.append(self._add(*parsed))
            state.after_call = True
        return True

    def _add(self, name: str, arguments: str) -> ToolCall:
        index = len(self.calls)
        call = ToolCall(index, call_id(self.seed, index), name, arguments)
        self.calls.append(call)
        return call

    def flush(self, channel: str = "content") -> str:
        """The channel's held-back text; an unterminated block is returned as text."""
        state = self._channels[channel]
        rest = state.pending if state.block is None else state.lead + CALL_START + state.block + state.pending
        state.pending, state.block, state.lead = "", None, ""
        return state.text(rest)


def tool_call_deltas(call: ToolCall) -> list[dict]:
    """Stream deltas of one call (OpenAI shape): name first, then the arguments as one fragment."""
    return [{"index": call.index, "id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": ""}},
            {"index": call.index, "function": {"arguments": call.arguments}}]


def message_tool_calls(calls: list[ToolCall]) -> list[dict]:
    """`message.tool_calls` of a non-stream reply."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


# ---- history for the Qwen3 templates ------------------------------------------------------------

def _text_of(content) -> str:
    """Assistant and tool content: a string, None, or text parts (joined with "\n")."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = [part.get("text") for part in content if isinstance(part, dict)]
    return "\n".join(text for text in texts if isinstance(text, str))


def _template_call(call: dict) -> dict:
    """OpenAI sends `arguments` as a JSON string; the template writes a string as-is and an object
    with `tojson`, so an object string becomes a dict: the prompt then reads as the model writes."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    try:
        parsed = _loads(arguments) if isinstance(arguments, str) else arguments
    except (ValueError, RecursionError):
        parsed = arguments  # not JSON: written as sent
    if parsed is None or (isinstance(parsed, str) and not parsed.strip()):
        parsed = {}
    shaped = {"type": "function", "function": {"name": function.get("name", ""), "arguments": parsed}}
    return {"id": call["id"], **shaped} if call.get("id") else shaped


def tool_fields(message: dict) -> dict:
    """The fields of one OpenAI history message that the Qwen3 templates render for tools and
    reasoning, in their shape. Merge into the message built for the template."""
    role = message.get("role")
    fields: dict = {}
    if role in ("assistant", "tool"):
        fields["content"] = _text_of(message.get("content"))
    if role == "assistant" and message.get("tool_calls"):
        fields["tool_calls"] = [_template_call(c) for c in message["tool_calls"]]
    if role == "assistant" and isinstance(message.get("reasoning_content"), str):
        fields["reasoning_content"] = message["reasoning_content"]
    if role == "tool" and message.get("tool_call_id") is not None:
        fields["tool_call_id"] = message["tool_call_id"]
    return fields
