"""Sessions in one SQLite file: they survive a crash of the one process that uses it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

from .base import CHAT, RESPONSE, RUNNING, TERMINAL, EventStore, SessionExists, SessionRecord, StoredEvent, ttl_for

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


# What one `append` writes: its `events` rows, its `event_names` rows, its `sessions` count update.
Rows = tuple[list[tuple], list[tuple], tuple[int, str]]


class SQLiteStore(EventStore):
    """One connection, used only from the event loop thread: the single writer. Each call is a few
    milliseconds at most (WAL, no fsync per commit), so it runs inline rather than on a thread.

    Appends are committed in groups: a commit costs the loop far more than its rows, and one engine step
    wakes every stream's producer in the same loop iteration. The first append queued schedules one flush
    for the next iteration, so that step's appends of all sessions share one transaction; each append
    still returns only once its own rows are committed."""

    durable = True

    def __init__(self, path: str):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.executescript(SCHEMA)
        self._queued: list[tuple[Rows, asyncio.Future]] = []

    async def create(self, record: SessionRecord, owner: str = "") -> int:
        try:
            with self.conn:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)",
                                  (record.session_id, record.request_hash, record.request_json, record.created,
                                   record.state, record.event_count, record.finished_at))
                if record.kind != CHAT:
                    self.conn.execute("INSERT INTO session_kinds VALUES (?,?,?)",
                                      (record.session_id, record.kind, int(record.background)))
        except sqlite3.IntegrityError as exc:
            raise SessionExists(record.session_id) from exc
        return 0

    async def get(self, session_id: str) -> SessionRecord | None:
        row = self.conn.execute(f"{SESSION_SELECT} WHERE s.session_id=?", (session_id,)).fetchone()
        return _record(row) if row else None

    async def append(self, session_id: str, events: list[StoredEvent], epoch: int = 0) -> str:
        rows = ([(session_id, e.index, e.data, json.dumps(e.token_ids)) for e in events],
                [(session_id, e.index, e.event) for e in events if e.event], (len(events), session_id))
        loop = asyncio.get_running_loop()
        if not self._queued:
            loop.call_soon(self._flush)
        committed = loop.create_future()
        self._queued.append((rows, committed))
        await committed
        return ""

    def _flush(self) -> None:
        """Commits every queued append in one transaction, in the order they came. If it fails, each is
        tried again alone, so that a bad append (an index stored already) fails its own caller only."""
        batch, self._queued = self._queued, []
        if not batch:
            return  # close() flushed already
        try:
            self._write([rows for rows, _ in batch])
            errors = [None] * len(batch)
        except Exception:  # noqa: BLE001 - every error reaches a caller below; none may leave a caller waiting
            errors = [self._write_alone(rows) for rows, _ in batch]
        for (_, committed), error in zip(batch, errors):
            if committed.done():
                continue  # its caller was cancelled: the rows are written all the same, as queued
            if error is None:
                committed.set_result(None)
            else:
                committed.set_exception(error)

    def _write_alone(self, rows: Rows) -> Exception | None:
        try:
            self._write([rows])
        except Exception as exc:  # noqa: BLE001 - handed to the append's caller
            return exc
        return None

    def _write(self, appends: list[Rows]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany("INSERT INTO events VALUES (?,?,?,?)", [r for a in appends for r in a[0]])
            self.conn.executemany("INSERT INTO event_names VALUES (?,?,?)", [r for a in appends for r in a[1]])
            self.conn.executemany("UPDATE sessions SET event_count=event_count+? WHERE session_id=?",
                                  [a[2] for a in appends])

    async def read(self, session_id: str, after: int) -> list[StoredEvent]:
        rows = self.conn.execute(
            "SELECT e.idx, e.data, e.token_ids, n.event FROM events e LEFT JOIN event_names n "
            "ON n.session_id = e.session_id AND n.idx = e.idx WHERE e.session_id=? AND e.idx>? ORDER BY e.idx",
            (session_id, after)).fetchall()
        return [StoredEvent(i, d, json.loads(t), e) for i, d, t, e in rows]

    async def oldest_index(self, session_id: str) -> int:
        return 0  # every event is kept until the session expires

    async def token_ids(self, session_id: str) -> list[int]:
        rows = self.conn.execute("SELECT token_ids FROM events WHERE session_id=? ORDER BY idx", (session_id,))
        return [t for (ids,) in rows for t in json.loads(ids)]

    async def set_state(self, session_id: str, state: str, epoch: int = 0) -> list[str]:
        finished_at = time.time() if state in TERMINAL else None
        self.conn.execute("UPDATE sessions SET state=?, finished_at=? WHERE session_id=?",
                          (state, finished_at, session_id))
        return []  # on disk: only the TTL limits what is kept

    async def delete(self, session_id: str) -> None:
        self._delete([session_id])

    def _delete(self, session_ids: list[str]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            for table in TABLES:
                self.conn.executemany(f"DELETE FROM {table} WHERE session_id=?", [(s,) for s in session_ids])

    async def delete_expired(self, ttl_seconds: float, now: float | None = None,
                             response_ttl_seconds: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        response_ttl = ttl_for(RESPONSE, ttl_seconds, response_ttl_seconds)
        gone = [sid for (sid,) in self.conn.execute(
            "SELECT s.session_id FROM sessions s LEFT JOIN session_kinds k ON k.session_id = s.session_id "
            "WHERE s.finished_at IS NOT NULL AND s.finished_at <= (CASE WHEN k.kind=? THEN ? ELSE ? END)",
            (RESPONSE, now - response_ttl, now - ttl_seconds))]
        self._delete(gone)
        return gone

    async def unfinished(self) -> list[SessionRecord]:
        rows = self.conn.execute(f"{SESSION_SELECT} WHERE s.state=?", (RUNNING,)).fetchall()
        return [_record(row) for row in rows]

    async def close(self) -> None:
        self._flush()  # appends still queued were promised a commit
        self.conn.close()


def _record(row: tuple) -> SessionRecord:
    """A joined row: sessions without a `session_kinds` row are chat sessions."""
    *fields, kind, background = row
    return SessionRecord(*fields, kind=kind or CHAT, background=bool(background))
