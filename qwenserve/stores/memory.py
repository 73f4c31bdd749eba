"""Sessions in this process's memory: a ring buffer per chat session, finished sessions bounded."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace

from .base import CHAT, RESPONSE, TERMINAL, EventsGone, EventStore, SessionRecord, StoredEvent, ttl_for


class MemoryStore(EventStore):
    """A ring buffer of the last `buffer_events` events per chat session (a response keeps them all). Finished sessions are kept up to
    `max_finished` of them and `max_finished_bytes` of event data, the oldest finished evicted first.
    A chat request's body is not kept: nothing reads it back, since nothing in memory survives a restart;
    a response's is (a later `previous_response_id` reads its conversation), and counts in the bytes."""

    def __init__(self, buffer_events: int, max_finished: int = 1024, max_finished_bytes: int = 256 * 1024 * 1024):
        self.buffer_events = buffer_events
        self.max_finished = max_finished
        self.max_finished_bytes = max_finished_bytes
        self._records: dict[str, SessionRecord] = {}
        self._events: dict[str, deque[StoredEvent]] = {}
        self._finished: dict[str, int] = {}  # finished sessions, oldest first -> bytes of their events
        self._finished_bytes = 0

    async def create(self, record: SessionRecord, owner: str = "") -> int:
        self._records[record.session_id] = replace(record, request_json="" if record.kind == CHAT
                                                   else record.request_json)
        # A response keeps all its events: "the response as it stands" is rebuilt from them.
        self._events[record.session_id] = deque(maxlen=None if record.kind == RESPONSE else self.buffer_events)
        return 0

    async def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return replace(record) if record else None

    async def append(self, session_id: str, events: list[StoredEvent], epoch: int = 0) -> str:
        self._events[session_id].extend(events)
        self._records[session_id].event_count += len(events)
        return ""

    async def oldest_index(self, session_id: str) -> int:
        buffer = self._events.get(session_id)
        return buffer[0].index if buffer else 0

    async def read(self, session_id: str, after: int) -> list[StoredEvent]:
        buffer = self._events.get(session_id)
        if not buffer:
            return []
        oldest = buffer[0].index
        if after + 1 < oldest:
            raise EventsGone(oldest)
        return list(buffer)[max(after + 1 - oldest, 0):]

    async def token_ids(self, session_id: str) -> list[int]:
        # Only a restart asks for these, and no memory session outlives one: the kept events suffice.
        return [t for event in self._events.get(session_id, ()) for t in event.token_ids]

    async def set_state(self, session_id: str, state: str, epoch: int = 0) -> list[str]:
        record = self._records[session_id]
        record.state = state
        record.finished_at = time.time() if state in TERMINAL else None
        self._unlist(session_id)
        if state not in TERMINAL:
            return []
        size = sum(len(event.data.encode()) for event in self._events[session_id]) + len(record.request_json)
        self._finished[session_id] = size
        self._finished_bytes += size
        # The session that just finished is spared: its readers are still taking its last events.
        # A limit it breaks alone (0, or fewer bytes than it holds) drops it at the next janitor pass.
        return self._evict(spare=session_id)

    def _evict(self, spare: str | None = None) -> list[str]:
        gone = []
        for sid in list(self._finished):
            if sid == spare or (len(self._finished) <= self.max_finished
                                and self._finished_bytes <= self.max_finished_bytes):
                break
            self._drop(sid)
            gone.append(sid)
        return gone

    def _unlist(self, session_id: str) -> None:
        self._finished_bytes -= self._finished.pop(session_id, 0)

    def _drop(self, session_id: str) -> None:
        self._unlist(session_id)
        del self._records[session_id], self._events[session_id]

    async def delete(self, session_id: str) -> None:
        if session_id in self._records:
            self._drop(session_id)

    async def delete_expired(self, ttl_seconds: float, now: float | None = None,
                             response_ttl_seconds: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        gone = [sid for sid, r in self._records.items()
                if r.finished_at and r.finished_at + ttl_for(r.kind, ttl_seconds, response_ttl_seconds) <= now]
        for sid in gone:
            self._drop(sid)
        return gone + self._evict()

    async def unfinished(self) -> list[SessionRecord]:
        return []  # nothing survives a restart in memory
