"""Readers of a session: SSE text from an index on to the end, live, with pings while quiet.

Two ways to wait for the next events. In one process (memory, SQLite) the producer wakes its readers
(`LiveSession.changed`), and readers are counted here for the auto-cancel. With a shared store the
producer may be another replica: a reader catches up and follows in one loop, `XREAD BLOCK` from the
last id it sent, and registers itself in the store so that the producer counts readers everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from .sse import sse
from .stores import TERMINAL, EventsGone, StoreUnavailable

log = logging.getLogger("qwenserve.sessions")
PING = ": ping\n\n"


class Following:
    """The reading half of `SessionManager` (a mixin: it uses the manager's store, live sessions, pings,
    shutdown event and replicas)."""

    def follow(self, session_id: str, after: int) -> AsyncIterator[str]:
        """SSE text from index after+1 to the end, with pings while waiting. At shutdown it stops between
        two events, so that the client has whole events only and can resume."""
        if self.replicas:
            return self._follow_shared(session_id, after)
        return self._follow_local(session_id, after)

    async def _follow_local(self, session_id: str, after: int) -> AsyncIterator[str]:
        live = self.live.get(session_id)
        if live:
            self._client_joined(live)
        try:
            while not self._readers_end.is_set():
                waiter = live.changed if live else None
                events = await self.store.read(session_id, after)
                for event in events:
                    yield sse(session_id, event)
                    after = event.index
                    if self.is_final(event) or self._readers_end.is_set():
                        return
                record = await self.store.get(session_id)
                if record is None or (record.state in TERMINAL and not events and
                                      (live is None or live.generation is None)):
                    return
                if waiter is None:
                    live = self.live.get(session_id)
                    if live is not None:
                        self._client_joined(live)
                        continue
                if not await self._news(waiter):
                    yield PING
        except EventsGone:
            return  # evicted while this reader lagged behind: close; the client resumes and gets a 410
        finally:
            if live:
                self._client_left(live)

    async def _follow_shared(self, session_id: str, after: int) -> AsyncIterator[str]:
        member, reading = None, None
        shutdown = asyncio.ensure_future(self._readers_end.wait())
        try:
            try:
                member = await self.replicas.reader_joined(session_id)
            except StoreUnavailable as exc:  # not counted anywhere: the stream itself still goes on
                log.warning("reader of %s not registered: %s", session_id, exc)
            while not self._readers_end.is_set():
                reading = asyncio.ensure_future(
                    self.store.read_wait(session_id, after, int(self.ping_seconds * 1000)))
                await asyncio.wait({reading, shutdown}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    return  # shutdown: between two events
                try:
                    got = reading.result()
                except StoreUnavailable:
                    await asyncio.sleep(min(1.0, self.ping_seconds))
                    got = None
                reading = None
                if got is None:  # quiet for a ping interval: still there?
                    if not await self._still_there(session_id):
                        return
                    yield PING
                    continue
                events, ended = got
                for event in events:
                    yield sse(session_id, event)
                    after = event.index
                    if self.is_final(event) or self._readers_end.is_set():
                        return
                if ended:
                    return  # ended without a final event (a cancelled response)
        finally:
            shutdown.cancel()
            if reading is not None:
                reading.cancel()  # a blocked XREAD would hold its connection until the ping interval
            if member is not None:
                self.replicas.reader_left(session_id, member)

    async def _still_there(self, session_id: str) -> bool:
        try:
            return await self.known(session_id) is not None
        except StoreUnavailable:
            return True  # Redis restarting: keep the client, it reads on when Redis is back

    async def _news(self, waiter: asyncio.Event | None) -> bool:
        """Waits for the session to change (or for shutdown); False when ping_seconds passed quietly."""
        try:
            await asyncio.wait_for((waiter or self._readers_end).wait(), timeout=self.ping_seconds)
            return True
        except asyncio.TimeoutError:
            return False

    # ---- auto-cancel in one process (with a shared store, the producer's heartbeat counts readers) ------
    def _client_joined(self, live) -> None:
        live.clients += 1
        if live.cancel_timer:
            live.cancel_timer.cancel()
            live.cancel_timer = None

    def _client_left(self, live) -> None:
        live.clients -= 1
        # Readers ended by a shutdown did not leave: their clients come back after the restart.
        if live.clients == 0 and self.cancel_after_seconds and live.auto_cancel and live.generation is not None \
                and not self._readers_end.is_set():
            self._arm_auto_cancel(live)

    def _arm_auto_cancel(self, live) -> None:
        if live.cancel_timer:
            live.cancel_timer.cancel()
        live.cancel_timer = asyncio.get_running_loop().call_later(
            self.cancel_after_seconds, self._auto_cancel, live)

    def _auto_cancel(self, live) -> None:
        live.cancel_timer = None
        if live.clients == 0:
            log.info("session %s: no client for %ss, cancelling", live.session_id, self.cancel_after_seconds)
            self._request_cancel(live)
