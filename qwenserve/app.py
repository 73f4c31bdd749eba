"""App factory: wiring, lifespan, the error envelope, auth and the body-size limit."""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_stream import choice_progress
from .completions import open_stream, prepare
from .config import Settings, get_settings
from .engine import Engine
from .media import MediaLoader
from .metrics import Metrics
from .opening import shutting_down
from .protocol import (APIError, ChatCompletionRequest, chat_request_from, error_body, parse_json_object,
                       validation_to_api_error)
from .response_routes import Responses
from .response_routes import router as responses_router
from .routes import router
from .sessions import SessionManager
from .stores import RESPONSE, EventStore, MemoryStore, RedisStore, SessionRecord, SQLiteStore, StoreUnavailable

log = logging.getLogger("qwenserve")


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def open_store(settings: Settings) -> EventStore:
    """SESSIONS_STORE: memory (one process), sqlite (one process, survives it), redis (several replicas)."""
    kind = settings.store_kind
    if kind == "redis":
        return RedisStore(settings.redis_url, settings.sessions_ttl_seconds, settings.responses_ttl_seconds,
                          settings.session_lease_seconds)
    if kind == "sqlite":
        return SQLiteStore(settings.sessions_db_path)
    return MemoryStore(settings.sessions_buffer_events, settings.sessions_max_finished,
                       settings.sessions_max_finished_bytes)


class Services:
    """Everything the handlers need, in one place: `request.app.state.services`."""

    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.metrics = Metrics(engine)
        self.media = MediaLoader(settings)
        self.sessions = SessionManager(open_store(settings), self.continue_session, settings.sessions_ttl_seconds,
                                       settings.cancel_after_disconnect_seconds, settings.sse_ping_seconds,
                                       self.metrics, settings.responses_ttl_seconds,
                                       settings.session_lease_seconds, self.room)
        self.responses = Responses(self)

    async def prepare(self, request: ChatCompletionRequest, continuing: bool = False, rows: int | None = None):
        if not continuing and not self.sessions.admitting:
            raise shutting_down()
        loader = self.media.load if self.engine.is_multimodal else None
        return await prepare(self.engine, self.settings, request, loader, continuing, rows)

    def room(self) -> int:
        """How many sessions of other replicas this one may take over now: its free admission slots."""
        if not self.engine.ready.is_set():
            return 0
        limit = self.settings.max_concurrent_requests + self.settings.max_queued_requests
        return limit - self.engine.running_count - self.engine.waiting_count

    async def continue_session(self, record: SessionRecord, resume_ids: list[int]):
        """Restart a persisted session's generation after a restart, from the tokens it had produced."""
        if record.kind == RESPONSE:
            return await self.responses.continue_response(record, resume_ids)
        request = chat_request_from(parse_json_object(record.request_json, self.settings.max_json_depth))
        return await self.continue_chat(request, record, resume_ids)

    async def continue_chat(self, request: ChatCompletionRequest, record: SessionRecord, resume_ids: list[int]):
        """From the tokens each choice had produced; choices whose final chunk was stored only count for
        usage and the end."""
        while not self.engine.ready.is_set() and not self.engine.error:
            await asyncio.sleep(0.1)
        progress = {0: (resume_ids, None)} if request.n == 1 else \
            choice_progress(await self.sessions.store.read(record.session_id, -1))
        running = {i: progress.get(i, ([], None))[0] for i in range(request.n) if progress.get(i, ([], None))[1] is None}
        prompt, params = await self.prepare(request, continuing=True, rows=len(running))
        stream = open_stream(self.engine, request, record.session_id, self.settings.model_id, prompt.text,
                             record.created)
        for i, (ids, reason) in progress.items():
            if reason is not None:
                stream.mark_finished(i, reason, len(ids))
        return self.engine.submit(prompt, params, running), stream


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services: Services = app.state.services
        if settings.load_model_on_startup:
            engine.start()
        await services.sessions.start()
        yield
        await services.sessions.stop()
        engine.stop()

    app = FastAPI(title="qwenserve", lifespan=lifespan)
    app.state.services = Services(settings, engine)
    app.include_router(router)
    app.include_router(responses_router)
    _install_error_handlers(app)
    _install_guards(app, settings)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(_: Request, exc: StoreUnavailable):
        log.warning("session store unavailable: %s", exc)
        return error_response(APIError(503, "the session store is unavailable; retry shortly", "service_unavailable",
                                       code="store_unavailable", headers={"Retry-After": "1"}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error_response(validation_to_api_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: ClientDisconnect):
        log.info("client disconnected before its request body was complete")
        return Response(status_code=400)  # nobody reads it

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
        if self.api_key and _needs_key(scope["path"]) and not self._authorized(headers.get(b"authorization", b"")):
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


    def _authorized(self, header: bytes) -> bool:
        """RFC 7235: the scheme is case-insensitive; the key is compared in constant time."""
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())


# The API and its description (/docs, /redoc, /openapi.json) want the key; /health and /metrics do not.
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def _needs_key(path: str) -> bool:
    return path.startswith("/v1") or path.startswith(DOC_PATHS)


class BodyTooLarge(Exception):
    pass
