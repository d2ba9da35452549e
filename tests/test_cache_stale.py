"""Stale serving, RFC 5861 style (issue 7 point 3): ``stale_while_revalidate`` serves an expired
value while one caller refreshes it in the background; ``stale_if_error`` serves it when the
loader fails or Redis is down. Both are bounded: no value is served more than its window past
its expiry (the client checks on its estimate of the server clock, and Redis itself deletes the
entry ``ttl + max(windows)`` after the write)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics
from distkit import ConfigError, aconnect, connect
from distkit.testing import RedisServer

MISSING = object()


class Boom(Exception):
    pass


def _fail() -> Any:
    raise Boom("the database is down")


def _expiry_ms(r: redis.Redis, rkey: str) -> int:
    """``computed_at_ms + ttl_ms`` of the entry under ``rkey`` (server clock)."""
    raw = r.get(rkey)
    assert raw is not None
    size = int(raw[22:26], 16)
    computed, _, ttl = raw[26 : 26 + size].split(b"|")[:3]
    return int(computed) + int(ttl)


def _server_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return sec * 1000 + usec // 1000


# -- stale_while_revalidate ---------------------------------------------------------------------
def _threads_of(namespace: str) -> list[threading.Thread]:
    """The live threads of the caches of ``namespace`` (refresh, fill-lock renewer, release):
    other tests' caches may still have theirs, and must not be counted here."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("distcache-") and t.name.endswith(f"-{namespace}")
    ]


def test_swr_serves_the_expired_value_at_once_and_refreshes_in_the_background(
    r: redis.Redis,
) -> None:
    metrics = CounterMetrics()
    cache = Cache(r, namespace="swr", ttl=60, stale_while_revalidate=5, metrics=metrics)
    # v1 lives 0.2 s; the refresh stores v2 for the cache's 60 s, so the last read below finds
    # it fresh however slow the machine (a stale v2 would start a refresh the test never ends)
    cache.set("k", "v1", ttl=0.2)
    assert 5000 < r.pttl("distkit:cache:{swr}:k:k") <= 5200  # kept ttl + window
    time.sleep(0.3)
    assert cache.get("k", MISSING) is MISSING  # plain reads honour the ttl
    gate = threading.Event()

    def slow() -> str:
        gate.wait(10)
        return "v2"

    assert cache.get_or_set("k", slow) == "v1"  # served stale, did not wait for slow()
    assert metrics.count(CacheEvent.STALE_SERVED) == 1
    gate.set()
    assert cache.drain(5)
    assert cache.get_or_set("k", _fail) == "v2"  # the background refresh stored v2
    assert metrics.count(CacheEvent.STALE_SERVED) == 1  # a fresh hit: no new refresh
    assert cache.drain(5)
    assert not [t for t in _threads_of("swr") if t.name.startswith("distcache-refresh")]


def test_drain_is_true_only_once_every_refresh_thread_has_ended(r: redis.Redis) -> None:
    """A refresh thread that has done its work but not yet ended is still running: ``drain``
    waits for it (it used to return ``True`` as soon as the thread had unlisted itself)."""
    cache = Cache(r, namespace="swr-drain", ttl=60, stale_while_revalidate=5)
    cache.set("k", "v1", ttl=0.05)
    time.sleep(0.1)
    flow = cache._flow
    work, done, leave = threading.Event(), threading.Event(), threading.Event()
    refresh = flow._refresh

    def lingering(call: Any, entry: Any) -> None:  # the thread's target: its work, then more
        refresh(call, entry)
        done.set()
        leave.wait(10)

    flow._refresh = lingering  # type: ignore[method-assign]

    def loader() -> str:
        work.set()
        return "v2"

    assert cache.get_or_set("k", loader) == "v1"
    assert done.wait(10) and work.is_set()
    assert not cache.drain(0.1)  # the thread is still alive
    assert [t for t in _threads_of("swr-drain") if t.name.startswith("distcache-refresh")]
    leave.set()
    assert cache.drain(10)
    assert not [t for t in _threads_of("swr-drain") if t.name.startswith("distcache-refresh")]


def test_swr_never_serves_past_its_window(r: redis.Redis) -> None:
    cache = Cache(r, namespace="swr-bound", ttl=0.2, stale_while_revalidate=0.3)
    cache.get_or_set("k", lambda: "v1")
    time.sleep(0.6)  # past ttl + window: Redis deleted it
    assert r.exists("distkit:cache:{swr-bound}:k:k") == 0
    assert cache.get_or_set("k", lambda: "v2") == "v2"  # loaded inline


def test_a_failing_background_refresh_is_logged_counted_and_harmless(
    r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = CounterMetrics()
    cache = Cache(r, namespace="swr-err", ttl=0.2, stale_while_revalidate=5, metrics=metrics)
    cache.get_or_set("k", lambda: "v1")
    time.sleep(0.3)
    assert cache.get_or_set("k", _fail) == "v1"
    assert cache.drain(5)
    assert metrics.count(CacheEvent.REFRESH_ERROR) == 1
    assert "background refresh" in caplog.text and "Boom" in caplog.text


def test_a_refresh_thread_that_cannot_start_still_serves_stale_and_frees_its_key(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = Cache(r, namespace="swr-nothread", ttl=60, stale_while_revalidate=5)
    cache.set("k", "v1", ttl=0.05)
    time.sleep(0.1)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        assert cache.get_or_set("k", lambda: "v2") == "v1"  # no raw RuntimeError
    assert cache.drain(1)
    assert cache.get_or_set("k", lambda: "v3") == "v1"  # the key is free: a refresh starts
    assert cache.drain(5)
    assert cache.get_or_set("k", _fail) == "v3"


def test_background_refreshes_are_bounded_and_leave_no_thread_behind(r: redis.Redis) -> None:
    cache = Cache(r, namespace="swr-many", ttl=60, stale_while_revalidate=5, max_background=2)
    cache.set_many({f"k{i}": "old" for i in range(6)}, ttl=0.2)
    time.sleep(0.3)
    gate = threading.Event()

    def slow() -> str:
        gate.wait(5)
        return "new"

    def refreshing() -> list[threading.Thread]:
        return [t for t in _threads_of("swr-many") if t.name.startswith("distcache-refresh")]

    for i in range(6):
        assert cache.get_or_set(f"k{i}", slow) == "old"
    assert 1 <= len(refreshing()) <= 2  # max_background
    gate.set()
    assert cache.drain(5)
    assert not refreshing()
    # the one fill-lock renewer thread of the cache exits once idle
    deadline = time.monotonic() + 10
    while _threads_of("swr-many") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _threads_of("swr-many")


def test_async_swr_refreshes_in_a_task(redis_server: RedisServer) -> None:
    redis_server.client().flushall()

    async def main() -> tuple[str, str, int]:
        client = aconnect(redis_server.url)
        cache = AsyncCache(client, namespace="aswr", ttl=0.2, stale_while_revalidate=5)

        async def v(x: str) -> str:
            return x

        await cache.get_or_set("k", lambda: v("v1"))
        await asyncio.sleep(0.3)
        stale = await cache.get_or_set("k", lambda: v("v2"))
        assert await cache.drain(5)
        fresh = await cache.get_or_set("k", lambda: v("v3"))
        tasks = len(cache._flow._tasks)
        await client.aclose()
        return stale, fresh, tasks

    assert asyncio.run(main()) == ("v1", "v2", 0)


def test_an_async_refresh_cancelled_before_it_ran_frees_its_key_and_slot(
    redis_server: RedisServer,
) -> None:
    """A refresh task cancelled before its first step (what ``asyncio.run`` does to the tasks
    left at its end) never runs its body: its key and its ``max_background`` slot must be
    freed all the same, and ``drain`` must not report it as running forever."""
    redis_server.client().flushall()

    async def main() -> tuple[bool, str]:
        client = aconnect(redis_server.url)
        cache = AsyncCache(
            client, namespace="aswr-cancel", ttl=60, stale_while_revalidate=5, max_background=1
        )

        async def v(x: str) -> str:
            return x

        await cache.set("k", "v1", ttl=0.05)
        await asyncio.sleep(0.1)
        assert await cache.get_or_set("k", lambda: v("v2")) == "v1"
        (task,) = cache._flow._tasks
        task.cancel()  # before it ever ran
        await asyncio.sleep(0)
        assert task.cancelled()
        drained = await cache.drain(1)
        assert await cache.get_or_set("k", lambda: v("v3")) == "v1"  # a new refresh starts
        assert await cache.drain(5)
        fresh = await cache.get_or_set("k", lambda: v("v4"))
        await client.aclose()
        return drained, fresh

    assert asyncio.run(main()) == (True, "v3")


# -- stale_if_error -----------------------------------------------------------------------------
def test_sie_serves_the_old_value_when_the_loader_fails(r: redis.Redis) -> None:
    metrics = CounterMetrics()
    cache = Cache(r, namespace="sie", ttl=0.2, stale_if_error=5, metrics=metrics)
    cache.get_or_set("k", lambda: "v1")
    time.sleep(0.3)
    assert cache.get_or_set("k", _fail) == "v1"
    assert metrics.count(CacheEvent.STALE_SERVED) == 1
    assert cache.get_or_set("k", lambda: "v2") == "v2"  # the loader works again


def test_sie_past_its_window_raises_the_loader_error(r: redis.Redis) -> None:
    cache = Cache(r, namespace="sie-bound", ttl=0.2, stale_if_error=0.3)
    cache.get_or_set("k", lambda: "v1")
    time.sleep(0.6)
    with pytest.raises(Boom):
        cache.get_or_set("k", _fail)


def test_sie_serves_the_last_value_while_redis_is_down(fresh_server: RedisServer) -> None:
    now = [100.0]
    metrics = CounterMetrics()
    client = connect({"port": fresh_server.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
    cache = Cache(
        client,
        namespace="down",
        ttl=10,
        stale_if_error=60,
        clock=lambda: now[0],
        breaker=False,
        metrics=metrics,
    )
    assert cache.get_or_set("k", lambda: "v1") == "v1"
    fresh_server.stop()
    calls = []

    def loader() -> str:
        calls.append(1)
        return "v2"

    assert cache.get_or_set("k", loader) == "v1"  # from memory: the database is spared
    now[0] += 71  # expiry (10 s) + window (60 s) passed on the cache's clock
    assert cache.get_or_set("k", loader) == "v2"  # past the bound: fail open, load
    assert calls == [1]
    assert metrics.count(CacheEvent.STALE_SERVED) == 1


@pytest.mark.parametrize("source", ["load", "hit"])
def test_sie_serves_what_was_stored_not_a_mutated_result(
    fresh_server: RedisServer, source: str
) -> None:
    """Review (alias.py): the copy of a loaded value was the loader's own object, so a caller
    that mutated its result changed what was served while Redis was down ({'role': 'admin'},
    never stored). Copies are kept serialized and decoded anew on every serve."""
    client = connect({"port": fresh_server.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
    cache = Cache(client, namespace=f"alias-{source}", ttl=60, stale_if_error=300, breaker=False)
    if source == "hit":
        cache.set("k", {"role": "user"})
    got = cache.get_or_set("k", lambda: {"role": "user"})
    got["role"] = "admin"  # the caller's own object: must not reach the kept copy
    fresh_server.stop()
    served = cache.get_or_set("k", _fail)
    assert served == {"role": "user"}
    served["role"] = "admin"  # nor may one served copy reach the next
    assert cache.get_or_set("k", _fail) == {"role": "user"}


def test_sie_copies_are_bounded_by_bytes_too(fresh_server: RedisServer) -> None:
    """The in-memory copies kept for ``stale_if_error`` are bounded by their serialized size
    (``stale_if_error_max_bytes``), not only by their count: the least recently used go."""
    client = connect({"port": fresh_server.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
    cache = Cache(
        client,
        namespace="sie-bytes",
        ttl=10,
        stale_if_error=60,
        stale_if_error_max_bytes=4000,
        breaker=False,
    )
    store = cache._policy._store
    assert store is not None
    for key in ("a", "b", "c"):  # 1502 bytes of JSON each: the third evicts "a"
        assert cache.get_or_set(key, lambda key=key: key * 1500) == key * 1500
    assert cache.get_or_set("huge", lambda: "h" * 5000) == "h" * 5000  # over budget: not kept
    assert [k.rsplit(":", 1)[1] for k in store._data] == ["b", "c"]
    assert store._bytes == 2 * 1502
    cache.delete("b")
    assert store._bytes == 1502  # invalidations keep the count right
    assert cache.get_or_set("c", lambda: "x") == "c" * 1500  # a hit read: kept as entry bytes
    assert store._bytes == sum(kept[4] for kept in store._data.values())
    fresh_server.stop()
    calls: list[str] = []

    def loader(key: str) -> str:
        calls.append(key)
        return "new"

    assert cache.get_or_set("c", lambda: loader("c")) == "c" * 1500  # from memory
    for key in ("a", "huge"):
        assert cache.get_or_set(key, lambda key=key: loader(key)) == "new"  # not kept
    assert calls == ["a", "huge"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, "64"])
def test_sie_max_bytes_must_be_a_positive_int(r: redis.Redis, bad: Any) -> None:
    with pytest.raises(ConfigError, match="stale_if_error_max_bytes"):
        Cache(r, namespace="sie-bad", stale_if_error=5, stale_if_error_max_bytes=bad)


# -- the bound, proved --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stale_if_error", "stale_while_revalidate"])
def test_no_value_is_served_past_its_window(r: redis.Redis, mode: str) -> None:
    """Every call is bracketed by the server's clock; the loader always fails after the first
    fill, so the only value there is goes stale. A call that *starts* later than expiry +
    window must not get it (the decision can only come later than the start)."""
    window_ms = 400
    cache = Cache(r, namespace="bound", ttl=0.2, **{mode: window_ms / 1000})
    cache.get_or_set("k", lambda: "v1")
    expiry = _expiry_ms(r, "distkit:cache:{bound}:k:k")
    served, refused = [], []
    stop = time.monotonic() + 1.0
    while time.monotonic() < stop:
        start = _server_ms(r)
        try:
            value = cache.get_or_set("k", _fail)
        except Boom:
            refused.append(start)
        else:
            assert value == "v1"
            served.append(start)
        time.sleep(0.005)
    cache.drain(5)
    late = [s - expiry for s in served]
    assert max(late) <= window_ms  # never past the bound
    assert max(late) > 0  # and stale values were indeed served (the window is used)
    assert refused and min(refused) - expiry > 0  # after the bound: the loader's error


def test_the_client_checks_the_bound_even_while_redis_still_holds_the_entry(
    r: redis.Redis,
) -> None:
    """A fake clock runs ahead of the server: the entry is still in Redis (its PX runs on the
    server's clock), but the client's own estimate says it is past the window."""
    now = [1000.0]
    metrics = CounterMetrics()
    cache = Cache(
        r,
        namespace="fake",
        ttl=10,
        stale_while_revalidate=1,
        clock=lambda: now[0],
        metrics=metrics,
        max_background=0,  # no refresh: the entry stays the one written at t = 0
    )
    cache.get_or_set("k", lambda: "v1")
    now[0] += 10.5  # 0.5 s past expiry: within the window
    assert cache.get_or_set("k", lambda: "v2") == "v1"
    now[0] += 0.7  # 1.2 s past expiry: beyond it
    assert r.exists("distkit:cache:{fake}:k:k") == 1  # Redis still has it...
    assert cache.get_or_set("k", lambda: "v2") == "v2"  # ...but it is not served
    assert metrics.count(CacheEvent.STALE_SERVED) == 1


def test_cached_functions_get_the_same_stale_serving(r: redis.Redis) -> None:
    from distcache import cached

    cache = Cache(r, namespace="deco-swr", ttl=0.2, stale_while_revalidate=5, stale_if_error=5)
    version = ["v1"]
    fail = [False]

    @cached(cache)
    def fetch(x: int) -> str:
        if fail[0]:
            raise Boom("down")
        return f"{version[0]}:{x}"

    assert fetch(1) == "v1:1"
    time.sleep(0.3)
    version[0] = "v2"
    assert fetch(1) == "v1:1"  # stale, refreshed in the background
    assert cache.drain(5)
    assert fetch(1) == "v2:1"
    time.sleep(0.3)
    fail[0] = True
    assert fetch(1) == "v2:1"  # the refresh fails: still within both windows
    assert cache.drain(5)


# -- C8: every handle's invalidations reach every stale_if_error copy of the namespace ----------
@pytest.mark.parametrize("what", ["delete", "tag", "clear"])
def test_an_invalidation_through_a_handle_without_sie_drops_other_handles_copies(
    proxy: Any, r: redis.Redis, what: str
) -> None:
    """A handle with ``stale_if_error`` keeps the last value in memory; another handle of the
    namespace, without ``stale_if_error``, invalidates it; then Redis is unreachable: the
    first handle must not serve the forgotten value."""
    client = connect({"port": proxy.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
    keeper = Cache(client, namespace="sie-others", ttl=10, stale_if_error=60, breaker=False)
    plain = Cache(r, namespace="sie-others", ttl=10)
    assert keeper.get_or_set("k", lambda: "v1", tags=["t"]) == "v1"
    {
        "delete": lambda: plain.delete("k"),
        "tag": lambda: plain.invalidate_tags("t"),
        "clear": plain.clear,
    }[what]()
    proxy.refuse()
    proxy.cut()
    assert keeper.get_or_set("k", lambda: "v2", tags=["t"]) == "v2"  # loaded, not "v1"


def test_an_async_invalidation_through_a_handle_without_sie_drops_other_handles_copies(
    proxy: Any, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        client = aconnect({"port": proxy.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
        keeper = AsyncCache(client, namespace="asie-others", ttl=10, stale_if_error=60)
        direct = redis_server.async_client()
        plain = AsyncCache(direct, namespace="asie-others", ttl=10)

        async def v1() -> str:
            return "v1"

        async def v2() -> str:
            return "v2"

        assert await keeper.get_or_set("k", v1) == "v1"
        await plain.delete("k")
        proxy.refuse()
        proxy.cut()
        assert await keeper.get_or_set("k", v2) == "v2"
        await direct.aclose()

    redis_server.client().flushall()
    asyncio.run(scenario())
