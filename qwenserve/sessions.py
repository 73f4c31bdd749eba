"""Streamed requests as sessions: generation appends events to a log; clients read from it.

Generation runs in its own task, independent of any connection. Every event gets the next
index and is made durable by the store before readers are woken, so a reader can join, leave
and come back (`Last-Event-ID`) and get exactly the events it has not seen yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from .completions import DONE, ChatStream, ChunkEvent
from .engine import Generation
from .protocol import APIError, ChatCompletionRequest
from .stores import (CANCELLED, FAILED, FINISHED, RUNNING, TERMINAL, EventsGone, EventStore, SessionRecord,
                     StoredEvent)

log = logging.getLogger("qwenserve.sessions")

# Starts a generation for a request: returns the engine job and the chunk builder for it.
Starter = Callable[[ChatCompletionRequest, SessionRecord, list[int]], Awaitable[tuple[Generation, ChatStream]]]


def new_session_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


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
    return f"id: {session_id}:{event.index}\ndata: {event.data}\n\n"


@dataclass
class LiveSession:
    """A session whose generation runs in this process."""
    session_id: str
    generation: Generation | None = None
    task: asyncio.Task | None = None
    clients: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_timer: asyncio.TimerHandle | None = None
    next_index: int = 0
    cancel_requested: bool = False

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class SessionManager:
    def __init__(self, store: EventStore, starter: Starter, ttl_seconds: float, cancel_after_seconds: float,
                 ping_seconds: float, metrics=None):
        self.store = store
        self.starter = starter
        self.ttl_seconds = ttl_seconds
        self.cancel_after_seconds = cancel_after_seconds
        self.ping_seconds = ping_seconds
        self.metrics = metrics
        self.live: dict[str, LiveSession] = {}
        self._janitor: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._janitor = asyncio.create_task(self._expire_loop())
        for record in self.store.unfinished():
            last = self.store.read(record.session_id, record.event_count - 2)
            if last and last[-1].data == DONE:  # crashed between the last event and the state update
                self.store.set_state(record.session_id, FINISHED)
                continue
            log.info("continuing session %s after restart", record.session_id)
            request = ChatCompletionRequest.model_validate_json(record.request_json)
            self._launch(record, self.starter(request, record, self.store.token_ids(record.session_id)))

    async def stop(self) -> None:
        if self._janitor:
            self._janitor.cancel()
        for live in list(self.live.values()):
            if live.task:
                live.task.cancel()
        self.store.close()

    async def _expire_loop(self) -> None:
        interval = max(0.2, min(self.ttl_seconds / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                for sid in self.store.delete_expired(self.ttl_seconds):
                    self.live.pop(sid, None)
            except Exception:
                log.exception("session expiry failed")

    # ---- opening streams -----------------------------------------------------------------
    def lookup(self, request: ChatCompletionRequest, body: dict, last_event_id: str | None) -> tuple[str, int] | None:
        """An existing session to resume as (session_id, last index seen), or None for a new stream."""
        after = -1
        session_id = request.session_id
        if last_event_id is not None:
            named, after = parse_last_event_id(last_event_id)
            if session_id and session_id != named:
                raise APIError(400, f"Last-Event-ID names session {named[:128]!r} but the body names "
                                    f"{session_id!r}", param="Last-Event-ID", code="session_mismatch")
            session_id = named
            record = self._known(session_id)
        elif session_id is None:
            return None
        else:
            record = self.store.get(session_id)
            if record is None:
                return None
        if record.request_hash != request_fingerprint(body):
            raise APIError(409, f"session {session_id!r} exists with a different request body",
                           "invalid_request_error", "session_id", "session_conflict")
        self.check_index(record, after)
        if self.metrics:
            self.metrics.resumes.inc()
        return session_id, after

    def create(self, session_id: str, request: ChatCompletionRequest, body: dict,
               generation: Generation, stream: ChatStream) -> None:
        """Record a new session and run its generation; the caller has prepared and submitted it."""
        if self.store.get(session_id) is not None:  # lost a race with an identical request
            generation.cancel()
            raise APIError(409, f"session {session_id!r} already exists", "invalid_request_error",
                           "session_id", "session_conflict")
        record = SessionRecord(session_id, request_fingerprint(body), json.dumps(body), stream.created)
        self.store.create(record)
        self._launch(record, self._started(generation, stream))

    @staticmethod
    async def _started(generation: Generation, stream: ChatStream) -> tuple[Generation, ChatStream]:
        return generation, stream

    def _known(self, session_id: str) -> SessionRecord:
        record = self.store.get(session_id)
        if record is None:
            raise APIError(404, f"session {session_id[:128]!r} is unknown or has expired", "not_found_error",
                           "session_id", "session_not_found")
        return record

    def check_index(self, record: SessionRecord, after: int) -> None:
        if after >= record.event_count:
            raise APIError(400, f"index {after} is beyond the last event ({record.event_count - 1}) of this session",
                           param="Last-Event-ID", code="invalid_last_event_id")
        oldest = self.store.oldest_index(record.session_id)
        if after + 1 < oldest:
            raise APIError(410, f"events after index {after} are no longer kept; the oldest available index "
                                f"is {oldest}", "invalid_request_error", "Last-Event-ID", "events_expired")

    def resolve(self, session_id: str, last_event_id: str | None) -> tuple[str, int]:
        """For GET /v1/sessions/{id}/events."""
        after = -1
        if last_event_id is not None:
            named, after = parse_last_event_id(last_event_id)
            if named != session_id:
                raise APIError(400, "Last-Event-ID names another session", param="Last-Event-ID",
                               code="session_mismatch")
        self.check_index(self._known(session_id), after)
        return session_id, after

    # ---- generation ----------------------------------------------------------------------
    def _launch(self, record: SessionRecord, starting: Awaitable[tuple[Generation, ChatStream]]) -> None:
        live = self.live.setdefault(record.session_id, LiveSession(record.session_id))
        live.next_index = record.event_count
        live.task = asyncio.create_task(self._produce(live, record, starting))
        if self.cancel_after_seconds and record.event_count:
            self._arm_auto_cancel(live)  # resumed after a restart: nobody is listening yet

    async def _produce(self, live: LiveSession, record: SessionRecord,
                       starting: Awaitable[tuple[Generation, ChatStream]]) -> None:
        state = FAILED
        try:
            generation, stream = await starting
            live.generation = generation
            if live.cancel_requested:
                generation.cancel()
            if not record.event_count:
                self._append(live, stream.start())
            async for output in generation:
                self._append(live, stream.feed(output))
            state = FAILED if stream.error else CANCELLED if stream.finish_reason == "cancelled" else FINISHED
        except asyncio.CancelledError:
            if live.generation:
                live.generation.cancel()
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            log.warning("session %s failed: %s", record.session_id, message)
            self._append(live, [ChunkEvent({"error": {"message": message[:500], "type": "server_error",
                                                      "param": None, "code": "generation_failed"}}),
                                ChunkEvent(DONE)])
        finally:
            if not asyncio.current_task().cancelling():
                self.store.set_state(record.session_id, state)
            live.generation = None
            if live.cancel_timer:
                live.cancel_timer.cancel()
            live.notify()

    def _append(self, live: LiveSession, events: list[ChunkEvent]) -> None:
        if not events:
            return
        stored = []
        for event in events:
            stored.append(StoredEvent(live.next_index, event.data(), event.token_ids))
            live.next_index += 1
        self.store.append(live.session_id, stored)  # durable before anyone is told
        live.notify()

    # ---- reading -------------------------------------------------------------------------
    async def follow(self, session_id: str, after: int) -> AsyncIterator[str]:
        """SSE text from index after+1 to `[DONE]`, with pings while waiting."""
        live = self.live.get(session_id)
        if live:
            self._client_joined(live)
        try:
            while True:
                waiter = live.changed if live else None
                events = self.store.read(session_id, after)
                for event in events:
                    yield sse(session_id, event)
                    after = event.index
                    if event.data == DONE:
                        return
                record = self.store.get(session_id)
                if record is None or (record.state in TERMINAL and not events and
                                      (live is None or live.generation is None)):
                    return
                if waiter is None:
                    live = self.live.get(session_id)
                    if live is None:
                        await asyncio.sleep(self.ping_seconds)
                        yield ": ping\n\n"
                        continue
                    self._client_joined(live)
                    continue
                try:
                    await asyncio.wait_for(waiter.wait(), timeout=self.ping_seconds)
                except asyncio.TimeoutError:
                    yield ": ping\n\n"
        except EventsGone:
            return  # evicted while this reader lagged behind: close; the client resumes and gets a 410
        finally:
            if live:
                self._client_left(live)

    def _client_joined(self, live: LiveSession) -> None:
        live.clients += 1
        if live.cancel_timer:
            live.cancel_timer.cancel()
            live.cancel_timer = None

    def _client_left(self, live: LiveSession) -> None:
        live.clients -= 1
        if live.clients == 0 and self.cancel_after_seconds and live.generation is not None:
            self._arm_auto_cancel(live)

    def _arm_auto_cancel(self, live: LiveSession) -> None:
        if live.cancel_timer:
            live.cancel_timer.cancel()
        live.cancel_timer = asyncio.get_running_loop().call_later(
            self.cancel_after_seconds, self._auto_cancel, live)

    def _auto_cancel(self, live: LiveSession) -> None:
        live.cancel_timer = None
        if live.clients == 0:
            log.info("session %s: no client for %ss, cancelling", live.session_id, self.cancel_after_seconds)
            self._request_cancel(live)

    # ---- control -------------------------------------------------------------------------
    def cancel(self, session_id: str) -> SessionRecord:
        record = self._known(session_id)
        live = self.live.get(session_id)
        if live and record.state == RUNNING:
            self._request_cancel(live)
        return record

    def _request_cancel(self, live: LiveSession) -> None:
        live.cancel_requested = True
        if live.generation:
            live.generation.cancel()

    def describe(self, session_id: str) -> dict:
        record = self._known(session_id)
        live = self.live.get(session_id)
        return {"id": record.session_id, "object": "chat.completion.session", "state": record.state,
                "event_count": record.event_count, "created": record.created,
                "clients": live.clients if live else 0,
                "cancel_requested": bool(live and live.cancel_requested)}
