"""Several replica processes on one real redis-server: a session produced on one replica is read,
resumed, cancelled and kept alive from another; a replica that dies (kill -9), stalls (SIGSTOP) or is
stopped (SIGTERM) hands its generations to another, and nothing a client saw is lost, repeated or
changed; Redis keys expire; a Redis restarted from its AOF still has every session."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from qwenserve.stores import Fenced, RedisStore, SessionRecord, StoredEvent

from .helpers import chat_body, read_sse, stream
from .redis_fixtures import RedisServer, keys_without_expiry, session_keys, start_replicas
from .test_persistence import normalize
from .test_session_hardening import exited_cleanly, parse_blocks
from .test_sessions import metric, state, wait_state

LEASE = 2  # seconds: a dead replica's sessions are taken over after this (plus one scan)
ENDLESS = dict(stream=True, temperature=0, stream_options={"include_usage": True})
# Every replica of this module: quick takeovers, auto-cancel, pings and shutdowns.
REPLICA = dict(SESSION_LEASE_SECONDS=LEASE, CANCEL_AFTER_DISCONNECT_SECONDS=1.5, SSE_PING_SECONDS=1,
               SHUTDOWN_GRACE_SECONDS=4)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(server_factory_module, endless_ckpt, redis_server):
    """Replicas A and B on one Redis database, for the whole module (starting replicas is the slow part).
    A test that kills or stops A starts it again before it ends."""
    db = redis_server.new_db()
    a, b = start_replicas(server_factory_module, endless_ckpt, 2, REDIS_URL=redis_server.url(db), **REPLICA)
    a.db = b.db = db
    return a, b


@pytest.fixture(scope="module")
def third(server_factory_module, endless_ckpt, redis_server, pair):
    """A third replica C on the same database."""
    (c,) = start_replicas(server_factory_module, endless_ckpt, 1, REDIS_URL=redis_server.url(pair[0].db), **REPLICA)
    return c


class Reader(threading.Thread):
    """Follows a session through GET /v1/sessions/{id}/events, collecting events as they come, until the
    stream ends or `close()` (then it leaves at the next event)."""

    def __init__(self, server, session_id: str, last_event_id: str | None = None):
        super().__init__(daemon=True)
        self.url = f"{server.url}/v1/sessions/{session_id}/events"
        self.headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        self.events: list[tuple[str, str]] = []
        self.status: int | None = None
        self.leave = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("GET", self.url, headers=self.headers, timeout=120) as response:
            self.status = response.status_code
            event_id, data = None, None
            for line in response.iter_lines():
                if line.startswith("id:"):
                    event_id = line[3:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif line == "" and data is not None:
                    self.events.append((event_id, data))
                    event_id, data = None, None
                    if self.leave.is_set():
                        return

    def close(self) -> None:
        self.leave.set()
        self.join(timeout=60)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline and self.is_alive():
            time.sleep(0.02)
        assert len(self.events) >= count, f"{len(self.events)} events, wanted {count}"


def indices(events) -> list[int]:
    return [int(event_id.rsplit(":", 1)[1]) for event_id, _ in events]


def until(condition, timeout: float = 30, what: str = "condition"):
    """Polls until `condition()` is truthy (a hang bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def counter(server, name: str) -> float:
    try:
        return metric(server, name)
    except KeyError:
        return 0.0


def read_then_drop(server, body: dict, count: int, headers: dict | None = None):
    _, events = stream(server.url, body, headers=headers, max_events=count)
    return events.events


# ---- any replica serves any session ---------------------------------------------------------------------

def test_a_stream_produced_on_a_reads_byte_identical_through_b(pair, redis_server):
    a, b = pair
    body = chat_body(session_id="rep-read", max_tokens=120, **ENDLESS)
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        head = read_sse(lines, max_events=3)
        live_on_b = Reader(b, "rep-read")  # joins while A is still producing: catches up, then follows
        rest = read_sse(lines)
    live_on_b.join(timeout=60)
    on_a = head.events + rest.events
    assert on_a[-1][1] == "[DONE]" and indices(on_a) == list(range(len(on_a)))
    assert live_on_b.status == 200 and live_on_b.events == on_a
    with httpx.stream("GET", b.url + "/v1/sessions/rep-read/events", timeout=60) as replay:
        raw = replay.read().decode()
    assert raw == "".join(f"id: {i}\ndata: {d}\n\n" for i, d in on_a)  # byte for byte, after the end
    _, reposted = stream(b.url, body)  # the same body on another replica: the same stream, not a second one
    assert reposted.events == on_a
    described = [{k: v for k, v in state(server, "rep-read").items() if k != "clients"} for server in pair]
    assert described[0] == described[1] and described[0]["state"] == "finished"
    assert described[0]["event_count"] == len(on_a)
    assert keys_without_expiry(redis_server.client(a.db)) == []


def test_one_body_posted_to_two_replicas_at_once_is_one_session(pair):
    a, b = pair
    body = chat_body(session_id="rep-twice", max_tokens=40, **ENDLESS)
    barrier = threading.Barrier(4)
    results: list = [None] * 4

    def post(i: int) -> None:
        barrier.wait()
        with httpx.stream("POST", pair[i % 2].url + "/v1/chat/completions", json=body, timeout=60) as response:
            results[i] = (response.status_code, response.read())

    threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [status for status, _ in results] == [200] * 4
    assert len({raw for _, raw in results}) == 1  # one generation: byte-identical streams on both replicas
    events = read_sse(iter(results[0][1].decode().splitlines()))
    assert events.events[-1][1] == "[DONE]" and state(b, "rep-twice")["event_count"] == len(events.events)
    other = chat_body("something else", session_id="rep-twice", max_tokens=40, **ENDLESS)
    conflict, _ = stream(a.url, other)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "session_conflict"


def test_resume_on_b_in_the_middle_then_on_a_again(pair):
    a, b = pair
    body = chat_body(session_id="rep-resume", max_tokens=200, **ENDLESS)
    first = read_then_drop(a, body, 10)
    second = read_then_drop(b, body, 10, {"Last-Event-ID": first[-1][0]})
    _, third = stream(a.url, body, headers={"Last-Event-ID": second[-1][0]})
    events = first + second + third.events
    assert indices(events) == list(range(len(events))) and events[-1][1] == "[DONE]"
    _, reference = stream(b.url, chat_body(session_id="rep-resume-ref", max_tokens=200, **ENDLESS))
    assert normalize(events, "rep-resume") == normalize(reference.events, "rep-resume-ref")


def test_cancel_on_b_stops_the_generation_on_a(pair):
    a, b = pair
    before = counter(a, "qwenserve_cross_replica_cancels_total")
    body = chat_body(session_id="rep-cancel", max_tokens=20000, **ENDLESS)
    with httpx.stream("POST", a.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        read_sse(lines, max_events=5)
        answer = httpx.post(b.url + "/v1/cancel/rep-cancel")
        assert answer.status_code == 200 and answer.json()["cancel_requested"] is True
        at_cancel = state(b, "rep-cancel")["event_count"]
        rest = read_sse(lines)
    assert rest.events[-1][1] == "[DONE]"
    assert rest.chunks()[-2]["choices"][0]["finish_reason"] == "stop"
    # A sees the cancel at its next append: a few steps, not the 20000 tokens asked for.
    assert state(a, "rep-cancel")["event_count"] - at_cancel <= 64
    wait_state(a, "rep-cancel", "cancelled")
    assert state(b, "rep-cancel")["state"] == "cancelled" and state(b, "rep-cancel")["cancel_requested"]
    assert counter(a, "qwenserve_cross_replica_cancels_total") == before + 1
    assert counter(a, "qwenserve_cancellations_total") >= 1  # the engine on A stopped the row


def test_a_reader_on_b_keeps_the_generation_on_a_past_the_grace(pair):
    a, b = pair
    body = chat_body(session_id="rep-grace", max_tokens=20000, **ENDLESS)
    head = read_then_drop(a, body, 5)  # A's own client leaves at once...
    on_b = Reader(b, "rep-grace", head[-1][0])  # ...but one reads on B
    on_b.wait_for(5)
    time.sleep(3 * 1.5)  # three times CANCEL_AFTER_DISCONNECT_SECONDS with no client on A
    assert state(a, "rep-grace")["state"] == "running" and state(a, "rep-grace")["clients"] == 1
    seen = len(on_b.events)
    on_b.wait_for(seen + 5)  # and it still produces
    on_b.close()  # the last reader anywhere leaves: the grace starts now
    wait_state(b, "rep-grace", "cancelled")
    assert indices(on_b.events)[0] == 5 and indices(on_b.events) == list(range(5, 5 + len(on_b.events)))


def test_a_response_made_on_a_is_retrieved_and_cancelled_on_b(pair, redis_server):
    a, b = pair
    made = httpx.post(a.url + "/v1/responses", timeout=30,
                      json={"model": "m", "input": "hi", "background": True, "max_output_tokens": 20000,
                            "temperature": 0})
    response_id = made.json()["id"]
    until(lambda: httpx.get(f"{b.url}/v1/responses/{response_id}").json()["status"] == "in_progress",
          what="the response to start")
    with httpx.stream("GET", f"{b.url}/v1/responses/{response_id}", params={"stream": "true", "starting_after": 2},
                      timeout=60) as streamed:
        lines = streamed.iter_lines()
        first = next(line for line in lines if line.startswith("id:"))
    assert first == f"id: {response_id}:3"
    cancelled = httpx.post(f"{b.url}/v1/responses/{response_id}/cancel", timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert httpx.get(f"{a.url}/v1/responses/{response_id}").json()["status"] == "cancelled"
    stored = json.loads(redis_server.client(a.db).hget(f"qwenserve:{{{response_id}}}:rec", "req"))
    assert isinstance(stored["chat"]["seed"], int) and 0 <= stored["chat"]["seed"] < 2 ** 63
    deleted = httpx.delete(f"{b.url}/v1/responses/{response_id}")
    assert deleted.status_code == 200
    assert httpx.get(f"{a.url}/v1/responses/{response_id}").status_code == 404
    assert session_keys(redis_server.client(a.db), response_id) == []


# ---- takeover ---------------------------------------------------------------------------------------------

SAMPLINGS = {
    "greedy": dict(temperature=0),
    "seeded": dict(temperature=1.0, seed=1234),
    "server-seeded": dict(temperature=1.0),  # no seed: the server picks one and stores it with the session
}


def test_replicas_racing_to_take_over_one_wins_and_the_stale_producer_is_fenced(pair, third):
    a, b = pair
    c = third
    taken = lambda: [counter(server, "qwenserve_sessions_taken_over_total") for server in (b, c)]  # noqa: E731
    before, fenced = taken(), counter(a, "qwenserve_fenced_appends_total")
    body = chat_body(session_id="race-take", max_tokens=400, **ENDLESS)
    head = read_then_drop(a, body, 20)
    on_c = Reader(c, "race-take", head[-1][0])
    on_c.wait_for(1)
    a.proc.send_signal(signal.SIGSTOP)  # A stalls: its lease runs out while it still believes it produces
    try:
        until(lambda: sum(taken()) > sum(before), what="a takeover")
        seen = len(on_c.events)
        on_c.wait_for(seen + 10)  # the winner produces
    finally:
        a.proc.send_signal(signal.SIGCONT)
    # A wakes up, writes with its old epoch and is refused: it stops generating.
    until(lambda: counter(a, "qwenserve_fenced_appends_total") > fenced, what="A's refused append")
    until(lambda: metric(a, "qwenserve_requests_running") == 0, what="A to stop its generation")
    on_c.join(timeout=300)
    assert sorted(now - then for now, then in zip(taken(), before)) == [0, 1]  # exactly one winner
    events = head + on_c.events
    assert events[-1][1] == "[DONE]" and indices(events) == list(range(len(events)))
    _, reference = stream(b.url, {**body, "session_id": "race-ref"})
    assert normalize(events, "race-take") == normalize(reference.events, "race-ref")


def test_the_lease_fence_refuses_stale_epochs_and_unexpected_indices(redis_server):
    """The scripts themselves, on the real server: two replicas race for one orphaned session."""
    db = redis_server.new_db()

    async def scenario():
        one, two = (RedisStore(redis_server.url(db), 60, 60, 1) for _ in range(2))
        epoch = await one.create(SessionRecord("fence", "h", "{}", 1), "one")
        await one.append("fence", [StoredEvent(0, "a", [1])], epoch)
        with pytest.raises(Fenced):  # the same index twice
            await one.append("fence", [StoredEvent(0, "a again", [1])], epoch)
        with pytest.raises(Fenced):  # an index past the next one
            await one.append("fence", [StoredEvent(2, "c", [3])], epoch)
        await one.release("fence", epoch, "one")
        won = await asyncio.gather(one.take("fence", "one"), two.take("fence", "two"))
        assert sorted(won) == [0, epoch + 1]  # one winner, with a newer epoch
        winner, loser = (one, two) if won[0] else (two, one)
        with pytest.raises(Fenced):  # the old epoch is refused, whoever writes it
            await loser.append("fence", [StoredEvent(1, "stale", [2])], epoch)
        await winner.append("fence", [StoredEvent(1, "b", [2])], epoch + 1)
        assert [e.data for e in await loser.read("fence", -1)] == ["a", "b"]
        with pytest.raises(Fenced):
            await loser.set_state("fence", "finished", epoch)
        await winner.set_state("fence", "finished", epoch + 1)
        assert (await one.get("fence")).state == "finished"
        await one.close()
        await two.close()

    asyncio.run(scenario())
    assert keys_without_expiry(redis_server.client(db)) == []


# ---- Redis itself --------------------------------------------------------------------------------------

def test_keys_of_finished_sessions_expire(server_factory, endless_ckpt, redis_server):
    db = redis_server.new_db()
    (server,) = start_replicas(server_factory, endless_ckpt, 1, REDIS_URL=redis_server.url(db),
                               SESSIONS_TTL_SECONDS=3)
    client = redis_server.client(db)
    _, events = stream(server.url, chat_body(session_id="ttl-1", max_tokens=20, **ENDLESS))
    assert events.events[-1][1] == "[DONE]"
    assert session_keys(client, "ttl-1")  # kept for the TTL...
    assert keys_without_expiry(client) == []  # ...and every key knows when it goes
    until(lambda: session_keys(client, "ttl-1") == [], what="the keys to expire")
    assert httpx.get(server.url + "/v1/sessions/ttl-1").status_code == 404


def test_sessions_survive_a_redis_restart_from_its_aof(pair, redis_server):
    a, b = pair
    done_body = chat_body(session_id="aof-done", max_tokens=30, **ENDLESS)
    _, done = stream(a.url, done_body)
    body = chat_body(session_id="aof-live", max_tokens=400, **ENDLESS)
    head = read_then_drop(a, body, 10)
    on_b = Reader(b, "aof-live", head[-1][0])
    on_b.wait_for(5)
    redis_server.kill()  # SIGKILL: only the AOF (fsync at every write) remains
    redis_server.start()
    on_b.join(timeout=300)
    events = head + on_b.events
    assert events[-1][1] == "[DONE]" and indices(events) == list(range(len(events)))
    _, replay = stream(b.url, done_body, headers={"Last-Event-ID": "aof-done:-1"})
    assert replay.events == done.events
    _, reference = stream(b.url, {**body, "session_id": "aof-ref"})
    assert normalize(events, "aof-live") == normalize(reference.events, "aof-ref")


# ---- replicas that die or stop (last: they leave fewer replicas behind) ------------------------------

def test_kill_9_mid_generation_another_replica_continues_exactly(pair, third, redis_server):
    a, b = pair
    taken = lambda: sum(counter(server, "qwenserve_sessions_taken_over_total") for server in (b, third))  # noqa: E731
    before = taken()
    bodies = {name: chat_body(session_id=f"kill-{name}", max_tokens=300, stream=True,
                              stream_options={"include_usage": True}, **sampling)
              for name, sampling in SAMPLINGS.items()}
    heads, readers = {}, {}
    for name, body in bodies.items():  # read on A, then follow live on B (the survivor)
        heads[name] = read_then_drop(a, body, 20)
        readers[name] = Reader(b, body["session_id"], heads[name][-1][0])
        readers[name].wait_for(1)
    a.kill()  # A stays dead: the tests after this one use B and C
    for reader in readers.values():
        reader.join(timeout=300)
    assert taken() == before + len(bodies)  # by B or C, whichever scanned first
    client = redis_server.client(b.db)
    stored = {name: json.loads(client.hget(f"qwenserve:{{{body['session_id']}}}:rec", "req"))
              for name, body in bodies.items()}
    # The same requests (with the seed each session ran with) uninterrupted, on the survivor, together.
    references = {name: {**body, "session_id": f"ref-{name}", "seed": stored[name]["seed"]}
                  for name, body in bodies.items()}
    with ThreadPoolExecutor(len(references)) as pool:
        uninterrupted = dict(zip(references, pool.map(lambda ref: stream(b.url, ref)[1], references.values())))
    mismatched = {}
    for name, body in bodies.items():
        events = heads[name] + readers[name].events
        assert events[-1][1] == "[DONE]", name
        assert indices(events) == list(range(len(events))), name  # no gap, no repeat
        assert json.loads(events[-2][1]).get("usage", {}).get("completion_tokens") == 300, (name, events[-2])
        if name == "server-seeded":
            assert "seed" not in body and 0 <= stored[name]["seed"] < 2 ** 63
            _, again = stream(b.url, body)  # the stored seed is not part of the request's identity
            assert again.events == events
        reference = uninterrupted[name]
        if normalize(events, body["session_id"]) != normalize(reference.events, references[name]["session_id"]):
            mismatched[name] = "the continued stream differs from an uninterrupted run"
    assert mismatched == {}


def post_after_signal(server, body: dict):
    """A request whose body arrives after SIGTERM (its connection was open before): a new generation."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload))
    return sock, payload


def read_to_end(sock: socket.socket) -> str:
    """The whole answer: a server that is shutting down closes the connection after it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data.decode()


def test_sigterm_hands_sessions_over_and_refuses_new_generations(pair, third, redis_server):
    b, c = pair[1], third  # C stops (SHUTDOWN_GRACE_SECONDS=4); B, the one left, continues
    before = counter(b, "qwenserve_sessions_taken_over_total")
    body = chat_body(session_id="term-over", max_tokens=400, **ENDLESS)
    sock, payload = post_after_signal(c, chat_body(session_id="term-new", max_tokens=5, stream=True))
    raw, sent = "", False
    with httpx.stream("POST", c.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for text in response.iter_text():  # C's own reader: served until C ends it, at an event boundary
            raw += text
            if not sent and raw.count("\n\n") >= 10:
                on_b = Reader(b, "term-over", "term-over:5")
                on_b.wait_for(1)
                c.proc.terminate()
                sent = True
                until(lambda: "Shutting down" in c.log_path.read_text(), what="C to begin its shutdown")
                sock.sendall(payload)
                refused = read_to_end(sock)
    assert exited_cleanly(c, 30)
    status, _, rest = refused.partition("\r\n")
    assert status == "HTTP/1.1 503 Service Unavailable" and "retry-after: 1" in rest.lower()
    assert json.loads(rest.split("\r\n\r\n", 1)[1])["error"]["code"] == "shutting_down"
    on_b.join(timeout=300)
    # C released its lease at the signal and said so: B took the session over without waiting for it to expire.
    handovers = redis_server.client(b.db).xrange("qwenserve:handover")
    assert {"id": "term-over"} in [fields for _, fields in handovers]
    assert counter(b, "qwenserve_sessions_taken_over_total") == before + 1
    seen_on_c = parse_blocks(raw)
    events = seen_on_c[:6] + on_b.events
    assert indices(events) == list(range(len(events))) and events[-1][1] == "[DONE]"
    assert seen_on_c == events[:len(seen_on_c)]  # what C's reader got is a prefix of the whole stream
    _, reference = stream(b.url, {**body, "session_id": "term-ref"})
    assert normalize(events, "term-over") == normalize(reference.events, "term-ref")
