"""What every session store holds and answers: records, events, and the interface above them.

A store's `append` returns only once the events are durable (SQLite: committed; Redis: written by the
server, to disk as its AOF policy says), and readers are told about new events only after that, so a
client never sees an event a crash could lose. The interface is async because one backend (Redis) is
across the network; the in-process ones answer at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"
TERMINAL = (FINISHED, CANCELLED, FAILED)
CHAT, RESPONSE = "chat", "response"
# What another process asked of a running session (shared stores only): stop it, or stop and drop it.
CANCEL, DELETE = "cancel", "delete"


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
    control: str = ""  # shared stores: CANCEL or DELETE once any replica asked for it


class EventsGone(Exception):
    """The events asked for were evicted; `oldest` is the first index still kept."""

    def __init__(self, oldest: int):
        super().__init__(oldest)
        self.oldest = oldest


class SessionExists(Exception):
    """`create` for an id another process created first (shared stores: two replicas raced for it)."""


class Fenced(Exception):
    """A write refused because this process no longer owns the session: another replica took it over
    (a newer lease epoch), the index is not the next one, or the session is gone."""


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis down or restarting); the operation may be retried."""


class EventStore(ABC):
    durable = False  # sessions outlive the process
    shared = False  # several processes use it at once (leases, cross-process cancel and readers)

    @abstractmethod
    async def create(self, record: SessionRecord, owner: str = "") -> int:
        """Stores a new session; returns the fencing epoch of its producer (0 where there is no lease)."""

    @abstractmethod
    async def get(self, session_id: str) -> SessionRecord | None: ...

    @abstractmethod
    async def append(self, session_id: str, events: list[StoredEvent], epoch: int = 0) -> str:
        """Stores events with the next indices; returns what another process asked of the session
        ("", CANCEL or DELETE). A shared store refuses (`Fenced`) a stale epoch or an unexpected index."""

    @abstractmethod
    async def read(self, session_id: str, after: int) -> list[StoredEvent]: ...

    @abstractmethod
    async def oldest_index(self, session_id: str) -> int:
        """The first event index still kept (0 when nothing was evicted)."""

    @abstractmethod
    async def token_ids(self, session_id: str) -> list[int]: ...

    @abstractmethod
    async def set_state(self, session_id: str, state: str, epoch: int = 0) -> list[str]:
        """Returns the sessions the store dropped to stay within its limits (now unknown)."""

    @abstractmethod
    async def delete_expired(self, ttl_seconds: float, now: float | None = None,
                             response_ttl_seconds: float | None = None) -> list[str]:
        """Drops finished sessions past the TTL (responses past `response_ttl_seconds` when given, and any
        a limit no longer allows); returns their ids."""

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Drops one session and its events (DELETE /v1/responses/{id})."""

    @abstractmethod
    async def unfinished(self) -> list[SessionRecord]: ...

    async def close(self) -> None:
        pass


def ttl_for(kind: str, ttl_seconds: float, response_ttl_seconds: float | None) -> float:
    return response_ttl_seconds if kind == RESPONSE and response_ttl_seconds is not None else ttl_seconds
