"""SQLite sessions: kill -9 mid-stream, restart on the same database, resume, and the generation goes on."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx

from .helpers import chat_body, read_sse, stream

TOKENS = 1500


def normalize(events, session_id):
    """Events of two sessions compared: the index and the chunk, less the session id and creation time."""
    out = []
    for event_id, data in events:
        chunk = data if data == "[DONE]" else {**json.loads(data), "id": "X", "created": 0}
        out.append((event_id.rsplit(":", 1)[1], chunk))
    return out


def integrity(db) -> str:
    with sqlite3.connect(db) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def read_then_kill(server, body, headers, count):
    """Read `count` events, then SIGKILL the server while the stream is still open."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        seen = read_sse(lines, max_events=count)
        server.kill()
    return seen


def test_kill_restart_resume_continues_the_generation(server_factory, endless_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db,
                            CANCEL_AFTER_DISCONNECT_SECONDS=0)
    options = dict(stream=True, max_tokens=TOKENS, temperature=0, stream_options={"include_usage": True})
    _, reference = stream(server.url, chat_body(session_id="ref", **options))

    body = chat_body(session_id="crash-1", **options)
    seen = read_then_kill(server, body, {}, 40)
    for round_ in range(3):
        assert integrity(db) == "ok"
        server.start()
        # Every event a client saw was committed before it was sent: the replay starts with them, byte for byte.
        _, replay = stream(server.url, body, headers={"Last-Event-ID": "crash-1:-1"}, max_events=len(seen.events))
        assert replay.events == seen.events
        if round_ < 2:
            more = read_then_kill(server, body, {"Last-Event-ID": seen.ids[-1]}, 60)
            seen.events += more.events
    _, rest = stream(server.url, body, headers={"Last-Event-ID": seen.ids[-1]})
    events = seen.events + rest.events
    assert [int(i.rsplit(":", 1)[1]) for i, _ in events] == list(range(len(events)))
    assert normalize(events, "crash-1") == normalize(reference.events, "ref")
    assert json.loads(events[-2][1])["usage"]["completion_tokens"] == TOKENS
    assert httpx.get(server.url + "/v1/sessions/crash-1").json()["state"] == "finished"
    server.stop()
    assert integrity(db) == "ok"
    with sqlite3.connect(db) as conn:
        indices = [i for (i,) in conn.execute("SELECT idx FROM events WHERE session_id='crash-1' ORDER BY idx")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        stored_request = json.loads(conn.execute(
            "SELECT request_json FROM sessions WHERE session_id='crash-1'").fetchone()[0])
    assert indices == list(range(len(events)))
    assert mode == "wal"
    assert stored_request["messages"] == body["messages"] and stored_request["max_tokens"] == TOKENS


def test_finished_session_replays_identically_after_restart(server_factory, vl_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(vl_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db)
    body = chat_body(stream=True, session_id="done-1", stream_options={"include_usage": True})
    _, original = stream(server.url, body)
    server.kill()
    server.start()
    _, replay = stream(server.url, body, headers={"Last-Event-ID": "done-1:-1"})
    assert replay.events == original.events
    via_get = httpx.get(server.url + "/v1/sessions/done-1/events", params={"last_event_id": "done-1:3"})
    assert via_get.text.startswith("id: done-1:4\n")
    assert httpx.get(server.url + "/v1/sessions/done-1").json() == {
        "id": "done-1", "object": "chat.completion.session", "state": "finished",
        "event_count": len(original.events), "created": json.loads(original.events[0][1])["created"],
        "clients": 0, "cancel_requested": False}


def test_persisted_sessions_expire_after_ttl(server_factory, vl_ckpt, tmp_path):
    db = tmp_path / "sessions.db"
    server = server_factory(vl_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db, SESSIONS_TTL_SECONDS=1)
    stream(server.url, chat_body(stream=True, session_id="old-1"))
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/v1/sessions/old-1").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/v1/sessions/old-1").status_code == 404
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE session_id='old-1'").fetchone()[0] == 0


def test_image_session_continues_after_a_crash(server_factory, endless_ckpt, tmp_path):
    from .mediafiles import data_url, png

    db = tmp_path / "sessions.db"
    server = server_factory(endless_ckpt, PERSIST_SESSIONS=1, SESSIONS_DB_PATH=db,
                            CANCEL_AFTER_DISCONNECT_SECONDS=0)
    content = [{"type": "image_url", "image_url": {"url": data_url(png(), "image/png")}},
               {"type": "text", "text": "describe"}]
    body = {"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": 600,
            "temperature": 0, "session_id": "img-crash", "stream_options": {"include_usage": True}}
    _, reference = stream(server.url, {**body, "session_id": "img-ref"})
    seen = read_then_kill(server, body, {}, 30)
    server.start()
    _, rest = stream(server.url, body, headers={"Last-Event-ID": seen.ids[-1]})
    events = seen.events + rest.events
    assert normalize(events, "img-crash") == normalize(reference.events, "img-ref")
    assert json.loads(events[-2][1])["usage"] == json.loads(reference.events[-2][1])["usage"]
