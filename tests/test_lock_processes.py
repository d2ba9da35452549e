"""Multi-process evidence: mutual exclusion (L1) and fencing under a paused holder (L3)."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from distkit import StaleFencingToken, connect
from distkit.testing import RedisServer
from distlock import AsyncLock, FencedStore, Lock

WORKERS = 8
SECTIONS_PER_WORKER = 250


def _sync_worker(url: str, name: str, sections: int, out: Any) -> None:
    client = connect(url)
    lock = Lock(client, name, ttl=10)
    intervals = []
    for _ in range(sections):
        assert lock.acquire(timeout=60)
        start = time.monotonic_ns()
        value = int(client.get("counter") or 0)  # unsafe read-modify-write: only the lock
        client.set("counter", value + 1)  # makes it exact
        end = time.monotonic_ns()
        token = lock.fencing_token
        lock.release()
        intervals.append((start, end, token))
    out.put(intervals)


def _async_worker(url: str, name: str, sections: int, out: Any) -> None:
    from distkit import aconnect

    async def run() -> list[tuple[int, int, int | None]]:
        client = aconnect(url)
        lock = AsyncLock(client, name, ttl=10)
        intervals = []
        for _ in range(sections):
            assert await lock.acquire(timeout=60)
            start = time.monotonic_ns()
            value = int(await client.get("counter") or 0)
            await client.set("counter", value + 1)
            end = time.monotonic_ns()
            token = lock.fencing_token
            await lock.release()
            intervals.append((start, end, token))
        await client.aclose()
        return intervals

    out.put(asyncio.run(run()))


@pytest.mark.slow
def test_eight_processes_never_overlap_and_count_exactly(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_sync_worker if i % 2 == 0 else _async_worker,
            args=(redis_server.url, "counter-lock", SECTIONS_PER_WORKER, out),
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    intervals = sorted(iv for worker in results for iv in worker)
    total = WORKERS * SECTIONS_PER_WORKER
    assert len(intervals) == total
    assert int(client.get("counter") or 0) == total
    for (_s1, e1, t1), (s2, _e2, t2) in itertools.pairwise(intervals):
        assert e1 <= s2, "two holders' critical sections overlapped"
        assert t1 is not None
        assert t2 is not None
        assert t2 > t1, "fencing tokens did not increase with the order of the sections"
    assert client.exists("distkit:lock:{counter-lock}") == 0


def _paused_holder(url: str, db_path: str, conn: Any) -> None:
    client = connect(url)
    lock = Lock(client, "pause", ttl=0.5)
    assert lock.acquire()
    token = lock.fencing_token
    assert token is not None
    conn.send("ready")
    assert conn.recv() == "go"  # SIGSTOP lands here, and the lease runs out meanwhile
    result = {"token": token}
    try:
        FencedStore(client, "account").write(token, "written by A")
        result["redis"] = "accepted"
    except StaleFencingToken as exc:
        result["redis"] = "rejected"
        result["highest"] = exc.highest
    with sqlite3.connect(db_path) as db:
        cur = db.execute(
            "UPDATE account SET balance = ?, fence_token = ? WHERE id = 1 AND fence_token <= ?",
            (-1, token, token),
        )
        result["sql_rows"] = cur.rowcount
    conn.send(result)


@pytest.mark.slow
def test_paused_holder_cannot_overwrite_the_next_holders_data(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A is SIGSTOPped past its TTL, B acquires and writes, A resumes: A's writes are rejected."""
    client = redis_server.client()
    client.flushall()
    db_path = str(tmp_path / "bank.db")
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, balance INT, fence_token INT)")
        db.execute("INSERT INTO account VALUES (1, 100, 0)")
    ctx = mp.get_context("spawn")
    # A pipe, not an Event: a process stopped while holding an Event's lock would block us.
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_paused_holder, args=(redis_server.url, db_path, theirs))
    proc.start()
    try:
        assert ours.poll(30)
        assert ours.recv() == "ready"
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGSTOP)
        ours.send("go")
        b = Lock(client, "pause", ttl=10)
        assert b.acquire(timeout=5)  # A's lease ran out while A was stopped
        token_b = b.fencing_token
        assert token_b is not None
        FencedStore(client, "account").write(token_b, "written by B")
        with sqlite3.connect(db_path) as db:
            cur = db.execute(
                "UPDATE account SET balance = ?, fence_token = ? WHERE id = 1 AND fence_token <= ?",
                (200, token_b, token_b),
            )
            assert cur.rowcount == 1
    finally:
        if proc.pid is not None:
            os.kill(proc.pid, signal.SIGCONT)
    assert ours.poll(30)
    result = ours.recv()
    proc.join(30)
    assert result["token"] < token_b
    assert result["redis"] == "rejected"
    assert result["highest"] == token_b
    assert result["sql_rows"] == 0
    stored = FencedStore(client, "account").read()
    assert stored == (b"written by B", token_b)
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT balance, fence_token FROM account").fetchone() == (200, token_b)
    b.release()
