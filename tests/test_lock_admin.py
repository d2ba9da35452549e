"""Repairing a stuck lock from code: ``Lock.force_release`` (issue 15 point 15)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis

from distkit.testing import RedisServer
from distlock import AsyncLock, Lock, LockNotOwned


def test_force_release_frees_a_held_lock_and_tokens_keep_rising(r: redis.Redis) -> None:
    stuck = Lock(r, "stuck", ttl=60)
    assert stuck.acquire()
    before = stuck.fencing_token
    assert Lock.force_release(r, "stuck") is True
    assert not r.exists("distkit:lock:{stuck}")
    assert r.exists("distkit:lock:{stuck}:fence")  # the fence stays
    other = Lock(r, "stuck", ttl=5)
    assert other.acquire(blocking=False)
    assert other.fencing_token is not None and before is not None
    assert other.fencing_token > before
    with pytest.raises(LockNotOwned):
        stuck.release()  # the former holder learns it lost the lock
    other.release()
    assert Lock.force_release(r, "stuck") is False  # free: nothing to do


def test_force_release_hands_the_lock_to_the_next_waiter(r: redis.Redis) -> None:
    stuck = Lock(r, "handoff", ttl=60)
    assert stuck.acquire()
    waiter = Lock(r, "handoff", ttl=5)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=5)))
    thread.start()
    for _ in range(200):
        if r.zcard("distkit:lock:{handoff}:queue"):
            break
        threading.Event().wait(0.01)
    assert Lock.force_release(r, "handoff") is True
    thread.join(5)
    assert got == [True] and waiter.owned()
    assert stuck.fencing_token is not None and waiter.fencing_token is not None
    assert waiter.fencing_token > stuck.fencing_token
    waiter.release()


def test_async_force_release(redis_server: RedisServer) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        lock = AsyncLock(client, "astuck", ttl=60)
        assert await lock.acquire()
        assert await AsyncLock.force_release(client, "astuck") is True
        assert not await lock.owned()
        await client.aclose()

    asyncio.run(main())
