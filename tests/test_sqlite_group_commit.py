"""SQLite group commit: the appends of one loop iteration share one transaction, and each still returns
only once its own rows are committed; one bad append fails alone; a session's appends keep their order."""

from __future__ import annotations

import asyncio
import sqlite3

from qwenserve.stores import SessionRecord, SQLiteStore, StoredEvent


def open_store(path, sessions: int) -> tuple[SQLiteStore, list[str]]:
    """A store with `sessions` sessions, and the statements its connection runs from now on."""
    store = SQLiteStore(str(path))
    statements: list[str] = []
    for i in range(sessions):
        asyncio.run(store.create(SessionRecord(f"s{i}", "h", "{}", 0)))
    store.conn.set_trace_callback(statements.append)
    return store, statements


def events(*indices: int, tag: str = "") -> list[StoredEvent]:
    return [StoredEvent(i, f"d{i}{tag}", [i]) for i in indices]


def commits(statements: list[str]) -> int:
    return statements.count("COMMIT")


def stored(path, session_id: str) -> tuple[list[tuple], int]:
    """What another connection sees: the session's events (index, data) and its event count."""
    with sqlite3.connect(path) as other:
        rows = other.execute("SELECT idx, data FROM events WHERE session_id=? ORDER BY idx", (session_id,)).fetchall()
        (count,) = other.execute("SELECT event_count FROM sessions WHERE session_id=?", (session_id,)).fetchone()
    return rows, count


def run_then_close(store: SQLiteStore, scenario) -> None:
    asyncio.run(scenario())
    asyncio.run(store.close())


def test_one_transaction_per_iteration_and_committed_before_return(tmp_path):
    path = tmp_path / "s.db"
    store, statements = open_store(path, 16)

    async def produce(sid: str) -> tuple[list[tuple], int]:
        await store.append(sid, events(0, 1))
        return stored(path, sid)  # the moment append returns

    async def scenario():
        seen = await asyncio.gather(*(produce(f"s{i}") for i in range(16)))
        assert commits(statements) == 1
        assert seen == [([(0, "d0"), (1, "d1")], 2)] * 16
        await store.append("s0", events(2))  # a later iteration: a transaction of its own
        assert commits(statements) == 2
        assert stored(path, "s0") == ([(0, "d0"), (1, "d1"), (2, "d2")], 3)

    run_then_close(store, scenario)


def test_a_bad_append_fails_alone(tmp_path):
    path = tmp_path / "s.db"
    store, _ = open_store(path, 8)

    async def scenario():
        await store.append("s3", events(0, tag="first"))
        results = await asyncio.gather(*(store.append(f"s{i}", events(0)) for i in range(8)),
                                       return_exceptions=True)
        assert isinstance(results[3], sqlite3.IntegrityError)
        assert [r for i, r in enumerate(results) if i != 3] == [""] * 7
        assert not store.conn.in_transaction
        for i in range(8):  # the failed batch left nothing behind: no row or count twice
            assert stored(path, f"s{i}") == ([(0, "d0first" if i == 3 else "d0")], 1)
        try:  # alone in its iteration, too
            await store.append("s3", events(0))
            raise AssertionError("a duplicate index was stored")
        except sqlite3.IntegrityError:
            pass
        await store.append("s3", events(1))  # the store goes on
        assert stored(path, "s3") == ([(0, "d0first"), (1, "d1")], 2)

    run_then_close(store, scenario)


def test_appends_of_one_session_keep_their_order(tmp_path):
    path = tmp_path / "s.db"
    store, _ = open_store(path, 2)
    store.conn.execute("CREATE TEMP TABLE written (session_id TEXT, idx INTEGER, data TEXT)")
    store.conn.execute("CREATE TEMP TRIGGER log AFTER INSERT ON main.events BEGIN "
                       "INSERT INTO written VALUES (new.session_id, new.idx, new.data); END")

    def written(sid: str) -> list[tuple]:
        return store.conn.execute("SELECT idx, data FROM written WHERE session_id=? ORDER BY rowid",
                                  (sid,)).fetchall()

    async def scenario():
        await asyncio.gather(store.append("s0", events(0, 1)), store.append("s1", events(0)),
                             store.append("s0", events(2)), store.append("s1", events(1)),
                             store.append("s0", events(3, 4)))
        assert written("s0") == [(i, f"d{i}") for i in range(5)]
        assert written("s1") == [(0, "d0"), (1, "d1")]
        # One of them fails: the others are written one by one, still in the order they came.
        results = await asyncio.gather(store.append("s0", events(5, tag="a")), store.append("s0", events(5, tag="b")),
                                       store.append("s0", events(6)), return_exceptions=True)
        assert results[0] == "" and isinstance(results[1], sqlite3.IntegrityError) and results[2] == ""
        assert written("s0")[-2:] == [(5, "d5a"), (6, "d6")]
        assert stored(path, "s0") == ([(i, f"d{i}") for i in range(5)] + [(5, "d5a"), (6, "d6")], 7)

    run_then_close(store, scenario)


def test_close_commits_queued_appends(tmp_path):
    path = tmp_path / "s.db"
    store, _ = open_store(path, 3)

    async def scenario():
        appends = [asyncio.create_task(store.append(f"s{i}", events(0, 1))) for i in range(3)]
        await asyncio.sleep(0)  # the appends are queued; their flush would come in the next iteration
        assert all(not task.done() for task in appends)
        assert stored(path, "s0") == ([], 0)
        await store.close()
        for i in range(3):
            assert stored(path, f"s{i}") == ([(0, "d0"), (1, "d1")], 2)
        assert await asyncio.gather(*appends) == [""] * 3

    asyncio.run(scenario())
