"""The wire format of sessions: ids, what makes two requests the same stream, `Last-Event-ID`,
SSE event text, and the events that end a chat session whose generation could not run."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid

from .chat_stream import DONE, ChunkEvent
from .protocol import APIError
from .stores import SessionRecord, StoredEvent


def new_session_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def with_seed(body: dict) -> dict:
    """The body to store with a new session: the client's, with a random 63-bit seed when it names none."""
    return body if body.get("seed") is not None else {**body, "seed": new_seed()}


def new_seed() -> int:
    return secrets.randbits(63)


def request_fingerprint(body: dict) -> str:
    """What makes two requests the same stream: the body without the session id."""
    canonical = {k: v for k, v in body.items() if k != "session_id"}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_last_event_id(value: str) -> tuple[str, int]:
    session_id, sep, index = value.rpartition(":")
    try:
        k = int(index)
    except ValueError:
        k = None
    if not sep or not session_id or k is None or k < -1:
        raise APIError(400, "Last-Event-ID must look like '<session_id>:<index>' with an index >= -1",
                       param="Last-Event-ID", code="invalid_last_event_id")
    return session_id, k


def sse(session_id: str, event: StoredEvent) -> str:
    name = f"event: {event.event}\n" if event.event else ""
    return f"id: {session_id}:{event.index}\n{name}data: {event.data}\n\n"


def chat_failure(record: SessionRecord, message: str) -> list[ChunkEvent]:
    return [ChunkEvent({"error": {"message": message[:500], "type": "server_error", "param": None,
                                  "code": "generation_failed"}}), ChunkEvent(DONE)]
