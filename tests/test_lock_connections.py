"""Connection handling of the single-instance Lock / AsyncLock / Semaphore: a pool full of waiters,
a short socket timeout, the renewer's lost signal on a black-holed server, and the bound of a
plain redis-py client's own retries."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import distkit
from distkit import ConnectionUnavailable, DistkitError
from distkit.testing import FaultProxy, RedisServer
from distlock import AsyncLock, AsyncSemaphore, Lock, Semaphore

POOL = 8
NO_CLIENT_RETRY = Retry(NoBackoff(), 0)
WAITERS = 20  # more waiters than the pool has connections


def _as_before_redis_py_6_4(pool: Any) -> None:
    """Make ``pool`` report exhaustion as redis-py did before 6.4 (sync) / 8.0 (asyncio): a
    plain ``ConnectionError("Too many connections")``, not ``MaxConnectionsError``."""
    name = (
        "get_available_connection"
        if hasattr(pool, "get_available_connection")
        else ("make_connection")
    )
    original = getattr(pool, name)

    def old_style(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except redis.exceptions.MaxConnectionsError:
            raise redis.exceptions.ConnectionError("Too many connections") from None

    setattr(pool, name, old_style)


def _leftovers(client: redis.Redis) -> list[bytes]:
    return [k for k in client.keys("distkit:*") if not k.endswith((b":fence", b":rel", b":limit"))]


# -- 1. a pool full of waiters never fails the holder's release ---------------------------------


@pytest.mark.parametrize("pool_error", ["MaxConnectionsError", "ConnectionError"])
def test_release_succeeds_with_more_waiters_than_pool_connections(
    redis_server: RedisServer, r: redis.Redis, pool_error: str
) -> None:
    client = distkit.connect(redis_server.config(max_connections=POOL))
    if pool_error == "ConnectionError":
        _as_before_redis_py_6_4(client.connection_pool)
    holder = Lock(client, "pool-sync", ttl=30)
    assert holder.acquire()
    errors: list[BaseException] = []
    got: list[int] = []

    def waiter() -> None:
        lock = Lock(client, "pool-sync", ttl=30)
        try:
            if lock.acquire(timeout=20):
                got.append(1)
                lock.extend()
                lock.release()
        except DistkitError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(WAITERS)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # every waiter queued, the pool's connections taken by blocking waits
    started = time.monotonic()
    holder.release()  # raised ConnectionUnavailable (MaxConnectionsError) before
    assert time.monotonic() - started < 3.0
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(got) == WAITERS
    assert _leftovers(r) == []


@pytest.mark.parametrize("pool_error", ["MaxConnectionsError", "ConnectionError"])
def test_async_release_succeeds_with_more_waiters_than_pool_connections(
    redis_server: RedisServer, r: redis.Redis, pool_error: str
) -> None:
    errors: list[BaseException] = []
    got: list[int] = []

    async def main() -> None:
        client = distkit.aconnect(redis_server.config(max_connections=POOL))
        if pool_error == "ConnectionError":
            _as_before_redis_py_6_4(client.connection_pool)
        holder = AsyncLock(client, "pool-async", ttl=30)
        assert await holder.acquire()

        async def waiter() -> None:
            lock = AsyncLock(client, "pool-async", ttl=30)
            try:
                if await lock.acquire(timeout=20):
                    got.append(1)
                    await lock.extend()
                    await lock.release()
            except DistkitError as exc:
                errors.append(exc)

        tasks = [asyncio.ensure_future(waiter()) for _ in range(WAITERS)]
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await holder.release()
        assert time.monotonic() - started < 3.0
        await asyncio.gather(*tasks)
        await client.aclose()

    asyncio.run(main())
    assert errors == []
    assert len(got) == WAITERS
    assert _leftovers(r) == []


def test_semaphore_release_succeeds_with_more_waiters_than_pool_connections(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    client = distkit.connect(redis_server.config(max_connections=POOL))
    holder = Semaphore(client, "pool-sem", limit=1, ttl=30)
    assert holder.acquire()
    errors: list[BaseException] = []
    got: list[int] = []

    def waiter() -> None:
        sem = Semaphore(client, "pool-sem", limit=1, ttl=30)
        try:
            if sem.acquire(timeout=20):
                got.append(1)
                sem.release()
        except DistkitError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(WAITERS)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    holder.release()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(got) == WAITERS
    assert _leftovers(r) == []


def test_async_semaphore_failed_acquires_clean_up_on_a_full_pool(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """Waiters that time out leave the queue (a call each) while others fill the pool."""
    errors: list[BaseException] = []

    async def main() -> list[bool]:
        client = distkit.aconnect(redis_server.config(max_connections=POOL))
        holder = AsyncSemaphore(client, "pool-asem", limit=1, ttl=30)
        assert await holder.acquire()

        async def waiter() -> bool:
            sem = AsyncSemaphore(client, "pool-asem", limit=1, ttl=30)
            try:
                return await sem.acquire(timeout=1.5)
            except DistkitError as exc:
                errors.append(exc)
                return False

        results = await asyncio.gather(*(waiter() for _ in range(WAITERS)))
        await holder.release()
        await client.aclose()
        return list(results)

    assert asyncio.run(main()) == [False] * WAITERS
    assert errors == []
    assert _leftovers(r) == []


def _pool_worker(url: str, threads: int, rounds: int, out: Any) -> None:
    client = distkit.connect(url)
    done: list[int] = []
    errors: list[str] = []

    def work() -> None:
        lock = Lock(client, "pool-procs", ttl=30)
        for _ in range(rounds):
            try:
                if not lock.acquire(timeout=60):
                    errors.append("timed out")
                    continue
                value = int(client.get("pool-count") or 0)
                client.set("pool-count", value + 1)
                lock.release()
                done.append(1)
            except DistkitError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    out.put((len(done), errors))


@pytest.mark.slow
def test_processes_sharing_a_pool_limited_config_never_fail_a_release(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    """Three processes, each 16 threads on a 4-connection pool, all on one lock."""
    procs_n, threads, rounds = 3, 16, 3
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    url = redis_server.url + "?max_connections=4"
    assert distkit.connect(url).connection_pool.max_connections == 4  # type: ignore[union-attr]
    procs = [
        ctx.Process(target=_pool_worker, args=(url, threads, rounds, out)) for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [errors for _, errors in results] == [[]] * procs_n
    total = procs_n * threads * rounds
    assert sum(done for done, _ in results) == total
    assert int(r.get("pool-count") or 0) == total
    assert _leftovers(r) == []


# -- 3. a short socket timeout does not break blocking acquires ---------------------------------


@pytest.mark.parametrize("socket_timeout", [0.05, 0.1, 0.2, 0.3])
def test_blocking_acquire_with_a_short_socket_timeout(
    redis_server: RedisServer, r: redis.Redis, socket_timeout: float
) -> None:
    holder = Lock(r, "short-st", ttl=30)
    assert holder.acquire()
    timer = threading.Timer(2.0, holder.release)
    timer.start()
    try:
        client = distkit.connect(redis_server.config(socket_timeout=socket_timeout))
        waiter = Lock(client, "short-st", ttl=30)
        started = time.monotonic()
        assert waiter.acquire(timeout=10)  # raised ConnectionUnavailable before
        assert time.monotonic() - started < 4.0
        waiter.release()
    finally:
        timer.join()
    assert _leftovers(r) == []


@pytest.mark.parametrize("socket_timeout", [0.05, 0.2])
def test_async_blocking_acquire_with_a_short_socket_timeout(
    redis_server: RedisServer, r: redis.Redis, socket_timeout: float
) -> None:
    async def main() -> None:
        holder = Lock(r, "short-ast", ttl=30)
        assert holder.acquire()
        loop = asyncio.get_running_loop()
        loop.call_later(2.0, holder.release)
        client = distkit.aconnect(redis_server.config(socket_timeout=socket_timeout))
        waiter = AsyncLock(client, "short-ast", ttl=30)
        started = time.monotonic()
        assert await waiter.acquire(timeout=10)
        assert time.monotonic() - started < 4.0
        await waiter.release()
        await client.aclose()

    asyncio.run(main())
    assert _leftovers(r) == []


# -- 2. the renewer signals a loss within the lease's local estimate ----------------------------

TTL = 1.5
MARGIN = 0.3  # the renewer's poll (50 ms), thread scheduling on a loaded machine


def test_renewer_signals_loss_before_another_holder_gets_the_lock(
    proxy: FaultProxy, r: redis.Redis
) -> None:
    """A black-holed holder (socket timeout 5 s, 3 attempts) used to signal `lost` at ~16 s."""
    lost_at: list[float] = []
    holder = Lock(
        distkit.connect(proxy.config()),
        "renew-bh",
        ttl=TTL,
        auto_renew=True,
        on_lost=lambda _: lost_at.append(time.monotonic()),
    )
    sent = time.monotonic()
    assert holder.acquire()
    time.sleep(0.1)
    proxy.blackhole()
    try:
        other = Lock(r, "renew-bh", ttl=30)
        assert other.acquire(timeout=10)
        granted_at = time.monotonic()
        assert holder.lost.wait(TTL + MARGIN)
        assert lost_at, "on_lost was not called"
        assert lost_at[0] - sent <= TTL + MARGIN
        # a holder must not still believe in its lease after another holder was granted
        assert lost_at[0] <= granted_at + MARGIN
        assert holder.fencing_token is None
        other.release()
    finally:
        proxy.blackhole(False)


def test_async_renewer_signals_loss_before_another_holder_gets_the_lock(
    proxy: FaultProxy, r: redis.Redis
) -> None:
    lost_at: list[float] = []

    async def main() -> None:
        client = distkit.aconnect(proxy.config())
        holder = AsyncLock(
            client,
            "renew-abh",
            ttl=TTL,
            auto_renew=True,
            on_lost=lambda _: lost_at.append(time.monotonic()),
        )
        sent = time.monotonic()
        assert await holder.acquire()
        await asyncio.sleep(0.1)
        proxy.blackhole()
        try:
            other = Lock(r, "renew-abh", ttl=30)
            acquired = asyncio.ensure_future(asyncio.to_thread(other.acquire, timeout=10))
            await asyncio.wait_for(holder.lost.wait(), TTL + MARGIN)
            assert await acquired
            granted_at = time.monotonic()
            assert lost_at, "on_lost was not called"
            assert lost_at[0] - sent <= TTL + MARGIN
            assert lost_at[0] <= granted_at + MARGIN
            assert holder.fencing_token is None
            other.release()
        finally:
            proxy.blackhole(False)

    asyncio.run(main())


def test_renewer_keeps_renewing_through_a_slow_but_live_server(
    proxy: FaultProxy, r: redis.Redis
) -> None:
    """The bound cuts only calls that outlast the lease estimate: a 0.2 s link keeps the lease."""
    holder = Lock(distkit.connect(proxy.config()), "renew-slow", ttl=TTL, auto_renew=True)
    assert holder.acquire()
    proxy.set_latency(0.1)
    try:
        time.sleep(TTL * 2.5)
        assert not holder.lost.is_set()
        assert r.exists("distkit:lock:{renew-slow}")
        holder.ensure_held()
    finally:
        proxy.set_latency(0.0)
    holder.release()


# -- 4. a plain redis-py client's own retries ---------------------------------------------------


def test_a_client_that_retries_itself_is_warned_about_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    plain = redis.Redis(host=redis_server.address[0], port=redis_server.port, socket_timeout=1)
    retries = plain.get_retry().get_retries()  # type: ignore[union-attr]
    assert retries > 0  # redis-py's default (10 in redis-py 8)
    with caplog.at_level(logging.WARNING, logger="distlock"):
        Lock(plain, "own-retries")
        Semaphore(plain, "own-retries-sem", 2)
        Lock(plain, "own-retries-2")
        Lock(distkit.connect(redis_server.config()), "own-retries-3")
        Lock(
            redis.Redis(
                host=redis_server.address[0], port=redis_server.port, retry=NO_CLIENT_RETRY
            ),
            "own-retries-4",
        )
    warned = [
        rec.getMessage() for rec in caplog.records if "retries failed commands" in rec.message
    ]
    assert len(warned) == 1, warned  # once per client; none for clients without own retries
    assert f"({retries} retries" in warned[0]
    assert f"up to {(3 + 1) * (retries + 1)} x socket_timeout" in warned[0]
    plain.close()


def test_a_client_without_own_retries_fails_within_attempts_times_socket_timeout(
    proxy: FaultProxy,
) -> None:
    """docs/locks.md "Failures": the bound for a client built as the docs say."""
    client = redis.Redis(
        host=proxy.host,
        port=proxy.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=NO_CLIENT_RETRY,
    )
    lock = Lock(client, "bounded")
    client.ping()
    proxy.blackhole()
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionUnavailable):
            lock.acquire(blocking=False)
    finally:
        proxy.blackhole(False)
    # 3 attempts, then the failed acquire's one clean-up try; + backoff and slack
    assert time.monotonic() - started < (3 + 1) * 0.5 + 1.0
    client.close()


def test_late_blpop_replies_are_not_lost_connections(proxy: FaultProxy, r: redis.Redis) -> None:
    """Every wait's reply arrives after the socket timeout (0.1 s each way on a 0.3 s timeout),
    yet every other call answers in time: the waiter keeps waiting (a swallowed handoff is
    recovered by its next ACQUIRE) instead of giving up after a few "lost" waits."""
    holder = Lock(r, "late-pop", ttl=30)
    assert holder.acquire()
    client = distkit.connect(proxy.config(socket_timeout=0.3))
    waiter = Lock(client, "late-pop", ttl=30)
    proxy.set_latency(0.1)
    timer = threading.Timer(6.0, holder.release)
    timer.start()
    try:
        assert waiter.acquire(timeout=15)  # raised ConnectionUnavailable after 4 timed-out waits
        waiter.release()
    finally:
        timer.join()
        proxy.set_latency(0.0)
    assert _leftovers(r) == []


@pytest.mark.parametrize("pool_error", ["MaxConnectionsError", "ConnectionError"])
def test_a_full_pool_is_waited_for_whatever_redis_py_raises(
    redis_server: RedisServer, r: redis.Redis, pool_error: str
) -> None:
    """Every connection taken (by the application): acquire waits for one to come back instead of
    failing, also on redis-py < 6.4 (sync) / < 8 (asyncio), whose pools report it as a plain
    ConnectionError."""
    client = distkit.connect(redis_server.config(max_connections=1))
    pool = client.connection_pool
    if pool_error == "ConnectionError":
        _as_before_redis_py_6_4(pool)
    taken = pool.get_connection()
    threading.Timer(1.0, pool.release, args=(taken,)).start()
    lock = Lock(client, "pool-full-sync", ttl=30)
    assert lock.acquire(timeout=10)
    lock.release()
    assert _leftovers(r) == []

    async def main() -> None:
        aclient = distkit.aconnect(redis_server.config(max_connections=1))
        apool = aclient.connection_pool
        if pool_error == "ConnectionError":
            _as_before_redis_py_6_4(apool)
        held = await apool.get_connection()
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, lambda: asyncio.ensure_future(apool.release(held)))
        alock = AsyncLock(aclient, "pool-full-async", ttl=30)
        assert await alock.acquire(timeout=10)
        await alock.release()
        await aclient.aclose()

    asyncio.run(main())
    assert _leftovers(r) == []
