"""Sessions that cannot harm the server or each other: stored requests the server no longer accepts,
identical requests racing for one id, SIGTERM during a stream, memory held by finished sessions."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import threading
import time

import httpx

from .helpers import chat_body, read_sse, stream
from .test_persistence import integrity, read_then_kill
from .test_sessions import metric, state, wait_state

ENDLESS = dict(stream=True, max_tokens=20000, temperature=0)


def streams_started(server) -> float:
    """qwenserve_requests_total{stream="true"}; the labelled series appears with the first stream."""
    try:
        return metric(server, 'qwenserve_requests_total{stream="true"}')
    except KeyError:
        return 0.0


def events_of(server, session_id: str):
    with httpx.stream("GET", f"{server.url}/v1/sessions/{session_id}/events", timeout=60) as response:
        assert response.status_code == 200, response.read()
        return read_sse(response)


# ---- a stored session that cannot continue fails alone; the server starts ----------------------------

def clone_session(db, source: str, target: str, request_json: str) -> None:
    """A copy of a stored session (its events included) under another id, with another request body."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT * FROM sessions WHERE session_id=?", (source,)).fetchone()
        conn.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?)", (target, row[1], request_json, *row[3:]))
        conn.execute("INSERT INTO events SELECT ?, idx, data, token_ids FROM events WHERE session_id=?",
                     (target, source))


def nested(depth: int):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_stored_request_that_cannot_continue_fails_alone(server_factory, endless_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db,
                            CANCEL_AFTER_DISCONNECT_SECONDS=0)
    body = chat_body(session_id="victim", **ENDLESS)
    seen = read_then_kill(server, body, {}, 10)
    with sqlite3.connect(db) as conn:
        good = json.loads(conn.execute("SELECT request_json FROM sessions WHERE session_id='victim'").fetchone()[0])
        stored = [d for (d,) in conn.execute("SELECT data FROM events WHERE session_id='victim' ORDER BY idx")]
    broken = {
        "bad-json": '{"messages": [{"role": "user", "content": "hi"',
        "surrogate": json.dumps({**good, "messages": [{"role": "user", "content": "\ud800"}]}),
        "too-deep": json.dumps({**good, "extra": nested(100)}),  # deeper than MAX_JSON_DEPTH (64)
        "stops": json.dumps({**good, "stop": ["zz1", "zz2", "zz3"]}),  # valid, but 3 > MAX_STOP_SEQUENCES below
    }
    for session_id, request_json in broken.items():
        clone_session(db, "victim", session_id, request_json)
    server.env["MAX_STOP_SEQUENCES"] = "2"
    server.start()  # raises if the server does not come up healthy
    for session_id in broken:
        wait_state(server, session_id, "failed")
        events = events_of(server, session_id)
        assert [d for _, d in events.events[:-2]] == stored, session_id
        assert events.indices == list(range(len(stored) + 2))
        error = json.loads(events.events[-2][1])
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
        assert error["error"]["code"] == "generation_failed" and error["error"]["type"] == "server_error"
        assert error["error"]["message"].startswith("the session could not be continued after a restart: ")
        assert events.events[-1][1] == "[DONE]"
    # The other sessions were not harmed: the original one goes on after the events it had stored.
    assert state(server, "victim")["state"] == "running"
    _, more = stream(server.url, body, headers={"Last-Event-ID": f"victim:{len(stored) - 1}"}, max_events=5)
    assert more.indices == list(range(len(stored), len(stored) + 5))
    assert seen.events == [(f"victim:{i}", d) for i, d in enumerate(stored[:len(seen.events)])]
    httpx.post(server.url + "/v1/cancel/victim")
    wait_state(server, "victim", "cancelled")


# ---- identical requests for a new session id share one generation -----------------------------------

def post_together(server, bodies: list[dict]) -> list[tuple[int, bytes]]:
    """Every body posted at the same moment from its own thread; (status, raw body) in order."""
    barrier = threading.Barrier(len(bodies))
    results: list = [None] * len(bodies)

    def post(i: int) -> None:
        barrier.wait()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=bodies[i], timeout=60) as response:
            results[i] = (response.status_code, response.read())

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    return results


def test_identical_requests_racing_for_a_new_id_read_one_stream(vl_server):
    before = streams_started(vl_server)
    body = chat_body(stream=True, session_id="race-1", temperature=0)
    results = post_together(vl_server, [body] * 8)
    assert [status for status, _ in results] == [200] * 8
    assert len({raw for _, raw in results}) == 1  # byte-identical
    events = read_sse(iter(results[0][1].decode().splitlines()))
    assert events.events[-1][1] == "[DONE]" and events.indices == list(range(len(events.events)))
    assert streams_started(vl_server) == before + 1
    assert state(vl_server, "race-1")["event_count"] == len(events.events)


def test_a_different_body_racing_for_the_same_id_is_a_conflict(vl_server):
    before = streams_started(vl_server)
    first, second = (chat_body(text, stream=True, session_id="race-2", temperature=0) for text in ("one", "two"))
    results = post_together(vl_server, [first, second] * 4)
    statuses = [status for status, _ in results]
    winner = statuses[0] == 200  # first's group won, or second's did
    assert statuses == [200, 409] * 4 if winner else statuses == [409, 200] * 4
    assert len({raw for status, raw in results if status == 200}) == 1
    for status, raw in results:
        if status == 409:
            assert json.loads(raw)["error"]["code"] == "session_conflict"
    assert streams_started(vl_server) == before + 1


def test_when_the_winner_fails_to_prepare_everyone_gets_its_error(vl_server):
    before = streams_started(vl_server)
    broken = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    content = [{"type": "image_url", "image_url": {"url": broken}}, {"type": "text", "text": "describe"}]
    body = {"messages": [{"role": "user", "content": content}], "stream": True, "session_id": "race-3"}
    results = post_together(vl_server, [body] * 8)
    assert [status for status, _ in results] == [400] * 8
    assert len({raw for _, raw in results}) == 1
    error = json.loads(results[0][1])["error"]
    assert error["code"] == "invalid_image" and error["param"] == "messages[0].content[0]"
    assert httpx.get(vl_server.url + "/v1/sessions/race-3").status_code == 404
    assert streams_started(vl_server) == before
    # Nothing is left claimed: the id is free for a good request.
    _, events = stream(vl_server.url, chat_body(stream=True, session_id="race-3", temperature=0))
    assert events.events[-1][1] == "[DONE]"


# ---- SIGTERM while a client streams -------------------------------------------------------------------

def stream_through_sigterm(server, body: dict, signal_after: int) -> str:
    """Streams, sends SIGTERM after `signal_after` events, and reads on until the server ends the stream
    (an abrupt close would raise here). Returns the raw text."""
    raw, sent = "", False
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for text in response.iter_text():
            raw += text
            if not sent and raw.count("\n\n") >= signal_after:
                server.proc.terminate()
                sent = True
    return raw


def parse_blocks(raw: str) -> list[tuple[str, str]]:
    """Whole events only: the text ends at an event boundary and every block is an event or a ping."""
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        if block == ": ping":
            continue
        id_line, data_line = block.split("\n")
        assert id_line.startswith("id: ") and data_line.startswith("data: ")
        events.append((id_line[4:], data_line[6:]))
        if data_line != "data: [DONE]":
            json.loads(data_line[6:])
    return events


def exited_cleanly(server, bound: float) -> bool:
    """uvicorn shuts the app down, then raises the signal it caught again: ended by SIGTERM, or 0."""
    code = server.proc.wait(timeout=bound)  # a hang check, not a timing measure
    server.log.close()
    return code in (0, -signal.SIGTERM) and "Application shutdown complete" in server.log_path.read_text()


def test_sigterm_ends_streams_at_an_event_boundary_and_they_resume_after_restart(server_factory, endless_ckpt,
                                                                                  tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db, SHUTDOWN_GRACE_SECONDS=2,
                            CANCEL_AFTER_DISCONNECT_SECONDS=0)
    body = chat_body(session_id="term-1", **ENDLESS)
    events = parse_blocks(stream_through_sigterm(server, body, signal_after=5))
    assert exited_cleanly(server, 15)
    ids = [int(event_id.rsplit(":", 1)[1]) for event_id, _ in events]
    assert ids == list(range(len(events))) and len(events) >= 5 and events[-1][1] != "[DONE]"
    assert integrity(db) == "ok"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT state FROM sessions WHERE session_id='term-1'").fetchone()[0] == "running"
    server.start()
    assert state(server, "term-1")["state"] == "running"
    _, more = stream(server.url, body, headers={"Last-Event-ID": events[-1][0]}, max_events=5)
    assert more.indices == list(range(len(events), len(events) + 5))
    httpx.post(server.url + "/v1/cancel/term-1")
    wait_state(server, "term-1", "cancelled")


def test_a_stream_that_ends_within_the_grace_is_complete(server_factory, endless_ckpt):
    server = server_factory(endless_ckpt, SHUTDOWN_GRACE_SECONDS=120)
    body = chat_body(session_id="term-2", **{**ENDLESS, "max_tokens": 200})
    events = parse_blocks(stream_through_sigterm(server, body, signal_after=1))
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] == "length"
    assert [event_id for event_id, _ in events] == [f"term-2:{i}" for i in range(len(events))]
    assert exited_cleanly(server, 150)


# ---- finished sessions held in memory are bounded --------------------------------------------------

def finish(server, session_id: str):
    _, events = stream(server.url, chat_body(stream=True, session_id=session_id, temperature=0))
    assert events.events[-1][1] == "[DONE]"
    wait_state(server, session_id, "finished")
    return events


def gone(server, session_id: str) -> bool:
    """Unknown everywhere, as an expired session is (and once gone, it stays gone)."""
    if httpx.get(f"{server.url}/v1/sessions/{session_id}").status_code != 404:
        return False
    resumed, _ = stream(server.url, chat_body(stream=True, session_id=session_id, temperature=0),
                        headers={"Last-Event-ID": f"{session_id}:0"})
    assert resumed.status_code == 404 and resumed.json()["error"]["code"] == "session_not_found"
    assert httpx.get(f"{server.url}/v1/sessions/{session_id}/events").status_code == 404
    return True


def test_finished_sessions_in_memory_are_capped_by_count(server_factory, vl_ckpt):
    server = server_factory(vl_ckpt, SESSIONS_MAX_FINISHED=2)
    first, second = finish(server, "cap-1"), finish(server, "cap-2")
    assert events_of(server, "cap-1").events == first.events  # at the limit: both kept
    assert events_of(server, "cap-2").events == second.events
    third = finish(server, "cap-3")  # one past it: the oldest finished goes
    assert gone(server, "cap-1")
    assert events_of(server, "cap-2").events == second.events
    assert events_of(server, "cap-3").events == third.events


def test_finished_sessions_in_memory_are_capped_by_bytes(server_factory, vl_ckpt, vl_server):
    size = sum(len(data.encode()) for _, data in finish(vl_server, "siz-1").events)  # ids of one length
    server = server_factory(vl_ckpt, SESSIONS_MAX_FINISHED_BYTES=2 * size)
    first, second = finish(server, "byt-1"), finish(server, "byt-2")
    assert sum(len(d.encode()) for _, d in first.events + second.events) == 2 * size
    assert events_of(server, "byt-1").events == first.events  # exactly at the limit: both kept
    finish(server, "byt-3")
    assert gone(server, "byt-1")
    assert events_of(server, "byt-2").events == second.events


def test_with_no_finished_sessions_kept_the_reader_still_gets_every_event(server_factory, vl_ckpt):
    # The janitor runs every 0.5 s with this TTL; a session that just finished is kept until its pass.
    server = server_factory(vl_ckpt, SESSIONS_MAX_FINISHED=0, SESSIONS_TTL_SECONDS=1)
    _, events = stream(server.url, chat_body(stream=True, session_id="zero-1", temperature=0))
    assert events.events[-1][1] == "[DONE]" and events.indices == list(range(len(events.events)))
    for _ in range(200):  # a hang bound: the next janitor passes come within a second
        if gone(server, "zero-1"):
            break
        time.sleep(0.1)
    assert gone(server, "zero-1")
