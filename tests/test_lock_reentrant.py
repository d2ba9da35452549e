"""``Lock(..., reentrant=True)`` / ``AsyncLock``: the holder (thread / task) nests, the lease and
its fencing token belong to the outermost hold, and every other thread, task and process waits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing as mp
import os
import threading
import time
from typing import Any

import pytest
import redis

from distkit import ConfigError, LockError, LockLost, LockNotOwned, aconnect, connect
from distkit.testing import RedisServer
from distlock import AsyncLock, Lock

_names = itertools.count()


def fresh() -> str:
    return f"reent-{os.getpid()}-{next(_names)}"


def lease(name: str) -> str:
    return f"distkit:lock:{{{name}}}"


def test_nested_holds_keep_one_lease_and_one_token(redis_server: RedisServer) -> None:
    r = redis_server.client()
    name = fresh()
    lock = Lock(connect(redis_server.url), name, ttl=10, reentrant=True)
    with lock:
        token = lock.fencing_token
        with lock:
            assert lock.acquire() is True  # a third level, by hand
            assert lock.fencing_token == token
            lock.release()
            assert lock.fencing_token == token
        assert r.exists(lease(name)) == 1  # the inner exits kept the lease
        assert lock.fencing_token == token
    assert r.exists(lease(name)) == 0  # the outermost exit released it
    assert lock.fencing_token is None
    with lock:  # a new outermost hold: a new, higher token
        assert (lock.fencing_token or 0) > (token or 0)


def test_the_default_stays_non_reentrant(redis_server: RedisServer) -> None:
    lock = Lock(connect(redis_server.url), fresh(), ttl=10)
    with lock, pytest.raises(LockError, match="not reentrant"):
        lock.acquire()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_reentrant_must_be_a_bool(redis_server: RedisServer, value: Any) -> None:
    with pytest.raises(ConfigError, match="reentrant"):
        Lock(connect(redis_server.url), fresh(), reentrant=value)


def test_other_threads_sharing_the_handle_wait_for_the_outermost_release(
    redis_server: RedisServer,
) -> None:
    lock = Lock(connect(redis_server.url), fresh(), ttl=10, reentrant=True)
    results: list[Any] = []

    def other(timeout: float) -> None:
        try:
            got = lock.acquire(timeout=timeout)
            results.append(got)
            if got:
                results.append(lock.fencing_token)
                lock.release()
        except Exception as exc:  # recorded: the test asserts there is none
            results.append(exc)

    with lock:
        token = lock.fencing_token
        with lock:
            t = threading.Thread(target=other, args=(0.2,))
            t.start()
            t.join()
        assert results == [False]  # still held one level up
        assert lock.acquire(blocking=False) is True  # the holder nests without waiting
        lock.release()
        results.clear()
        waiter = threading.Thread(target=other, args=(10,))
        waiter.start()
        time.sleep(0.2)
        assert results == []  # waiting
    waiter.join(10)
    assert results[0] is True and results[1] > token  # its own hold, a later token


def test_only_the_holding_thread_releases(redis_server: RedisServer) -> None:
    lock = Lock(connect(redis_server.url), fresh(), ttl=10, reentrant=True)
    with pytest.raises(LockNotOwned):
        lock.release()  # nothing held
    errors: list[BaseException] = []
    with lock:

        def release() -> None:
            try:
                lock.release()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=release)
        t.start()
        t.join()
        assert lock.owned()
    assert len(errors) == 1 and isinstance(errors[0], LockNotOwned)
    assert "thread" in str(errors[0])


def test_a_nested_acquire_after_the_lease_ran_out_raises_lock_lost(
    redis_server: RedisServer,
) -> None:
    lock = Lock(connect(redis_server.url), fresh(), ttl=0.2, reentrant=True)
    assert lock.acquire()
    time.sleep(0.3)
    with pytest.raises(LockLost):
        lock.acquire()  # the nested section must not run as if protected
    with pytest.raises(LockNotOwned):
        lock.release()  # the outermost release: the lease is gone
    assert lock.acquire(timeout=5)  # the gate was given back
    lock.release()


def test_auto_renew_lasts_the_whole_outermost_hold(redis_server: RedisServer) -> None:
    r = redis_server.client()
    name = fresh()
    lock = Lock(connect(redis_server.url), name, ttl=0.6, auto_renew=True, reentrant=True)
    with lock:
        with lock:
            time.sleep(0.5)
        time.sleep(0.5)  # past the first ttl: renewed
        assert r.exists(lease(name)) == 1
        assert not lock.lost.is_set()
    assert r.exists(lease(name)) == 0


def test_a_forked_child_does_not_inherit_the_hold(redis_server: RedisServer) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork")
    name = fresh()
    lock = Lock(connect(redis_server.url), name, ttl=10, reentrant=True)
    with lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                held_elsewhere = lock.acquire(blocking=False) is False  # the parent holds it
                try:
                    lock.release()
                except LockNotOwned:
                    code = 0 if held_elsewhere else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert lock.owned()
    assert os.waitstatus_to_exitcode(status) == 0


# -- async ------------------------------------------------------------------------------------
def test_async_nested_holds_belong_to_the_task(redis_server: RedisServer) -> None:
    r = redis_server.client()
    name = fresh()

    async def main() -> None:
        client = aconnect(redis_server.url)
        lock = AsyncLock(client, name, ttl=10, reentrant=True)
        async with lock:
            token = lock.fencing_token
            async with lock:
                assert lock.fencing_token == token
                # another task sharing the handle waits, even with the holder suspended
                other = asyncio.ensure_future(lock.acquire(timeout=0.2))
                assert await other is False
                with pytest.raises(LockNotOwned, match="task"):
                    await asyncio.ensure_future(lock.release())
            assert r.exists(lease(name)) == 1
        assert r.exists(lease(name)) == 0

        async def later() -> int | None:
            async with lock:
                return lock.fencing_token

        async with lock:
            waiter = asyncio.ensure_future(later())
            await asyncio.sleep(0.1)
            assert not waiter.done()
        assert (await asyncio.wait_for(waiter, 10) or 0) > (token or 0)
        await client.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("stage", range(8))
def test_async_cancellation_at_every_await_point_leaves_the_handle_usable(
    redis_server: RedisServer, stage: int
) -> None:
    """A waiting task cancelled after ``stage`` loop iterations (waiting on the gate, or inside
    the Redis acquire once it has the gate): nothing stays held, the gate is not lost."""
    r = redis_server.client()
    name = fresh()

    async def main() -> None:
        client = aconnect(redis_server.url)
        lock = AsyncLock(client, name, ttl=10, reentrant=True)

        async def holder(hold: asyncio.Event) -> None:
            async with lock:
                await hold.wait()

        hold = asyncio.Event()
        first = asyncio.ensure_future(holder(hold))
        await asyncio.sleep(0.05)

        async def take_and_free() -> None:
            if await lock.acquire(timeout=5):
                await lock.release()

        victim = asyncio.ensure_future(take_and_free())
        for _ in range(stage):
            await asyncio.sleep(0)
        if stage % 2:
            hold.set()  # the holder lets go: the victim is handed the gate, then enters Redis
            for _ in range(stage):
                await asyncio.sleep(0)
        victim.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await victim
        hold.set()
        await first
        # usable: this task takes and frees it, and nothing is left in Redis
        assert await lock.acquire(timeout=5)
        await lock.release()
        assert r.exists(lease(name)) == 0
        await client.aclose()

    asyncio.run(main())


# -- several processes, each with threads sharing one reentrant handle -----------------------
def _worker(url: str, name: str, sections: int, out: Any) -> None:
    client = connect(url)
    lock = Lock(client, name, ttl=10, reentrant=True)
    intervals: list[tuple[int, int, int | None]] = []
    guard = threading.Lock()

    def run() -> None:
        for _ in range(sections):
            with lock:
                start = time.monotonic_ns()
                with lock:  # nested: the same hold
                    value = int(client.get("counter") or 0)  # unsafe read-modify-write
                    client.set("counter", value + 1)
                token = lock.fencing_token
                end = time.monotonic_ns()
            with guard:
                intervals.append((start, end, token))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(intervals)


def test_processes_and_threads_never_overlap_and_count_exactly(redis_server: RedisServer) -> None:
    r: redis.Redis = redis_server.client()
    r.delete("counter")
    name = fresh()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(redis_server.url, name, 40, out)) for _ in range(4)]
    for p in procs:
        p.start()
    intervals = sorted(i for _ in procs for i in out.get(timeout=120))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert int(r.get("counter") or 0) == 4 * 2 * 40
    for (_, end, token), (start, _, next_token) in itertools.pairwise(intervals):
        assert end <= start  # never two holders at once
        assert (next_token or 0) > (token or 0)  # a new outermost hold, a higher token
