"""Opening a stream: the session a request reads, found or made.

An existing session is resumed (`Last-Event-ID`) or replayed (the same body again); a new one is
claimed in this process first, so that identical requests arriving together share one generation, and
then created in the store, which refuses an id another replica made meanwhile (the same body then reads
that session; a different one is 409).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .completions import ChatStream
from .engine import Generation
from .protocol import APIError, ChatCompletionRequest
from .sse import new_session_id, parse_last_event_id, request_fingerprint
from .stores import CHAT, SessionExists, SessionRecord

# Prepares and submits a new stream's request under the given session id.
Start = Callable[[str], Awaitable[tuple[Generation, ChatStream]]]


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


def shutting_down() -> APIError:
    return APIError(503, "this server is shutting down and takes no new generations; retry (another replica, or "
                         "after the restart)", "service_unavailable", code="shutting_down",
                    headers={"Retry-After": "1"})


class Opening:
    """The opening half of `SessionManager` (a mixin: it uses the manager's store, claims, lookups,
    metrics and `_launch`)."""

    async def open_stream(self, request: ChatCompletionRequest, body: dict, last_event_id: str | None,
                          start: Start, stored: dict | None = None) -> tuple[str, int]:
        """The session a stream request reads and the last index its client saw: an existing one (resume,
        or the same body again), or a new one whose request `start` prepares and submits. Identical
        requests for a new id that arrive together share one generation. `stored` is the body kept with a
        new session (the client's, plus a server-picked seed); the fingerprint is the client's body's."""
        session_id, after = self._target(request, last_event_id)
        fingerprint = request_fingerprint(body)
        stored = body if stored is None else stored
        if session_id is None:
            return await self._start_session(new_session_id(), stored, fingerprint, start)
        claim = await self._claim(session_id, fingerprint)
        error = None
        try:
            record = await self._known(session_id) if last_event_id is not None else \
                await self.store.get(session_id)
            if record is None:
                try:
                    return await self._start_session(session_id, stored, fingerprint, start)
                except APIError as exc:
                    error = exc
                    raise
            if record.request_hash != fingerprint:
                raise conflict(session_id)
            await self.check_index(record, after)
        finally:
            self._unclaim(session_id, claim, error)
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

    async def _claim(self, session_id: str, fingerprint: str) -> Claim:
        """Holds the id while this request looks it up and, if it is new, prepares it. Waits while another
        request holds it; a different body is a conflict at once. If that request's preparation failed with
        an error the client sees (400, 429, 503...), the waiters get the same error; if it ended otherwise
        (an existing session, its task cancelled), the waiters try again themselves."""
        while (claim := self._claims.get(session_id)) is not None:
            if claim.fingerprint != fingerprint:
                raise conflict(session_id)
            await claim.settled.wait()
            if claim.error is not None:
                e = claim.error
                raise APIError(e.status, e.message, e.type, e.param, e.code, dict(e.headers))
        # No await since the loop's last check: no other request can slip in between.
        claim = self._claims[session_id] = Claim(fingerprint)
        return claim

    def _unclaim(self, session_id: str, claim: Claim, error: APIError | None) -> None:
        claim.error = error
        if self._claims.get(session_id) is claim:
            del self._claims[session_id]
        claim.settled.set()

    async def _start_session(self, session_id: str, body: dict, fingerprint: str, start: Start) -> tuple[str, int]:
        if not self.admitting:
            raise shutting_down()
        generation, stream = await start(session_id)
        try:
            await self._record(session_id, body, fingerprint, generation, stream)
        except SessionExists:
            # Another replica made this id while we prepared it: the same body reads that stream.
            record = await self.store.get(session_id)
            if record is None or record.request_hash != fingerprint:
                raise conflict(session_id)
        return session_id, -1

    async def create(self, session_id: str, request_json: str, start: Start, kind: str,
                     background: bool = False) -> None:
        """A new session under a server-made id (responses): no claim is needed, nobody else knows the id."""
        if not self.admitting:
            raise shutting_down()
        generation, stream = await start(session_id)
        fingerprint = hashlib.sha256(request_json.encode()).hexdigest()
        await self._record(session_id, request_json, fingerprint, generation, stream, kind, background)

    async def _record(self, session_id: str, body: dict | str, fingerprint: str, generation: Generation,
                      stream: ChatStream, kind: str = CHAT, background: bool = False) -> None:
        """Store a new session and run its generation (already submitted)."""
        request_json = body if isinstance(body, str) else json.dumps(body)
        record = SessionRecord(session_id, fingerprint, request_json, stream.created, kind=kind,
                               background=background)
        try:
            epoch = await self.store.create(record, self.owner)
        except BaseException:
            generation.cancel()
            raise
        self._launch(record, self._started(generation, stream), epoch)

    @staticmethod
    async def _started(generation: Generation, stream: ChatStream) -> tuple[Generation, ChatStream]:
        return generation, stream
