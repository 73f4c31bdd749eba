"""Test helpers: a live server process on a free port, and an SSE reader."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python main.py` in a subprocess, configured only through its environment."""

    def __init__(self, model_dir: str | Path, log_dir: Path, wait_ready: bool = True, cwd: Path | None = None,
                 **env: str):
        self.port = free_port()
        self.cwd = cwd or log_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL_REPO_ID": str(model_dir), "HOST": "127.0.0.1",
                    "PORT": str(self.port), "DEVICE_MAP": "cpu",
                    # Endless test streams run up to 20,000 tokens; the test models' cache is ~1 KB a token.
                    "KV_CACHE_TOKENS": "20480", **{k: str(v) for k, v in env.items()}}
        self.log_path = log_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start(wait_ready)

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.log = open(self.log_path, "a")
        # Run outside the checkout so that a developer's .env never leaks into a test server.
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=self.cwd,
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda h: h["modelReady"] if wait_ready else True)
        return self

    def wait(self, condition, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                health = httpx.get(self.url + "/health", timeout=2).json()
                if condition(health):
                    return health
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def chat_body(content: str = "hi", **extra) -> dict:
    return {"model": "any", "messages": [{"role": "user", "content": content}], **extra}


class SSE:
    """A parsed event stream: (id, data) pairs in order, plus comment lines."""

    def __init__(self):
        self.events: list[tuple[str | None, str]] = []
        self.comments: list[str] = []

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.events]

    @property
    def indices(self) -> list[int]:
        return [int(i.rsplit(":", 1)[1]) for i in self.ids]

    def chunks(self) -> list[dict]:
        return [json.loads(d) for _, d in self.events if d != "[DONE]"]

    def text(self, field: str = "content") -> str:
        return "".join(c["choices"][0]["delta"].get(field) or "" for c in self.chunks() if c.get("choices"))


def read_sse(source, max_events: int | None = None) -> SSE:
    """Reads a response (or an iterator of its lines, to read on later) until [DONE] or max_events."""
    sse = SSE()
    event_id, data = None, []
    lines = source.iter_lines() if isinstance(source, httpx.Response) else source
    for line in lines:
        if line.startswith(":"):
            sse.comments.append(line)
        elif line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            sse.events.append((event_id, "\n".join(data)))
            event_id, data = None, []
            if sse.events[-1][1] == "[DONE]" or (max_events and len(sse.events) >= max_events):
                break
    return sse


def stream(url: str, body: dict, headers: dict | None = None, params: dict | None = None,
           max_events: int | None = None, timeout: float = 60) -> tuple[httpx.Response, SSE]:
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers or {}, params=params,
                      timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            return response, SSE()
        return response, read_sse(response, max_events)


class InProcessServer:
    """uvicorn serving an app object in a thread, for tests that reach into the engine."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).json()["modelReady"]:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("in-process server not ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class RunningStream:
    """A greedy stream read in a thread, recording each chunk and when it arrives (for pacing tests);
    `start` returns once `ready_after` chunks came, `stop` cancels the session and joins the reader."""

    def __init__(self, url: str, session_id: str, max_tokens: int, ready_after: int, content: str = "hi"):
        self.url, self.session_id, self.max_tokens, self.ready_after = url, session_id, max_tokens, ready_after
        self.content = content
        self.arrivals: list[float] = []
        self.data: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read)

    def _read(self) -> None:
        body = chat_body(self.content, session_id=self.session_id, stream=True, max_tokens=self.max_tokens,
                         temperature=0)
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.arrivals.append(time.monotonic())
                    self.data.append(line[5:].strip())
                    if len(self.arrivals) == self.ready_after:
                        self._ready.set()

    def start(self) -> bool:
        self._reader.start()
        return self._ready.wait(60)

    def stop(self) -> None:
        httpx.post(f"{self.url}/v1/cancel/{self.session_id}")
        self._reader.join(60)

    def text(self) -> str:
        """The reply's text read so far, reasoning and content (all of it after `stop`)."""
        chunks = [json.loads(data) for data in self.data if data != "[DONE]"]
        deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
        return "".join((d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas)
