"""Sessions in Redis, shared by every replica that names the same REDIS_URL.

A session is a record hash, an events stream whose entry ids come from our event indices, a lease
(`SET NX PX`, value `<replica>:<epoch>`) held by the one replica that produces it, and a sorted set of
its readers on all replicas. Every write goes through a Lua script (`redis_scripts`), which also sets
the keys' expiry: a running session's keys live `running_ttl` past its last write (appends and lease
renewals extend them), a finished one's `SESSIONS_TTL_SECONDS` (`RESPONSES_TTL_SECONDS`) past its end.
"""

from __future__ import annotations

import functools
import json

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import redis_scripts as lua
from .base import (RESPONSE, EventStore, Fenced, SessionExists, SessionRecord, StoredEvent, StoreUnavailable,
                   ttl_for)

PREFIX = "qwenserve"
RUNNING_INDEX = f"{PREFIX}:running"  # running session ids: what a takeover scan looks at
HANDOVER = f"{PREFIX}:handover"  # a replica that releases leases says so here: the others look at once
READ_BATCH = 1000  # events per XREAD/XRANGE reply: a long catch-up comes in pieces
MIN_TTL_MS = 1000  # a finished session lives at least this long, so its readers get its last events


def keys(session_id: str) -> list[str]:
    """Record, events, lease, readers. The `{id}` hash tag keeps one session's keys in one slot."""
    base = f"{PREFIX}:{{{session_id}}}"
    return [f"{base}:rec", f"{base}:events", f"{base}:lease", f"{base}:readers"]


def entry_id(index: int) -> str:
    return f"{index + 1}-1"


def guarded(method):
    """Redis unreachable (down, restarting, loading its AOF) becomes StoreUnavailable: callers retry."""
    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return wrapper


class RedisStore(EventStore):
    durable = True
    shared = True

    def __init__(self, url: str, ttl_seconds: float, response_ttl_seconds: float, lease_seconds: float):
        # After a Redis restart every pooled connection is dead; a command retried on a fresh one succeeds.
        # (A script retried after it ran is refused by the fence, never applied twice.)
        self.client = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=5,
                                        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 4),
                                        retry_on_error=[RedisConnectionError, RedisTimeoutError])
        self.lease_ms = max(int(lease_seconds * 1000), 1)
        # A running session outlives its last write by its TTL, and by at least a few leases, so that it
        # cannot expire between two heartbeats of its producer.
        floor = 3 * self.lease_ms
        self.ttl_ms = {kind: max(int(ttl_for(kind, ttl_seconds, response_ttl_seconds) * 1000), MIN_TTL_MS)
                       for kind in ("chat", RESPONSE)}
        self.running_ttl_ms = {kind: max(ms, floor) for kind, ms in self.ttl_ms.items()}
        self.index_ttl_ms = max(self.running_ttl_ms.values())
        self._scripts = {name: self.client.register_script(getattr(lua, name))
                         for name in ("CREATE", "APPEND", "FINISH", "TAKE", "PROBE", "JOIN", "LEAVE", "COUNT",
                                      "CONTROL", "RELEASE")}

    async def _run(self, name: str, keys: list[str], args: list) -> object:
        return await self._scripts[name](keys=keys, args=args)

    # ---- the EventStore interface ---------------------------------------------------------------
    @guarded
    async def create(self, record: SessionRecord, owner: str = "") -> int:
        rec, _, lease, _ = keys(record.session_id)
        made = await self._run("CREATE", [rec, lease, RUNNING_INDEX], [
            record.session_id, record.request_hash, record.request_json, record.created, record.kind,
            int(record.background), owner, self.lease_ms, self.running_ttl_ms[record.kind], self.index_ttl_ms])
        if not made:
            raise SessionExists(record.session_id)
        return 1

    @guarded
    async def get(self, session_id: str) -> SessionRecord | None:
        fields = await self.client.hgetall(keys(session_id)[0])
        if not fields:
            return None
        return SessionRecord(session_id, fields["hash"], fields["req"], int(fields["created"]), fields["state"],
                             int(fields["count"]), float(fields["finished"]) if "finished" in fields else None,
                             fields["kind"], fields["bg"] == "1", fields.get("control", ""))

    @guarded
    async def append(self, session_id: str, events: list[StoredEvent], epoch: int = 0) -> str:
        rec, stream, _, _ = keys(session_id)
        args: list = [epoch, events[0].index, self.running_ttl_ms["chat"], self.running_ttl_ms[RESPONSE]]
        for event in events:
            args += [event.data, json.dumps(event.token_ids), event.event or ""]
        result = await self._run("APPEND", [rec, stream], args)
        if result[0] != "ok":
            raise Fenced(f"session {session_id}: append refused ({result[0]})")
        return result[1] or ""

    @guarded
    async def read(self, session_id: str, after: int) -> list[StoredEvent]:
        events, start = [], f"({entry_id(after)}"
        while True:
            entries = await self.client.xrange(keys(session_id)[1], start, "+", count=READ_BATCH)
            events += [e for e in map(_event, entries) if e is not None]
            if len(entries) < READ_BATCH:
                return events
            start = f"({entries[-1][0]}"

    @guarded
    async def read_wait(self, session_id: str, after: int, block_ms: int) -> tuple[list[StoredEvent], bool] | None:
        """Events after `after`, at once when there are some, else as soon as one is written (XREAD
        BLOCK); True with them when the session's end was written. None when `block_ms` passed quietly."""
        reply = await self.client.xread({keys(session_id)[1]: entry_id(after)}, count=READ_BATCH, block=block_ms)
        if not reply:
            return None
        entries = reply[0][1]
        events = [e for e in map(_event, entries) if e is not None]
        return events, len(events) < len(entries)

    async def oldest_index(self, session_id: str) -> int:
        return 0  # every event is kept until the session expires

    @guarded
    async def token_ids(self, session_id: str) -> list[int]:
        return [t for event in await self.read(session_id, -1) for t in event.token_ids]

    @guarded
    async def set_state(self, session_id: str, state: str, epoch: int = 0) -> list[str]:
        done = await self._run("FINISH", [*keys(session_id), RUNNING_INDEX],
                               [epoch, state, self.ttl_ms["chat"], self.ttl_ms[RESPONSE], session_id])
        if done == -1:
            raise Fenced(f"session {session_id}: end refused (stale epoch)")
        return []  # Redis expires what is kept

    async def delete_expired(self, ttl_seconds: float, now: float | None = None,
                             response_ttl_seconds: float | None = None) -> list[str]:
        return []  # every key carries its own expiry

    @guarded
    async def delete(self, session_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(*keys(session_id))
            pipe.zrem(RUNNING_INDEX, session_id)
            await pipe.execute()

    async def unfinished(self) -> list[SessionRecord]:
        return []  # running sessions are taken over by lease (`orphans` + `take`), not at start-up

    async def close(self) -> None:
        await self.client.aclose()

    # ---- several replicas --------------------------------------------------------------------------
    @guarded
    async def control(self, session_id: str, what: str) -> str:
        """CANCEL or DELETE asked by any replica: the session's state ('deleted' when dropped at once)."""
        return await self._run("CONTROL", [*keys(session_id), RUNNING_INDEX], [what, session_id])

    @guarded
    async def probe(self, session_id: str, epoch: int, owner: str) -> tuple[str, str, int, int]:
        """(status, control, readers, idle ms): status 'ok', or 'fenced' / 'gone' when the lease is lost."""
        result = await self._run("PROBE", [*keys(session_id), RUNNING_INDEX],
                                 [epoch, owner, self.lease_ms, self.running_ttl_ms["chat"],
                                  self.running_ttl_ms[RESPONSE], self.index_ttl_ms])
        if result[0] != "ok":
            return result[0], "", 0, -1
        return "ok", result[1] or "", int(result[2]), int(result[3])

    @guarded
    async def orphans(self) -> list[str]:
        """Running sessions whose lease is free: their producer died or handed them over."""
        running = await self.client.zrange(RUNNING_INDEX, 0, -1)
        if not running:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for sid in running:
                pipe.exists(keys(sid)[2])
            held = await pipe.execute()
        return [sid for sid, h in zip(running, held) if not h]

    @guarded
    async def take(self, session_id: str, owner: str) -> int:
        """The new epoch when this replica now holds the session's lease, else 0 (another one won)."""
        return int(await self._run("TAKE", [*keys(session_id), RUNNING_INDEX],
                                   [session_id, owner, self.lease_ms, self.running_ttl_ms["chat"],
                                    self.running_ttl_ms[RESPONSE]]))

    @guarded
    async def release(self, session_id: str, epoch: int, owner: str) -> None:
        await self._run("RELEASE", [keys(session_id)[2], HANDOVER],
                        [f"{owner}:{epoch}", session_id, self.index_ttl_ms])

    @guarded
    async def handovers(self, last_id: str, block_ms: int) -> str:
        """Waits up to `block_ms` for a handover notice after `last_id`; returns the last id seen."""
        reply = await self.client.xread({HANDOVER: last_id}, count=100, block=block_ms)
        return reply[0][1][-1][0] if reply else last_id

    @guarded
    async def readers_joined(self, session_id: str, members: list[str]) -> None:
        """Registers (or keeps alive) readers of this replica; each lives one lease past its last refresh."""
        rec, _, _, readers = keys(session_id)
        await self._run("JOIN", [readers, rec], [self.lease_ms, *members])

    @guarded
    async def reader_left(self, session_id: str, member: str) -> None:
        rec, _, _, readers = keys(session_id)
        await self._run("LEAVE", [readers, rec], [member])

    @guarded
    async def reader_count(self, session_id: str) -> int:
        return int(await self._run("COUNT", [keys(session_id)[3]], []))


def _event(entry: tuple[str, dict]) -> StoredEvent | None:
    """A stream entry as an event; None for the end marker (`<n>-0`)."""
    entry_key, fields = entry
    ms, _, seq = entry_key.partition("-")
    if seq == "0":
        return None
    return StoredEvent(int(ms) - 1, fields["d"], json.loads(fields["t"]), fields.get("e"))
