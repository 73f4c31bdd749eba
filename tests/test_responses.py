"""The Responses API through live servers and the unchanged `openai` SDK: plain, streamed and background
responses, retrieve (as it stands, and streamed from a sequence number), cancel, delete,
`previous_response_id`, structured outputs, function calls, reasoning, images, and a background
response that survives kill -9."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import httpx
import openai
import pytest

from qwenserve.stores import SessionRecord, SQLiteStore, StoredEvent

from .mediafiles import data_url, png
from .test_agents import TEXT_TEMPLATE, needs_templates, tool_servers  # noqa: F401 (fixture)
from .test_structured import REPORT, REPORT_REPLY, text_ckpt_structured  # noqa: F401 (fixture)

ANSWER, REASONING = "Hello! I am a demo model.", "Let me think briefly"
STREAM_TYPES = [
    "response.created", "response.in_progress",
    "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
    "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
    "response.output_item.added", "response.content_part.added", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed"]


def squeeze(types: list[str]) -> list[str]:
    """Event types with runs of the same delta type written once."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


def raw_stream(url: str, path: str, method: str = "GET", max_events: int | None = None, **kwargs):
    """(id, event name, data) of a Responses SSE stream, read with httpx."""
    events, current = [], {}
    with httpx.stream(method, url + path, timeout=60, **kwargs) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(":")
                current[key] = value.strip()
            elif line == "" and current:
                events.append((current.get("id"), current.get("event"), current.get("data")))
                current = {}
                if max_events and len(events) >= max_events:
                    break
    return events


# ---- a thinking VL checkpoint -------------------------------------------------------------------------


def test_create_gives_reasoning_and_message(vl_server):
    response = vl_server.client().responses.create(model="m", input="hi")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == REASONING
    assert response.output[1].content[0].type == "output_text"
    assert response.output_text == ANSWER
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.output_tokens == 15
    assert vl_server.client().responses.retrieve(response.id).model_dump() == response.model_dump()


def test_stream_events_in_order_with_event_names_and_ids(vl_server):
    events = raw_stream(vl_server.url, "/v1/responses", "POST", json={"model": "m", "input": "hi", "stream": True})
    datas = [json.loads(d) for _, _, d in events]
    response_id = datas[0]["response"]["id"]
    assert squeeze([d["type"] for d in datas]) == STREAM_TYPES
    assert [name for _, name, _ in events] == [d["type"] for d in datas]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    assert [i for i, _, _ in events] == [f"{response_id}:{n}" for n in range(len(datas))]
    final = datas[-1]["response"]
    assert final["status"] == "completed" and final["output_text"] == ANSWER
    text = "".join(d["delta"] for d in datas if d["type"] == "response.output_text.delta")
    assert text == ANSWER
    # The stored events replay byte for byte, from the start or after any sequence number.
    replay = raw_stream(vl_server.url, f"/v1/responses/{response_id}", params={"stream": "true"})
    assert replay == events
    after = raw_stream(vl_server.url, f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": 5})
    assert after == events[6:]
    resumed = raw_stream(vl_server.url, f"/v1/responses/{response_id}", params={"stream": "true"},
                         headers={"Last-Event-ID": f"{response_id}:9"})
    assert resumed == events[10:]


def test_sdk_stream_and_stream_helper(vl_server):
    client = vl_server.client()
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[-1].response.output_text == ANSWER
    with client.responses.stream(model="m", input="hi") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == ANSWER and final.output_text == ANSWER
    assert [item.type for item in final.output] == ["reasoning", "message"]
    # The helper resumes a stored response by id, dropping what came before starting_after.
    with client.responses.stream(response_id=final.id, starting_after=3) as again:
        numbers = [e.sequence_number for e in again]
        assert again.get_final_response().output_text == ANSWER
    assert numbers[0] == 4


def test_max_output_tokens_makes_it_incomplete(vl_server):
    response = vl_server.client().responses.create(model="m", input="hi", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["reasoning"]
    assert response.output[0].content[0].text == "Let me think" and response.usage.output_tokens == 3


def test_image_input(vl_server):
    content = [{"type": "input_image", "image_url": data_url(png(), "image/png")},
               {"type": "input_text", "text": "What is this?"}]
    response = vl_server.client().responses.create(model="m", input=[{"role": "user", "content": content}])
    assert response.status == "completed" and response.output_text == ANSWER
    plain = vl_server.client().responses.create(model="m", input="What is this?")
    assert response.usage.input_tokens > plain.usage.input_tokens  # the image's tokens are in the prompt


def test_previous_response_id_chains_the_conversation(vl_server):
    client = vl_server.client()
    first = client.responses.create(model="m", input="hi", instructions="Be brief.")
    second = client.responses.create(model="m", input="again", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.output_text == ANSWER
    # The same conversation as chat messages gives the same prompt (instructions are not carried over).
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING},
                {"role": "user", "content": "again"}]
    chat = httpx.post(vl_server.url + "/v1/chat/completions", json={"messages": messages}, timeout=60).json()
    assert second.usage.input_tokens == chat["usage"]["prompt_tokens"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="m", input="x", previous_response_id="resp_missing")
    assert missing.value.body["code"] == "previous_response_not_found"


def test_errors_use_the_envelope(vl_server):
    for body, param in [({"model": "m"}, "input"), ({"input": "x", "background": True, "store": False}, None),
                        ({"input": "x", "temperature": 3}, "temperature"),
                        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
                        ({"input": "x", "tools": [{"type": "web_search"}]}, None)]:
        reply = httpx.post(vl_server.url + "/v1/responses", json=body, timeout=30)
        assert reply.status_code == 400, body
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and (param is None or error["param"] == param), error
    for method in ("get", "delete"):
        assert getattr(httpx, method)(vl_server.url + "/v1/responses/resp_nope", timeout=10).status_code == 404
    assert httpx.post(vl_server.url + "/v1/responses/resp_nope/cancel", timeout=10).status_code == 404


def test_not_stored_responses_cannot_be_retrieved(vl_server):
    client = vl_server.client()
    response = client.responses.create(model="m", input="hi", store=False)
    assert response.output_text == ANSWER and response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


# ---- an endless checkpoint: background, resume, cancel, delete ----------------------------------------


def test_background_resume_cancel_delete(endless_server):
    client = endless_server.client()
    created = client.responses.create(model="m", input="go", background=True, max_output_tokens=5000, temperature=0)
    assert created.status == "queued" and created.background is True
    head = raw_stream(endless_server.url, f"/v1/responses/{created.id}", params={"stream": "true"}, max_events=12)
    # Resume mid-generation from a sequence number, with the SDK.
    with client.responses.retrieve(created.id, stream=True, starting_after=8) as events:
        seen = []
        for event in events:
            seen.append(event)
            if len(seen) == 10:
                break
    assert [e.sequence_number for e in seen] == list(range(9, 19))
    assert [e.model_dump() for e in seen[:3]] == [json.loads(d) for _, _, d in head[9:12]]
    assert client.responses.retrieve(created.id).status == "in_progress"
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled" and [item.type for item in cancelled.output] == ["reasoning"]
    assert cancelled.output[0].status == "incomplete"
    assert cancelled.output[0].content[0].text.startswith(" tick tock tick tock")
    assert client.responses.cancel(created.id).status == "cancelled"  # idempotent
    assert client.responses.retrieve(created.id).model_dump() == cancelled.model_dump()
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    # A response deleted while it runs is cancelled, and unknown at once.
    running = client.responses.create(model="m", input="go", background=True, max_output_tokens=5000)
    client.responses.delete(running.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel(running.id)
    assert client.responses.create(model="m", input="go", max_output_tokens=2).status == "incomplete"


def test_a_response_keeps_all_its_events_in_memory(tight_server):
    """The ring buffer (64 events here) bounds chat sessions; a response is rebuilt from all its events."""
    client = tight_server.client()
    response = client.responses.create(model="m", input="go", max_output_tokens=100, temperature=0)
    events = raw_stream(tight_server.url, f"/v1/responses/{response.id}", params={"stream": "true"})
    assert len(events) == 108 and json.loads(events[0][2])["type"] == "response.created"
    assert response.output[0].content[0].text == " tick tock" * 50
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()


def test_background_keeps_running_without_readers(server_factory, endless_ckpt):
    """Auto-cancel applies to streams whose clients left, never to background responses."""
    server = server_factory(endless_ckpt, CANCEL_AFTER_DISCONNECT_SECONDS=0.2)
    client = server.client()
    background = client.responses.create(model="m", input="go", background=True, stream=True, max_output_tokens=300)
    first = next(iter(background))
    background.close()
    streamed = raw_stream(server.url, "/v1/responses", "POST", max_events=5,
                          json={"model": "m", "input": "go", "stream": True, "max_output_tokens": 20000})
    stream_id = json.loads(streamed[0][2])["response"]["id"]
    final = raw_stream(server.url, f"/v1/responses/{first.response.id}", params={"stream": "true"})
    assert json.loads(final[-1][2])["response"]["status"] == "incomplete"
    assert json.loads(final[-1][2])["response"]["usage"]["output_tokens"] == 300
    rest = raw_stream(server.url, f"/v1/responses/{stream_id}", params={"stream": "true"})
    assert json.loads(rest[-1][2])["type"] == "response.output_item.done"  # cut, without a final event
    assert client.responses.retrieve(stream_id).status == "cancelled"


def test_background_response_survives_kill_and_restart(server_factory, endless_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db)
    client = server.client()
    options = {"model": "m", "input": "go", "max_output_tokens": 600, "temperature": 0}
    reference = client.responses.create(**options)
    created = client.responses.create(background=True, **options)
    seen = raw_stream(server.url, f"/v1/responses/{created.id}", params={"stream": "true"}, max_events=40)
    server.kill()
    server.start()
    # Nobody reads it: it goes on by itself after the restart, and finishes.
    events = raw_stream(server.url, f"/v1/responses/{created.id}", params={"stream": "true"})
    assert events[:40] == seen
    datas = [json.loads(d) for _, _, d in events]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    final = server.client().responses.retrieve(created.id)
    assert final.status == "incomplete" and final.output[0].content[0].text == " tick tock" * 300
    assert final.model_dump(exclude={"id", "created_at", "output", "background"}) == \
        reference.model_dump(exclude={"id", "created_at", "output", "background"})
    assert final.usage.output_tokens == reference.usage.output_tokens == 600
    assert len({item.id for item in final.output}) == len(final.output)


def test_a_response_that_cannot_continue_fails_alone(server_factory, endless_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db)
    created = server.client().responses.create(model="m", input="go on", background=True, max_output_tokens=5000)
    seen = raw_stream(server.url, f"/v1/responses/{created.id}", params={"stream": "true"}, max_events=10)
    server.kill()
    server.env["MAX_PROMPT_CHARS"] = "2"  # the stored request is refused when it is prepared again
    server.start()
    events = raw_stream(server.url, f"/v1/responses/{created.id}", params={"stream": "true"})
    last = json.loads(events[-1][2])
    assert events[:10] == seen and events[-1][1] == "response.failed"
    assert last["sequence_number"] == len(events) - 1
    failed = server.client().responses.retrieve(created.id)
    assert failed.status == "failed" and "MAX_PROMPT_CHARS" in failed.error.message
    assert failed.output[0].type == "reasoning" and failed.output[0].status == "incomplete"
    assert httpx.get(server.url + "/health").json()["modelReady"] is True


def test_responses_expire_after_their_own_ttl(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, RESPONSES_TTL_SECONDS=0.5, SESSIONS_TTL_SECONDS=600)
    response = server.client().responses.create(model="m", input="hi")
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "session_id": "kept"})
    assert chat.status_code == 200
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/v1/responses/{response.id}").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{server.url}/v1/responses/{response.id}").status_code == 404
    assert httpx.get(server.url + "/v1/sessions/kept").json()["state"] == "finished"


def test_old_databases_open_unchanged(tmp_path):
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript("""
            CREATE TABLE sessions (session_id TEXT PRIMARY KEY, request_hash TEXT NOT NULL,
                request_json TEXT NOT NULL, created INTEGER NOT NULL, state TEXT NOT NULL,
                event_count INTEGER NOT NULL DEFAULT 0, finished_at REAL);
            CREATE TABLE events (session_id TEXT NOT NULL, idx INTEGER NOT NULL, data TEXT NOT NULL,
                token_ids TEXT NOT NULL, PRIMARY KEY (session_id, idx)) WITHOUT ROWID;
            INSERT INTO sessions VALUES ('old', 'h', '{}', 1, 'finished', 1, 5.0);
            INSERT INTO events VALUES ('old', 0, '[DONE]', '[]');""")
    asyncio.run(_old_database_checks(SQLiteStore(str(db))))
    with sqlite3.connect(db) as conn:  # the first tables keep their columns: older code still reads them
        assert len(conn.execute("SELECT * FROM sessions").description) == 7
        assert len(conn.execute("SELECT * FROM events").description) == 4


# ---- tools and structured outputs ----------------------------------------------------------------------


@needs_templates
def test_function_call_item_and_its_output(tool_servers):  # noqa: F811
    client = tool_servers("one_call").client()
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    response = client.responses.create(model="m", input="Weather in Paris?", tools=tools)
    assert [item.type for item in response.output] == ["function_call"]
    call = response.output[0]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    with client.responses.stream(model="m", input="Weather in Paris?", tools=tools) as stream:
        final = stream.get_final_response()
    assert final.output[0].arguments == call.arguments
    forced = client.responses.create(model="m", input="Weather in Paris?", tools=tools,
                                     tool_choice={"type": "function", "name": "get_weather"})
    assert forced.output[0].arguments == call.arguments and forced.tool_choice.name == "get_weather"
    follow = client.responses.create(model="m", previous_response_id=response.id, tools=tools, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "7 degrees"}])
    assert follow.status == "completed"
    assert follow.usage.input_tokens > response.usage.input_tokens


@needs_templates
def test_reasoning_then_function_call(tool_servers):  # noqa: F811
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    response = tool_servers("think_then_call").client().responses.create(model="m", input="Paris?", tools=tools)
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    assert response.output[0].content[0].text == "The user asks about Paris.\n"
    assert response.output[1].arguments == '{"city": "Paris"}'


def test_json_schema_format(server_factory, text_ckpt_structured):  # noqa: F811
    server = server_factory(text_ckpt_structured)
    response = server.client().responses.create(
        model="m", input="Weather in Paris?", temperature=0,
        text={"format": {"type": "json_schema", "name": "report", "schema": REPORT, "strict": True}})
    assert response.output_text == REPORT_REPLY
    assert response.text.format.type == "json_schema"
    as_object = server.client().responses.create(model="m", input="Weather in Paris?", temperature=0,
                                                 text={"format": {"type": "json_object"}})
    assert json.loads(as_object.output_text) == {"Paris": 7}


async def _old_database_checks(store: SQLiteStore) -> None:
    record = await store.get("old")
    assert (record.kind, record.background, record.state) == ("chat", False, "finished")
    assert [(e.data, e.event) for e in await store.read("old", -1)] == [("[DONE]", None)]
    await store.create(SessionRecord("resp_1", "h", "{}", 1, kind="response", background=True))
    await store.append("resp_1", [StoredEvent(0, '{"type":"response.created"}', [5], "response.created")])
    await store.set_state("resp_1", "finished")
    assert ((await store.get("resp_1")).kind, (await store.get("resp_1")).background) == ("response", True)
    assert await store.read("resp_1", -1) == [StoredEvent(0, '{"type":"response.created"}', [5], "response.created")]
    assert await store.delete_expired(10, now=14.0, response_ttl_seconds=1e6) == []
    assert await store.delete_expired(10, now=15.0, response_ttl_seconds=1e6) == ["old"]
    assert await store.delete_expired(10, now=time.time() + 2, response_ttl_seconds=1) == ["resp_1"]
    assert await store.read("resp_1", -1) == [] and await store.get("resp_1") is None
    await store.close()
