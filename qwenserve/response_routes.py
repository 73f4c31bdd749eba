"""HTTP handlers of the Responses API, and the service that runs responses as sessions.

A response is a session of kind `response` in the same store as chat streams: its events are stored
(with their SSE `event:` names) before anyone reads them, replayed byte for byte, continued after a
restart. "The response as it stands" is rebuilt from its stored events (`Output`)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .protocol import APIError, chat_request_from, parse_json_object
from .response_stream import FINAL_EVENTS, Output, ResponseStream
from .responses import (
    ResponsesRequest,
    chat_body,
    input_messages,
    new_response_id,
    responses_request_from,
    stored_request,
)
from .sse import new_seed, parse_last_event_id
from .stores import RESPONSE, RUNNING, SessionRecord

router = APIRouter()

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
CANCEL_WAIT_SECONDS = 10  # a cancel answers once the generation stopped (a step boundary), or after this


def not_found(response_id: str, param: str | None = None) -> APIError:
    code = "previous_response_not_found" if param else "response_not_found"
    return APIError(404, f"response {response_id[:128]!r} is unknown, was not stored, or has expired",
                    "invalid_request_error", param, code)


class Responses:
    """Responses on top of `SessionManager`; `svc` is the app's `Services`."""

    def __init__(self, svc):
        self.svc = svc
        self.sessions = svc.sessions
        self.sessions.failure_events[RESPONSE] = self.failure_events
        self.sessions.final_events |= FINAL_EVENTS

    # ---- records -----------------------------------------------------------------------------
    async def record(self, response_id: str, param: str | None = None, stored_only: bool = True
                     ) -> tuple[SessionRecord, dict]:
        """A response's record and stored request; 404 for chat sessions and (`stored_only`) for responses
        made with `store: false`: only their own request sees them."""
        record = await self.sessions.known(response_id)
        if record is None or record.kind != RESPONSE:
            raise not_found(response_id, param)
        stored = json.loads(record.request_json)
        if stored_only and stored["request"].get("store") is False:
            raise not_found(response_id, param)
        return record, stored

    async def snapshot(self, response_id: str, stored_only: bool = True) -> dict:
        """The response as it stands, from its stored events; `queued` before its first event."""
        record, stored = await self.record(response_id, stored_only=stored_only)
        snapshot = Output.of(await self.sessions.store.read(response_id, -1)).snapshot(record.state)
        return snapshot or (await self.bare_stream(record, stored)).response("queued")

    async def bare_stream(self, record: SessionRecord, stored: dict) -> ResponseStream:
        """A stream object for a stored response without its prompt (no text to parse: for shapes only)."""
        try:
            echo = responses_request_from(stored["request"]).echo()
        except APIError:  # a stored request the server no longer reads: the shapes still go out
            echo = {}
        echo["model"] = self.svc.settings.model_id
        stream = ResponseStream(record.session_id, record.created, echo, "", False, record.background)
        stream.restore(await self.sessions.store.read(record.session_id, -1))
        return stream

    async def history(self, previous_id: str | None) -> list[dict]:
        """A previous response's conversation and output, as chat messages."""
        if previous_id is None:
            return []
        record, stored = await self.record(previous_id, "previous_response_id")
        if record.state == RUNNING:
            raise APIError(400, f"response {previous_id!r} is still in progress", "invalid_request_error",
                           "previous_response_id", "previous_response_in_progress")
        output = Output.of(await self.sessions.store.read(previous_id, -1)).items
        return stored["conversation"] + input_messages(output, "previous_response.output")

    # ---- starting ------------------------------------------------------------------------------
    def stream_for(self, request: ResponsesRequest, chat, response_id: str, prompt_text: str,
                   created: int | None = None) -> ResponseStream:
        echo = {**request.echo(), "model": self.svc.settings.model_id}
        return ResponseStream(response_id, int(time.time()) if created is None else created, echo, prompt_text,
                              chat.tool_mode != "none", request.background)

    async def create(self, body: dict) -> tuple[str, ResponsesRequest, list[ResponseStream]]:
        request = responses_request_from(body)
        conversation = await self.history(request.previous_response_id) + input_messages(request.input)
        if not conversation:
            raise APIError(400, "input must hold at least one item", param="input", code="invalid_value")
        # The server picks the seed and stores it in the chat body: a continuation (restart, takeover)
        # samples the same tokens.
        chat_dict = {**chat_body(request, conversation), "seed": new_seed()}
        chat = chat_request_from(chat_dict)
        response_id = new_response_id()
        made: list[ResponseStream] = []

        async def start(session_id: str):
            prompt, params = await self.svc.prepare(chat)
            made.append(self.stream_for(request, chat, session_id, prompt.text))
            generation = self.svc.engine.submit(prompt, params, n=1)
            self.svc.metrics.requests.labels(stream=str(request.stream).lower()).inc()
            return generation, made[0]

        await self.sessions.create(response_id, stored_request(body, conversation, chat_dict), start, RESPONSE,
                                   request.background)
        return response_id, request, made

    async def continue_response(self, record: SessionRecord, resume_ids: list[int]):
        """After a restart: the stored chat body prepared again, the stream's items and sequence numbers
        rebuilt from the stored events."""
        stored = json.loads(record.request_json)
        request = responses_request_from(stored["request"])
        chat = chat_request_from(parse_json_object(json.dumps(stored["chat"]), self.svc.settings.max_json_depth))
        while not self.svc.engine.ready.is_set() and not self.svc.engine.error:
            await asyncio.sleep(0.1)
        prompt, params = await self.svc.prepare(chat, continuing=True)
        stream = self.stream_for(request, chat, record.session_id, prompt.text, record.created)
        stream.restore(await self.sessions.store.read(record.session_id, -1))
        return self.svc.engine.submit(prompt, params, {0: resume_ids}), stream

    async def failure_events(self, record: SessionRecord, message: str) -> list:
        """A response that could not be continued ends with `response.failed` after its stored events."""
        return (await self.bare_stream(record, json.loads(record.request_json))).fail(message)


def responses(request: Request) -> Responses:
    return request.app.state.services.responses


@router.post("/v1/responses")
async def create_response(request: Request):
    svc = request.app.state.services
    body = parse_json_object(await request.body(), svc.settings.max_json_depth)
    response_id, parsed, made = await svc.responses.create(body)
    if parsed.stream:
        return StreamingResponse(svc.sessions.follow(response_id, -1), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    if parsed.background:
        return JSONResponse(made[0].response("queued"))
    task = svc.sessions.producer(response_id)
    try:
        while task is not None and not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                await svc.sessions.cancel(response_id)  # nobody is waiting for this answer any more
    except asyncio.CancelledError:  # the handler itself was cancelled (shutdown, client gone)
        svc.sessions.cancel_soon(response_id)
        raise
    return JSONResponse(await responses(request).snapshot(response_id, stored_only=False))


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str):
    service = responses(request)
    record, _ = await service.record(response_id)
    query = request.query_params
    if query.get("stream", "false").lower() != "true":
        return JSONResponse(await service.snapshot(response_id))
    after = -1
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None:
        named, after = parse_last_event_id(last_event_id)
        if named != response_id:
            raise APIError(400, "Last-Event-ID names another response", param="Last-Event-ID",
                           code="session_mismatch")
    elif query.get("starting_after") is not None:
        after = _sequence(query["starting_after"])
    await service.sessions.check_index(record, after)
    return StreamingResponse(service.sessions.follow(response_id, after), media_type="text/event-stream",
                             headers=SSE_HEADERS)


def _sequence(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < -1:
        raise APIError(400, "starting_after must be a sequence number (an integer >= -1)", param="starting_after",
                       code="invalid_value")
    return number


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str):
    service = responses(request)
    await service.record(response_id)
    await service.sessions.cancel(response_id)  # idempotent: an ended response stays as it ended
    await service.sessions.wait_ended(response_id, CANCEL_WAIT_SECONDS)  # on whichever replica produces it
    return JSONResponse(await service.snapshot(response_id))


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    service = responses(request)
    await service.record(response_id)
    await service.sessions.delete(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
