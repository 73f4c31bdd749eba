"""Resumable streams: the session log, resume, several readers, cancel, auto-cancel, TTL, pings."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .helpers import chat_body, read_sse, stream

ENDLESS = dict(stream=True, max_tokens=20000, temperature=0)


def state(server, session_id):
    return httpx.get(f"{server.url}/v1/sessions/{session_id}").json()


def wait_state(server, session_id, wanted, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state(server, session_id).get("state")
        if current == wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"session {session_id} is {current}, not {wanted}")


def test_resume_with_header_and_query_replays_exactly_the_missed_events(vl_server):
    body = chat_body(stream=True, session_id="resume-1", stream_options={"include_usage": True})
    _, full = stream(vl_server.url, body)
    assert full.events[-1][1] == "[DONE]"
    for k in (-1, 0, 4, len(full.events) - 2):
        _, by_header = stream(vl_server.url, body, headers={"Last-Event-ID": f"resume-1:{k}"})
        assert by_header.events == full.events[k + 1:]
        _, by_query = stream(vl_server.url, body, params={"last_event_id": f"resume-1:{k}"})
        assert by_query.events == full.events[k + 1:]


def test_same_session_same_body_never_generates_twice(vl_server):
    body = chat_body(stream=True, session_id="once-1", seed=1)
    _, first = stream(vl_server.url, body)
    _, again = stream(vl_server.url, body)  # no Last-Event-ID: replays everything
    assert again.events == first.events
    assert state(vl_server, "once-1")["event_count"] == len(first.events)


def test_resume_mid_generation_matches_an_uninterrupted_stream(endless_server):
    body = chat_body(session_id="mid-1", **{**ENDLESS, "max_tokens": 300})
    _, head = stream(endless_server.url, body, max_events=20)  # the client drops after 20 events
    k = head.indices[-1]
    _, tail = stream(endless_server.url, body, headers={"Last-Event-ID": f"mid-1:{k}"})
    combined = head.events + tail.events
    assert [i for i, _ in combined] == [f"mid-1:{i}" for i in range(len(combined))]
    _, reference = stream(endless_server.url, chat_body(session_id="mid-ref", **{**ENDLESS, "max_tokens": 300}))
    strip = lambda events: [json.loads(d)["choices"] if d != "[DONE]" else d for _, d in events]  # noqa: E731
    assert strip(combined) == strip(reference.events)


def test_two_clients_follow_one_session(endless_server):
    body = chat_body(session_id="two-1", **{**ENDLESS, "max_tokens": 200})
    results = {}

    def follow_by_get():
        with httpx.stream("GET", f"{endless_server.url}/v1/sessions/two-1/events", timeout=60) as response:
            results["get"] = read_sse(response)

    with httpx.stream("POST", endless_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines) == "id: two-1:0"
        reader = threading.Thread(target=follow_by_get)
        reader.start()
        rest = read_sse(lines)
    reader.join(timeout=60)
    assert results["get"].events[-1][1] == "[DONE]"
    # The POST reader consumed the first "id:" line itself; everything else is the same, event for event.
    assert results["get"].events[0][1] == rest.events[0][1]
    assert results["get"].events[1:] == rest.events[1:]
    assert results["get"].indices == list(range(len(results["get"].events)))


def test_resume_errors(vl_server, endless_server):
    body = chat_body(stream=True, session_id="err-1")
    stream(vl_server.url, body)
    cases = [
        ({"Last-Event-ID": "no-colon"}, body, 400, "invalid_last_event_id"),
        ({"Last-Event-ID": "err-1:abc"}, body, 400, "invalid_last_event_id"),
        ({"Last-Event-ID": "err-1:-2"}, body, 400, "invalid_last_event_id"),
        ({"Last-Event-ID": "err-1:999"}, body, 400, "invalid_last_event_id"),
        ({"Last-Event-ID": "other:3"}, body, 400, "session_mismatch"),
        ({"Last-Event-ID": "ghost:3"}, chat_body(stream=True), 404, "session_not_found"),
        ({"Last-Event-ID": "err-1:2"}, chat_body("different", stream=True, session_id="err-1"), 409,
         "session_conflict"),
        ({}, chat_body("different", stream=True, session_id="err-1"), 409, "session_conflict"),
    ]
    for headers, request_body, status, code in cases:
        response, _ = stream(vl_server.url, request_body, headers=headers)
        assert response.status_code == status, (headers, response.text)
        assert response.json()["error"]["code"] == code
    assert httpx.get(vl_server.url + "/v1/sessions/ghost").status_code == 404
    assert httpx.get(vl_server.url + "/v1/sessions/ghost/events").status_code == 404
    assert httpx.get(vl_server.url + "/v1/sessions/err-1/events",
                     headers={"Last-Event-ID": "other:1"}).status_code == 400


def test_index_older_than_the_ring_buffer_is_410(tight_server):
    # tight_server keeps 64 events per session.
    endless_server = tight_server
    body = chat_body(session_id="ring-1", **{**ENDLESS, "max_tokens": 100})
    _, full = stream(endless_server.url, body)
    assert len(full.events) > 64
    oldest = len(full.events) - 64
    _, kept = stream(endless_server.url, body, headers={"Last-Event-ID": f"ring-1:{oldest - 1}"})
    assert kept.events == full.events[oldest:]
    response, _ = stream(endless_server.url, body, headers={"Last-Event-ID": f"ring-1:{oldest - 2}"})
    assert response.status_code == 410
    assert f"oldest available index is {oldest}" in response.json()["error"]["message"]


def test_cancel_is_prompt_idempotent_and_404_for_unknown(endless_server):
    body = chat_body(session_id="cancel-1", **ENDLESS)
    with httpx.stream("POST", endless_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        head = read_sse(lines, max_events=5)
        answer = httpx.post(endless_server.url + "/v1/cancel/cancel-1")
        assert answer.status_code == 200 and answer.json()["cancel_requested"] is True
        at_cancel = state(endless_server, "cancel-1")["event_count"]
        rest = read_sse(lines)
    assert rest.events[-1][1] == "[DONE]"
    final = rest.chunks()[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    # After the cancel: what was already on its way to the log, a generation step or two, the final chunk
    # and [DONE] -- a few dozen events at most on a loaded machine, against the 20000 tokens asked for.
    assert state(endless_server, "cancel-1")["event_count"] - at_cancel <= 64
    wait_state(endless_server, "cancel-1", "cancelled")
    again = httpx.post(endless_server.url + "/v1/cancel/cancel-1")
    assert again.status_code == 200 and again.json()["state"] == "cancelled"
    missing = httpx.post(endless_server.url + "/v1/cancel/nobody")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
    assert head.indices + rest.indices == list(range(len(head.events) + len(rest.events)))


def test_auto_cancel_after_grace(endless_server):
    # endless_server: CANCEL_AFTER_DISCONNECT_SECONDS=1.5
    body = chat_body(session_id="auto-1", **ENDLESS)
    stream(endless_server.url, body, max_events=3)
    assert state(endless_server, "auto-1")["state"] == "running"
    wait_state(endless_server, "auto-1", "cancelled", timeout=10)
    count = state(endless_server, "auto-1")["event_count"]
    _, tail = stream(endless_server.url, body, headers={"Last-Event-ID": f"auto-1:{count - 3}"})
    assert tail.events[-1][1] == "[DONE]"
    assert tail.chunks()[-1]["choices"][0]["finish_reason"] == "stop"


def test_client_back_within_grace_keeps_generation_alive(endless_server):
    body = chat_body(session_id="auto-2", **ENDLESS)
    _, head = stream(endless_server.url, body, max_events=3)
    time.sleep(0.5)
    with httpx.stream("POST", endless_server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Last-Event-ID": f"auto-2:{head.indices[-1]}"}) as response:
        deadline = time.monotonic() + 3.0  # twice the grace, connected all along
        for _ in response.iter_lines():
            if time.monotonic() > deadline:
                # Checked while still reading: leaving the loop closes the connection.
                assert state(endless_server, "auto-2")["state"] == "running"
                assert state(endless_server, "auto-2")["clients"] == 1
                break
    httpx.post(endless_server.url + "/v1/cancel/auto-2")
    wait_state(endless_server, "auto-2", "cancelled")


def test_auto_cancel_disabled_with_zero(server_factory, endless_ckpt):
    server = server_factory(endless_ckpt, CANCEL_AFTER_DISCONNECT_SECONDS=0)
    body = chat_body(session_id="keep-1", **ENDLESS)
    stream(server.url, body, max_events=3)
    time.sleep(1.5)
    assert state(server, "keep-1")["state"] == "running"
    httpx.post(server.url + "/v1/cancel/keep-1")
    wait_state(server, "keep-1", "cancelled")


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_non_stream_disconnect_cancels_at_once(endless_server):
    before = metric(endless_server, "qwenserve_cancellations_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(endless_server.url + "/v1/chat/completions", timeout=1.0,
                   json=chat_body(max_tokens=20000, temperature=0))
    # Nothing else runs on this server now: without the cancel, 20000 tokens would keep it busy.
    deadline = time.monotonic() + 5
    while metric(endless_server, "qwenserve_requests_running") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(endless_server, "qwenserve_requests_running") == 0
    assert metric(endless_server, "qwenserve_cancellations_total") >= before + 1


def queued_behind(server, holder: str, session_id: str):
    """On tight_server (one batch slot): `holder` takes the slot, then a stream for `session_id` is
    opened, which waits in the queue after its role chunk."""
    stream(server.url, chat_body(session_id=holder, **ENDLESS), max_events=2)
    return httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                        json=chat_body(session_id=session_id, **ENDLESS))


def test_pings_on_quiet_streams(tight_server):
    server = tight_server
    with queued_behind(server, "busy", "quiet") as response:
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if lines.count(": ping") >= 2:
                break
    assert lines[0] == "id: quiet:0" and lines.count(": ping") == 2
    for sid in ("busy", "quiet"):
        httpx.post(f"{server.url}/v1/cancel/{sid}")


def test_finished_sessions_expire_after_ttl(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, SESSIONS_TTL_SECONDS=1)
    body = chat_body(stream=True, session_id="ttl-1")
    stream(server.url, body)
    assert state(server, "ttl-1")["state"] == "finished"
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/sessions/ttl-1").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/v1/sessions/ttl-1").status_code == 404
    response, _ = stream(server.url, body, headers={"Last-Event-ID": "ttl-1:0"})
    assert response.status_code == 404


def test_cancel_of_a_queued_stream_ends_it_at_once(tight_server):
    server = tight_server
    with queued_behind(server, "holder", "waiter") as response:
        lines = response.iter_lines()
        head = read_sse(lines, max_events=1)  # the role chunk; no token yet
        assert httpx.post(server.url + "/v1/cancel/waiter").status_code == 200
        rest = read_sse(lines)
    assert head.indices + rest.indices == [0, 1, 2]
    assert rest.chunks()[0]["choices"][0]["finish_reason"] == "stop" and rest.events[-1][1] == "[DONE]"
    assert state(server, "waiter")["state"] == "cancelled"
    assert state(server, "holder")["state"] == "running"
    assert metric(server, "qwenserve_requests_waiting") == 0
    httpx.post(server.url + "/v1/cancel/holder")
    wait_state(server, "holder", "cancelled")
