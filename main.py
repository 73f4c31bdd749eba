"""Entry point: `python main.py` serves on HOST:PORT; `uvicorn main:app` works too
(there, pass `--timeout-graceful-shutdown` to bound a shutdown, and streams are cut when it runs out)."""

import logging
import sys

import uvicorn

from qwenserve.app import create_app
from qwenserve.config import get_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_app()


class Server(uvicorn.Server):
    """uvicorn alone waits for streams to end on SIGTERM (an endless one never does), or cancels them
    mid-write when a timeout runs out. Told of the signal, the sessions end their readers at an event
    boundary within SHUTDOWN_GRACE_SECONDS, and clients resume with Last-Event-ID."""

    def __init__(self, config: uvicorn.Config, grace_seconds: float):
        super().__init__(config)
        self.grace_seconds = grace_seconds

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        app.state.services.sessions.begin_shutdown(self.grace_seconds)


def serve() -> None:
    settings = get_settings()
    grace = settings.shutdown_grace_seconds
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=grace)
    server = Server(config, grace)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the app did not start


if __name__ == "__main__":
    serve()
