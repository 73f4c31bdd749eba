"""The Responses API request: validated at the door, then turned into the chat request that
`completions.prepare` takes, so that responses and chat completions share one preparation path
(template, tools, structured outputs, media and all their limits)."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .protocol import TOOL_NAME_PATTERN, bad_request, validate_body

ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"
MEDIA_OPTIONS = ("max_pixels", "fps", "max_frames")


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a format of type 'json_schema' needs a 'schema' object")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: TextFormat | None = None


class FunctionTool(BaseModel):
    """The Responses shape of a function tool (flat: no nested `function` object)."""
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    name: str


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.background and not self.store:
            raise ValueError("background responses must be stored (store: true)")
        if self.metadata is not None and len(self.metadata) > 16:
            raise ValueError("metadata holds at most 16 keys")
        return self

    def echo(self) -> dict:
        """The request's fields every response object repeats."""
        text = self.text.format.model_dump(by_alias=True, exclude_none=True) if self.text and self.text.format \
            else {"type": "text"}
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, FunctionChoice) else self.tool_choice
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "model": self.model, "parallel_tool_calls":
                self.parallel_tool_calls is not False, "previous_response_id": self.previous_response_id,
                "store": self.store, "temperature": self.temperature, "top_p": self.top_p,
                "text": {"format": text}, "tool_choice": choice or "auto",
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or []]}


def responses_request_from(body: dict) -> ResponsesRequest:
    return validate_body(ResponsesRequest, body)


# ---- input items -> chat messages ------------------------------------------------------------------

def input_messages(items: str | list, param: str = "input") -> list[dict]:
    """Responses input items (or a previous response's output items) as chat messages. A function call
    joins the assistant message before it; a reasoning item becomes the next assistant message's
    `reasoning_content`."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict] = []
    reasoning: str | None = None
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise bad_request("an input item must be an object", where)
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = "".join(p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict))
        elif kind == "message":
            messages.append(_message(item, where, reasoning))
            reasoning = None
        elif kind == "function_call":
            _add_call(messages, item, where, reasoning)
            reasoning = None
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": output if isinstance(output, str) else _content(output, where)})
        else:
            raise bad_request(f"input items of type {str(kind)[:40]!r} are not supported", f"{where}.type")
    return messages


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{key} must be a string", f"{where}.{key}")
    return value


def _message(item: dict, where: str, reasoning: str | None) -> dict:
    role = item.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise bad_request("role must be one of user, system, developer, assistant", f"{where}.role")
    message = {"role": role, "content": _content(item.get("content"), f"{where}.content")}
    if role == "assistant" and reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def _add_call(messages: list[dict], item: dict, where: str, reasoning: str | None) -> None:
    call = {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
    if messages and messages[-1]["role"] == "assistant" and reasoning is None:
        messages[-1].setdefault("tool_calls", []).append(call)
        return
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    messages.append(message)


def _content(content, where: str) -> str | list[dict]:
    """Parts in the chat shape: text parts, and media parts the media loader reads (with its limits)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of parts", where)
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": _string(part, "refusal" if kind == "refusal" else "text", at)})
        elif kind in ("input_image", "input_video"):
            key = "image_url" if kind == "input_image" else "video_url"
            if not isinstance(part.get(key), str):
                raise bad_request(f"{kind} needs '{key}' (an http(s) or data URL); file ids are not supported", at)
            options = {k: part[k] for k in MEDIA_OPTIONS if k in part}
            parts.append({"type": key, key: {"url": part[key], **options}})
        else:
            raise bad_request(f"content parts of type {str(kind)[:40]!r} are not supported", f"{at}.type")
    return parts


def chat_body(request: ResponsesRequest, conversation: list[dict]) -> dict:
    """The chat-completions body this response generates from: instructions as the system turn."""
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    body: dict = {"model": request.model, "messages": system + conversation}
    optional = {"max_completion_tokens": request.max_output_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "parallel_tool_calls": request.parallel_tool_calls}
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in request.tools]
    if isinstance(request.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": request.tool_choice.name}}
    elif request.tool_choice is not None:
        body["tool_choice"] = request.tool_choice
    form = request.text.format if request.text else None
    if form is not None and form.type == "json_schema":
        schema = {"name": form.name or "response", "schema": form.json_schema, "description": form.description,
                  "strict": form.strict}
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {k: v for k, v in schema.items() if v is not None}}
    elif form is not None and form.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    return body


def stored_request(body: dict, conversation: list[dict], chat: dict) -> str:
    """What a response session stores: the request as sent (echo fields, `store`), the conversation
    without instructions (what a later `previous_response_id` continues) and the chat body it runs."""
    return json.dumps({"request": body, "conversation": conversation, "chat": chat})
