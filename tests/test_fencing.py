"""Fencing tokens (L3): monotonic across restarts that lose data, bounded storage, the guards."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from distkit import ConfigError, ForeignDataError, ServerError, StaleFencingToken
from distkit.testing import RedisServer
from distlock import AsyncFencedStore, FencedStore, Lock


def test_tokens_keep_increasing_after_a_restart_that_lost_all_data(
    fresh_server: RedisServer,
) -> None:
    tokens = []
    for _round in range(3):
        client = fresh_server.client()
        lock = Lock(client, "restart", ttl=30)
        for _ in range(5):
            assert lock.acquire()
            tokens.append(lock.fencing_token)
            lock.release()
        assert client.exists("distkit:lock:{restart}:fence") == 1
        client.close()
        fresh_server.kill()
        fresh_server.restart(keep_data=False)
        assert fresh_server.client().dbsize() == 0  # the fencing state is gone
    client = fresh_server.client()
    lock = Lock(client, "restart", ttl=30)
    assert lock.acquire()
    tokens.append(lock.fencing_token)
    assert all(t is not None for t in tokens)
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_a_held_lease_lost_in_a_restart_still_fences_the_old_holder(
    fresh_server: RedisServer,
) -> None:
    """A holds a lease, the server restarts empty, B acquires: B's token beats A's at the guard."""
    a = Lock(fresh_server.client(), "crash-held", ttl=30)
    assert a.acquire()
    token_a = a.fencing_token
    assert token_a is not None
    fresh_server.kill()
    fresh_server.restart(keep_data=False)
    client = fresh_server.client()
    b = Lock(client, "crash-held", ttl=30)
    assert b.acquire(blocking=False)
    token_b = b.fencing_token
    assert token_b is not None
    assert token_b > token_a
    guard = FencedStore(client, "crash-held-resource")
    guard.write(token_b, "b")
    with pytest.raises(StaleFencingToken):
        guard.write(token_a, "a")


def test_tokens_of_different_names_are_independent(r: redis.Redis) -> None:
    a = Lock(r, "name-a", ttl=10)
    b = Lock(r, "name-b", ttl=10)
    assert a.acquire()
    assert b.acquire(blocking=False)  # different names never exclude each other
    a.release()
    b.release()
    fence_a = r.get("distkit:lock:{name-a}:fence")
    ahead = 4 * 10**15  # year 2096 in microseconds
    r.set("distkit:lock:{name-b}:fence", str(ahead))  # push b's counter far ahead
    assert a.acquire()
    assert a.fencing_token is not None
    assert a.fencing_token < ahead  # a's sequence did not jump with b's
    assert fence_a is not None
    assert a.fencing_token > int(fence_a)
    a.release()
    assert b.acquire()
    assert b.fencing_token == ahead + 1  # last + 1 wins over the clock when it is ahead
    b.release()


def test_an_exhausted_token_space_is_an_error_not_a_repeat(r: redis.Redis) -> None:
    r.set("distkit:lock:{full}:fence", str(2**53 - 1))
    lock = Lock(r, "full", ttl=10)
    with pytest.raises(ServerError, match="exhausted"):
        lock.acquire()
    assert lock.fencing_token is None
    assert r.exists("distkit:lock:{full}") == 0  # nothing was granted


def test_lock_storage_is_bounded(r: redis.Redis) -> None:
    """Many names leave only keys with a TTL, and they vanish after the fence retention."""
    for i in range(300):
        lock = Lock(r, f"many-{i}", ttl=5, fence_retention=0.5)
        assert lock.acquire()
        lock.release()
    keys = r.keys("distkit:lock:*")
    assert keys  # the fence and the release markers, nothing else
    assert all(k.endswith((b":fence", b":rel")) for k in keys), keys[:5]
    assert all(r.pttl(k) > 0 for k in keys)
    lock = Lock(r, "many-held", ttl=0.3, fence_retention=0.1)
    assert lock.acquire()
    # retention never drops below the lease's ttl, so a retried acquire still finds its token
    assert r.pttl("distkit:lock:{many-held}:fence") > 100
    time.sleep(5.6)
    assert r.keys("distkit:lock:*") == []


def test_fenced_store_accepts_equal_and_higher_tokens_only(r: redis.Redis) -> None:
    store = FencedStore(r, "doc")
    assert store.read() is None
    store.write(5, "v5")
    store.write(5, b"v5-again")  # the same holder may write several times
    store.write(9, "v9")
    with pytest.raises(StaleFencingToken) as info:
        store.write(8, "v8")
    assert info.value.token == 8
    assert info.value.highest == 9
    assert info.value.name == "doc"
    assert store.read() == (b"v9", 9)


def test_fenced_store_rejects_bad_input(r: redis.Redis) -> None:
    """A bad token or value raises ConfigError (distkit's tree, not builtins.TypeError) before
    anything is sent: tokens are ints in [0, 2**53), the only ones distlock issues."""
    store = FencedStore(r, "doc")
    for bad in (-1, 1.5, "3", None, True, 2**53, 2**53 + 1, 2**64, 2**64 + 5):
        with pytest.raises(ConfigError, match="token"):
            store.write(bad, "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="value"):
        store.write(1, {"not": "bytes"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        FencedStore(r, "")
    assert store.read() is None
    assert r.keys("distkit:fenced:*") == []


def test_fenced_store_compares_tokens_exactly_up_to_2_53(r: redis.Redis) -> None:
    """Near 2**53 a double still holds every integer: an older token one below the newest is
    refused, and the newest reads back unchanged."""
    store = FencedStore(r, "edge")
    top = 2**53 - 1
    store.write(top, "new")
    for stale in (top - 1, top - 2, 2**52):
        with pytest.raises(StaleFencingToken) as info:
            store.write(stale, "OLD")
        assert info.value.highest == top
    store.write(top, "again")  # equal tokens are accepted
    assert store.read() == (b"again", top)


@pytest.mark.parametrize(
    "planted", [b"abc", b"1.5", b"-1", b"9007199254740992", b"1e3", b" 7", b"nan", b"07"]
)
def test_fenced_store_refuses_a_foreign_stored_token(r: redis.Redis, planted: bytes) -> None:
    """A token FencedStore never writes (not a canonical int below 2**53) raises
    ForeignDataError from write() and read(); the write changes nothing."""
    r.hset("distkit:fenced:{doc}", mapping={"token": planted, "value": b"theirs"})
    store = FencedStore(r, "doc")
    with pytest.raises(ForeignDataError):
        store.write(5, "mine")
    with pytest.raises(ForeignDataError):
        store.read()
    assert r.hgetall("distkit:fenced:{doc}") == {b"token": planted, b"value": b"theirs"}


def test_async_fenced_store(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = redis_server.async_client()
        await client.flushall()
        store = AsyncFencedStore(client, "adoc")
        await store.write(3, "a")
        with pytest.raises(StaleFencingToken):
            await store.write(2, "b")
        assert await store.read() == (b"a", 3)
        await client.aclose()

    asyncio.run(run())
