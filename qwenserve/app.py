"""App factory: wiring, lifespan, the error envelope, auth and the body-size limit."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .completions import ChatStream, prepare
from .config import Settings, get_settings
from .engine import Engine
from .media import MediaLoader
from .metrics import Metrics
from .protocol import APIError, ChatCompletionRequest, error_body, validation_to_api_error
from .routes import router
from .sessions import SessionManager
from .stores import MemoryStore, SessionRecord, SQLiteStore

log = logging.getLogger("qwenserve")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class Services:
    """Everything the handlers need, in one place: `request.app.state.services`."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics(engine)
        self.media = MediaLoader(settings)
        store = SQLiteStore(settings.sessions_db_path) if settings.persist_sessions \
            else MemoryStore(settings.sessions_buffer_events)
        self.sessions = SessionManager(store, self.continue_session, settings.sessions_ttl_seconds,
                                       settings.cancel_after_disconnect_seconds, settings.sse_ping_seconds,
                                       self.metrics)

    async def prepare(self, request: ChatCompletionRequest):
        loader = self.media.load if self.engine.is_multimodal else None
        return await prepare(self.engine, self.settings, request, loader)

    async def continue_session(self, request: ChatCompletionRequest, record: SessionRecord, resume_ids: list[int]):
        """Restart a persisted session's generation after a restart, from the tokens it had produced."""
        while not self.engine.ready.is_set() and not self.engine.error:
            await asyncio.sleep(0.1)
        prompt, params = await self.prepare(request)
        generation = self.engine.submit(prompt, params, resume_ids)
        return generation, ChatStream(record.session_id, record.created, self.settings.model_id, prompt.text,
                                      request.include_usage)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services: Services = app.state.services
        if settings.load_model_on_startup:
            engine.start()
        services.sessions.start()
        yield
        await services.sessions.stop()
        engine.stop()

    app = FastAPI(title="qwenserve", lifespan=lifespan)
    app.state.services = Services(settings, engine)
    app.include_router(router)
    _install_error_handlers(app)
    _install_guards(app, settings)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error_response(validation_to_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def _install_guards(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(Guards, api_key=settings.api_key, body_limit=settings.max_request_bytes)


class Guards:
    """API key on /v1/*, and a 413 for bodies over the limit, counted as they arrive
    (Content-Length is not trusted). Plain ASGI, so errors never get wrapped."""

    def __init__(self, app, api_key: str | None, body_limit: int):
        self.app = app
        self.api_key = api_key
        self.body_limit = body_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        if self.api_key and scope["path"].startswith("/v1"):
            if headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}":
                error = APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                 "authentication_error", code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        too_large = APIError(413, f"request body is larger than {self.body_limit} bytes (MAX_REQUEST_BYTES)",
                             code="request_too_large")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.body_limit:
            return await error_response(too_large)(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.body_limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await error_response(too_large)(scope, receive, send)


class BodyTooLarge(Exception):
    pass
