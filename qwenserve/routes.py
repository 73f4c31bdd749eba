"""Thin HTTP handlers: parse, hand to the services, shape the answer."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .completions import open_stream
from .protocol import APIError, ChatCompletionRequest, chat_request_from, models_body, parse_json_object
from .sse import new_session_id, with_seed

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def services(request: Request):
    return request.app.state.services


@router.get("/health")
async def health(request: Request):
    engine = services(request).engine
    return {"ok": True, "modelReady": engine.ready.is_set(), "modelId": engine.model_id, "error": engine.error,
            **getattr(engine, "runtime", {})}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(services(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    engine = services(request).engine
    return models_body(engine.model_id, engine.created)


async def parse_chat_request(request: Request) -> tuple[ChatCompletionRequest, dict]:
    body = parse_json_object(await request.body(), services(request).settings.max_json_depth)
    return chat_request_from(body), body


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    svc = services(request)
    chat, body = await parse_chat_request(request)
    if chat.stream:
        return await _stream(request, svc, chat, body)
    return await _complete(request, svc, chat)


async def _complete(request: Request, svc, chat: ChatCompletionRequest):
    prompt, params = await svc.prepare(chat)
    generation = svc.engine.submit(prompt, params, n=chat.n)
    svc.metrics.requests.labels(stream="false").inc()
    stream = open_stream(svc.engine, chat, new_session_id(), svc.settings.model_id, prompt.text)

    async def collect():
        async for output in generation:
            stream.feed(output)

    collector = asyncio.create_task(collect())
    try:
        while not collector.done():
            await asyncio.wait({collector}, timeout=0.25)
            if not collector.done() and await request.is_disconnected():
                generation.cancel()  # nobody is waiting for this answer any more
    except asyncio.CancelledError:  # the handler itself was cancelled (shutdown): so is its generation
        generation.cancel()
        raise
    collector.result()
    if stream.error:
        raise APIError(500, stream.error, "server_error", code="generation_failed")
    return JSONResponse(stream.reply())


async def _stream(request: Request, svc, chat: ChatCompletionRequest, body: dict):
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    # A new session without a seed gets one, stored with it: a continuation (restart, takeover) samples
    # the same tokens. The client's body, without it, stays what makes a re-post the same session.
    stored = with_seed(body)
    if chat.seed is None:
        chat = chat.model_copy(update={"seed": stored["seed"]})

    async def start(session_id: str):
        """Runs once per new session: identical requests racing for its id wait and read the same stream."""
        prompt, params = await svc.prepare(chat)
        stream = open_stream(svc.engine, chat, session_id, svc.settings.model_id, prompt.text)
        generation = svc.engine.submit(prompt, params, n=chat.n)
        svc.metrics.requests.labels(stream="true").inc()
        return generation, stream

    session_id, after = await svc.sessions.open_stream(chat, body, last_event_id, start, stored)
    return StreamingResponse(svc.sessions.follow(session_id, after), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.get("/v1/sessions/{session_id}")
async def session_state(request: Request, session_id: str):
    return await services(request).sessions.describe(session_id)


@router.get("/v1/sessions/{session_id}/events")
async def session_events(request: Request, session_id: str):
    sessions = services(request).sessions
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    session_id, after = await sessions.resolve(session_id, last_event_id)
    return StreamingResponse(sessions.follow(session_id, after), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.post("/v1/cancel/{session_id}")
async def cancel(request: Request, session_id: str):
    record = await services(request).sessions.cancel(session_id)
    # Idempotent: cancelling a session that already ended is a no-op that still answers 200.
    return {"id": session_id, "object": "chat.completion.session", "state": record.state,
            "cancel_requested": record.state == "running"}
