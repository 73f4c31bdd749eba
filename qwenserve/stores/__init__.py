"""Where session events live: one interface (`base`), and a store per place: this process's memory,
one SQLite file, or a Redis that several replicas share."""

from .base import (CANCEL, CANCELLED, CHAT, DELETE, FAILED, FINISHED, RESPONSE, RUNNING, TERMINAL, EventsGone,
                   EventStore, Fenced, SessionExists, SessionRecord, StoredEvent, StoreUnavailable)
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = ["CANCEL", "CANCELLED", "CHAT", "DELETE", "FAILED", "FINISHED", "RESPONSE", "RUNNING", "TERMINAL",
           "EventsGone", "EventStore", "Fenced", "MemoryStore", "RedisStore", "SQLiteStore", "SessionExists",
           "SessionRecord", "StoreUnavailable", "StoredEvent"]
