"""Semaphore across real processes: k-exclusion history, fencing order, a holder killed -9."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time
from typing import Any

import pytest

from distkit import aconnect, connect
from distkit.testing import RedisServer
from distlock import AsyncSemaphore, LockNotOwned, Semaphore

WORKERS = 4
LIMIT = 2
SECTIONS = 25


def _sync_worker(url: str, name: str, out: Any) -> None:
    client = connect(url)
    sem = Semaphore(client, name, LIMIT, ttl=10)
    record = []
    for _ in range(SECTIONS):
        called = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
        assert sem.acquire(timeout=60)
        start = time.monotonic()
        time.sleep(0.002)
        record.append((called, start, time.monotonic(), sem.fencing_token))
        sem.release()
    out.put(record)


def _async_worker(url: str, name: str, out: Any) -> None:
    async def run() -> list[tuple[float, float, float, int | None]]:
        client = aconnect(url)
        sem = AsyncSemaphore(client, name, LIMIT, ttl=10)
        record = []
        for _ in range(SECTIONS):
            called = time.monotonic()
            assert await sem.acquire(timeout=60)
            start = time.monotonic()
            await asyncio.sleep(0.002)
            record.append((called, start, time.monotonic(), sem.fencing_token))
            await sem.release()
        await client.aclose()
        return record

    out.put(asyncio.run(run()))


def check_k_exclusion(intervals: list[tuple[float, float, float, int | None]], limit: int) -> int:
    """Each interval is (acquire called, section start, section end, token). At most ``limit``
    sections overlap; an acquisition whose call began after another section ended has the higher
    token (L3; the section start is no bound: a granted process may be descheduled before it
    notes the time). Returns the most overlapping sections seen."""
    events = sorted([(s, 1) for _, s, _, _ in intervals] + [(e, -1) for _, _, e, _ in intervals])
    live = most = 0
    for _, delta in events:  # at equal times an end (-1) sorts before a start (+1)
        live += delta
        most = max(most, live)
    assert most <= limit, f"{most} holders overlapped (limit {limit})"
    tokens = [t for _, _, _, t in intervals]
    assert all(t is not None for t in tokens) and len(set(tokens)) == len(tokens)
    by_end = sorted(intervals, key=lambda iv: iv[2])
    for c2, _s2, _e2, t2 in intervals:
        for _c1, _s1, e1, t1 in by_end:
            if e1 >= c2:
                break
            assert t1 is not None and t2 is not None and t1 < t2, "fencing order broken"
    return most


def test_the_checker_catches_overlap_and_token_disorder() -> None:
    check_k_exclusion([(0, 0, 2, 1), (1, 1, 3, 2), (2.5, 2.5, 4, 3)], 2)
    check_k_exclusion([(0, 0, 1, 5), (0.5, 2, 3, 4)], 2)  # granted first, noted the time late
    with pytest.raises(AssertionError, match="overlapped"):
        check_k_exclusion([(0, 0, 2, 1), (1, 1, 3, 2), (1.5, 1.5, 4, 3)], 2)
    with pytest.raises(AssertionError, match="fencing order"):
        check_k_exclusion([(0, 0, 1, 5), (2, 2, 3, 4)], 2)


@pytest.mark.slow
def test_processes_never_exceed_the_limit_and_tokens_follow_grants(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    client.flushall()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_sync_worker if i % 2 == 0 else _async_worker,
            args=(redis_server.url, "k-excl", out),
        )
        for i in range(WORKERS)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    intervals = [iv for worker in results for iv in worker]
    assert len(intervals) == WORKERS * SECTIONS
    most = check_k_exclusion(intervals, LIMIT)
    assert most == LIMIT  # the permits were actually shared, not serialised
    assert client.zcard("distkit:sem:{k-excl}:holders") == 0
    assert client.zcard("distkit:sem:{k-excl}:queue") == 0
    client.close()


def _holder_then_hang(url: str, ready: Any) -> None:
    client = connect(url)
    sem = Semaphore(client, "killed", 1, ttl=1.0)
    assert sem.acquire()
    ready.put(sem.fencing_token)
    time.sleep(600)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill", "stop"])
def test_a_killed_or_paused_holder_frees_its_permit_within_its_ttl(
    redis_server: RedisServer, sig: int
) -> None:
    client = redis_server.client()
    client.flushall()
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_holder_then_hang, args=(redis_server.url, ready))
    proc.start()
    try:
        dead_token = ready.get(timeout=60)
        assert proc.pid is not None
        os.kill(proc.pid, sig)
        killed_at = time.monotonic()
        waiter = Semaphore(client, "killed", 1, ttl=5)
        assert waiter.acquire(timeout=10)
        assert time.monotonic() - killed_at < 1.0 + 0.3
        assert waiter.fencing_token is not None and waiter.fencing_token > dead_token
        waiter.release()
    finally:
        if proc.pid is not None and proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    client.close()


def test_a_late_release_after_a_pause_is_refused(redis_server: RedisServer) -> None:
    """What the paused holder sees when it resumes: its permit is gone (LockNotOwned)."""
    client = redis_server.client()
    client.flushall()
    a = Semaphore(client, "paused", 1, ttl=0.2)
    b = Semaphore(client, "paused", 1, ttl=5)
    assert a.acquire()
    assert b.acquire(timeout=2)
    with pytest.raises(LockNotOwned):
        a.release()
    assert b.owned()
    b.release()
    client.close()
