"""Thin HTTP handlers: parse, hand to the services, shape the answer."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from .completions import ChatStream
from .protocol import APIError, ChatCompletionRequest, bad_request, models_body, validation_to_api_error
from .sessions import new_session_id

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def services(request: Request):
    return request.app.state.services


@router.get("/health")
async def health(request: Request):
    engine = services(request).engine
    return {"ok": True, "modelReady": engine.ready.is_set(), "modelId": engine.model_id, "error": engine.error}


@router.get("/metrics")
async def metrics(request: Request):
    return Response(services(request).metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    engine = services(request).engine
    return models_body(engine.model_id, engine.created)


async def parse_chat_request(request: Request) -> tuple[ChatCompletionRequest, dict]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc.msg if hasattr(exc, 'msg') else exc}"[:300],
                          code="invalid_json")
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(body), body
    except ValidationError as exc:
        raise validation_to_api_error(exc.errors())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    svc = services(request)
    chat, body = await parse_chat_request(request)
    if chat.stream:
        return await _stream(request, svc, chat, body)
    return await _complete(request, svc, chat)


async def _complete(request: Request, svc, chat: ChatCompletionRequest):
    prompt, params = await svc.prepare(chat)
    generation = svc.engine.submit(prompt, params)
    svc.metrics.requests.labels(stream="false").inc()
    stream = ChatStream(new_session_id(), int(time.time()), svc.settings.model_id, prompt.text)

    async def collect():
        async for output in generation:
            stream.feed(output)

    collector = asyncio.create_task(collect())
    while not collector.done():
        await asyncio.wait({collector}, timeout=0.25)
        if not collector.done() and await request.is_disconnected():
            generation.cancel()  # nobody is waiting for this answer any more
    collector.result()
    if stream.error:
        raise APIError(500, stream.error, "server_error", code="generation_failed")
    return JSONResponse(stream.reply())


async def _stream(request: Request, svc, chat: ChatCompletionRequest, body: dict):
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    existing = svc.sessions.lookup(chat, body, last_event_id)
    if existing:
        session_id, after = existing
    else:
        prompt, params = await svc.prepare(chat)
        session_id = chat.session_id or new_session_id()
        stream = ChatStream(session_id, int(time.time()), svc.settings.model_id, prompt.text, chat.include_usage)
        generation = svc.engine.submit(prompt, params)
        svc.metrics.requests.labels(stream="true").inc()
        svc.sessions.create(session_id, chat, body, generation, stream)
        after = -1
    return StreamingResponse(svc.sessions.follow(session_id, after), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.get("/v1/sessions/{session_id}")
async def session_state(request: Request, session_id: str):
    return services(request).sessions.describe(session_id)


@router.get("/v1/sessions/{session_id}/events")
async def session_events(request: Request, session_id: str):
    sessions = services(request).sessions
    last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    session_id, after = sessions.resolve(session_id, last_event_id)
    return StreamingResponse(sessions.follow(session_id, after), media_type="text/event-stream",
                             headers=SSE_HEADERS)


@router.post("/v1/cancel/{session_id}")
async def cancel(request: Request, session_id: str):
    record = services(request).sessions.cancel(session_id)
    # Idempotent: cancelling a session that already ended is a no-op that still answers 200.
    return {"id": session_id, "object": "chat.completion.session", "state": record.state,
            "cancel_requested": record.state == "running"}
