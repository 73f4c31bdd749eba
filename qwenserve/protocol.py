"""Pydantic models mirroring the OpenAI chat-completions shapes, and the error envelope."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant")
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


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[Any] | None = None
    name: str | None = None

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


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str


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
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    n: int = Field(1, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    session_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    # Accepted so that they can be refused with a clear message rather than ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        if isinstance(stop, list) and any(not s for s in stop):
            raise ValueError("stop sequences must be non-empty strings")
        if stop == "":
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise ValueError("n must be 1: this server returns one choice per request")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format other than 'text' is not supported")
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def make_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


def completion_body(completion_id: str, created: int, model: str, content: str,
                    reasoning: str | None, finish_reason: str, usage: dict) -> dict:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage,
    }


def chunk_body(completion_id: str, created: int, model: str, delta: dict,
               finish_reason: str | None = None) -> dict:
    return {
        "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk_body(completion_id: str, created: int, model: str, usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [], "usage": usage}


def models_body(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "qwenserve"}]}


FinishReason = Literal["stop", "length"]
