"""Values distlock never writes, planted in a lock's or a semaphore's fence or stored limit: every
operation ends in ``ForeignDataError`` naming the key, with no grant left behind (fast path and
queued path) and the foreign value kept as it was for the operator (docs/locks.md,
docs/semaphore.md). Random plants of every key are fuzzed in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from distkit import ForeignDataError, ServerError
from distkit.testing import RedisServer
from distlock import AsyncLock, AsyncSemaphore, Lock, Semaphore

# not a number, nan, inf, negative, fractional, past 2^53 (where tokens stop being exact)
BAD_FENCES = [
    b"abc",
    b"nan",
    b"inf",
    b"-inf",
    b"1e400",
    b"-1",
    b"1.5",
    b"9" * 40,
    b"9007199254740993",
    b"",
]
BAD_LIMITS = [b"abc", b"nan", b"inf", b"-1", b"0", b"1.5", b"", b"02", b"9" * 20, b"2147483649"]


def _wait_queued(r: redis.Redis, queue: str) -> None:
    deadline = time.monotonic() + 5
    while r.zcard(queue) < 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.002)


def _wait_in_thread(handle: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(handle.acquire(timeout=10))
        except Exception as exc:  # the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- Lock ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_lock_fence_on_the_fast_path_is_foreign_data(r: redis.Redis, junk: bytes) -> None:
    fence = "distkit:lock:{ff}:fence"
    r.set(fence, junk)
    lock = Lock(r, "ff", ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:lock:\{ff\}:fence"):
        lock.acquire(blocking=False)
    assert lock.fencing_token is None
    assert r.exists("distkit:lock:{ff}") == 0  # no grant left behind
    assert r.get(fence) == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_lock_fence_on_the_queued_path_grants_nobody(r: redis.Redis, junk: bytes) -> None:
    """Planted while a waiter is queued: the release cannot hand over (no token to give), so it
    frees the lease and raises; the waiter then fails too and leaves the queue."""
    lease, fence, queue = "distkit:lock:{fq}", "distkit:lock:{fq}:fence", "distkit:lock:{fq}:queue"
    holder = Lock(r, "fq", ttl=1)
    assert holder.acquire()
    waiter = Lock(r, "fq", ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, queue)
    r.set(fence, junk)
    with pytest.raises(ForeignDataError, match=r"distkit:lock:\{fq\}:fence"):
        holder.release()
    assert r.exists(lease) == 0  # freed, handed to nobody
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert waiter.fencing_token is None
    assert r.exists(lease, queue, "distkit:lock:{fq}:qexp") == 0
    assert r.get(fence) == junk


def test_the_last_token_before_2_53_is_still_exhaustion_not_foreign(r: redis.Redis) -> None:
    r.set("distkit:lock:{full}:fence", str(2**53 - 1))
    with pytest.raises(ServerError, match="exhausted") as info:
        Lock(r, "full", ttl=10).acquire(blocking=False)
    assert not isinstance(info.value, ForeignDataError)


@pytest.mark.parametrize("junk", [b"nan", b"-1", b"1e400"], ids=repr)
def test_a_foreign_fence_async_lock(redis_server: RedisServer, junk: bytes) -> None:
    redis_server.client().flushall()

    async def main() -> None:
        client = redis_server.async_client()
        try:
            await client.set("distkit:lock:{fa}:fence", junk)
            lock = AsyncLock(client, "fa", ttl=10)
            with pytest.raises(ForeignDataError):
                await lock.acquire(blocking=False)
            assert await client.exists("distkit:lock:{fa}") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


# -- Semaphore ----------------------------------------------------------------------------------
def _sem_keys(r: redis.Redis, name: str) -> set[str]:
    return {k.decode() for k in r.keys(f"distkit:sem:{{{name}}}:*")}


@pytest.mark.parametrize("junk", BAD_LIMITS, ids=repr)
def test_a_foreign_stored_limit_is_foreign_data_and_writes_nothing(
    r: redis.Redis, junk: bytes
) -> None:
    limit = "distkit:sem:{sl}:limit"
    r.set(limit, junk)
    sem = Semaphore(r, "sl", 2, ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sl\}:limit"):
        sem.acquire(blocking=False)
    with pytest.raises(ForeignDataError):
        Semaphore(r, "sl", 2, ttl=10).acquire(timeout=0.2)  # the queued path too
    assert sem.fencing_token is None
    assert _sem_keys(r, "sl") == {limit}  # nothing granted, nothing queued, nothing written
    assert r.get(limit) == junk and r.pttl(limit) == -1  # kept as it was, TTL untouched


@pytest.mark.parametrize("junk", [b"abc", b"nan", b"0"], ids=repr)
def test_a_limit_planted_under_a_holder_frees_its_permit_and_grants_nobody(
    r: redis.Redis, junk: bytes
) -> None:
    holder = Semaphore(r, "sh", 1, ttl=1)
    assert holder.acquire()
    waiter = Semaphore(r, "sh", 1, ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:sem:{sh}:queue")
    r.set("distkit:sem:{sh}:limit", junk)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sh\}:limit"):
        holder.release()
    assert r.zcard("distkit:sem:{sh}:holders") == 0  # freed, handed to nobody
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.zcard("distkit:sem:{sh}:holders") == 0
    assert r.zcard("distkit:sem:{sh}:queue") == 0
    assert r.get("distkit:sem:{sh}:limit") == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_semaphore_fence_on_the_fast_path_writes_nothing(
    r: redis.Redis, junk: bytes
) -> None:
    fence = "distkit:sem:{sf}:fence"
    r.set(fence, junk)
    sem = Semaphore(r, "sf", 2, ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sf\}:fence"):
        sem.acquire(blocking=False)
    assert sem.fencing_token is None
    assert _sem_keys(r, "sf") == {fence}
    assert r.get(fence) == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_semaphore_fence_on_the_queued_path_grants_nobody(
    r: redis.Redis, junk: bytes
) -> None:
    holder = Semaphore(r, "sq", 1, ttl=1)
    assert holder.acquire()
    waiter = Semaphore(r, "sq", 1, ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:sem:{sq}:queue")
    r.set("distkit:sem:{sq}:fence", junk)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sq\}:fence"):
        holder.release()
    assert r.zcard("distkit:sem:{sq}:holders") == 0
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.zcard("distkit:sem:{sq}:holders") == 0
    assert r.zcard("distkit:sem:{sq}:queue") == 0
    assert r.get("distkit:sem:{sq}:fence") == junk


def test_a_foreign_limit_async_semaphore(redis_server: RedisServer) -> None:
    redis_server.client().flushall()

    async def main() -> None:
        client = redis_server.async_client()
        try:
            await client.set("distkit:sem:{as}:limit", b"nan")
            with pytest.raises(ForeignDataError):
                await AsyncSemaphore(client, "as", 2, ttl=10).acquire(blocking=False)
            assert await client.exists("distkit:sem:{as}:holders") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


def test_force_release_with_a_foreign_fence_frees_the_lease_and_hands_it_to_nobody(
    r: redis.Redis,
) -> None:
    holder = Lock(r, "ffr", ttl=1)
    assert holder.acquire()
    waiter = Lock(r, "ffr", ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:lock:{ffr}:queue")
    r.set("distkit:lock:{ffr}:fence", b"nan")
    with pytest.raises(ForeignDataError, match="fencing state"):
        Lock.force_release(r, "ffr")
    assert r.exists("distkit:lock:{ffr}") == 0
    thread.join(10)
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.exists("distkit:lock:{ffr}", "distkit:lock:{ffr}:queue") == 0
