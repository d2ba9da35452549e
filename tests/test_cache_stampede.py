"""C2, one loader per key (issue 7 point 1): N concurrent misses of one key, across threads,
asyncio tasks and several processes, call the loader once; waits are bounded; a loader's
exception reaches every waiter and the fill lock is released at once. Loader calls are counted
in Redis (``INCR``), so calls from every process are counted in one place."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics, Stampede, cached
from distkit import ConfigError, LoaderError, aconnect, connect
from distkit.testing import RedisServer, free_port

LOAD_SECONDS = 0.2


def _counting_loader(client: redis.Redis, counter: str, value: Any, seconds: float) -> Any:
    def load() -> Any:
        client.incr(counter)
        time.sleep(seconds)
        return value

    return load


def _fill_lock_keys(r: redis.Redis) -> list[bytes]:
    """Leases of fill locks (``{prefix}:cache:lock:{name}``; fencing records stay a while)."""
    return [k for k in r.keys("distkit:cache:lock:{cache.fill.*") if k.endswith(b"}")]


# -- C1 beats C2: no joining a flight that began before an invalidation ---------------------------
@pytest.mark.parametrize("what", ["tag", "delete", "clear"])
def test_a_caller_after_an_invalidation_does_not_join_an_older_load(
    r: redis.Redis, what: str
) -> None:
    """A get_or_set that starts after an invalidation returned must not get the value of a load
    that began before it (single-flight must not undo C1)."""
    cache = Cache(r, namespace=f"flight-{what}")
    source = {"v": 1}

    def load() -> int:
        value = source["v"]  # the source is read first, then the load takes a while
        time.sleep(0.3)
        return value

    first: list[int] = []
    t = threading.Thread(target=lambda: first.append(cache.get_or_set("k", load, tags=["t"])))
    t.start()
    time.sleep(0.1)  # the first load has read the source
    source["v"] = 2
    {
        "tag": lambda: cache.invalidate_tags("t"),
        "delete": lambda: cache.delete("k"),
        "clear": cache.clear,
    }[what]()
    assert cache.get_or_set("k", load, tags=["t"]) == 2  # began after the invalidation returned
    t.join(10)
    assert first == [1]  # it overlapped the invalidation: the old value is fine for it
    assert cache.get("k") == 2  # and its late fill was refused


def test_an_async_caller_after_an_invalidation_does_not_join_an_older_load(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        client = redis_server.async_client()
        cache = AsyncCache(client, namespace="flight-async")
        source = {"v": 1}

        async def load() -> int:
            value = source["v"]
            await asyncio.sleep(0.3)
            return value

        first = asyncio.ensure_future(cache.get_or_set("k", load, tags=["t"]))
        await asyncio.sleep(0.1)
        source["v"] = 2
        await cache.invalidate_tags("t")
        assert await cache.get_or_set("k", load, tags=["t"]) == 2
        assert await first == 1
        assert await cache.get("k") == 2
        await client.aclose()

    redis_server.client().flushall()
    asyncio.run(scenario())


# -- threads ------------------------------------------------------------------------------------
def test_concurrent_misses_in_threads_call_the_loader_once(r: redis.Redis) -> None:
    metrics = CounterMetrics()
    cache = Cache(r, namespace="stampede-threads", metrics=metrics)
    load = _counting_loader(r, "calls", {"v": 1}, LOAD_SECONDS)
    barrier = threading.Barrier(32)
    results: list[Any] = []

    def caller() -> None:
        barrier.wait()
        results.append(cache.get_or_set("hot", load))

    threads = [threading.Thread(target=caller) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [{"v": 1}] * 32
    assert int(r.get("calls") or 0) == 1
    assert metrics.count(CacheEvent.FILL) == 1
    assert metrics.count(CacheEvent.COALESCED) >= 1
    assert not _fill_lock_keys(r)  # released


def test_without_stampede_control_every_thread_loads(r: redis.Redis) -> None:
    """The control experiment: the same stampede with ``stampede=None`` loads many times."""
    cache = Cache(r, namespace="stampede-off", stampede=None)
    load = _counting_loader(r, "calls", 1, LOAD_SECONDS)
    barrier = threading.Barrier(8)

    def caller() -> None:
        barrier.wait()
        cache.get_or_set("hot", load)

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert int(r.get("calls") or 0) > 1


def test_two_caches_in_one_process_share_one_load_through_the_fill_lock(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """Two Cache objects have separate in-process flights: only the distributed lock
    collapses their misses (the same path two processes take)."""
    caches = [Cache(connect(redis_server.url), namespace="two") for _ in "ab"]
    load = _counting_loader(r, "calls", "v", LOAD_SECONDS)
    barrier = threading.Barrier(16)
    results: list[Any] = []

    def caller(i: int) -> None:
        barrier.wait()
        results.append(caches[i % 2].get_or_set("hot", load))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["v"] * 16
    assert int(r.get("calls") or 0) == 1


# -- asyncio ------------------------------------------------------------------------------------
def test_concurrent_misses_in_tasks_call_the_loader_once(redis_server: RedisServer) -> None:
    redis_server.client().flushall()

    async def main() -> tuple[list[Any], int]:
        client = aconnect(redis_server.url)
        cache = AsyncCache(client, namespace="stampede-tasks")

        async def load() -> Any:
            await client.incr("calls")
            await asyncio.sleep(LOAD_SECONDS)
            return [1, 2]

        results = await asyncio.gather(*(cache.get_or_set("hot", load) for _ in range(64)))
        calls = int(await client.get("calls") or 0)
        await client.aclose()
        return list(results), calls

    results, calls = asyncio.run(main())
    assert results == [[1, 2]] * 64
    assert calls == 1


def test_the_decorator_collapses_concurrent_calls(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.flushall()

    async def main() -> list[int]:
        client = aconnect(redis_server.url)
        cache = AsyncCache(client, namespace="stampede-deco")

        @cached(cache)
        async def square(x: int) -> int:
            await client.incr(f"calls:{x}")
            await asyncio.sleep(LOAD_SECONDS)
            return x * x

        out = await asyncio.gather(*(square(i % 2) for i in range(20)))
        await client.aclose()
        return list(out)

    assert asyncio.run(main()) == [0, 1] * 10
    assert int(r.get("calls:0") or 0) == 1 and int(r.get("calls:1") or 0) == 1


# -- processes ----------------------------------------------------------------------------------
def _process_worker(url: str, kind: str, callers: int, start: Any, out: Any) -> None:
    client = connect(url)

    def load() -> str:
        client.incr("calls")
        time.sleep(LOAD_SECONDS)
        return "loaded"

    if kind == "sync":
        cache = Cache(client, namespace="stampede-procs")
        results: list[Any] = []
        barrier = threading.Barrier(callers)

        def caller() -> None:
            barrier.wait()
            results.append(cache.get_or_set("hot", load))

        start.wait(30)
        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        out.put(results)
        return

    async def main() -> list[Any]:
        aclient = aconnect(url)
        acache = AsyncCache(aclient, namespace="stampede-procs")

        async def aload() -> str:
            await aclient.incr("calls")
            await asyncio.sleep(LOAD_SECONDS)
            return "loaded"

        start.wait(30)
        got = await asyncio.gather(*(acache.get_or_set("hot", aload) for _ in range(callers)))
        await aclient.aclose()
        return list(got)

    out.put(asyncio.run(main()))


@pytest.mark.slow
def test_concurrent_misses_in_four_processes_call_the_loader_once(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.flushall()
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    kinds = ["sync", "async", "sync", "async"]
    procs = [
        ctx.Process(target=_process_worker, args=(redis_server.url, kind, 16, start, out))
        for kind in kinds
    ]
    for p in procs:
        p.start()
    time.sleep(1.5)  # let the spawned interpreters import and reach start.wait()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert [len(x) for x in results] == [16] * 4
    assert all(v == "loaded" for x in results for v in x)
    assert int(r.get("calls") or 0) == 1  # 64 callers, 4 processes, one loader call
    assert not _fill_lock_keys(r)


# -- errors and bounds --------------------------------------------------------------------------
def test_a_loader_error_reaches_every_waiter_and_frees_the_lock_at_once(r: redis.Redis) -> None:
    cache = Cache(r, namespace="stampede-err")
    entered = threading.Event()
    release = threading.Event()
    calls = []

    class Boom(Exception):
        pass

    def failing() -> Any:
        calls.append(1)
        entered.set()
        release.wait(10)
        raise Boom("database down")

    errors: list[BaseException] = []

    def caller() -> None:
        try:
            cache.get_or_set("k", failing)
        except Boom as exc:
            errors.append(exc)

    leader = threading.Thread(target=caller)
    leader.start()
    assert entered.wait(10)
    assert _fill_lock_keys(r)  # held while the loader runs
    waiters = [threading.Thread(target=caller) for _ in range(7)]
    for t in waiters:
        t.start()
    time.sleep(0.2)  # the waiters join the flight
    release.set()
    for t in [leader, *waiters]:
        t.join(10)
    assert len(calls) == 1
    assert len(errors) == 8 and all(e is errors[0] for e in errors)  # the one exception
    assert not _fill_lock_keys(r)  # released before the exception propagated
    assert cache.get_or_set("k", lambda: "ok") == "ok"  # the next caller loads at once


def test_a_waiter_on_another_process_lock_gives_up_after_the_bound_and_loads(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """A second cache object stands for another process whose loader hangs."""
    metrics = CounterMetrics()
    kwargs = redis_server.url
    hung = Cache(connect(kwargs), namespace="stampede-wait")
    waiting = Cache(
        connect(kwargs), namespace="stampede-wait", stampede=Stampede(wait=0.3), metrics=metrics
    )
    entered, release = threading.Event(), threading.Event()

    def hang() -> str:
        entered.set()
        release.wait(20)
        return "late"

    t = threading.Thread(target=hung.get_or_set, args=("k", hang))
    t.start()
    try:
        assert entered.wait(10)
        began = time.monotonic()
        assert waiting.get_or_set("k", lambda: "own") == "own"  # loaded itself
        assert time.monotonic() - began < 5  # bounded by wait=0.3, not by the hung loader
        assert metrics.count(CacheEvent.WAIT_TIMEOUT) == 1
    finally:
        release.set()
        t.join(10)


def test_on_timeout_stale_serves_the_expired_value_within_the_bound(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    kwargs = redis_server.url
    opts: dict[str, Any] = {"namespace": "stampede-stale", "ttl": 0.2, "stale_if_error": 30}
    hung = Cache(connect(kwargs), **opts)
    waiting = Cache(connect(kwargs), stampede=Stampede(wait=0.2, on_timeout="stale"), **opts)
    assert waiting.get_or_set("k", lambda: "old") == "old"
    time.sleep(0.3)  # expired, but kept for the stale window
    entered, release = threading.Event(), threading.Event()

    def hang() -> str:
        entered.set()
        release.wait(20)
        return "new"

    t = threading.Thread(target=hung.get_or_set, args=("k", hang))
    t.start()
    try:
        assert entered.wait(10)
        assert waiting.get_or_set("k", lambda: "own") == "old"  # stale, not a second load
    finally:
        release.set()
        t.join(10)
    assert waiting.get_or_set("k", lambda: "own") == "new"


def test_redis_down_in_process_single_flight_still_protects_the_loader() -> None:
    cache = Cache(connect({"port": free_port(), "connect_timeout": 0.2}), namespace="down")
    calls = []
    barrier = threading.Barrier(16)

    def load() -> int:
        calls.append(1)
        time.sleep(LOAD_SECONDS)
        return 7

    results: list[int] = []

    def caller() -> None:
        barrier.wait()
        results.append(cache.get_or_set("k", load))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [7] * 16
    # one load, or two: a caller whose call began after the first load started (its own read
    # failed, so it cannot rule out an invalidation since) waits for it and runs the next one
    assert 1 <= len(calls) <= 2


def test_a_cancelled_async_leader_does_not_strand_its_waiters(redis_server: RedisServer) -> None:
    redis_server.client().flushall()

    async def main() -> Any:
        client = aconnect(redis_server.url)
        cache = AsyncCache(client, namespace="cancel", stampede=Stampede(wait=5))
        entered = asyncio.Event()

        async def slow() -> str:
            entered.set()
            await asyncio.sleep(30)
            return "never"

        async def quick() -> str:
            return "quick"

        leader = asyncio.create_task(cache.get_or_set("k", slow))
        await entered.wait()
        waiter = asyncio.create_task(cache.get_or_set("k", quick))
        await asyncio.sleep(0.05)
        leader.cancel()
        got = await asyncio.wait_for(waiter, 10)
        with pytest.raises(asyncio.CancelledError):
            await leader  # the cancellation propagates only after the lock is released
        locks = await client.keys("distkit:cache:lock:{cache.fill.*")
        await client.aclose()
        return got, [k for k in locks if k.endswith(b"}")]

    got, locks = asyncio.run(main())
    assert got == "quick"  # the waiter went on by itself, long before the 30 s loader
    assert locks == []  # the cancelled leader released the fill lock


def test_stampede_policy_is_validated() -> None:
    with pytest.raises(ConfigError):
        Stampede(wait=0)
    with pytest.raises(ConfigError):
        Stampede(on_timeout="forever")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Stampede(lock="yes")  # type: ignore[arg-type]
    cache_client = connect({"port": free_port()})
    with pytest.raises(ConfigError):
        Cache(cache_client, stampede="on")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Cache(cache_client, early_refresh=-1)
    with pytest.raises(ConfigError):
        Cache(cache_client, stale_if_error=-1)


def test_a_loader_error_reaches_the_waiters_of_other_processes(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """Two cache objects stand for two processes: the second waits on the fill lock while the
    first's loader runs and raises; it gets a ``LoaderError`` naming the failure (with URL
    passwords redacted) instead of calling the loader again."""
    failing = Cache(connect(redis_server.url), namespace="err-x")
    waiting = Cache(connect(redis_server.url), namespace="err-x")
    entered = threading.Event()
    calls = []

    def broken() -> Any:
        calls.append(1)
        entered.set()
        time.sleep(0.3)
        raise RuntimeError("cannot reach postgres://app:hunter2@db:5432/app")

    def first() -> None:
        with pytest.raises(RuntimeError):
            failing.get_or_set("k", broken)

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(10)
    with pytest.raises(LoaderError) as info:
        waiting.get_or_set("k", broken)
    t.join(10)
    assert len(calls) == 1  # the waiter did not load
    assert "RuntimeError: cannot reach postgres://app:***@db" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert info.value.key == "k"
    # a later caller that did not wait for that load loads again (and succeeds)
    assert waiting.get_or_set("k", lambda: "ok") == "ok"


def test_a_waiter_of_another_process_falls_back_on_stale_if_error(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    opts: dict[str, Any] = {"namespace": "err-sie", "ttl": 0.2, "stale_if_error": 30}
    failing = Cache(connect(redis_server.url), **opts)
    waiting = Cache(connect(redis_server.url), **opts)
    waiting.get_or_set("k", lambda: "old")
    time.sleep(0.3)
    entered = threading.Event()

    def broken() -> Any:
        entered.set()
        time.sleep(0.3)
        raise RuntimeError("down")

    t = threading.Thread(target=failing.get_or_set, args=("k", broken))
    t.start()
    assert entered.wait(10)
    assert waiting.get_or_set("k", broken) == "old"
    t.join(10)


def test_on_a_cluster_the_fill_lock_and_clock_work_across_slots(cluster: Any) -> None:
    """The fill lock lives on its own hash tag (distlock's keys of one name share a slot), the
    entry on its shard's, the server-clock probe is routed to the entry's node: no CROSSSLOT,
    and still one loader call for concurrent misses from two cache objects."""
    from distkit.testing import RedisCluster

    assert isinstance(cluster, RedisCluster)
    clients = [connect(cluster.config()) for _ in "ab"]
    caches = [Cache(c, namespace="stampede-cluster", ttl=30, stale_if_error=5) for c in clients]
    calls = []
    barrier = threading.Barrier(12)
    results: list[Any] = []

    def load() -> str:
        calls.append(1)
        time.sleep(LOAD_SECONDS)
        return "v"

    def caller(i: int) -> None:
        barrier.wait()
        results.append(caches[i % 2].get_or_set(f"hot-{i // 6}", load))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["v"] * 12
    assert len(calls) == 2  # two keys ("hot-0", "hot-1"), one load each
    for c in clients:
        c.close()


def test_the_fill_lock_is_renewed_while_a_long_loader_runs(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    opts: dict[str, Any] = {"namespace": "renew", "stampede": Stampede(lock_ttl=0.3, wait=5)}
    first, second = (Cache(connect(redis_server.url), **opts) for _ in "ab")
    calls = []

    def slow() -> str:
        calls.append(1)
        time.sleep(1.0)  # more than three lock ttls
        return "v"

    t = threading.Thread(target=first.get_or_set, args=("k", slow))
    t.start()
    time.sleep(0.6)  # twice the lock's ttl
    assert _fill_lock_keys(r)  # still held: renewed
    assert second.get_or_set("k", slow) == "v"  # waited for the first load, did not load
    t.join(10)
    assert len(calls) == 1
    assert not _fill_lock_keys(r)


def test_the_async_fill_lock_is_renewed_while_a_long_loader_runs(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.flushall()

    async def main() -> tuple[list[Any], bool]:
        opts: dict[str, Any] = {"namespace": "arenew", "stampede": Stampede(lock_ttl=0.3)}
        first, second = (AsyncCache(aconnect(redis_server.url), **opts) for _ in "ab")
        calls = []

        async def slow() -> str:
            calls.append(1)
            await asyncio.sleep(1.0)
            return "v"

        task = asyncio.create_task(first.get_or_set("k", slow))
        await asyncio.sleep(0.6)
        held = bool(_fill_lock_keys(r))
        got = await second.get_or_set("k", slow)
        await task
        return [got, len(calls)], held

    (got, calls), held = asyncio.run(main())
    assert held and got == "v" and calls == 1


def test_a_user_lock_named_like_a_fill_lock_does_not_block_fills(r: redis.Redis) -> None:
    """Fill locks live under ``{prefix}:cache:lock:``, user locks under ``{prefix}:lock:``."""
    from distlock import Lock

    metrics = CounterMetrics()
    cache = Cache(r, namespace="clash", metrics=metrics, stampede=Stampede(wait=1.0))
    rkey = cache._core.entry_key("k")
    user_lock = Lock(r, cache._policy.lock_name(rkey), ttl=30)
    assert user_lock.acquire(blocking=False)
    try:
        assert cache.get_or_set("k", lambda: 1) == 1
        assert metrics.count(CacheEvent.WAIT_TIMEOUT) == 0  # it never waited for the user's lock
        assert not _fill_lock_keys(r)
    finally:
        user_lock.release()


@pytest.mark.parametrize("cancel_after", [0.0, 0.05, 0.25])
def test_a_cancelled_get_or_set_leaves_no_flight_behind(
    redis_server: RedisServer, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, cancel_after: float
) -> None:
    import distcache._stampede as stampede_module

    original = stampede_module._arelease_quietly

    async def slow_release(lock: Any, core: Any) -> None:  # a slow server at the release
        await asyncio.sleep(0.5)
        await original(lock, core)

    async def main() -> None:
        client = redis_server.async_client()
        cache = AsyncCache(
            client,
            namespace=f"cancelflight{cancel_after}",
            negative_ttl=0,
            stampede=Stampede(wait=3.0),
            miss_deadline=30,
        )

        async def loader() -> None:
            return None

        monkeypatch.setattr(stampede_module, "_arelease_quietly", slow_release)
        task = asyncio.create_task(cache.get_or_set("k", loader))
        await asyncio.sleep(cancel_after)  # 0.25: the leader is inside RELEASE
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):  # or the call ended first
            await task
        monkeypatch.setattr(stampede_module, "_arelease_quietly", original)
        assert not cache._flow._flights  # nothing for a later call to join

        async def fresh() -> str:
            return "loaded"

        # a later call loads itself instead of waiting Stampede.wait on a dead flight
        assert await asyncio.wait_for(cache.get_or_set("k", fresh), 10) == "loaded"
        await cache.aclose()
        await client.aclose()

    asyncio.run(main())


# -- C1 beats C2 during an outage: a caller whose read failed joins no load older than its call ---
def _down_cache(namespace: str) -> Cache:
    """A cache whose Redis is unreachable from this process (nothing listens on the port)."""
    return Cache(connect({"port": free_port(), "connect_timeout": 0.2}), namespace=namespace)


def test_a_caller_whose_read_failed_does_not_join_a_load_older_than_its_call(
    r: redis.Redis,
) -> None:
    """Another process (which can reach Redis) deletes the key while this process's load runs:
    a later caller here, whose read failed, cannot see that delete, so it must not be handed the
    earlier load's value; it waits for it and runs the next load."""
    down = _down_cache("outage-join")
    up = Cache(r, namespace="outage-join")
    source = {"v": 1}

    def load() -> int:
        value = source["v"]  # the source is read first, then the load takes a while
        time.sleep(0.4)
        return value

    first: list[int] = []
    t = threading.Thread(target=lambda: first.append(down.get_or_set("k", load)))
    t.start()
    time.sleep(0.15)  # the first load has read the source
    source["v"] = 2
    up.delete("k")
    assert down.get_or_set("k", load) == 2  # began after the delete returned
    t.join(10)
    assert first == [1]


def test_an_async_caller_whose_read_failed_does_not_join_a_load_older_than_its_call(
    redis_server: RedisServer,
) -> None:
    async def scenario() -> None:
        down = AsyncCache(
            aconnect({"port": free_port(), "connect_timeout": 0.2}), namespace="outage-ajoin"
        )
        client = redis_server.async_client()
        up = AsyncCache(client, namespace="outage-ajoin")
        source = {"v": 1}

        async def load() -> int:
            value = source["v"]
            await asyncio.sleep(0.4)
            return value

        first = asyncio.ensure_future(down.get_or_set("k", load))
        await asyncio.sleep(0.15)
        source["v"] = 2
        await up.delete("k")
        assert await down.get_or_set("k", load) == 2
        assert await first == 1
        await client.aclose()

    asyncio.run(scenario())


class _LoadLog:
    """A loader that returns when it started, and records how many of its calls overlap."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.running = 0
        self.most = 0
        self.calls = 0

    def enter(self) -> float:
        with self.guard:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        return time.monotonic()

    def leave(self) -> None:
        with self.guard:
            self.running -= 1


def test_during_an_outage_twenty_callers_share_at_most_two_loads_at_once() -> None:
    """Callers arriving while a load runs share one follow-up load: at most two loads of a key
    at once, few in total, and every value comes from a load that started after its call."""
    cache = _down_cache("outage-twenty")
    loads = _LoadLog()

    def load() -> float:
        started = loads.enter()
        time.sleep(0.3)
        loads.leave()
        return started

    got: list[tuple[float, float]] = []

    def caller(delay: float) -> None:
        time.sleep(delay)
        begun = time.monotonic()
        got.append((begun, cache.get_or_set("k", load)))

    threads = [threading.Thread(target=caller, args=(i * 0.019,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == 20
    assert all(load_started >= begun for begun, load_started in got)
    assert loads.most <= 2
    assert loads.calls <= 4  # arrivals span 0.36 s, loads take 0.3 s: 2-3 loads, not 20


def test_during_an_outage_twenty_tasks_share_at_most_two_loads_at_once() -> None:
    async def scenario() -> None:
        cache = AsyncCache(
            aconnect({"port": free_port(), "connect_timeout": 0.2}), namespace="outage-atwenty"
        )
        loads = _LoadLog()

        async def load() -> float:
            started = loads.enter()
            await asyncio.sleep(0.3)
            loads.leave()
            return started

        async def caller(delay: float) -> tuple[float, float]:
            await asyncio.sleep(delay)
            begun = time.monotonic()
            return begun, await cache.get_or_set("k", load)

        got = await asyncio.gather(*(caller(i * 0.019) for i in range(20)))
        assert all(load_started >= begun for begun, load_started in got)
        assert loads.most <= 2
        assert loads.calls <= 4

    asyncio.run(scenario())
