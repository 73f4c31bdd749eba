"""Starting this server (`python main.py`) with a given environment, and an asyncio client for it."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .plan import RESULTS, ROOT, START_TIMEOUT

PROMPT = "Benchmark prompt: tell me a long story."


class Unavailable(Exception):
    """A measure that cannot run here (a server that fails to start, an error answer): reported, not fatal."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


@dataclass
class Server:
    label: str
    url: str
    proc: subprocess.Popen
    log: Path
    settings: dict            # what the bench set (the rest comes from the environment or defaults)
    health: dict = field(default_factory=dict)
    load_seconds: float = 0.0

    def peak_rss_mib(self) -> float:
        return rss_kib(self.proc.pid, "VmHWM") / 1024


def _log_tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


@contextmanager
def serving(label: str, model: Path, **settings: str):
    """Runs this server on `model` with `settings` (env names) until the block ends; Unavailable if it
    does not become ready. Sessions are in memory and quantization off unless `settings` say otherwise."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"DEVICE_MAP": "cpu", "MAX_CONCURRENT_REQUESTS": "16", "MAX_QUEUED_REQUESTS": "64",
                "SESSIONS_STORE": "memory", "PERSIST_SESSIONS": "0", "QUANTIZATION": "none", **settings}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL_REPO_ID": str(model), "SERVED_MODEL_NAME": "bench",
           "PORT": str(port), "HOST": "127.0.0.1", **settings}
    log = RESULTS / f"server-{label}.log"
    with open(log, "w") as out:
        # cwd outside the checkout: a developer's .env never leaks in
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env=env, cwd=RESULTS, stdout=out,
                                stderr=subprocess.STDOUT)
    server = Server(label, url, proc, log, settings)
    try:
        start = time.monotonic()
        server.health = wait_ready(url, proc, log, START_TIMEOUT)
        server.load_seconds = time.monotonic() - start
        shown = {k: v for k, v in settings.items() if k not in ("DEVICE_MAP", "MAX_QUEUED_REQUESTS")}
        print(f"  server {label} ready in {server.load_seconds:.0f}s; settings {shown}", flush=True)
        print(f"  /health {json.dumps(server.health)}", flush=True)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float, ours: bool = True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"server exited during start-up: {_log_tail(log)}")
        try:
            response = httpx.get(url + "/health", timeout=5)
            if response.status_code == 200 and not ours:
                return {}
            body = response.json()
            if body.get("error"):
                raise Unavailable(f"model failed to load: {str(body['error'])[:200]}")
            if response.status_code == 200 and body.get("modelReady"):
                return body
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise Unavailable(f"not ready after {timeout:.0f}s")


# ---- client -------------------------------------------------------------------------------------

@dataclass
class StreamRun:
    start: float
    times: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    end: float = 0.0
    completion_tokens: int = 0                         # from usage; 0 when the server sent none
    prompt_tokens: int = 0
    events: int = 0                                    # SSE data events, [DONE] included

    @property
    def tokens(self) -> int:
        return self.completion_tokens or len(self.times)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.start if self.times else float("nan")

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each inter-token gap."""
        return list(zip(self.times[:-1], self.times[1:]))


def chat_body(max_tokens: int, prompt: str = PROMPT, stream: bool = True, **extra) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30),
                             limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))


async def stream(http: httpx.AsyncClient, url: str, body: dict, run: StreamRun | None = None) -> StreamRun:
    """One streamed chat completion; `run` (optional) is filled as chunks arrive, for callers that watch."""
    run = run or StreamRun(time.perf_counter())
    run.start = time.perf_counter()
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise Unavailable(f"HTTP {response.status_code}: {_error_message(text)}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            run.events += 1
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise Unavailable(f"stream error: {_error_message(data)}")
            if chunk.get("usage"):
                run.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                run.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    run.times.append(now)
    run.end = time.perf_counter()
    return run


async def complete(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    response = await http.post(url + "/v1/chat/completions", json={**body, "stream": False})
    if response.status_code != 200:
        raise Unavailable(f"HTTP {response.status_code}: {_error_message(response.text)}")
    return response.json()


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def concurrent(url: str, count: int, body: dict) -> tuple[float, list[StreamRun]]:
    """`count` streams started together: (aggregate tokens/s from the first send to the last token, runs)."""
    async with client() as http:
        runs = await asyncio.gather(*(stream(http, url, body) for _ in range(count)))
    begin, end = min(r.start for r in runs), max(r.end for r in runs)
    return sum(r.tokens for r in runs) / (end - begin), runs


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]
