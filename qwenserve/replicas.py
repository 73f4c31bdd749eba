"""This replica's part in a store that several replicas share (Redis).

Three background duties, one loop each:
- heartbeat: for every session this replica produces, renew its lease (fenced by the epoch), and learn
  what other replicas asked (cancel, delete) and how many readers the session has anywhere (auto-cancel);
  keep this replica's readers registered, so that a replica that dies stops counting after one lease;
- takeover: find running sessions whose lease is free (their producer died, or handed them over at
  shutdown) and continue them here, as many as this replica has room for;
- handover: at shutdown, stop producing and release the leases at once.

The session logic itself stays in `SessionManager`; this module only talks to the store and calls back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import uuid
from typing import Callable

from .stores import RedisStore, StoreUnavailable

log = logging.getLogger("qwenserve.replicas")


class Replicas:
    def __init__(self, store: RedisStore, manager, lease_seconds: float, room: Callable[[], int] | None = None):
        self.store = store
        self.manager = manager  # SessionManager (duck-typed: this module must not import sessions)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # Renewals come three times per lease: one late or lost renewal does not lose the lease.
        self.interval = min(lease_seconds / 3, 1.0)
        self.room = room or (lambda: 1)
        self.readers: dict[str, set[str]] = {}  # session -> this replica's connected reader members
        self._serial = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._chores: set[asyncio.Task] = set()
        self.draining = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._takeover())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._chores, return_exceptions=True)

    # ---- readers -------------------------------------------------------------------------------------
    async def reader_joined(self, session_id: str) -> str:
        member = f"{self.id}:{next(self._serial)}"
        self.readers.setdefault(session_id, set()).add(member)
        await self.store.readers_joined(session_id, [member])
        return member

    def reader_left(self, session_id: str, member: str) -> None:
        """Called from a reader's `finally`, often inside a cancelled request task (the client left):
        the store call runs as a task of its own so that the cancellation cannot stop it."""
        members = self.readers.get(session_id)
        if members is not None:
            members.discard(member)
            if not members:
                del self.readers[session_id]
        self.background(self.store.reader_left(session_id, member))

    def background(self, coroutine) -> None:
        """Runs a store call in a task of its own; its failure is logged."""
        task = asyncio.create_task(_quietly(coroutine))
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # ---- heartbeat -----------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad beat must not end the loop: the leases depend on it
                log.exception("heartbeat failed")

    async def _beat(self) -> None:
        for live in list(self.manager.producing()):
            try:
                status, control, readers, idle_ms = await self.store.probe(live.session_id, live.epoch, self.id)
            except StoreUnavailable as exc:
                log.warning("lease renewal for %s failed: %s", live.session_id, exc)
                continue
            if status != "ok":
                log.warning("session %s: lease lost (%s); stopping its generation here", live.session_id, status)
                self.manager.lost(live)
            else:
                self.manager.observed(live, control, readers, idle_ms)
        for session_id, members in list(self.readers.items()):
            if members:
                self.background(self.store.readers_joined(session_id, list(members)))

    # ---- takeover ------------------------------------------------------------------------------------
    async def _takeover(self) -> None:
        last = "$"
        while not self.draining:
            try:
                last = await self.store.handovers(last, int(self.interval * 1000))
                if last == "$":
                    last = "0-0"  # from now on, notices after the start are not missed between two waits
                if not self.draining:
                    await self._take_orphans()
            except StoreUnavailable as exc:
                log.warning("takeover scan failed: %s", exc)
                await asyncio.sleep(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("takeover scan failed")
                await asyncio.sleep(self.interval)

    async def _take_orphans(self) -> None:
        room = self.room()
        if room <= 0:
            return
        for session_id in await self.store.orphans():
            if room <= 0 or self.draining:
                return
            if self.manager.is_producing(session_id):
                continue  # our own lease lapsed (a stall): the heartbeat renews it, no takeover of ourselves
            epoch = await self.store.take(session_id, self.id)
            if not epoch:
                continue  # another replica won the race, or the session ended meanwhile
            record = await self.store.get(session_id)
            if record is None:
                continue
            room -= 1
            log.info("taking over session %s (epoch %d)", session_id, epoch)
            await self.manager.take_over(record, epoch)

    # ---- handover ------------------------------------------------------------------------------------
    async def release(self, session_id: str, epoch: int) -> None:
        try:
            await self.store.release(session_id, epoch, self.id)
        except StoreUnavailable as exc:  # the lease then expires by itself
            log.warning("could not release the lease of %s: %s", session_id, exc)


async def _quietly(coroutine) -> None:
    try:
        await coroutine
    except StoreUnavailable as exc:
        log.warning("session store unavailable: %s", exc)
