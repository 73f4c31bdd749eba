"""Pydantic models mirroring the OpenAI chat-completions shapes, and the error envelope."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOP_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 10.0
# Keywords of apply_chat_template (tokenizer and processor) and what the server itself decides:
# a request passes template variables only, never its own template or tokenizer options.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "chat_template", "conversation", "messages", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "images",
    "videos", "audio", "text", "kwargs", "load_audio_from_video", "sampling_rate", "num_frames", "fps",
    "video_fps", "video_load_backend", "do_sample_frames", "return_mm_token_type_ids", "template",
})
MEDIA_PART_TYPES = ("image_url", "input_image", "video_url", "input_video")
TEXT_PART_TYPES = ("text", "input_text")


class APIError(Exception):
    """An error the client sees in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def validation_to_api_error(errors) -> APIError:
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [p for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}"[:500] if param else message[:500], param=param or None,
                    code="invalid_value")


def _is_union_tag(part) -> bool:
    """Pydantic names the union member it tried ('str', 'list[any]'); that is no field name."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: it could not be stored and read back as JSON
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json_object(raw: bytes | str, max_depth: int) -> dict:
    """A request body as a dict, or a 400: the one parser used at the door and when a stored request
    is read back, so that what was accepted can always be read again."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else (
            "nested too deeply" if isinstance(exc, RecursionError) else str(exc))
        raise bad_request(f"request body is not valid JSON: {reason}"[:300], code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    check_json_tree(body, max_depth)
    return body


def check_json_tree(value: Any, max_depth: int) -> None:
    """Iteratively (no recursion): nesting depth within MAX_JSON_DEPTH, and every string encodable as
    UTF-8 (a lone surrogate escape such as \\ud800 is valid JSON but no text)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > max_depth:
            raise bad_request(f"request body is nested more than {max_depth} levels deep (MAX_JSON_DEPTH)",
                              code="invalid_json")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        else:
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("request body holds a string that is not valid Unicode (a lone surrogate)",
                          code="invalid_json")


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    arguments: str | dict | None = None


class AssistantToolCall(BaseModel):
    """A call in an assistant message of the history (OpenAI shape; `arguments` a JSON string)."""
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[Any] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text_chars(self) -> int:
        total = len(self.reasoning_content or "")
        if isinstance(self.content, str):
            total += len(self.content)
        elif self.content:
            total += sum(len(part["text"]) for part in self.content if isinstance(part.get("text"), str))
        for call in self.tool_calls or []:
            arguments = call.function.arguments
            total += len(call.function.name) + len(arguments if isinstance(arguments, str) else json.dumps(arguments))
        return total

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unsupported role {role[:40]!r}; expected one of {', '.join(ROLES)}")
        return role

    @field_validator("content")
    @classmethod
    def _parts_are_objects(cls, content):
        if isinstance(content, list):
            for i, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    raise ValueError(f"content[{i}] must be an object with a string 'type'")
                kind = part["type"]
                if kind not in TEXT_PART_TYPES + MEDIA_PART_TYPES:
                    raise ValueError(f"content[{i}] has unsupported type {kind[:40]!r}")
                if kind in TEXT_PART_TYPES and not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{i}] of type {kind!r} needs a string 'text'")
        return content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema):
        if schema and schema.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON Schema of type 'object'")
        return schema


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_MIN, le=REPETITION_PENALTY_MAX)
    n: int = Field(1, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    session_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, kwargs):
        for key in kwargs or {}:
            if key in RESERVED_TEMPLATE_KWARGS:
                raise ValueError(f"{key!r} cannot be set by a request: only template variables such as "
                                 "'enable_thinking' are passed to the model's own chat template")
        return kwargs

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, list) and any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        if stop == "":
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _consistent(self):
        if self.tools is not None and not self.tools:
            raise ValueError("tools must not be empty (leave it out for no tools)")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.forced_tool() is None:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name[:64]!r}, which is not among the tools")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def tool_mode(self) -> str:
        """"none", "auto", "required" or "named": what the model may or must do with the tools."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def forced_tool(self) -> ToolDefinition | None:
        """The tool a named tool_choice forces."""
        if not isinstance(self.tool_choice, NamedToolChoice):
            return None
        return next((t for t in self.tools or [] if t.function.name == self.tool_choice.function.name), None)

    def text_chars(self) -> int:
        """Characters of text the template will render (messages, reasoning, calls, tools, template
        variables): the cheap bound checked before any tokenizing."""
        total = sum(message.text_chars() for message in self.messages)
        extras = [tool.model_dump(exclude_none=True) for tool in self.tools or []]
        if self.chat_template_kwargs:
            extras.append(self.chat_template_kwargs)
        return total + sum(len(json.dumps(extra)) for extra in extras)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def validate_body(model: type[BaseModel], body: dict):
    """Validate a parsed body (see `parse_json_object`) as `model`; any failure is a 400."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_to_api_error(exc.errors())
    except (ValueError, TypeError, RecursionError) as exc:
        raise bad_request(f"invalid request: {type(exc).__name__}", code="invalid_value")


def chat_request_from(body: dict) -> ChatCompletionRequest:
    return validate_body(ChatCompletionRequest, body)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


def completion_body(completion_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def chunk_body(completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    return {
        "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }


def usage_chunk_body(completion_id: str, created: int, model: str, usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage}


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "qwenserve"}]}


FinishReason = Literal["stop", "length"]
