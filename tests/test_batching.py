"""Many requests on one model: exact replies under concurrency, batching that does not mix requests up,
fairness, backpressure and metrics."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .helpers import chat_body, stream
from .mediafiles import data_url, png

REASONING, CONTENT = "Let me think briefly", "Hello! I am a demo model."


def complete(server, body, timeout=120) -> dict:
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def metric(server, name: str, labels: str = "") -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def image_message(text="look"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(), "image/png")}},
                                         {"type": "text", "text": text}]}]


def test_32_concurrent_streams_get_their_exact_reply(vl_server):
    def one(i):
        body = chat_body(f"request {i}", stream=True, session_id=f"many-{i}")
        if i % 4 == 0:
            body["messages"] = image_message(f"request {i}")
        _, sse = stream(vl_server.url, body, timeout=120)
        return sse

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, sse in enumerate(results):
        assert sse.text("reasoning_content") == REASONING, i
        assert sse.text() == CONTENT, i
        assert sse.ids == [f"many-{i}:{k}" for k in range(len(sse.events))]


def test_mixed_max_tokens_in_one_batch(vl_server):
    limits = list(range(1, 19))
    with ThreadPoolExecutor(len(limits)) as pool:
        replies = list(pool.map(lambda n: complete(vl_server, chat_body(max_tokens=n)), limits))
    for n, reply in zip(limits, replies):
        usage, choice = reply["usage"], reply["choices"][0]
        assert usage["completion_tokens"] == min(n, 15)
        assert choice["finish_reason"] == ("length" if n < 15 else "stop")


def test_batched_requests_match_their_solo_runs(server_factory, random_vl_ckpt):
    """Random weights: any mix-up of caches, masks or (multimodal) positions changes the greedy text."""
    server = server_factory(random_vl_ckpt, MAX_CONCURRENT_REQUESTS=8)
    bodies = [
        chat_body("short", max_tokens=24, temperature=0),
        {"messages": image_message("what is this picture"), "max_tokens": 24, "temperature": 0},
        chat_body("a much longer prompt " * 12, max_tokens=24, temperature=0),
        {"messages": image_message("x"), "max_tokens": 30, "temperature": 0},
        chat_body("seeded", max_tokens=24, temperature=1.0, seed=5),
    ]
    solo = [complete(server, body)["choices"][0]["message"] for body in bodies]

    def delayed(args, step=0.05):
        i, body = args
        time.sleep(step * i)  # join a batch that is already decoding
        return complete(server, body)["choices"][0]["message"]

    for _ in range(2):
        with ThreadPoolExecutor(len(bodies) * 2) as pool:
            together = list(pool.map(delayed, enumerate(bodies + bodies)))
        assert together == solo + solo
    # All at once: prompts of different lengths prefill together, left-padded.
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda args: delayed(args, step=0), enumerate(bodies + bodies)))
    assert together == solo + solo


def test_cancel_inside_a_batch_leaves_neighbours_unchanged(endless_server):
    options = dict(stream=True, max_tokens=300, temperature=0)
    bodies = {f"nb-{i}": chat_body(session_id=f"nb-{i}", **options) for i in range(4)}
    bodies["nb-img"] = {"messages": image_message(), "session_id": "nb-img", **options}
    results = {}

    def follow(sid):
        _, results[sid] = stream(endless_server.url, bodies[sid], timeout=120)

    threads = [threading.Thread(target=follow, args=(sid,)) for sid in bodies]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert httpx.post(endless_server.url + "/v1/cancel/nb-1").status_code == 200
    for thread in threads:
        thread.join(120)
    expected = " tick tock" * 150
    for sid, sse in results.items():
        if sid == "nb-1":
            assert len(sse.text("reasoning_content")) < len(expected)
            assert sse.chunks()[-1]["choices"][0]["finish_reason"] == "stop"
        else:
            assert sse.text("reasoning_content") == expected, sid


def test_short_request_is_not_stuck_behind_long_streams(endless_server):
    long_ids = [f"long-{i}" for i in range(4)]
    started = [threading.Event() for _ in long_ids]

    def read_long(sid: str, started: threading.Event) -> None:  # read throughout: a client that keeps up
        with httpx.stream("POST", endless_server.url + "/v1/chat/completions", timeout=60,
                          json=chat_body(session_id=sid, stream=True, max_tokens=20000, temperature=0)) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i == 4:
                    started.set()

    readers = [threading.Thread(target=read_long, args=args) for args in zip(long_ids, started)]
    for reader in readers:
        reader.start()
    for event in started:
        assert event.wait(60)
    reply = complete(endless_server, chat_body(max_tokens=5, temperature=0), timeout=60)
    assert reply["usage"]["completion_tokens"] == 5
    for sid in long_ids:  # still running: the short one went through beside them, not after them
        assert httpx.get(f"{endless_server.url}/v1/sessions/{sid}").json()["state"] == "running"
        httpx.post(f"{endless_server.url}/v1/cancel/{sid}")
    for reader in readers:
        reader.join(60)


@pytest.fixture
def small_server(server_factory, endless_ckpt):
    return server_factory(endless_ckpt, MAX_CONCURRENT_REQUESTS=2, MAX_QUEUED_REQUESTS=1,
                          CANCEL_AFTER_DISCONNECT_SECONDS=0)


def test_backpressure_429_and_recovery(small_server):
    server = small_server
    body = lambda i: chat_body(session_id=f"bp-{i}", stream=True, max_tokens=20000, temperature=0)  # noqa: E731
    for i in range(3):  # 2 running + 1 waiting: exactly at the limit
        response, _ = stream(server.url, body(i), max_events=1)
        assert response.status_code == 200
    deadline = time.monotonic() + 10
    while (metric(server, "qwenserve_requests_running"), metric(server, "qwenserve_requests_waiting")) != (2, 1):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    over, _ = stream(server.url, body(3))
    assert over.status_code == 429
    assert over.headers["retry-after"] == "1"
    assert over.json()["error"]["type"] == "rate_limit_exceeded"
    non_stream = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=10)
    assert non_stream.status_code == 429
    assert metric(server, "qwenserve_rejected_total") == 2
    assert httpx.get(server.url + "/health").json()["modelReady"]
    httpx.post(server.url + "/v1/cancel/bp-0")
    deadline = time.monotonic() + 10
    while True:
        response, _ = stream(server.url, body(4), max_events=1)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert response.status_code == 200
    for i in (1, 2, 4):
        httpx.post(f"{server.url}/v1/cancel/bp-{i}")


def test_metrics_move(small_server):
    server = small_server
    text = httpx.get(server.url + "/metrics").text
    for name in ("qwenserve_requests_running", "qwenserve_requests_waiting",
                 "qwenserve_time_to_first_token_seconds_count", "qwenserve_e2e_request_latency_seconds_count",
                 "qwenserve_prompt_tokens_total", "qwenserve_generation_tokens_total",
                 "qwenserve_cancellations_total", "qwenserve_resumes_total", "qwenserve_rejected_total"):
        assert name in text, name
    before = {n: metric(server, n) for n in ("qwenserve_time_to_first_token_seconds_count",
                                             "qwenserve_e2e_request_latency_seconds_count",
                                             "qwenserve_prompt_tokens_total", "qwenserve_generation_tokens_total",
                                             "qwenserve_cancellations_total", "qwenserve_resumes_total")}
    reply = complete(server, chat_body(max_tokens=7, temperature=0))
    body = chat_body(session_id="m-1", stream=True, max_tokens=20000, temperature=0)
    response, head = stream(server.url, body, max_events=3)
    stream(server.url, body, headers={"Last-Event-ID": "m-1:1"}, max_events=2)
    httpx.post(server.url + "/v1/cancel/m-1")
    deadline = time.monotonic() + 10
    while metric(server, "qwenserve_cancellations_total") == before["qwenserve_cancellations_total"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    after = {n: metric(server, n) for n in before}
    assert after["qwenserve_time_to_first_token_seconds_count"] == before[
        "qwenserve_time_to_first_token_seconds_count"] + 2
    assert after["qwenserve_e2e_request_latency_seconds_count"] == before[
        "qwenserve_e2e_request_latency_seconds_count"] + 2
    assert after["qwenserve_generation_tokens_total"] > before["qwenserve_generation_tokens_total"] + 7
    assert after["qwenserve_prompt_tokens_total"] == before["qwenserve_prompt_tokens_total"] + \
        2 * reply["usage"]["prompt_tokens"]
    assert after["qwenserve_resumes_total"] == before["qwenserve_resumes_total"] + 1
    assert metric(server, "qwenserve_requests_total", '{stream="true"}') >= 1
