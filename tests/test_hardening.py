"""No request harms another, the server or its next start: validation at the door, template
variables only, cheap refusals first, failures isolated to their row, auth details."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwenserve import checkpoints
from qwenserve.app import create_app
from qwenserve.config import Settings
from qwenserve.engine import Engine

from .helpers import InProcessServer, chat_body, read_sse, stream
from .mediafiles import png
from .test_errors import assert_envelope, post

# ---- numbers at the door ------------------------------------------------------------------------


@pytest.mark.parametrize("field,ok,refused,extra", [
    ("temperature", 0.01, 0.0099, {}),
    ("temperature", 0.01, 1e-300, {}),
    ("seed", 2 ** 64 - 1, 2 ** 64, {"temperature": 1.0}),
    ("seed", -(2 ** 63), -(2 ** 63) - 1, {"temperature": 1.0}),
    ("repetition_penalty", 0.01, 0.0099, {"temperature": 1.0}),
    ("repetition_penalty", 0.01, 1e-300, {"temperature": 1.0}),
    ("repetition_penalty", 10.0, 10.01, {"temperature": 1.0}),
])
def test_numbers_within_their_range_at_the_limit_and_past_it(text_server, field, ok, refused, extra):
    accepted = post(text_server, chat_body(**{field: ok}, max_tokens=3, **extra))
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["choices"][0]["message"]["content"] == "Hello from a"
    error = assert_envelope(post(text_server, chat_body(**{field: refused}, max_tokens=3, **extra)), 400)
    assert error["param"] == field


def test_extreme_allowed_numbers_sample_safely(text_server):
    body = chat_body(max_tokens=6, temperature=0.01, repetition_penalty=0.01, presence_penalty=2,
                     frequency_penalty=-2, top_k=10 ** 12, top_p=1e-9, seed=2 ** 64 - 1)
    reply = post(text_server, body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- request bodies that used to be 500s -------------------------------------------------------


def _raw(server, data: bytes) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", content=data,
                      headers={"content-type": "application/json"}, timeout=30)


MESSAGES = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,
    ("{" + MESSAGES + ', "x": ' + "[" * 5000 + "]" * 5000 + "}").encode(),
    ("{" + MESSAGES + ', "x": 1' + "0" * 5000 + "}").encode(),
    ("{" + MESSAGES + ', "temperature": NaN}').encode(),
    ("{" + MESSAGES + ', "x": Infinity}').encode(),
    ("{" + MESSAGES + ', "x": 1e400}').encode(),
    ("{" + MESSAGES + ', "user": "\\ud800"}').encode(),
    ('{"messages": [{"role": "user", "content": "a\\udfffb"}]}').encode(),
])
def test_hostile_json_is_a_400(text_server, raw):
    error = assert_envelope(_raw(text_server, raw), 400, code="invalid_json")
    assert len(error["message"]) < 400
    assert post(text_server, chat_body(max_tokens=2)).status_code == 200


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_depth_at_the_limit_and_past_it(text_server):
    # The body object is level 1, so MAX_JSON_DEPTH=64 leaves 63 levels for a field's value.
    ok = _raw(text_server, ("{" + MESSAGES + ', "max_tokens": 2, "x": ' + _nested(63) + "}").encode())
    assert ok.status_code == 200, ok.text
    refused = _raw(text_server, ("{" + MESSAGES + ', "max_tokens": 2, "x": ' + _nested(64) + "}").encode())
    assert "MAX_JSON_DEPTH" in assert_envelope(refused, 400, code="invalid_json")["message"]


# ---- template variables only -------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"chat_template": ""},
    {"chat_template": "{% for i in range(10**9) %}x{% endfor %}"},
    {"tokenize": True},
    {"tools": [{"type": "function"}]},
    {"documents": [{"text": "x"}]},
    {"add_generation_prompt": False},
])
def test_template_keywords_are_refused(text_server, kwargs):
    error = assert_envelope(post(text_server, chat_body(chat_template_kwargs=kwargs)), 400)
    assert error["param"] == "chat_template_kwargs"
    assert "template variables" in error["message"]


def test_template_variables_pass_and_unknown_ones_are_dropped(vl_server):
    reply = post(vl_server, chat_body(chat_template_kwargs={"enable_thinking": False, "not_used": [1, 2]}))
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert message["content"] == "Hello! I am a demo model." and message["reasoning_content"] is None


@pytest.fixture(scope="module")
def empty_template_server(server_factory_module, ckpt_dir):
    path = checkpoints.build_text_checkpoint(ckpt_dir / "text-empty-template")
    (Path(path) / "chat_template.jinja").write_text("{%- if false -%}never{%- endif -%}")
    config = json.loads((Path(path) / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (Path(path) / "tokenizer_config.json").write_text(json.dumps(config))
    return server_factory_module(path)


def test_empty_prompt_is_a_400(empty_template_server):
    error = assert_envelope(post(empty_template_server, chat_body()), 400, code="empty_prompt")
    assert error["param"] == "messages"
    assert httpx.get(empty_template_server.url + "/health").json()["ok"]


# ---- cheap refusals first -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(server_factory_module, text_ckpt):
    return server_factory_module(text_ckpt, MAX_PROMPT_CHARS=100, API_KEY="s3cret")


KEY = {"Authorization": "Bearer s3cret"}


def test_prompt_chars_at_the_limit_and_past_it(guarded_server):
    ok = post(guarded_server, chat_body("x" * 100, max_tokens=2), headers=KEY)
    assert ok.status_code == 200, ok.text
    parts = [{"type": "text", "text": "x" * 50}, {"type": "text", "text": "y" * 51}]
    error = assert_envelope(post(guarded_server, chat_body(parts), headers=KEY), 400,
                            code="context_length_exceeded")
    assert "MAX_PROMPT_CHARS" in error["message"] and error["param"] == "messages"


class CountingImageServer:
    """A local HTTP server that serves one PNG and counts the requests it gets."""

    def __init__(self):
        body = png(32, 32)
        self.hits = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits += 1
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cat.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_overload_is_refused_before_media_is_fetched(server_factory, endless_ckpt):
    server = server_factory(endless_ckpt, MAX_CONCURRENT_REQUESTS=1, MAX_QUEUED_REQUESTS=0,
                            MEDIA_ALLOW_PRIVATE_NETWORKS=1)
    images = CountingImageServer()
    try:
        image_body = chat_body([{"type": "image_url", "image_url": {"url": images.url}},
                                {"type": "text", "text": "what is it?"}], max_tokens=2)
        assert post(server, image_body).status_code == 200 and images.hits == 1  # the fetch works
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json=chat_body(stream=True, max_tokens=20_000, session_id="busy")) as busy:
            read_sse(busy.iter_lines(), max_events=2)
            error = assert_envelope(post(server, image_body), 429, code="server_overloaded")
            assert images.hits == 1, "the media was fetched for a request that was refused"
            assert "capacity" in error["message"]
            httpx.post(server.url + "/v1/cancel/busy")
    finally:
        images.close()


# ---- failures stay with their row ----------------------------------------------------------------

POISON_SEED = 666


@pytest.fixture
def poisoned_server(endless_ckpt, monkeypatch):
    """A real engine whose sampling (or prefill) fails for requests with one seed: an injected fault."""
    from qwenserve import sampling

    real_sample = sampling.RowSampler.sample

    def sample(self, logits, step=0):
        if self.params.seed == POISON_SEED:
            raise FloatingPointError("injected sampling fault")
        return real_sample(self, logits, step)

    monkeypatch.setattr(sampling.RowSampler, "sample", sample)
    settings = Settings(model_repo_id=str(endless_ckpt), device_map="cpu", _env_file=None)
    server = InProcessServer(create_app(settings, Engine(settings)))
    yield server
    server.stop()


def _stream_texts(server, bodies: list[dict]) -> list:
    results = [None] * len(bodies)

    def run(i):
        results[i] = stream(server.url, bodies[i], timeout=120)[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_failing_row_fails_alone(poisoned_server):
    healthy = chat_body(stream=True, max_tokens=40, temperature=0)
    bodies = [healthy, chat_body(stream=True, max_tokens=40, temperature=1.0, seed=POISON_SEED), healthy]
    results = _stream_texts(poisoned_server, bodies)
    for sse in (results[0], results[2]):
        finish = [c for c in sse.chunks() if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish[-1]["choices"][0]["finish_reason"] == "length"
        assert sse.text("reasoning_content").count(" tick") == 20  # a thinking model: all reasoning
    poisoned = results[1].chunks()
    assert poisoned[-1]["error"]["code"] == "generation_failed"
    assert "injected sampling fault" in poisoned[-1]["error"]["message"]


def test_a_failing_prefill_fails_alone(endless_ckpt, monkeypatch):
    """The fault is injected where every chunk's pass starts, alone or folded into a decode step."""
    real_inputs = Engine._chunk_inputs

    def chunk_inputs(rows, width):
        if any(row.job.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("injected prefill fault")
        return real_inputs(rows, width)

    monkeypatch.setattr(Engine, "_chunk_inputs", staticmethod(chunk_inputs))
    settings = Settings(model_repo_id=str(endless_ckpt), device_map="cpu", _env_file=None)
    server = InProcessServer(create_app(settings, Engine(settings)))
    try:
        bodies = [chat_body(stream=True, max_tokens=10, temperature=0, seed=s) for s in (1, POISON_SEED, 2, 3)]
        results = _stream_texts(server, bodies)
    finally:
        server.stop()
    assert [r.text("reasoning_content").count(" tick") for i, r in enumerate(results) if i != 1] == [5, 5, 5]
    assert results[1].chunks()[-1]["error"]["code"] == "generation_failed"


# ---- auth and the small ones ---------------------------------------------------------------------


@pytest.mark.parametrize("header,status", [
    ("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER s3cret", 200), ("Bearer  s3cret", 200),
    ("Bearer s3cre", 401), ("Bearer s3cret2", 401), ("Basic s3cret", 401), ("s3cret", 401), ("", 401),
])
def test_bearer_scheme_is_case_insensitive(guarded_server, header, status):
    response = post(guarded_server, chat_body(max_tokens=2), headers={"Authorization": header})
    assert response.status_code == status, response.text


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc"])
def test_api_description_follows_the_key(guarded_server, path):
    assert_envelope(httpx.get(guarded_server.url + path), 401, code="invalid_api_key")
    assert httpx.get(guarded_server.url + path, headers=KEY).status_code == 200
    assert httpx.get(guarded_server.url + "/health").status_code == 200


def test_model_id_never_shows_a_local_path(guarded_server, text_ckpt):
    assert httpx.get(guarded_server.url + "/health").json()["modelId"] == text_ckpt.name
    models = httpx.get(guarded_server.url + "/v1/models", headers=KEY).json()
    assert [m["id"] for m in models["data"]] == [text_ckpt.name]
    reply = post(guarded_server, chat_body(max_tokens=2), headers=KEY).json()
    assert reply["model"] == text_ckpt.name and str(text_ckpt) not in json.dumps(reply)


def test_client_leaving_mid_body_is_not_an_unhandled_error(guarded_server):
    port = int(guarded_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\": [")
        time.sleep(0.5)
    time.sleep(1.0)
    assert post(guarded_server, chat_body(max_tokens=2), headers=KEY).status_code == 200
    log = guarded_server.log_path.read_text()
    assert "unhandled error" not in log and "Traceback" not in log


def test_prompt_chars_count_tools_calls_and_reasoning(guarded_server):
    big_tool = {"type": "function", "function": {"name": "f", "description": "d" * 200}}
    error = assert_envelope(post(guarded_server, chat_body("hi", tools=[big_tool]), headers=KEY), 400,
                            code="context_length_exceeded")
    assert "MAX_PROMPT_CHARS" in error["message"]
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "reasoning_content": "r" * 120}]
    assert_envelope(post(guarded_server, {"messages": history}, headers=KEY), 400, code="context_length_exceeded")
