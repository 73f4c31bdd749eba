"""Engine outputs -> Responses API stream events, and a response object rebuilt from stored events.

One `ChoiceState` (from `chat_stream`) splits reasoning from the answer and parses tool calls, exactly
as for chat. Output items open and close in the order the text asks for them: a `reasoning` item while
the model thinks, a `message` item for the answer, one `function_call` item per call. Every event is
also applied to an `Output` accumulator, the same code that rebuilds a response from stored events (for
`GET /v1/responses/{id}` and for a continuation after a restart), so what a retrieve says and what the
stream said cannot drift apart.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

from .chat_stream import ChoiceState, ChunkEvent
from .engine import EngineOutput
from .reasoning import prompt_opens_reasoning
from .stores import StoredEvent
from .tools import ToolCall

CREATED, IN_PROGRESS = "response.created", "response.in_progress"
COMPLETED, INCOMPLETE, FAILED = "response.completed", "response.incomplete", "response.failed"
# Events that end a response's stream (besides these, a cancelled response's stream simply ends).
FINAL_EVENTS = frozenset({COMPLETED, INCOMPLETE, FAILED})
LIFECYCLE = frozenset({CREATED, IN_PROGRESS}) | FINAL_EVENTS
ITEM_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


@dataclass
class ResponseEvent(ChunkEvent):
    """A chunk event with its SSE `event:` name (stored with it, so a replay is identical)."""
    event: str | None = None


def item_id(response_id: str, kind: str, output_index: int) -> str:
    """Derived, so a continuation after a restart names its items as the first run did."""
    digest = hashlib.sha256(f"{response_id}:{output_index}".encode()).hexdigest()[:32]
    return f"{ITEM_PREFIX[kind]}_{digest}"


def output_text(items: list[dict]) -> str:
    return "".join(part.get("text", "") for item in items if item.get("type") == "message"
                   for part in item.get("content", []) if part.get("type") == "output_text")


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    # No prefix cache, and reasoning tokens are not counted apart (0): both details are what the SDK reads.
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


class Output:
    """A response's state from its events, in order: the last full response object, the output items
    (text deltas applied), the open item and the next sequence number."""

    def __init__(self):
        self.response: dict | None = None
        self.items: list[dict] = []
        self.open_index: int | None = None
        self.next_sequence = 0
        self.final = False

    def apply(self, event: dict) -> None:
        kind = event["type"]
        self.next_sequence = event["sequence_number"] + 1
        if kind in LIFECYCLE:
            self.response, self.final = event["response"], kind in FINAL_EVENTS
        elif kind == "response.output_item.added":
            self.items.append(copy.deepcopy(event["item"]))
            self.open_index = event["output_index"]
        elif kind == "response.output_item.done":
            self.items[event["output_index"]] = copy.deepcopy(event["item"])
            self.open_index = None
        elif kind == "response.content_part.added":
            self.items[event["output_index"]]["content"].append(copy.deepcopy(event["part"]))
        elif kind in ("response.output_text.delta", "response.reasoning_text.delta"):
            self.items[event["output_index"]]["content"][event["content_index"]]["text"] += event["delta"]
        elif kind == "response.function_call_arguments.delta":
            self.items[event["output_index"]]["arguments"] += event["delta"]

    @property
    def open_item(self) -> dict | None:
        return None if self.open_index is None else self.items[self.open_index]

    @classmethod
    def of(cls, events: list[StoredEvent]) -> Output:
        output = cls()
        if events and events[-1].event in FINAL_EVENTS:  # an ended response: its last event says it all
            last = json.loads(events[-1].data)
            output.apply(last)
            output.items = copy.deepcopy(last["response"]["output"])
            return output
        for event in events:
            output.apply(json.loads(event.data))
        return output

    def snapshot(self, state: str) -> dict | None:
        """The response as it stands: a final event's response as stored; else the last lifecycle
        response with the items so far, its status from the session state (cancelled, failed)."""
        if self.response is None:
            return None
        if self.final:
            return self.response
        status = {"cancelled": "cancelled", "failed": "failed"}.get(state, self.response["status"])
        items = copy.deepcopy(self.items)
        return {**self.response, "status": status, "output": items, "output_text": output_text(items)}


class ResponseStream:
    """Shapes one response's engine outputs into events; `ChoiceState` does the text work."""

    def __init__(self, response_id: str, created: int, echo: dict, prompt_text: str, parse_tools: bool,
                 background: bool = False):
        self.response_id = response_id
        self.created = created
        self.echo = echo  # the request's fields every response object repeats
        self.background = background
        self.choice = ChoiceState(0, prompt_opens_reasoning(prompt_text), f"{response_id}:0", parse_tools, None)
        self.output = Output()
        self.raw_reason: str | None = None
        self.error: str | None = None
        self.ended = False

    @property
    def finish_reason(self) -> str | None:
        return self.raw_reason  # "cancelled" makes the session's state `cancelled`

    def restore(self, events: list[StoredEvent]) -> None:
        """After a restart: items, open item and sequence numbers from the events stored before it
        (the replayed text rebuilds the `ChoiceState`)."""
        self.output = Output.of(events)

    def response(self, status: str, **fields) -> dict:
        items = copy.deepcopy(self.output.items)
        body = {"id": self.response_id, "object": "response", "created_at": self.created, "status": status,
                "background": self.background, "error": None, "incomplete_details": None, **self.echo,
                "output": items, "output_text": output_text(items), "usage": None}
        body.update(fields)
        return body

    def _emit(self, kind: str, **fields) -> ResponseEvent:
        payload = {"type": kind, "sequence_number": self.output.next_sequence, **fields}
        self.output.apply(payload)
        return ResponseEvent(payload, event=kind)

    def start(self) -> list[ResponseEvent]:
        return [self._emit(CREATED, response=self.response("queued" if self.background else "in_progress")),
                self._emit(IN_PROGRESS, response=self.response("in_progress"))]

    def feed(self, output: EngineOutput) -> list[ChunkEvent]:
        if self.ended:
            return []
        self.choice.observe(output, None)
        if output.kind == "replay":
            self.choice.split(output.text)
            return []
        if output.kind == "delta":
            events = self._deltas(*self.choice.split(output.text))
        elif output.kind == "error":
            events = self.fail(output.error or "generation failed")
        else:
            events = self._finish(output)
        if events:
            events[0].token_ids = self.choice.take_ids()
        return events

    # ---- items -------------------------------------------------------------------------------
    def _deltas(self, reasoning: str, content: str, calls: list[ToolCall]) -> list[ResponseEvent]:
        events = []
        if reasoning:
            events += self._open("reasoning")
            events.append(self._text_event("response.reasoning_text.delta", delta=reasoning))
        if content:
            events += self._open("message")
            events.append(self._text_event("response.output_text.delta", delta=content, logprobs=[]))
        for call in calls:
            events += self._close() + self._function_call(call)
        return events

    def _text_event(self, kind: str, **fields) -> ResponseEvent:
        index = self.output.open_index
        return self._emit(kind, item_id=self.output.items[index]["id"], output_index=index, content_index=0,
                          **fields)

    def _open(self, kind: str) -> list[ResponseEvent]:
        """Opens an item of this kind (reasoning or message) unless one is open already."""
        current = self.output.open_item
        if current is not None and current["type"] == kind:
            return []
        events = self._close()
        index = len(self.output.items)
        item = {"id": item_id(self.response_id, kind, index), "type": kind, "status": "in_progress"}
        if kind == "reasoning":
            item.update(summary=[], content=[])
            part = {"type": "reasoning_text", "text": ""}
        else:
            item.update(role="assistant", content=[])
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events.append(self._emit("response.output_item.added", output_index=index, item=item))
        events.append(self._emit("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part=part))
        return events

    def _close(self, status: str = "completed") -> list[ResponseEvent]:
        """Ends the open reasoning or message item: its text's `.done`, its part's, its own."""
        item = self.output.open_item
        if item is None:
            return []
        index, part = self.output.open_index, item["content"][0]
        text_done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
        extra = {} if item["type"] == "reasoning" else {"logprobs": []}
        events = [self._text_event(text_done, text=part["text"], **extra),
                  self._emit("response.content_part.done", item_id=item["id"], output_index=index,
                             content_index=0, part=part)]
        done = {**item, "status": status, "content": [part]}
        events.append(self._emit("response.output_item.done", output_index=index, item=done))
        return events

    def _function_call(self, call: ToolCall) -> list[ResponseEvent]:
        index = len(self.output.items)
        item = {"id": item_id(self.response_id, "function_call", index), "type": "function_call",
                "status": "in_progress", "call_id": call.id, "name": call.name, "arguments": ""}
        ids = {"item_id": item["id"], "output_index": index}
        return [self._emit("response.output_item.added", output_index=index, item=item),
                self._emit("response.function_call_arguments.delta", **ids, delta=call.arguments),
                self._emit("response.function_call_arguments.done", **ids, name=call.name,
                           arguments=call.arguments),
                self._emit("response.output_item.done", output_index=index,
                           item={**item, "status": "completed", "arguments": call.arguments})]

    # ---- the end -------------------------------------------------------------------------------
    def _finish(self, output: EngineOutput) -> list[ResponseEvent]:
        events = self._deltas(*self.choice.flush())
        self.raw_reason, self.ended = output.finish_reason, True
        events += self._close("completed" if output.finish_reason == "stop" else "incomplete")
        if output.finish_reason == "cancelled":
            return events  # the API has no event for it: the stream ends, a retrieve says `cancelled`
        usage = usage_body(output.prompt_tokens, output.completion_tokens)
        if output.finish_reason == "length":
            return events + [self._emit(INCOMPLETE, response=self.response(
                "incomplete", usage=usage, incomplete_details={"reason": "max_output_tokens"}))]
        return events + [self._emit(COMPLETED, response=self.response("completed", usage=usage))]

    def fail(self, message: str) -> list[ResponseEvent]:
        """The open item ends `incomplete`, then `response.failed` carries the error."""
        self.error, self.ended = message, True
        return self._close("incomplete") + [self._emit(FAILED, response=self.response(
            "failed", error={"code": "server_error", "message": message[:500]}))]
