"""Structured outputs through the live server: `response_format` (`json_schema`, `json_object`) and
forced tool calls, on designed checkpoints whose own replies break the constraint.

The checkpoints (`qwenserve.checkpoints`: `build_structured_text_checkpoint`, `build_ktp_vl_checkpoint`)
add weaker preferences to the designed reply chain for what a mask leaves free (a string's word, the
number 7, closing as soon as the schema allows), so every constrained reply below is exact. Requests
are greedy (`temperature: 0`): under a mask most tokens tie, and sampling would pick among them.
"""

from __future__ import annotations

import json
import re
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest

from examples import ktp_ocr
from qwenserve import checkpoints as ck

from .helpers import chat_body, stream
from .mediafiles import data_url, png
from .test_agents import TEXT_TEMPLATE, calls_of, streamed_calls
from .test_errors import assert_envelope, post
from .test_persistence import read_then_kill

GREEDY = {"temperature": 0}
TOOLS = [ck.WEATHER_TOOL, ck.TIME_TOOL]
TIME_PARAMETERS = ck.TIME_TOOL["function"]["parameters"]
FREE_REPLY = "".join(ck.TOOL_CALL_REPLY)  # the text model's own reply: a get_weather call, not JSON


def response_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def strict_object(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


REPORT = strict_object(city={"type": "string"}, temperature={"type": "integer"},
                       sky={"enum": ["sunny", "cloudy", "rain"]}, alerts={"type": "array", "items": {"type": "string"}})
REPORT_REPLY = '{"city": "Paris", "temperature": 7, "sky": "cloudy", "alerts": ["Paris"]}'
TRIPLE = {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}
NIK = strict_object(nik={"type": "string", "pattern": "^[0-9]{16}$"})
KTP_REPLY = {"nik": "7777777777777777", "nama": "BUDI", "tempat_lahir": "BUDI", "tgl_lahir": "77-77-7777",
             "jenis_kelamin": "LAKI-LAKI",
             "alamat": {"jalan": "BUDI", "rt_rw": "BUDI", "kel_desa": "BUDI", "kecamatan": "BUDI"},
             "agama": "BUDI", "status_perkawinan": "BUDI", "pekerjaan": "BUDI", "kewarganegaraan": "BUDI",
             "berlaku_hingga": "BUDI"}
REASONING = "".join(ck.KTP_REASONING)


@pytest.fixture(scope="module")
def text_ckpt_structured(ckpt_dir):
    if not TEXT_TEMPLATE.is_file():
        pytest.skip(f"the real Qwen3 text chat template is not at {TEXT_TEMPLATE} (the text model's tests need it)")
    return ck.build_structured_text_checkpoint(ckpt_dir / "structured-text", TEXT_TEMPLATE)


@pytest.fixture(scope="module")
def json_server(server_factory_module, text_ckpt_structured, tmp_path_factory):
    """Sessions in SQLite, for the test that kills it (the last of the text model's tests)."""
    return server_factory_module(text_ckpt_structured, PERSIST_SESSIONS=1,
                                 SESSIONS_DB_PATH=tmp_path_factory.mktemp("structured") / "sessions.db")


@pytest.fixture(scope="module")
def ktp_server(server_factory_module, ckpt_dir):
    return server_factory_module(ck.build_ktp_vl_checkpoint(ckpt_dir / "structured-ktp", ktp_ocr.KTP_SCHEMA))


def ask(server, content: str = "Weather in Paris?", **extra) -> dict:
    reply = post(server, {**chat_body(content), **GREEDY, **extra})
    assert reply.status_code == 200, reply.text
    return reply.json()


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


# ---- the text model: it prefers a get_weather call ------------------------------------------------------


def test_a_schema_the_preferred_reply_violates_comes_out_valid(json_server):
    assert ask(json_server)["choices"][0]["message"]["content"] == FREE_REPLY
    client = json_server.client()
    request = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                   response_format=response_format(REPORT), **GREEDY)
    choice = client.chat.completions.create(**request).choices[0]
    assert (choice.message.content, choice.finish_reason) == (REPORT_REPLY, "stop")
    jsonschema.validate(json.loads(choice.message.content), REPORT)
    chunks = list(client.chat.completions.create(stream=True, **request))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPORT_REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_json_object_gives_an_object(json_server):
    message = ask(json_server, response_format={"type": "json_object"})["choices"][0]["message"]
    assert json.loads(message["content"]) == {"Paris": 7}


def test_a_named_tool_choice_forces_the_other_function(json_server):
    assert calls_of(ask(json_server, tools=TOOLS)["choices"][0]["message"])[0]["name"] == "get_weather"
    forced = {"type": "function", "function": {"name": "get_time"}}
    reply = json_server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, tool_choice=forced,
        **GREEDY)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    arguments = json.loads(choice.message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, TIME_PARAMETERS)
    assert arguments == {"timezone": "Paris"}
    chunks = stream(json_server.url, {**chat_body("Weather in Paris?"), **GREEDY, "tools": TOOLS,
                                      "tool_choice": forced, "stream": True})[1].chunks()
    assert streamed_calls(chunks)[0] == [{"name": "get_time", "arguments": '{"timezone": "Paris"}'}]


def test_rows_with_different_constraints_share_the_batch(json_server):
    """Concurrent requests (they join one batch) each get their own constraint; a free row stays free."""
    get_time = {"type": "function", "function": {"name": "get_time"}}
    bodies = [dict(response_format=response_format(REPORT)), dict(response_format={"type": "json_object"}),
              dict(response_format=response_format(TRIPLE), n=2), dict(tools=TOOLS, tool_choice=get_time), {}]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda extra: ask(json_server, **extra), bodies))
    report, obj, triple, call, free = ([c["message"] for c in r["choices"]] for r in replies)
    assert [m["content"] for m in report] == [REPORT_REPLY]
    assert [json.loads(m["content"]) for m in obj] == [{"Paris": 7}]
    assert [json.loads(m["content"]) for m in triple] == [[7, 7, 7], [7, 7, 7]]
    jsonschema.validate(json.loads(triple[1]["content"]), TRIPLE)
    assert calls_of(call[0]) == [{"name": "get_time", "arguments": '{"timezone": "Paris"}'}]
    assert [m["content"] for m in free] == [FREE_REPLY]


def test_max_tokens_cuts_a_constrained_answer(json_server):
    reply = ask(json_server, response_format=response_format(REPORT), max_tokens=12)
    content = reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 12
    assert content == '{"city": "Paris"'  # the valid answer's first 12 tokens
    assert REPORT_REPLY.startswith(content)


@pytest.mark.parametrize("extra, param", [
    (dict(response_format=response_format({"type": "object", "properties": {"a": {"type": "nope"}}})),
     "response_format.json_schema.schema"),
    (dict(response_format=response_format({"$ref": "#/$defs/nowhere"})), "response_format.json_schema.schema"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "format": "no-such-format"}}}}}], tool_choice="required"),
     "tools[0].function.parameters"),
])
def test_a_schema_that_cannot_be_compiled_is_a_400_before_generation(json_server, extra, param):
    before = [metric(json_server, m) for m in ("qwenserve_prompt_tokens_total", "qwenserve_generation_tokens_total")]
    body = {**chat_body(), **extra, "stream": True, "session_id": "uncompilable"}
    assert_envelope(post(json_server, body), 400, param=param, code="invalid_constraint")
    assert httpx.get(json_server.url + "/v1/sessions/uncompilable", timeout=10).status_code == 404
    after = [metric(json_server, m) for m in ("qwenserve_prompt_tokens_total", "qwenserve_generation_tokens_total")]
    assert after == before  # nothing was tokenized or generated


def test_a_constrained_stream_continues_valid_after_kill_and_restart(json_server):
    """Killed mid-answer, restarted on its database: the continuation replays the stored tokens into
    the matcher (a fresh one would force '{' again), so the whole stream is the one valid answer."""
    items = 60
    schema = strict_object(readings={"type": "array", "items": {"type": "integer"}, "minItems": items,
                                     "maxItems": items})
    expected = json.dumps({"readings": [7] * items})
    body = {**chat_body(), **GREEDY, "stream": True, "session_id": "json-crash",
            "response_format": response_format(schema), "max_tokens": 1000}
    seen = read_then_kill(json_server, body, {}, 30)
    assert 0 < len(seen.text()) < len(expected) // 2
    stored_at_kill = stored_events(json_server, "json-crash")
    json_server.start()
    rest = stream(json_server.url, body, headers={"Last-Event-ID": seen.ids[-1]})[1]
    events = seen.events + rest.events
    assert stored_events(json_server, "json-crash") == len(events) > stored_at_kill  # generated after the restart
    assert [int(i.rsplit(":", 1)[1]) for i, _ in events] == list(range(len(events)))
    chunks = [json.loads(data) for _, data in events[:-1]]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert content == expected
    jsonschema.validate(json.loads(content), schema)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def stored_events(server, session_id: str) -> int:
    with sqlite3.connect(server.env["SESSIONS_DB_PATH"]) as conn:
        return conn.execute("SELECT count(*) FROM events WHERE session_id=?", (session_id,)).fetchone()[0]


# ---- the thinking VL model: it reasons, then answers {"nama": "BUDI"} ------------------------------------


def test_a_thinking_model_reasons_freely_and_answers_valid_json(ktp_server):
    free = ask(ktp_server, "Read the card")["choices"][0]["message"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(free["content"]), NIK)
    constrained = {"response_format": response_format(NIK)}
    message = ask(ktp_server, "Read the card", **constrained)["choices"][0]["message"]
    assert message["reasoning_content"] == REASONING == free["reasoning_content"]
    assert message["content"] == '{"nik": "7777777777777777"}'
    jsonschema.validate(json.loads(message["content"]), NIK)
    sse = stream(ktp_server.url, {**chat_body("Read the card"), **GREEDY, **constrained, "stream": True})[1]
    assert (sse.text("reasoning_content"), sse.text()) == (REASONING, message["content"])


def test_required_tool_choice_on_a_thinking_model_makes_a_call(ktp_server):
    assert "tool_calls" not in ask(ktp_server, tools=TOOLS)["choices"][0]["message"]
    choice = ask(ktp_server, tools=TOOLS, tool_choice="required")["choices"][0]
    assert choice["message"]["reasoning_content"] == REASONING
    calls = calls_of(choice["message"])
    assert len(calls) >= 1 and calls == [{"name": "get_time", "arguments": '{"timezone": "BUDI"}'}]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"


def ktp_message(image: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image, "image/png")}},
                                         {"type": "text", "text": ktp_ocr.PROMPT}]}]


def test_ktp_from_an_image(ktp_server):
    body = {"messages": ktp_message(png(320, 200)), **GREEDY, "response_format": ktp_ocr.KTP_FORMAT}
    reply = post(ktp_server, body)
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    message = reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] == "stop" and message["reasoning_content"] == REASONING
    assert json.loads(message["content"]) == KTP_REPLY
    jsonschema.validate(json.loads(message["content"]), ktp_ocr.KTP_SCHEMA)


def test_the_ktp_example_script(ktp_server, tmp_path, capsys):
    photo = tmp_path / "ktp.png"
    photo.write_bytes(png(320, 200, (90, 140, 200)))
    assert ktp_ocr.main([str(photo), "--base-url", ktp_server.url + "/v1", "--model", "any"]) == 0
    card = json.loads(capsys.readouterr().out)
    jsonschema.validate(card, ktp_ocr.KTP_SCHEMA)
    assert card == KTP_REPLY
