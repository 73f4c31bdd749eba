"""Every client mistake gets a 400 (or 401/413/503) in the OpenAI envelope; failures end streams cleanly."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from qwenserve.app import create_app
from qwenserve.config import Settings

from .helpers import InProcessServer, chat_body, stream

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def assert_envelope(response: httpx.Response, status: int, param=..., code=...) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not ...:
        assert error["param"] == param
    if code is not ...:
        assert error["code"] == code
    return error


def post(server, body=None, **kwargs):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30, **kwargs)


@pytest.mark.parametrize("body,param,fragment", [
    ({}, "messages", "required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "unsupported role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ""),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content", "unsupported type"),
    ({"messages": USER, "temperature": "hot"}, "temperature", "number"),
    ({"messages": USER, "temperature": -1}, "temperature", "greater than or equal"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": USER, "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", ""),
    ({"messages": USER, "top_p": 0}, "top_p", ""),
    ({"messages": USER, "stop": ""}, "stop", "non-empty"),
    ({"messages": USER, "stream": "yes please"}, "stream", ""),
    ({"messages": USER, "n": 0}, "n", "greater than or equal to 1"),
    ({"messages": USER, "tools": []}, None, "tools must not be empty"),
    ({"messages": USER, "tool_choice": "auto"}, None, "tool_choice needs tools"),
    ({"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     None, "not among the tools"),
    ({"messages": USER, "tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "pattern"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools[0].function.name", "pattern"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters", "type 'object'"),
    ({"messages": USER, "tools": [{"type": "retrieval"}]}, "tools[0].type", ""),
    ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format", "needs a 'json_schema'"),
    ({"messages": USER, "top_logprobs": 2}, None, "top_logprobs needs logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({"messages": USER, "logprobs": True, "top_logprobs": -1}, "top_logprobs", ""),
    ({"messages": USER, "session_id": "bad id!"}, "session_id", ""),
    ({"messages": USER, "stream_options": {"include_usage": True}}, None, "stream_options"),
])
def test_validation_errors_are_400(vl_server, body, param, fragment):
    error = assert_envelope(post(vl_server, body), 400, param=param)
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"]


def test_too_many_stop_sequences(vl_server):
    assert post(vl_server, chat_body(stop=["a", "b", "c", "d"])).status_code == 200
    assert_envelope(post(vl_server, chat_body(stop=["a", "b", "c", "d", "e"])), 400, param="stop")


def test_invalid_json_and_non_object(vl_server):
    response = httpx.post(vl_server.url + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert_envelope(response, 400, code="invalid_json")
    assert_envelope(post(vl_server, [1, 2]), 400, code="invalid_json")


def test_unknown_fields_are_ignored(vl_server):
    assert post(vl_server, chat_body(frobnicate=True, user="u1", metadata={"a": "b"})).status_code == 200


def test_huge_input_is_not_echoed(vl_server):
    error = assert_envelope(post(vl_server, {"messages": [{"role": "x" * 100_000, "content": "hi"}]}), 400)
    assert len(error["message"]) < 600


def test_request_body_limit(vl_server):
    # The vl_server runs with MAX_REQUEST_BYTES=200000.
    def body_of_size(size: int) -> bytes:
        template = b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"padding":"%s"}'
        return template % (b"a" * (size - len(template) + 2))

    at_limit = httpx.post(vl_server.url + "/v1/chat/completions", content=body_of_size(200_000),
                          headers={"content-type": "application/json"}, timeout=60)
    assert at_limit.status_code == 200, at_limit.text
    over = httpx.post(vl_server.url + "/v1/chat/completions", content=body_of_size(200_001),
                      headers={"content-type": "application/json"}, timeout=60)
    assert_envelope(over, 413, code="request_too_large")

    def chunked():  # no Content-Length: counted while reading
        yield body_of_size(200_001)

    assert_envelope(httpx.post(vl_server.url + "/v1/chat/completions", content=chunked(),
                               headers={"content-type": "application/json"}), 413)
    assert httpx.get(vl_server.url + "/health").json()["modelReady"]


def test_unknown_route_is_enveloped(vl_server):
    assert_envelope(httpx.get(vl_server.url + "/v1/nothing"), 404)


def test_api_key(server_factory, text_ckpt):
    server = server_factory(text_ckpt, API_KEY="sekret")
    assert httpx.get(server.url + "/health").status_code == 200
    assert_envelope(httpx.get(server.url + "/v1/models"), 401, code="invalid_api_key")
    assert_envelope(post(server, chat_body(), headers={"Authorization": "Bearer wrong"}), 401)
    assert_envelope(httpx.post(server.url + "/v1/cancel/x"), 401)
    reply = server.client(api_key="sekret").chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.content == "Hello from a text model."


def test_load_failure_is_reported(server_factory, tmp_path):
    (tmp_path / "config.json").write_text("{not a config")
    server = server_factory(tmp_path, wait_ready=False)
    health = server.wait(lambda h: h["error"] is not None, timeout=60)
    assert health["ok"] is True and health["modelReady"] is False
    error = assert_envelope(post(server, chat_body()), 503, code="model_load_failed")
    assert "failed to load" in error["message"]


def test_not_ready_is_503(vl_ckpt):
    app = create_app(Settings(model_repo_id=str(vl_ckpt), load_model_on_startup=False, _env_file=None))
    with TestClient(app) as client:
        assert client.get("/health").json()["modelReady"] is False
        response = client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
        assert response.headers["retry-after"] == "5"


@pytest.fixture
def fault_server(vl_ckpt):
    app = create_app(Settings(model_repo_id=str(vl_ckpt), device_map="cpu", _env_file=None))
    server = InProcessServer(app)
    yield server, app.state.services.engine
    server.stop()


def test_generation_failure_ends_stream_and_server_keeps_serving(fault_server):
    server, engine = fault_server
    decoder = engine.decoder
    real_step, real_prefill = decoder.decode_step, decoder.prefill
    calls = {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected fault")
        return real_step(*args, **kwargs)

    decoder.decode_step = failing_step
    try:
        _, sse = stream(server.url, chat_body(stream=True, session_id="fails"))
    finally:
        decoder.decode_step = real_step
    assert sse.events[-1][1] == "[DONE]"
    error = sse.chunks()[-1]
    assert "injected fault" in error["error"]["message"] and error["error"]["type"] == "server_error"
    assert sse.indices == list(range(len(sse.events)))
    assert httpx.get(server.url + "/v1/sessions/fails").json()["state"] == "failed"

    decoder.prefill = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        assert_envelope(post(server, chat_body()), 500, code="generation_failed")
    finally:
        decoder.prefill = real_prefill
    reply = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=30).json()
    assert reply["choices"][0]["message"]["content"] == "Hello! I am a demo model."


def test_session_id_length_limit(vl_server):
    _, ok = stream(vl_server.url, chat_body(stream=True, session_id="s" * 128))
    assert ok.events[-1][1] == "[DONE]" and ok.ids[0] == "s" * 128 + ":0"
    assert_envelope(post(vl_server, chat_body(stream=True, session_id="s" * 129)), 400, param="session_id")


def test_served_model_name(server_factory, text_ckpt):
    server = server_factory(text_ckpt, SERVED_MODEL_NAME="my-model")
    assert [m.id for m in server.client().models.list().data] == ["my-model"]
    assert httpx.get(server.url + "/health").json()["modelId"] == "my-model"
    assert server.client().chat.completions.create(model="x", messages=USER).model == "my-model"


def test_settings_from_dotenv(server_factory, text_ckpt, tmp_path):
    (tmp_path / ".env").write_text("SERVED_MODEL_NAME=from-dotenv\nAPI_KEY=dotenv-key\nMAX_TOKENS=2\n")
    server = server_factory(text_ckpt, cwd=tmp_path)
    assert httpx.get(server.url + "/v1/models").status_code == 401
    client = server.client(api_key="dotenv-key")
    reply = client.chat.completions.create(model="m", messages=USER)
    assert reply.model == "from-dotenv" and reply.usage.completion_tokens == 2
