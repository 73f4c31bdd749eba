"""Streamed requests as sessions: generation appends events to a log; clients read from it.

Generation runs in its own task, independent of any connection. Every event gets the next
index and is made durable by the store before readers are woken, so a reader can join, leave
and come back (`Last-Event-ID`) and get exactly the events it has not seen yet.

With a store that several replicas share (Redis), a session is produced by the one replica that holds
its lease (`replicas.Replicas` renews it and takes over sessions whose producer died); its readers,
cancels and state queries may be on any replica. Readers then follow the store itself (XREAD BLOCK),
and a producer whose append the store refuses (a newer lease epoch) stops at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .completions import DONE, ChatStream, ChunkEvent
from .engine import Generation
from .following import Following
from .opening import Claim, Opening
from .protocol import APIError
from .replicas import Replicas
from .sse import chat_failure, parse_last_event_id
from .stores import (CANCEL, CANCELLED, CHAT, DELETE, FAILED, FINISHED, RUNNING, TERMINAL, EventStore, Fenced,
                     SessionRecord, StoredEvent, StoreUnavailable)

log = logging.getLogger("qwenserve.sessions")

# Starts a stored session's generation again after a restart, from the tokens it had produced: reads its
# request back (chat or response, by `record.kind`) and returns the engine job and the event builder.
Starter = Callable[[SessionRecord, list[int]], Awaitable[tuple[Generation, ChatStream]]]
# The events that end a session whose generation could not run: an error chunk and `[DONE]` for chat.
FailureEvents = Callable[[SessionRecord, str], Awaitable[list[ChunkEvent]]]


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
    epoch: int = 0  # the lease epoch this replica produces under (shared stores); the fence checks it

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


async def _chat_failure(record: SessionRecord, message: str) -> list[ChunkEvent]:
    return chat_failure(record, message)


class SessionManager(Opening, Following):
    def __init__(self, store: EventStore, starter: Starter, ttl_seconds: float, cancel_after_seconds: float,
                 ping_seconds: float, metrics=None, response_ttl_seconds: float | None = None,
                 lease_seconds: float = 10.0, room: Callable[[], int] | None = None):
        self.store = store
        self.response_ttl_seconds = response_ttl_seconds
        # Per session kind: the events that end a failed session, and the event names that end a stream
        # (besides `[DONE]`); the Responses module registers its own.
        self.failure_events: dict[str, FailureEvents] = {CHAT: _chat_failure}
        self.final_events: set[str] = set()
        self.starter = starter
        self.ttl_seconds = ttl_seconds
        self.cancel_after_seconds = cancel_after_seconds
        self.ping_seconds = ping_seconds
        self.lease_seconds = lease_seconds
        self.metrics = metrics
        self.live: dict[str, LiveSession] = {}
        self._claims: dict[str, Claim] = {}
        self._janitor: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers_end = asyncio.Event()  # set at shutdown: every reader stops at an event boundary
        self._shutdown_begun = False
        self.admitting = True  # False from SIGTERM on: new generations get 503 with Retry-After
        self.replicas = Replicas(store, self, lease_seconds, room) if store.shared else None

    @property
    def owner(self) -> str:
        return self.replicas.id if self.replicas else ""

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.replicas:  # keys expire by themselves; running sessions are taken over by lease
            self.replicas.start()
            return
        self._janitor = asyncio.create_task(self._expire_loop())
        for record in await self.store.unfinished():
            if await self._ended_before_crash(record):
                await self.store.set_state(record.session_id, FINISHED)
                continue
            log.info("continuing session %s after restart", record.session_id)
            self._launch(record, self._continue(record))

    async def _ended_before_crash(self, record: SessionRecord) -> bool:
        """The last stored event is `[DONE]`: the crash came between it and the state update."""
        try:
            last = await self.store.read(record.session_id, record.event_count - 2)
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
            return await self.starter(record, await self.store.token_ids(record.session_id))
        except StoreUnavailable:
            raise  # not the session's fault: it is left to a later takeover (its lease lapses)
        except Exception as exc:
            reason = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            raise APIError(500, f"the session could not be continued after a restart: {reason}",
                           "server_error", code="generation_failed") from exc

    async def take_over(self, record: SessionRecord, epoch: int) -> None:
        """A session whose producer died or handed it over, now leased to this replica (`Replicas`)."""
        if self.metrics:
            self.metrics.takeovers.inc()
        if await self._ended_before_crash(record):
            await self.store.set_state(record.session_id, FINISHED, epoch)
            return
        self._launch(record, self._continue(record), epoch)

    def begin_shutdown(self, grace_seconds: float) -> None:
        """A shutdown signal arrived (called from the signal handler, so it only schedules). New generations
        are refused from now on. Streams keep going for most of the grace, so those that finish within it
        are complete; then every reader stops at an event boundary, before the server cancels what is
        left, and clients resume with `Last-Event-ID` (after the restart, with persistence). With a shared
        store the running sessions are handed over at once: another replica continues them, and this
        replica's readers follow them there until they end."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule_readers_end, grace_seconds)

    def _schedule_readers_end(self, grace_seconds: float) -> None:
        if self._shutdown_begun:
            return
        self._shutdown_begun = True
        self.admitting = False
        if self.replicas:
            self.replicas.draining = True
            for live in self.producing():
                live.task.cancel()  # its `finally` releases the lease: another replica continues it
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
            if not task.cancelling():  # a second cancel would interrupt its lease release
                task.cancel()
        # A cancelled producer leaves its session `running` (continued at the next start with persistence,
        # or at once by another replica); waiting for them means none touches the store after it is closed.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.replicas:
            await self.replicas.stop()
        await self.store.close()

    async def _expire_loop(self) -> None:
        interval = max(0.2, min(self.ttl_seconds / 2, (self.response_ttl_seconds or 60.0) / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                self._forget(await self.store.delete_expired(self.ttl_seconds,
                                                             response_ttl_seconds=self.response_ttl_seconds))
            except Exception:
                log.exception("session expiry failed")

    def _forget(self, session_ids: list[str]) -> None:
        """Sessions the store dropped (expired or evicted): unknown from now on."""
        for sid in session_ids:
            self.live.pop(sid, None)

    # ---- looking sessions up -------------------------------------------------------------
    async def _known(self, session_id: str) -> SessionRecord:
        record = await self.store.get(session_id)
        live = self.live.get(session_id)
        if record is None or record.control == DELETE or (live is not None and live.deleted):
            raise APIError(404, f"session {session_id[:128]!r} is unknown or has expired", "not_found_error",
                           "session_id", "session_not_found")
        return record

    async def known(self, session_id: str) -> SessionRecord | None:
        """The record, or None when the session is unknown, expired or being deleted."""
        try:
            return await self._known(session_id)
        except APIError:
            return None

    async def check_index(self, record: SessionRecord, after: int) -> None:
        if after >= record.event_count:
            raise APIError(400, f"index {after} is beyond the last event ({record.event_count - 1}) of this session",
                           param="Last-Event-ID", code="invalid_last_event_id")
        oldest = await self.store.oldest_index(record.session_id)
        if after + 1 < oldest:
            raise APIError(410, f"events after index {after} are no longer kept; the oldest available index "
                                f"is {oldest}", "invalid_request_error", "Last-Event-ID", "events_expired")

    async def resolve(self, session_id: str, last_event_id: str | None) -> tuple[str, int]:
        """For GET /v1/sessions/{id}/events."""
        after = -1
        if last_event_id is not None:
            named, after = parse_last_event_id(last_event_id)
            if named != session_id:
                raise APIError(400, "Last-Event-ID names another session", param="Last-Event-ID",
                               code="session_mismatch")
        await self.check_index(await self._known(session_id), after)
        return session_id, after

    # ---- generation ----------------------------------------------------------------------
    def _launch(self, record: SessionRecord, starting: Awaitable[tuple[Generation, ChatStream]],
                epoch: int = 0) -> None:
        live = self.live.setdefault(record.session_id, LiveSession(record.session_id))
        live.next_index = record.event_count
        live.epoch = epoch
        live.auto_cancel = not record.background
        live.cancel_requested = live.cancel_requested or bool(record.control)  # asked before a takeover
        live.deleted = live.deleted or record.control == DELETE
        live.task = asyncio.create_task(self._produce(live, record, starting))
        if self.cancel_after_seconds and record.event_count and live.auto_cancel and not self.replicas:
            self._arm_auto_cancel(live)  # resumed after a restart: nobody is listening yet

    async def _produce(self, live: LiveSession, record: SessionRecord,
                       starting: Awaitable[tuple[Generation, ChatStream]]) -> None:
        state, abandoned = FAILED, False
        try:
            generation, stream = await starting
            live.generation = generation
            if live.cancel_requested:
                generation.cancel()
            if not record.event_count:
                await self._append(live, stream.start())
            async for output in generation:
                await self._append(live, stream.feed(output))
            state = FAILED if stream.error else CANCELLED if stream.finish_reason == "cancelled" else FINISHED
        except asyncio.CancelledError:
            if live.generation:
                live.generation.cancel()
            raise
        except (Fenced, StoreUnavailable) as exc:
            abandoned = self._abandon(live, exc)
        except Exception as exc:
            message = exc.message if isinstance(exc, APIError) else f"{type(exc).__name__}: {exc}"
            log.warning("session %s failed: %s", record.session_id, message)
            try:
                await self._append(live, await self.failure_events[record.kind](record, message))
            except (Fenced, StoreUnavailable) as lost:
                abandoned = self._abandon(live, lost)
        finally:
            await self._settle(live, state, abandoned)

    def _abandon(self, live: LiveSession, exc: Exception) -> bool:
        """The store refused our write (another replica produces the session now) or stayed unreachable:
        stop generating at once, and touch the session no more; its owner (or a takeover) continues it."""
        if live.generation:
            live.generation.cancel()
        if isinstance(exc, Fenced) and self.metrics:
            self.metrics.fenced_appends.inc()
        log.warning("session %s: stopped producing here: %s", live.session_id, exc)
        return True

    async def _settle(self, live: LiveSession, state: str, abandoned: bool) -> None:
        """The producer's end: the session's final state, its deletion, or (cancelled: shutdown) its handover."""
        sid = live.session_id
        handed_over = asyncio.current_task().cancelling()
        try:
            if abandoned:
                pass
            elif live.deleted:
                await self.store.delete(sid)
                self._forget([sid])
            elif not handed_over:
                self._forget(await self.store.set_state(sid, state, live.epoch))
            elif self.replicas:
                await self.replicas.release(sid, live.epoch)
        except (Fenced, StoreUnavailable) as exc:
            log.warning("session %s: could not record its end: %s", sid, exc)
        finally:
            live.generation = None
            if live.cancel_timer:
                live.cancel_timer.cancel()
            live.notify()
            if self.replicas and self.live.get(sid) is live:
                del self.live[sid]  # readers follow the store; nothing here outlives the producer

    async def _append(self, live: LiveSession, events: list[ChunkEvent]) -> None:
        if not events:
            return
        stored = []
        for event in events:
            stored.append(StoredEvent(live.next_index, event.data(), event.token_ids, getattr(event, "event", None)))
            live.next_index += 1
        control = await self._store_events(live, stored)  # durable before anyone is told
        live.notify()
        if control:
            self._control(live, control)

    async def _store_events(self, live: LiveSession, stored: list[StoredEvent]) -> str:
        """A shared store that cannot be reached is retried for up to one lease (a Redis restart); after
        that another replica may have taken the session over, and the fence decides."""
        deadline = None
        while True:
            try:
                return await self.store.append(live.session_id, stored, live.epoch)
            except StoreUnavailable:
                now = asyncio.get_running_loop().time()
                deadline = deadline or now + self.lease_seconds
                if not self.replicas or now >= deadline:
                    raise
                await asyncio.sleep(0.2)

    # ---- several replicas (called by `Replicas`) ------------------------------------------
    def producing(self) -> list[LiveSession]:
        return [live for live in self.live.values() if live.task is not None and not live.task.done()]

    def is_producing(self, session_id: str) -> bool:
        live = self.live.get(session_id)
        return live is not None and live.task is not None and not live.task.done()

    def lost(self, live: LiveSession) -> None:
        """The lease went to another replica: stop; the next append is refused and ends the producer."""
        self._request_cancel(live)

    def observed(self, live: LiveSession, control: str, readers: int, idle_ms: int) -> None:
        """What a heartbeat saw: a cancel or delete from anywhere, and the readers on all replicas."""
        if control:
            self._control(live, control)
        elif (live.auto_cancel and self.cancel_after_seconds and readers == 0 and not live.cancel_requested
              and idle_ms >= self.cancel_after_seconds * 1000):
            log.info("session %s: no client on any replica for %ss, cancelling", live.session_id,
                     self.cancel_after_seconds)
            self._request_cancel(live)

    def _control(self, live: LiveSession, control: str) -> None:
        """A cancel or delete asked on another replica (seen at an append or a heartbeat)."""
        if control == DELETE:
            live.deleted = True
        if not live.cancel_requested:
            log.info("session %s: cancelled from another replica", live.session_id)
            if self.metrics:
                self.metrics.remote_cancels.inc()
            self._request_cancel(live)

    # ---- control -------------------------------------------------------------------------
    async def cancel(self, session_id: str) -> SessionRecord:
        record = await self._known(session_id)
        live = self.live.get(session_id)
        if record.state == RUNNING:
            if live:
                self._request_cancel(live)
            if self.replicas:  # the producer may be another replica: it sees this at its next append
                await self.store.control(session_id, CANCEL)
        return record

    def cancel_soon(self, session_id: str) -> None:
        """A cancel from code that cannot wait (a cancelled handler): the local generation stops now, the
        store's flag (other replicas) is written by a task of its own."""
        live = self.live.get(session_id)
        if live is not None:
            self._request_cancel(live)
        if self.replicas:
            self.replicas.background(self.store.control(session_id, CANCEL))

    async def delete(self, session_id: str) -> None:
        """Forget a session: at once when it has ended, else cancel it and drop it when its producer ends
        (unknown from now on either way, on every replica)."""
        await self._known(session_id)
        live = self.live.get(session_id)
        if live is not None and live.task is not None and not live.task.done():
            live.deleted = True
            self._request_cancel(live)
            live.notify()
        if self.replicas:  # dropped now if nobody produces it, else flagged for its producer
            await self.store.control(session_id, DELETE)
        elif live is None or live.task is None or live.task.done():
            await self.store.delete(session_id)
            self._forget([session_id])

    def producer(self, session_id: str) -> asyncio.Task | None:
        """The task generating a session in this process (None when it is not running here)."""
        live = self.live.get(session_id)
        return live.task if live else None

    async def wait_ended(self, session_id: str, timeout: float) -> None:
        """Until the session's generation stopped (wherever it runs), or `timeout` seconds."""
        task = self.producer(session_id)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=timeout)
            return
        if not self.replicas:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            record = await self.store.get(session_id)
            if record is None or record.state in TERMINAL:
                return
            await asyncio.sleep(0.1)

    def _request_cancel(self, live: LiveSession) -> None:
        live.cancel_requested = True
        if live.generation:
            live.generation.cancel()

    async def describe(self, session_id: str) -> dict:
        record = await self._known(session_id)
        live = self.live.get(session_id)
        if self.replicas:  # readers on every replica; a cancel asked on any
            clients = await self.store.reader_count(session_id)
            cancel_requested = bool(record.control) or bool(live and live.cancel_requested)
        else:
            clients, cancel_requested = (live.clients if live else 0), bool(live and live.cancel_requested)
        return {"id": record.session_id, "object": "chat.completion.session", "state": record.state,
                "event_count": record.event_count, "created": record.created, "clients": clients,
                "cancel_requested": cancel_requested}
