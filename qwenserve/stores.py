"""Where session events live: one interface, a memory ring buffer and a SQLite store.

A store's `append` returns only once the events are durable (for SQLite: committed), and
readers are told about new events only after that, so a client never sees an event a crash
could lose. Another backend (Redis) implements `EventStore` and nothing else changes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, replace

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"
TERMINAL = (FINISHED, CANCELLED, FAILED)
CHAT, RESPONSE = "chat", "response"


@dataclass
class StoredEvent:
    index: int
    data: str
    token_ids: list[int] = field(default_factory=list)
    event: str | None = None  # the SSE `event:` name (Responses streams); None for chat chunks


@dataclass
class SessionRecord:
    session_id: str
    request_hash: str
    request_json: str
    created: int
    state: str = RUNNING
    event_count: int = 0
    finished_at: float | None = None
    kind: str = CHAT  # CHAT or RESPONSE: which protocol shapes its events, which TTL applies
    background: bool = False  # a background response: never auto-cancelled for want of readers


class EventsGone(Exception):
    """The events asked for were evicted; `oldest` is the first index still kept."""

    def __init__(self, oldest: int):
        super().__init__(oldest)
        self.oldest = oldest


class EventStore(ABC):
    durable = False

    @abstractmethod
    def create(self, record: SessionRecord) -> None: ...

    @abstractmethod
    def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    def append(self, session_id: str, events: list[StoredEvent]) -> None: ...

    @abstractmethod
    def read(self, session_id: str, after: int) -> list[StoredEvent]: ...

    @abstractmethod
    def oldest_index(self, session_id: str) -> int:
        """The first event index still kept (0 when nothing was evicted)."""

    @abstractmethod
    def token_ids(self, session_id: str) -> list[int]: ...

    @abstractmethod
    def set_state(self, session_id: str, state: str) -> list[str]:
        """Returns the sessions the store dropped to stay within its limits (now unknown)."""

    @abstractmethod
    def delete_expired(self, ttl_seconds: float, now: float | None = None,
                       response_ttl_seconds: float | None = None) -> list[str]:
        """Drops finished sessions past the TTL (responses past `response_ttl_seconds` when given, and any
        a limit no longer allows); returns their ids."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Drops one session and its events (DELETE /v1/responses/{id})."""

    @abstractmethod
    def unfinished(self) -> list[SessionRecord]: ...

    def close(self) -> None:
        pass


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

    def create(self, record: SessionRecord) -> None:
        self._records[record.session_id] = replace(record, request_json="" if record.kind == CHAT
                                                   else record.request_json)
        # A response keeps all its events: "the response as it stands" is rebuilt from them.
        self._events[record.session_id] = deque(maxlen=None if record.kind == RESPONSE else self.buffer_events)

    def get(self, session_id: str) -> SessionRecord | None:
        record = self._records.get(session_id)
        return replace(record) if record else None

    def append(self, session_id: str, events: list[StoredEvent]) -> None:
        self._events[session_id].extend(events)
        self._records[session_id].event_count += len(events)

    def oldest_index(self, session_id: str) -> int:
        buffer = self._events.get(session_id)
        return buffer[0].index if buffer else 0

    def read(self, session_id: str, after: int) -> list[StoredEvent]:
        buffer = self._events.get(session_id)
        if not buffer:
            return []
        oldest = buffer[0].index
        if after + 1 < oldest:
            raise EventsGone(oldest)
        return list(buffer)[max(after + 1 - oldest, 0):]

    def token_ids(self, session_id: str) -> list[int]:
        # Only a restart asks for these, and no memory session outlives one: the kept events suffice.
        return [t for event in self._events.get(session_id, ()) for t in event.token_ids]

    def set_state(self, session_id: str, state: str) -> list[str]:
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

    def delete(self, session_id: str) -> None:
        if session_id in self._records:
            self._drop(session_id)

    def delete_expired(self, ttl_seconds: float, now: float | None = None,
                       response_ttl_seconds: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        gone = [sid for sid, r in self._records.items()
                if r.finished_at and r.finished_at + _ttl(r.kind, ttl_seconds, response_ttl_seconds) <= now]
        for sid in gone:
            self._drop(sid)
        return gone + self._evict()

    def unfinished(self) -> list[SessionRecord]:
        return []  # nothing survives a restart in memory


def _ttl(kind: str, ttl_seconds: float, response_ttl_seconds: float | None) -> float:
    return response_ttl_seconds if kind == RESPONSE and response_ttl_seconds is not None else ttl_seconds


SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, request_hash TEXT NOT NULL, request_json TEXT NOT NULL,
    created INTEGER NOT NULL, state TEXT NOT NULL, event_count INTEGER NOT NULL DEFAULT 0,
    finished_at REAL);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL, idx INTEGER NOT NULL, data TEXT NOT NULL, token_ids TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sessions_finished ON sessions (finished_at);
CREATE TABLE IF NOT EXISTS session_kinds (
    session_id TEXT PRIMARY KEY, kind TEXT NOT NULL, background INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_names (
    session_id TEXT NOT NULL, idx INTEGER NOT NULL, event TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
"""
# Responses came after the first schema: what only they have (a kind, a background flag, SSE event names)
# lives in tables of its own, so the first tables keep their columns and older databases open unchanged.
SESSION_SELECT = ("SELECT s.session_id, s.request_hash, s.request_json, s.created, s.state, s.event_count, "
                  "s.finished_at, k.kind, k.background FROM sessions s "
                  "LEFT JOIN session_kinds k ON k.session_id = s.session_id")
TABLES = ("events", "event_names", "session_kinds", "sessions")


class SQLiteStore(EventStore):
    """One connection, used only from the event loop thread: the single writer."""

    durable = True

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)

    def create(self, record: SessionRecord) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)",
                              (record.session_id, record.request_hash, record.request_json, record.created,
                               record.state, record.event_count, record.finished_at))
            if record.kind != CHAT:
                self.conn.execute("INSERT INTO session_kinds VALUES (?,?,?)",
                                  (record.session_id, record.kind, int(record.background)))

    def get(self, session_id: str) -> SessionRecord | None:
        row = self.conn.execute(f"{SESSION_SELECT} WHERE s.session_id=?", (session_id,)).fetchone()
        return _record(row) if row else None

    def append(self, session_id: str, events: list[StoredEvent]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO events VALUES (?,?,?,?)",
                                  [(session_id, e.index, e.data, json.dumps(e.token_ids)) for e in events])
            self.conn.executemany("INSERT INTO event_names VALUES (?,?,?)",
                                  [(session_id, e.index, e.event) for e in events if e.event])
            self.conn.execute("UPDATE sessions SET event_count=event_count+? WHERE session_id=?",
                              (len(events), session_id))

    def read(self, session_id: str, after: int) -> list[StoredEvent]:
        rows = self.conn.execute(
            "SELECT e.idx, e.data, e.token_ids, n.event FROM events e LEFT JOIN event_names n "
            "ON n.session_id = e.session_id AND n.idx = e.idx WHERE e.session_id=? AND e.idx>? ORDER BY e.idx",
            (session_id, after)).fetchall()
        return [StoredEvent(i, d, json.loads(t), e) for i, d, t, e in rows]

    def oldest_index(self, session_id: str) -> int:
        return 0  # every event is kept until the session expires

    def token_ids(self, session_id: str) -> list[int]:
        rows = self.conn.execute("SELECT token_ids FROM events WHERE session_id=? ORDER BY idx", (session_id,))
        return [t for (ids,) in rows for t in json.loads(ids)]

    def set_state(self, session_id: str, state: str) -> list[str]:
        finished_at = time.time() if state in TERMINAL else None
        self.conn.execute("UPDATE sessions SET state=?, finished_at=? WHERE session_id=?",
                          (state, finished_at, session_id))
        return []  # on disk: only the TTL limits what is kept

    def delete(self, session_id: str) -> None:
        self._delete([session_id])

    def _delete(self, session_ids: list[str]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for table in TABLES:
                self.conn.executemany(f"DELETE FROM {table} WHERE session_id=?", [(s,) for s in session_ids])

    def delete_expired(self, ttl_seconds: float, now: float | None = None,
                       response_ttl_seconds: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        response_ttl = _ttl(RESPONSE, ttl_seconds, response_ttl_seconds)
        gone = [sid for (sid,) in self.conn.execute(
            "SELECT s.session_id FROM sessions s LEFT JOIN session_kinds k ON k.session_id = s.session_id "
            "WHERE s.finished_at IS NOT NULL AND s.finished_at <= (CASE WHEN k.kind=? THEN ? ELSE ? END)",
            (RESPONSE, now - response_ttl, now - ttl_seconds))]
        self._delete(gone)
        return gone

    def unfinished(self) -> list[SessionRecord]:
        rows = self.conn.execute(f"{SESSION_SELECT} WHERE s.state=?", (RUNNING,)).fetchall()
        return [_record(row) for row in rows]

    def close(self) -> None:
        self.conn.close()


def _record(row: tuple) -> SessionRecord:
    """A joined row: sessions without a `session_kinds` row are chat sessions."""
    *fields, kind, background = row
    return SessionRecord(*fields, kind=kind or CHAT, background=bool(background))
