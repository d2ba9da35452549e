"""Near-cache stress and edges (issue 14 items 7, 8, 9 and the "listener up" window, C6).

- Threads with a 1 µs switch interval hammer a tiny L1 (gets racing LRU evictions, writes,
  deletes): nothing may raise, and every thread reads its own writes back.
- A process with more than 1024 open file descriptors: L1 serves hits and hears invalidations.
- A listener that fails at once, every time, backs off and logs at a bounded rate.
- The accounted size of a value is at least what tracemalloc measures (generated value shapes).
- An invalidation sent while the listener thread has not reached its loop still bypasses L1.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distcache import Cache, NearCache
from distcache import _near as near
from distcache._near import ENTRY_OVERHEAD, NearStore, _Listener, deep_size
from distkit.testing import RedisServer
from tests.test_near_cache import FakeClock, entry, kill_listeners, store_for, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_switches() -> Iterator[None]:
    """Switch threads every microsecond: races that need an unlucky switch happen at once."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def run_threads(bodies: list[Any], seconds: float) -> list[BaseException]:
    """Run each ``body(stop)`` in a thread for ``seconds``; the exceptions they raised."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(body: Any) -> None:
        try:
            body(stop)
        except BaseException as exc:  # collected and asserted on
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(10)
    return errors


# -- item 7: LRU eviction vs the unlocked hit path ------------------------------------------------
@pytest.mark.usefixtures("tiny_switches")
def test_evictions_race_hits_without_raising() -> None:
    """Hits move entries to the LRU end without the lock while fills evict the oldest."""
    store, _ = store_for(FakeClock(), max_entries=4)
    keys = [f"distkit:cache:{{unit}}:k:{i}" for i in range(8)]

    def hits(stop: threading.Event) -> None:
        while not stop.is_set():
            for key in keys:
                store.get(key, None)

    def fills(stop: threading.Event) -> None:
        while not stop.is_set():
            for key in keys:
                store.put(key, None, entry(key), store.stamp(key))

    errors = run_threads([hits, hits, fills, fills], 1.5)
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    assert store.stats()["entries"] <= 4


@pytest.mark.usefixtures("tiny_switches")
def test_threads_on_a_tiny_l1_against_redis(redis_server: RedisServer) -> None:
    """get/set/delete/get_or_set from 4 threads on a 3-entry L1: no exception, and coherence."""
    client = redis_server.client()
    client.flushall()
    cache = Cache(client, namespace="stress", near_cache=NearCache(max_entries=3))
    assert cache._near is not None and cache._near.wait_live(5)
    shared = [f"s{i}" for i in range(6)]

    def worker(n: int) -> Any:
        def body(stop: threading.Event) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                own = f"own{n}:{i % 5}"
                cache.set(own, [n, i])
                assert cache.get(own) == [n, i], "own write not read back"
                for key in shared:  # hits, misses and evictions of the tiny L1
                    cache.get(key)
                cache.set(shared[i % 6], i)
                if i % 3 == 0:
                    cache.delete(own)
                    assert cache.get(own) is None, "own delete not seen"
                assert cache.get_or_set(f"gos{n}", lambda: n) == n

        return body

    errors = run_threads([worker(n) for n in range(4)], 2.0)
    try:
        assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
        assert cache._near.stats()["entries"] <= 3
        # After the dust settles L1 and Redis agree on every key.
        time.sleep(0.05)
        plain = Cache(redis_server.client(), namespace="stress")
        for key in shared:
            assert cache.get(key) == plain.get(key)
    finally:
        cache.close()


# -- item 8: file descriptors >= 1024 --------------------------------------------------------------
FD_PROGRAM = textwrap.dedent(
    """
    import os, resource, sys, time
    import redis
    from distcache import Cache, CacheEvent, CounterMetrics, NearCache

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    url = sys.argv[1]
    metrics = CounterMetrics()
    client = redis.Redis.from_url(url)
    cache = Cache(client, namespace="fds", near_cache=NearCache(), metrics=metrics)
    writer = Cache(redis.Redis.from_url(url), namespace="fds")
    assert cache._near.wait_live(5), "the listener never came up"
    sock = cache._near._socks[0]
    assert sock.fileno() >= 1024, sock.fileno()
    writer.set("k", 1)
    time.sleep(0.05)
    deadline = time.monotonic() + 5
    while not (cache.get("k") == 1 and cache._near.stats()["entries"] == 1):
        assert time.monotonic() < deadline, "L1 never kept the entry"
        time.sleep(0.001)
    hits = metrics.count(CacheEvent.NEAR_HIT)
    for _ in range(100):
        assert cache.get("k") == 1
    assert metrics.count(CacheEvent.NEAR_HIT) - hits >= 95, "L1 does not serve"
    writer.set("k", 2)  # another client: the invalidation must arrive
    deadline = time.monotonic() + 1
    while cache.get("k") != 2:
        assert time.monotonic() < deadline, "the invalidation never arrived"
    connections = [c for c in client.client_list() if c.get("name") == "distcache-near:fds"]
    assert len(connections) == 1, connections
    print("ok", sock.fileno())
    cache.close()
    """
)


def test_near_cache_works_with_descriptors_above_1024(redis_server: RedisServer) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(
        [sys.executable, "-c", FD_PROGRAM, redis_server.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout


# -- item 8: a listener that fails at once backs off -----------------------------------------------
def test_a_listener_failing_at_once_backs_off_and_logs_rarely(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Subscribing works, serving fails at once (as select did for fd >= 1024): no storm."""
    attempts: list[float] = []

    def broken(self: _Listener, conn: Any, *offset: float) -> None:
        attempts.append(time.monotonic())
        if offset:  # L1 goes live in _serve (before the fix: in _subscribe)
            self._store.listener_up(id(self), offset[0])
        raise ValueError("filedescriptor out of range in select()")

    monkeypatch.setattr(_Listener, "_serve", broken)
    caplog.set_level(logging.DEBUG, logger="distcache")
    cache = Cache(redis_server.client(), namespace="storm", near_cache=NearCache())
    try:
        time.sleep(2.0)
    finally:
        cache.close()
    # 20 ms doubling (jittered down to half) up to 2 s: at most 8 attempts in 2 s, not ~100
    assert 3 <= len(attempts) <= 8, len(attempts)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]


def test_a_healthy_link_restarts_the_backoff(redis_server: RedisServer) -> None:
    """After a link that served a while is killed, the listener is back within ~20 ms."""
    cache = Cache(redis_server.client(), namespace="steady", near_cache=NearCache())
    r = redis_server.client()
    try:
        assert cache._near is not None and cache._near.wait_live(5)
        for _ in range(3):
            time.sleep(1.1)  # served longer than the steady threshold
            assert kill_listeners(r, "steady") == 1
            wait_for(lambda: not cache._near.live, timeout=2)  # type: ignore[union-attr]
            assert wait_for(lambda: cache._near.live, timeout=2) < 0.5  # type: ignore[union-attr]
    finally:
        cache.close()


# -- item 9: max_bytes counts honestly -------------------------------------------------------------
def traced_size(raw: bytes, copies: int = 200) -> float:
    """Bytes tracemalloc sees per decoded copy of ``raw`` (JSON), keeping the copies alive."""

    def measure(data: bytes) -> int:
        keep: list[Any] = [None] * copies
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(copies):
                keep[i] = json.loads(data)
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    # minus what the measuring loop allocates itself (b"0" decodes to a cached small int)
    return (measure(raw) - measure(b"0")) / copies


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=60,
)


@settings(max_examples=50, deadline=None)  # each example costs 4 full collections (CI's budget)
@given(value=JSON)
def test_accounted_size_covers_what_tracemalloc_measures(value: Any) -> None:
    raw = json.dumps(value).encode()
    assert deep_size(json.loads(raw)) >= traced_size(raw)


@pytest.mark.parametrize(
    "shape",
    ["small_lists", "small_dicts", "empties", "records", "strings"],
)
def test_accounted_size_of_many_small_containers(shape: str) -> None:
    """The review's case: values made of many small containers were accounted 2.3x too low."""
    n = 20_000
    value: Any = {
        "small_lists": [[i] for i in range(n)],
        "small_dicts": [{"a": i} for i in range(n)],
        "empties": [[] for _ in range(n)],
        "records": [{"id": i, "tags": ["x", "y"], "m": {"k": 1.5}} for i in range(n // 4)],
        "strings": [f"abcdefgh{i}" for i in range(n)],
    }[shape]
    raw = json.dumps(value).encode()
    traced = traced_size(raw, copies=2)
    accounted = deep_size(json.loads(raw))
    print(f"{shape}: accounted {accounted / traced:.2f}x what tracemalloc measures")
    assert traced <= accounted <= 2 * traced


def test_max_bytes_holds_against_tracemalloc() -> None:
    """An L1 full of many-small-container values holds no more than max_bytes, measured."""
    limit = 8 << 20
    store, _ = store_for(FakeClock(), max_entries=100_000, max_bytes=limit)
    raw = json.dumps([{"a": [i]} for i in range(2000)]).encode()  # 6,000 objects a value
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(60):
            key = f"distkit:cache:{{unit}}:k:{i}"
            store.put(key, None, entry(json.loads(raw), size=len(raw)), store.stamp(key))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.stats()["bytes"] <= limit
    assert held <= limit, f"{held / limit:.2f}x max_bytes held"
    assert store.stats()["entries"] >= 1


def test_a_value_larger_than_max_bytes_stops_the_walk_early() -> None:
    store, _ = store_for(FakeClock(), max_bytes=ENTRY_OVERHEAD + 10_000)
    big = [[i] for i in range(100_000)]
    key = "distkit:cache:{unit}:k:big"
    start = time.perf_counter()
    assert not store.put(key, None, entry(big), store.stamp(key))
    assert time.perf_counter() - start < 0.05  # a few hundred objects walked, not 200,000
    assert deep_size(big, limit=10_000) > 10_000


# -- the window between "listener up" and the serving loop ----------------------------------------
@pytest.mark.parametrize("held_at", ["watch", "first_wait"])
def test_an_invalidation_before_the_listener_loop_bypasses_l1(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, held_at: str
) -> None:
    """The listener thread is held (as the GIL may hold it) after subscribing, before it watches
    its socket or before its first wait for bytes: a change another client makes meanwhile is
    never hidden behind an L1 hit."""
    gate = threading.Event()
    held = threading.Event()
    if held_at == "watch":
        real_watch = NearStore.watch

        def watch(store: NearStore, sock: Any, on: bool) -> None:
            if on:
                held.set()
                gate.wait(5)
            real_watch(store, sock, on)

        monkeypatch.setattr(NearStore, "watch", watch)
    else:
        real_readable = near.readable

        def readable(socks: list[Any], timeout: float) -> bool:
            if isinstance(threading.current_thread(), _Listener) and not held.is_set():
                held.set()
                gate.wait(5)
            return real_readable(socks, timeout)

        monkeypatch.setattr(near, "readable", readable)
    writer = Cache(redis_server.client(), namespace="window")
    writer.set("k", 1)
    cache = Cache(redis_server.client(), namespace="window", near_cache=NearCache())
    try:
        assert held.wait(5)
        for _ in range(3):
            cache.get("k")  # fills L1 if it is live already
        writer.set("k", 2)  # its invalidation waits in the socket, unread
        time.sleep(0.01)
        assert cache.get("k") == 2, "a stale L1 hit while the listener was held"
        gate.set()
        assert cache._near is not None and cache._near.wait_live(5)
        writer.set("k", 3)
        wait_for(lambda: cache.get("k") == 3, timeout=0.5)
    finally:
        gate.set()
        cache.close()


# -- item 5 and the admin operations -------------------------------------------------------------
@pytest.mark.parametrize("operation", ["flushdb", "flushall", "swapdb"])
def test_admin_operations(redis_server: RedisServer, operation: str) -> None:
    """FLUSHDB / FLUSHALL empty L1 (Redis sends a null invalidation); SWAPDB sends nothing, so
    L1 serves the swapped-out value until ``clear()`` (from any process) or its ttl."""
    admin = redis_server.client()
    admin.flushall()
    writer = Cache(redis_server.client(), namespace="admin")
    cache = Cache(redis_server.client(), namespace="admin", near_cache=NearCache())
    try:
        assert cache._near is not None and cache._near.wait_live(5)
        writer.set("k", 1)
        wait_for(lambda: cache.get("k") == 1 and cache._near.stats()["entries"] == 1)  # type: ignore[union-attr]
        if operation == "swapdb":
            admin.swapdb(0, 1)
            time.sleep(0.05)
            assert Cache(redis_server.client(), namespace="admin").get("k") is None
            assert cache.get("k") == 1  # documented: SWAPDB is not seen by the near cache
            writer.clear()  # the documented remedy: any process's clear() empties every L1
            wait_for(lambda: cache.get("k") is None, timeout=0.5)
            admin.swapdb(0, 1)
        else:
            getattr(admin, operation)()
            wait_for(lambda: cache.get("k") is None, timeout=0.5)
        writer.set("k", 3)
        wait_for(lambda: cache.get("k") == 3, timeout=0.5)
    finally:
        cache.close()
        admin.flushall()
