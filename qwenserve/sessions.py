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
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from .completions import DONE, ChatStream, ChunkEvent
from .engine import Generation
from .protocol import APIError, ChatCompletionRequest
from .sse import chat_failure, new_session_id, parse_last_event_id, request_fingerprint, sse
from .stores import (CANCELLED, CHAT, FAILED, FINISHED, RUNNING, TERMINAL, EventsGone, EventStore,
                     SessionRecord, StoredEvent)

log = logging.getLogger("qwenserve.sessions")

# Starts a stored session's generation again after a restart, from the tokens it had produced: reads its
# request back (chat or response, by `record.kind`) and returns the engine job and the event builder.
Starter = Callable[[SessionRecord, list[int]], Awaitable[tuple[Generation, ChatStream]]]
# The events that end a session whose generation could not run: an error chunk and `[DONE]` for chat.
FailureEvents = Callable[[SessionRecord, str], list[ChunkEvent]]
# Prepares and submits a new stream's request under the given session id.
Start = Callable[[str], Awaitable[tuple[Generation, ChatStream]]]


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
    auto_cancel: bool = True  # False for background responses: they run whether or not anyone reads
    deleted: bool = False  # deleted while generating: dropped from the store when the producer ends

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class Claim:
    """A new session id whose request is being prepared: identical requests wait for it (one generation,
    one stream for all); `error` is the answer they share when preparation fails."""
    fingerprint: str
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    error: APIError | None = None


def conflict(session_id: str) -> APIError:
    return APIError(409, f"session {session_id!r} exists with a different request body", "invalid_request_error",
                    "session_id", "session_conflict")


class SessionManager:
    def __init__(self, store: EventStore, starter: Starter, ttl_seconds: float, cancel_after_seconds: float,
                 ping_seconds: float, metrics=None, response_ttl_seconds: float | None = None):
        self.store = store
        self.response_ttl_seconds = response_ttl_seconds
        # Per session kind: the events that end a failed session, and the event names that end a stream
        # (besides `[DONE]`); the Responses module registers its own.
        self.failure_events: dict[str, FailureEvents] = {CHAT: chat_failure}
        self.final_events: set[str] = set()
        self.starter = starter
        self.ttl_seconds = ttl_seconds
        self.cancel_after_seconds = cancel_after_seconds
        self.ping_seconds = ping_seconds
        self.metrics = metrics
        self.live: dict[str, LiveSession] = {}
        self._claims: dict[str, Claim] = {}
        self._janitor: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers_end = asyncio.Event()  # set at shutdown: every reader stops at an event boundary
        self._shutdown_begun = False

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._janitor = asyncio.create_task(self._expire_loop())
        for record in self.store.unfinished():
            if self._ended_before_crash(record):
                self.store.set_state(record.session_id, FINISHED)
                continue
            log.info("continuing session %s after restart", record.session_id)
            self._launch(record, self._continue(record))

    def _ended_before_crash(self, record: SessionRecord) -> bool:
        """The last stored event is `[DONE]`: the crash came between it and the state update."""
        try:
            last = self.store.read(record.session_id, record.event_count - 2)
        except Exception:  # unreadable events: the continuation fails too, and says so to the readers
            log.exception("session %s: stored events unreadable", record.session_id)
            return False
        return bool(last) and self.is_final(last[-1])

    def is_final(self, event: StoredEvent) -> bool:
        return event.data == DONE or event.event in self.final_events

    async def _continue(self, record: SessionRecord) -> tuple[Generation, ChatStream]:
        """A stored session's generation again, its request read back through the parser the door uses.
        Any failure (a request the server no longer accepts, a preparation that fails) fails this
        session only: `_produce` gives its readers an error event and `[DONE]`."""
        try:
            return await self.starter(record, self.store.token_ids(record.session_id))
        except Exception as exc:
            reason = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            raise APIError(500, f"the session could not be continued after a restart: {reason}",
                           "server_error", code="generation_failed") from exc

    def begin_shutdown(self, grace_seconds: float) -> None:
        """A shutdown signal arrived (called from the signal handler, so it only schedules). Streams keep
        going for most of the grace, so those that finish within it are complete; then every reader
        stops at an event boundary, before the server cancels what is left, and clients resume with
        `Last-Event-ID` (after the restart, with persistence)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule_readers_end, grace_seconds)

    def _schedule_readers_end(self, grace_seconds: float) -> None:
        if self._shutdown_begun:
            return
        self._shutdown_begun = True
        # The margin lets the ended responses finish and the server see their connections close.
        margin = min(1.0, grace_seconds / 2)
        self._loop.call_later(grace_seconds - margin, self._end_readers)

    def _end_readers(self) -> None:
        self._readers_end.set()
        for live in self.live.values():
            live.notify()

    async def stop(self) -> None:
        self._end_readers()
        tasks = [live.task for live in self.live.values() if live.task and not live.task.done()]
        if self._janitor:
            tasks.append(self._janitor)
        for task in tasks:
            task.cancel()
        # A cancelled producer leaves its session `running` (continued at the next start with persistence);
        # waiting for them means none touches the store after it is closed.
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    async def _expire_loop(self) -> None:
        interval = max(0.2, min(self.ttl_seconds / 2, (self.response_ttl_seconds or 60.0) / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self._forget(self.store.delete_expired(self.ttl_seconds,
                                                       response_ttl_seconds=self.response_ttl_seconds))
            except Exception:
                log.exception("session expiry failed")

    def _forget(self, session_ids: list[str]) -> None:
        """Sessions the store dropped (expired or evicted): unknown from now on."""
        for sid in session_ids:
            self.live.pop(sid, None)

    # ---- opening streams -----------------------------------------------------------------
    async def open_stream(self, request: ChatCompletionRequest, body: dict, last_event_id: str | None,
                          start: Start) -> tuple[str, int]:
        """The session a stream request reads and the last index its client saw: an existing one (resume,
        or the same body again), or a new one whose request `start` prepares and submits. Identical
        requests for a new id that arrive together share one generation."""
        session_id, after = self._target(request, last_event_id)
        fingerprint = request_fingerprint(body)
        if session_id is None:
            return await self._create(new_session_id(), body, fingerprint, start)
        await self._settled(session_id, fingerprint)
        # No await from here to the claim in _create: no other request can slip in between.
        record = self._known(session_id) if last_event_id is not None else self.store.get(session_id)
        if record is None:
            return await self._create(session_id, body, fingerprint, start)
        if record.request_hash != fingerprint:
            raise conflict(session_id)
        self.check_index(record, after)
        if self.metrics:
            self.metrics.resumes.inc()
        return session_id, after

    @staticmethod
    def _target(request: ChatCompletionRequest, last_event_id: str | None) -> tuple[str | None, int]:
        """The session named (by Last-Event-ID, else the body) and the last index seen."""
        if last_event_id is None:
            return request.session_id, -1
        named, after = parse_last_event_id(last_event_id)
        if request.session_id and request.session_id != named:
            raise APIError(400, f"Last-Event-ID names session {named[:128]!r} but the body names "
                                f"{request.session_id!r}", param="Last-Event-ID", code="session_mismatch")
        return named, after

    async def _settled(self, session_id: str, fingerprint: str) -> None:
        """Waits while another request prepares this new session; a different body is a conflict at once.
        If that preparation failed with an error the client sees (400, 429, 503...), the waiters get the
        same error; if it ended otherwise (its task cancelled), the waiters try again themselves."""
        while (claim := self._claims.get(session_id)) is not None:
            if claim.fingerprint != fingerprint:
                raise conflict(session_id)
            await claim.settled.wait()
            if claim.error is not None:
                e = claim.error
                raise APIError(e.status, e.message, e.type, e.param, e.code, dict(e.headers))

    async def _create(self, session_id: str, body: dict, fingerprint: str, start: Start) -> tuple[str, int]:
        claim = self._claims[session_id] = Claim(fingerprint)
        try:
            generation, stream = await start(session_id)
            self._record(session_id, body, fingerprint, generation, stream)
        except APIError as exc:
            claim.error = exc
            raise
        finally:
            del self._claims[session_id]
            claim.settled.set()
        return session_id, -1

    async def create(self, session_id: str, request_json: str, start: Start, kind: str,
                     background: bool = False) -> None:
        """A new session under a server-made id (responses): no claim is needed, nobody else knows the id."""
        generation, stream = await start(session_id)
        fingerprint = hashlib.sha256(request_json.encode()).hexdigest()
        self._record(session_id, request_json, fingerprint, generation, stream, kind, background)

    def _record(self, session_id: str, body: dict | str, fingerprint: str, generation: Generation,
                stream: ChatStream, kind: str = CHAT, background: bool = False) -> None:
        """Store a new session and run its generation (already submitted)."""
        request_json = body if isinstance(body, str) else json.dumps(body)
        record = SessionRecord(session_id, fingerprint, request_json, stream.created, kind=kind,
                               background=background)
        try:
            self.store.create(record)
        except BaseException:
            generation.cancel()
            raise
        self._launch(record, self._started(generation, stream))

    @staticmethod
    async def _started(generation: Generation, stream: ChatStream) -> tuple[Generation, ChatStream]:
        return generation, stream

    def _known(self, session_id: str) -> SessionRecord:
        record = self.store.get(session_id)
        live = self.live.get(session_id)
        if record is None or (live is not None and live.deleted):
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
        live.auto_cancel = not record.background
        live.task = asyncio.create_task(self._produce(live, record, starting))
        if self.cancel_after_seconds and record.event_count and live.auto_cancel:
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
            self._append(live, self.failure_events[record.kind](record, message))
        finally:
            if live.deleted:
                self.store.delete(record.session_id)
                self._forget([record.session_id])
            elif not asyncio.current_task().cancelling():
                self._forget(self.store.set_state(record.session_id, state))
            live.generation = None
            if live.cancel_timer:
                live.cancel_timer.cancel()
            live.notify()

    def _append(self, live: LiveSession, events: list[ChunkEvent]) -> None:
        if not events:
            return
        stored = []
        for event in events:
            stored.append(StoredEvent(live.next_index, event.data(), event.token_ids, getattr(event, "event", None)))
            live.next_index += 1
        self.store.append(live.session_id, stored)  # durable before anyone is told
        live.notify()

    # ---- reading -------------------------------------------------------------------------
    async def follow(self, session_id: str, after: int) -> AsyncIterator[str]:
        """SSE text from index after+1 to `[DONE]`, with pings while waiting. At shutdown it stops
        between two events, so that the client has whole events only and can resume."""
        live = self.live.get(session_id)
        if live:
            self._client_joined(live)
        try:
            while not self._readers_end.is_set():
                waiter = live.changed if live else None
                events = self.store.read(session_id, after)
                for event in events:
                    yield sse(session_id, event)
                    after = event.index
                    if self.is_final(event) or self._readers_end.is_set():
                        return
                record = self.store.get(session_id)
                if record is None or (record.state in TERMINAL and not events and
                                      (live is None or live.generation is None)):
                    return
                if waiter is None:
                    live = self.live.get(session_id)
                    if live is not None:
                        self._client_joined(live)
                        continue
                if not await self._news(waiter):
                    yield ": ping\n\n"
        except EventsGone:
            return  # evicted while this reader lagged behind: close; the client resumes and gets a 410
        finally:
            if live:
                self._client_left(live)

    async def _news(self, waiter: asyncio.Event | None) -> bool:
        """Waits for the session to change (or for shutdown); False when ping_seconds passed quietly."""
        try:
            await asyncio.wait_for((waiter or self._readers_end).wait(), timeout=self.ping_seconds)
            return True
        except asyncio.TimeoutError:
            return False

    def _client_joined(self, live: LiveSession) -> None:
        live.clients += 1
        if live.cancel_timer:
            live.cancel_timer.cancel()
            live.cancel_timer = None

    def _client_left(self, live: LiveSession) -> None:
        live.clients -= 1
        # Readers ended by a shutdown did not leave: their clients come back after the restart.
        if live.clients == 0 and self.cancel_after_seconds and live.auto_cancel and live.generation is not None \
                and not self._readers_end.is_set():
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

    def delete(self, session_id: str) -> None:
        """Forget a session: at once when it has ended, else cancel it and drop it when its producer ends
        (unknown from now on either way)."""
        self._known(session_id)
        live = self.live.get(session_id)
        if live is not None and live.task is not None and not live.task.done():
            live.deleted = True
            self._request_cancel(live)
            live.notify()
            return
        self.store.delete(session_id)
        self._forget([session_id])

    def producer(self, session_id: str) -> asyncio.Task | None:
        """The task generating a session in this process (None when it is not running here)."""
        live = self.live.get(session_id)
        return live.task if live else None

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
