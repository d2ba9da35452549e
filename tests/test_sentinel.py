"""Redis Sentinel end to end: the rig, connecting through sentinels, and locks and caches across
a real failover (kill -9 the master; the sentinels promote a replica).

What is shown, against real processes:

- ``RedisConfig(mode="sentinel")`` -> ``connect`` / ``aconnect`` reach the master through the
  sentinels, and the same client follows the master after a failover (with a retry policy).
- The known weakness: asynchronous replication can lose a just-granted lease at failover, so two
  handles hold "the" lock; fencing tokens still increase (hybrid clock), so a fenced resource
  rejects the older holder.
- The mitigation: ``wait_for_replicas=1`` WAITs after each grant; an unacknowledged grant is
  released and refused; an acknowledged one survives the failover; under multi-process
  contention across a failover no two critical sections overlap.
- The cache keeps serving through the failover (fail-open), then serves hits again.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from distcache import Cache, CacheEvent, CircuitBreaker, CounterMetrics
from distkit import (
    ConfigError,
    ConnectionUnavailable,
    LockError,
    LockNotAcquired,
    RedisConfig,
    RetryConfig,
    StaleFencingToken,
    aconnect,
    connect,
)
from distkit.testing import RedisCluster, RedisSentinelGroup, RedisServer
from distlock import AsyncLock, FencedStore, Lock, locked

# What a user configures so that clients ride out a failover (a few seconds) on their own:
# connection errors are retried with backoff for up to 20 s.
FAILOVER_RETRY = RetryConfig(attempts=100, backoff_initial=0.05, backoff_max=0.25, max_delay=20)


def _role(server: RedisServer) -> str:
    with server.client() as conn:
        return str(conn.info("replication")["role"])


@pytest.fixture(scope="module")
def stable(redis_binary: str) -> Iterator[RedisSentinelGroup]:
    """A Sentinel group that the tests of this module never fail over (replicas may be paused)."""
    with RedisSentinelGroup(binary=redis_binary) as group:
        yield group


@pytest.fixture
def stable_cfg(stable: RedisSentinelGroup) -> RedisConfig:
    with stable.master.client() as conn:
        conn.flushall()
        assert conn.execute_command("WAIT", 1, 10_000) == 1  # the replica is empty too
    return stable.config()


# -- the rig ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rig_starts_fails_over_and_stops_by_pid(sentinel: RedisSentinelGroup) -> None:
    old, replica = sentinel.master, sentinel.replicas[0]
    assert _role(old) == "master"
    assert _role(replica) == "slave"
    assert len(sentinel.sentinels) == 3 and sentinel.quorum == 2
    for node in sentinel.sentinels:
        with node.client() as conn:
            addr = conn.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", sentinel.service)
        assert (addr[0].decode(), int(addr[1])) == old.address

    client = sentinel.client()
    client.set("before", "failover")
    sentinel.wait_replicated()

    sentinel.kill_master()
    assert not old.running
    promoted = sentinel.wait_for_failover()
    assert promoted is replica is sentinel.master
    assert _role(promoted) == "master"
    with promoted.client() as conn:
        assert conn.get("before") == b"failover"  # replicated before the crash: kept
    assert sentinel.client().get("before") == b"failover"  # the sentinels name the new master

    pids = [p.pid for p in [*sentinel.servers, *sentinel.sentinels] if p.pid is not None]
    assert len(pids) == 4  # the killed master is gone
    sentinel.stop()
    assert all(not p.running for p in [*sentinel.servers, *sentinel.sentinels])


def test_rig_failure_message_carries_the_logs(sentinel: RedisSentinelGroup) -> None:
    with pytest.raises(RuntimeError, match="failover not reached") as info:
        sentinel.wait_for_failover(timeout=0.2)  # nothing failed: no failover
    assert "SentinelServer" in str(info.value) and "RedisServer" in str(info.value)


# -- connecting through the sentinels ---------------------------------------------------------


def test_connect_through_sentinels(stable: RedisSentinelGroup, stable_cfg: RedisConfig) -> None:
    assert stable_cfg.mode == "sentinel"
    client = connect(stable_cfg)
    client.set("via", "sentinel")
    with stable.master.client() as conn:
        assert conn.get("via") == b"sentinel"  # it really is the master
    client.close()


def test_aconnect_through_sentinels(stable: RedisSentinelGroup, stable_cfg: RedisConfig) -> None:
    async def run() -> bytes | None:
        client = aconnect(stable_cfg)
        await client.set("via", "async sentinel")
        value: bytes | None = await client.get("via")
        await client.aclose()
        return value

    assert asyncio.run(run()) == b"async sentinel"
    with stable.master.client() as conn:
        assert conn.get("via") == b"async sentinel"


def test_connect_from_environment(
    stable: RedisSentinelGroup, stable_cfg: RedisConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTKIT_MODE", "sentinel")
    monkeypatch.setenv(
        "DISTKIT_SENTINELS", ",".join(f"{h}:{p}" for h, p in stable.sentinel_addresses)
    )
    monkeypatch.setenv("DISTKIT_SENTINEL_SERVICE", stable.service)
    config = RedisConfig.from_env()
    assert config.sentinels == stable_cfg.sentinels
    with Lock(connect(config), "env-lock", ttl=5) as lock:
        assert lock.fencing_token is not None
        with stable.master.client() as conn:
            assert conn.exists("distkit:lock:{env-lock}") == 1


# -- wait_for_replicas without a failover -----------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_wait_for_replicas_refuses_an_unacknowledged_grant(
    stable: RedisSentinelGroup, stable_cfg: RedisConfig, kind: str
) -> None:
    replica = stable.replicas[0]
    with stable.master.client() as conn:

        def run(name: str) -> int | None:
            if kind == "sync":
                lock = Lock(connect(stable_cfg), name, ttl=10, wait_for_replicas=1)
                assert lock.acquire(blocking=False)
                token = lock.fencing_token
                lock.release()
                return token

            async def arun() -> int | None:
                alock = AsyncLock(aconnect(stable_cfg), name, ttl=10, wait_for_replicas=1)
                assert await alock.acquire(blocking=False)
                token = alock.fencing_token
                await alock.release()
                return token

            return asyncio.run(arun())

        def refused(name: str) -> str:
            if kind == "sync":
                lock = Lock(
                    connect(stable_cfg), name, ttl=10, wait_for_replicas=1, replica_timeout=0.2
                )
                with pytest.raises(LockNotAcquired, match="acknowledged") as info:
                    lock.acquire(blocking=False)
                assert lock.fencing_token is None and not lock.owned()
                return str(info.value)

            async def arun() -> str:
                alock = AsyncLock(
                    aconnect(stable_cfg), name, ttl=10, wait_for_replicas=1, replica_timeout=0.2
                )
                with pytest.raises(LockNotAcquired, match="acknowledged") as info:
                    await alock.acquire(blocking=False)
                assert alock.fencing_token is None and not await alock.owned()
                return str(info.value)

            return asyncio.run(arun())

        first = run(f"{kind}-ok")  # healthy replica: WAIT is acknowledged at once
        assert first is not None
        replica.pause()  # a replica that does not acknowledge
        try:
            message = refused(f"{kind}-refused")
        finally:
            replica.resume()
        assert "0 of 1 replica" in message
        # the refused grant was released: the name is free again, on the master
        assert conn.exists(f"distkit:lock:{{{kind}-refused}}") == 0
        second = run(f"{kind}-refused")
        assert second is not None and second > first


def test_wait_for_replicas_covers_the_handoff_and_extend(
    stable: RedisSentinelGroup, stable_cfg: RedisConfig
) -> None:
    holder = Lock(connect(stable_cfg), "handoff", ttl=10, wait_for_replicas=1, replica_timeout=0.3)
    waiter = Lock(connect(stable_cfg), "handoff", ttl=10, wait_for_replicas=1, replica_timeout=0.3)
    assert holder.acquire()
    first = holder.fencing_token
    assert first is not None
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=20)))
    thread.start()
    deadline = time.monotonic() + 10
    with stable.master.client() as conn:  # wait until the waiter is queued
        while not conn.exists("distkit:lock:{handoff}:queue"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    holder.release()  # handed to the waiter, whose BLPOP is followed by a WAIT
    thread.join(20)
    assert got == [True]
    second = waiter.fencing_token
    assert second is not None and second > first

    # extend: not acknowledged -> LockError, the lease is still held, the estimate not extended
    waiter.extend(30)  # acknowledged
    before = waiter.validity
    assert before > 25
    stable.replicas[0].pause()
    try:
        with pytest.raises(LockError, match="previous expiry"):
            waiter.extend(60)
    finally:
        stable.replicas[0].resume()
    assert waiter.validity <= before and waiter.owned()
    waiter.release()


def test_locked_forwards_wait_for_replicas(
    stable: RedisSentinelGroup, stable_cfg: RedisConfig
) -> None:
    client = connect(stable_cfg)

    @locked(client, "deco", ttl=5, wait_for_replicas=1, replica_timeout=0.2)
    def job() -> str:
        return "done"

    assert job() == "done"
    stable.replicas[0].pause()
    try:
        with pytest.raises(LockNotAcquired):
            job()
    finally:
        stable.replicas[0].resume()
    assert job() == "done"


def test_wait_for_replicas_arguments_are_checked(
    redis_server: RedisServer, cluster: RedisCluster
) -> None:
    client = redis_server.client()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ConfigError, match="wait_for_replicas"):
            Lock(client, "x", wait_for_replicas=bad)
    with pytest.raises(ConfigError, match="replica_timeout"):
        Lock(client, "x", wait_for_replicas=1, replica_timeout=0)
    with pytest.raises(ConfigError, match="standalone or Sentinel"):
        Lock(cluster.client(), "x", wait_for_replicas=1)
    # no replica at all: every grant is refused and released
    lock = Lock(client, "lonely", wait_for_replicas=1, replica_timeout=0.05)
    with pytest.raises(LockNotAcquired, match="0 of 1"):
        lock.acquire(blocking=False)
    assert not lock.locked()


# -- failovers --------------------------------------------------------------------------------


@pytest.mark.slow
def test_failover_can_lose_a_fresh_grant_but_fencing_never_goes_back(
    sentinel: RedisSentinelGroup, r: redis.Redis
) -> None:
    """The known weakness, made deterministic: the grant never reaches the replica."""
    config = sentinel.config(retry=FAILOVER_RETRY)
    a = Lock(connect(config), "weak", ttl=30, retry=FAILOVER_RETRY)
    with sentinel.replication_cut():
        assert a.acquire(blocking=False)  # granted by the master, replicated nowhere
        sentinel.kill_master()
    sentinel.wait_for_failover()

    b = Lock(connect(config), "weak", ttl=30, retry=FAILOVER_RETRY)
    assert b.acquire(blocking=False)  # the new master never saw A's lease: two holders
    assert a.fencing_token is not None and b.fencing_token is not None
    assert b.fencing_token > a.fencing_token  # max(TIME us, last + 1): the clock moved on

    # ... so a resource that checks tokens keeps A out once B has written
    store = FencedStore(r, "account")
    store.write(b.fencing_token, "B")
    with pytest.raises(StaleFencingToken):
        store.write(a.fencing_token, "A")
    assert store.read() == (b"B", b.fencing_token)


@pytest.mark.slow
def test_acknowledged_grant_survives_the_failover(sentinel: RedisSentinelGroup) -> None:
    """The mitigation (asyncio twin): WAIT after the grant, so the promoted replica has it."""
    config = sentinel.config()

    async def run() -> tuple[int, int]:
        a = AsyncLock(aconnect(config), "safe", ttl=30, wait_for_replicas=1, retry=FAILOVER_RETRY)
        b = AsyncLock(aconnect(config), "safe", ttl=30, retry=FAILOVER_RETRY)
        assert await a.acquire(blocking=False)
        token_a = a.fencing_token
        assert token_a is not None
        sentinel.kill_master()
        await asyncio.to_thread(sentinel.wait_for_failover)
        assert not await b.acquire(blocking=False)  # the lease moved with the promotion
        assert await a.owned()
        await a.release()  # A's client found the new master on its own (retry policy)
        assert await b.acquire(blocking=False)
        token_b = b.fencing_token
        assert token_b is not None
        await b.release()
        return token_a, token_b

    token_a, token_b = asyncio.run(run())
    assert token_b > token_a


def _contender(
    sentinels: list[str], service: str, wid: int, stop: Any, out: Any
) -> None:  # pragma: no cover - runs in a child process
    config = RedisConfig(mode="sentinel", sentinels=sentinels, sentinel_service=service)
    client = connect(config)
    lock = Lock(
        client,
        "hot",
        ttl=3,
        wait_for_replicas=1,
        replica_timeout=0.5,
        retry=FAILOVER_RETRY,
    )
    while not stop.is_set():
        try:
            if not lock.acquire(timeout=5):
                continue
        except (LockNotAcquired, ConnectionUnavailable) as exc:
            out.put(("refused", wid, type(exc).__name__))
            time.sleep(0.02)
            continue
        start = time.monotonic_ns()
        time.sleep(0.002)
        end = time.monotonic_ns()
        token = lock.fencing_token
        try:
            lock.release()
        except LockError as exc:  # e.g. the release reached a master that lost the lease
            out.put(("release", wid, type(exc).__name__))
        out.put(("section", wid, start, end, token))
    out.put(("done", wid))


@pytest.mark.slow
def test_failover_under_lock_contention_and_cache_traffic(redis_binary: str) -> None:
    workers = 3
    # Two replicas: after the failover one is left to acknowledge wait_for_replicas=1.
    with RedisSentinelGroup(replicas=2, binary=redis_binary) as group:
        sentinels = [f"{h}:{p}" for h, p in group.sentinel_addresses]
        ctx = mp.get_context("spawn")
        stop, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_contender, args=(sentinels, group.service, i, stop, out))
            for i in range(workers)
        ]
        for p in procs:
            p.start()

        # cache traffic in this process: no retries (fail open fast), a quick breaker
        metrics = CounterMetrics()
        cache = Cache(
            connect(group.config(socket_timeout=1.0)),
            namespace="users",
            ttl=60,
            metrics=metrics,
            breaker=CircuitBreaker(failure_threshold=3, reset_timeout=0.3),
        )
        cache_errors: list[BaseException] = []
        cache_done = threading.Event()
        loads = [0]

        def traffic() -> None:
            i = 0
            while not cache_done.is_set():
                key = f"user-{i % 10}"

                def load(key: str = key) -> dict[str, str]:
                    loads[0] += 1
                    return {"id": key}

                try:
                    assert cache.get_or_set(key, load) == {"id": key}
                except BaseException as exc:  # the test fails on any
                    cache_errors.append(exc)
                    return
                i += 1
                time.sleep(0.002)

        cache_thread = threading.Thread(target=traffic)
        cache_thread.start()

        sections: list[tuple[int, int, int, int]] = []
        events: list[tuple[Any, ...]] = []

        def drain(until: Any, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not until():
                assert time.monotonic() < deadline, f"stuck: {events[-5:]}\n{group.logs()}"
                try:
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    continue
                events.append(item)
                if item[0] == "section":
                    sections.append(item[1:])

        try:
            drain(lambda: len(sections) >= 5 * workers, 60)
            hits_before = metrics.count(CacheEvent.HIT)
            assert hits_before > 0
            killed_at = time.monotonic_ns()
            group.kill_master()
            group.wait_for_failover()

            def everyone_worked_after_the_failover() -> bool:
                after = {wid for wid, start, _e, _t in sections if start > killed_at}
                return len(after) == workers

            drain(everyone_worked_after_the_failover, 60)
            hits_after_failover = metrics.count(CacheEvent.HIT)
            drain(lambda: metrics.count(CacheEvent.HIT) > hits_after_failover + 20, 30)
        finally:
            stop.set()
            cache_done.set()
            cache_thread.join(30)
            drain(lambda: sum(1 for e in events if e[0] == "done") == workers, 60)
            for p in procs:
                p.join(30)

        assert all(p.exitcode == 0 for p in procs)
        assert cache_errors == []
        # fail-open: during the gap the loader answered (misses and errors or short circuits)
        snapshot = metrics.snapshot()
        assert snapshot.get("error", 0) + snapshot.get("short_circuit", 0) > 0, snapshot
        assert loads[0] > 10  # ten keys, filled once each at least

        ordered = sorted(sections, key=lambda s: s[1])
        for (_w1, _s1, end1, token1), (_w2, start2, _e2, token2) in itertools.pairwise(ordered):
            assert end1 <= start2, "two critical sections overlapped across the failover"
            assert token2 > token1, "fencing tokens went backwards across the failover"


# -- the protocol step, without I/O -----------------------------------------------------------


def test_acquire_protocol_waits_for_replicas_then_releases_without_io() -> None:
    from distkit._protocol import Cleanup, Eval, Pop, Replicated
    from distlock._core import LockCore

    core = LockCore(
        "p",
        ttl=5,
        prefix="distkit",
        clock=time.monotonic,
        fence_retention=60,
        replicas=2,
        replica_timeout=0.25,
    )
    steps = core.acquire(False, None, 1.0)
    first = next(steps)
    assert isinstance(first, Replicated) and isinstance(first.step, Eval)
    assert (first.replicas, first.timeout) == (2, 0.25)
    assert first.needed([1, 7]) and not first.needed([0, 1500])
    cleanup = steps.send(([1, 7], 1))  # granted, but one of two replicas acknowledged
    assert isinstance(cleanup, Cleanup) and cleanup.step.script.name == "distlock.release"
    with pytest.raises(LockNotAcquired, match="1 of 2"):
        steps.send(None)
    assert core.owner is None and core.token is None

    steps = core.acquire(False, None, 1.0)
    next(steps)
    with pytest.raises(StopIteration) as done:
        steps.send(([1, 8], 2))  # both acknowledged: held
    assert done.value.value is True and core.token == 8

    core.clear()
    steps = core.acquire(True, 5.0, 1.0)  # blocking: the handoff's Pop is WAITed for too
    next(steps)
    pop = steps.send(([0, 1500], None))
    assert isinstance(pop, Replicated) and isinstance(pop.step, Pop)
    assert pop.needed(b"9") and not pop.needed(None)
    with pytest.raises(StopIteration):
        steps.send((b"9", 2))
    assert core.token == 9


def test_async_handoff_is_acknowledged(stable: RedisSentinelGroup, stable_cfg: RedisConfig) -> None:
    async def run() -> tuple[int | None, int | None]:
        holder = AsyncLock(aconnect(stable_cfg), "ahandoff", ttl=10, wait_for_replicas=1)
        waiter = AsyncLock(aconnect(stable_cfg), "ahandoff", ttl=10, wait_for_replicas=1)
        assert await holder.acquire()
        first = holder.fencing_token
        task = asyncio.ensure_future(waiter.acquire(timeout=20))
        client = aconnect(stable_cfg)
        for _ in range(1000):  # until the waiter is queued (10 s at most)
            if await client.exists("distkit:lock:{ahandoff}:queue"):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the waiter never queued")
        await holder.release()
        assert await task
        second = waiter.fencing_token
        await waiter.release()
        await client.aclose()
        return first, second

    first, second = asyncio.run(run())
    assert first is not None and second is not None and second > first


def test_a_retried_grant_still_writes_so_that_wait_covers_it(
    stable: RedisSentinelGroup, stable_cfg: RedisConfig
) -> None:
    """A retried ACQUIRE (the first reply was lost) writes again, so the WAIT that follows it on
    a new connection covers the first call's grant too."""
    from distlock._scripts import ACQUIRE

    keys = [f"distkit:lock:{{retried}}{suffix}" for suffix in ("", ":fence", ":queue", ":qexp")]
    keys.append("distkit:lock:{retried}:wake:me")
    with stable.master.client() as conn:
        assert ACQUIRE(conn, keys, ("me", 10_000, 60_000, 0))[0] == 1
        offset = int(conn.info("replication")["master_repl_offset"])
        granted, _token = ACQUIRE(conn, keys, ("me", 10_000, 60_000, 0))  # the retry
        assert granted == 1
        assert int(conn.info("replication")["master_repl_offset"]) > offset


# -- the near cache through Sentinel ------------------------------------------------------------
def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_near_cache_follows_the_master_across_a_failover(
    sentinel: RedisSentinelGroup, kind: str
) -> None:
    """The near cache's listener finds the master through the sentinels; a failover breaks its
    link (L1 flushed, bypassed), and it resubscribes on the promoted master, where another
    client's writes evict the local copy again."""
    from distcache import AsyncCache, NearCache

    cfg = sentinel.config(retry=FAILOVER_RETRY)
    writer = Cache(connect(cfg), namespace="near")
    loop = asyncio.new_event_loop()
    if kind == "sync":
        reader: Any = Cache(connect(cfg), namespace="near", near_cache=NearCache())

        def get(key: str) -> Any:
            return reader.get(key)

        def close() -> None:
            reader.close()

    else:
        reader = AsyncCache(aconnect(cfg), namespace="near", near_cache=NearCache())

        def get(key: str) -> Any:
            return loop.run_until_complete(reader.get(key))

        def close() -> None:
            loop.run_until_complete(reader.aclose())

    try:
        writer.set("k", 1)
        _until(lambda: get("k") == 1 and reader._near.stats()["entries"] >= 1)
        writer.set("k", 2)  # through the current master: the copy is evicted
        _until(lambda: get("k") == 2, timeout=1.0)
        sentinel.wait_replicated()
        old = sentinel.kill_master()
        promoted = sentinel.wait_for_failover()
        assert promoted.address != old.address
        writer.set("k", 3)  # retried until the new master takes it
        # read through from the new master, then back to serving from memory
        _until(lambda: get("k") == 3 and reader._near.stats()["entries"] >= 1)
        with promoted.client() as conn:  # a write straight to the new master...
            conn.delete("distkit:cache:{near}:k:k")
        _until(lambda: get("k") is None, timeout=1.0)  # ...reaches the listener there
    finally:
        close()
        loop.close()
