"""C3, early refresh (issue 7 point 2): XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015).

A read at time t refreshes early when ``t - δ·β·ln(rand()) >= expiry``: at a distance ``g``
before expiry that happens with probability ``exp(-g / (δ·β))``. The statistical tests drive
the decision with a fake clock (explicit ``now``) and a seeded RNG; the end-to-end tests show,
on a real server, that a hot key is refreshed before it expires (readers never miss) and that
an early refresh runs once however many readers trigger it.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics
from distcache._core import Entry
from distkit import aconnect, connect
from distkit.testing import RedisServer, free_port

DELTA_MS = 100.0
EXPIRY_MS = 1_000_000_000.0
SAMPLES = 20_000


def _entry(delta_ms: float, expires_ms: float, ttl_ms: int = 60_000) -> Entry:
    """An entry as WRITE lays it out (see distcache/_scripts.py), with a chosen δ and expiry."""
    computed = int(expires_ms) - ttl_ms
    meta = f"{computed}|{round(delta_ms * 1000)}|{ttl_ms}|0000000000000001|".encode()
    raw = b"dc1:" + b"0" * 16 + b"jv" + f"{len(meta):04x}".encode() + meta + b"1"
    return Entry(1, raw, 26 + len(meta), b"0" * 16)


def _cache(beta: float, seed: int) -> Cache:
    """A cache on a port nothing listens on: the decision itself does no I/O."""
    client = connect({"port": free_port(), "connect_timeout": 0.2})
    return Cache(client, namespace="x", early_refresh=beta, random=random.Random(seed).random)


def _rate(cache: Cache, entry: Entry, now_ms: float) -> float:
    early = cache._policy.early
    return sum(early(entry, now_ms) for _ in range(SAMPLES)) / SAMPLES


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_the_refresh_probability_follows_the_formula(beta: float) -> None:
    cache = _cache(beta, seed=7)
    entry = _entry(DELTA_MS, EXPIRY_MS)
    rates = []
    for gap in (800.0, 400.0, 200.0, 100.0, 50.0, 10.0):  # ms before expiry, nearing it
        expected = math.exp(-gap / (DELTA_MS * beta))
        rate = _rate(cache, entry, EXPIRY_MS - gap)
        sigma = math.sqrt(expected * (1 - expected) / SAMPLES)
        assert abs(rate - expected) <= 5 * sigma + 0.002, (gap, rate, expected)
        rates.append(rate)
    assert rates == sorted(rates)  # rises as expiry nears
    assert rates[-1] > 0.8 and rates[0] < 0.01 * beta + 0.001


def test_at_or_past_expiry_a_read_always_refreshes_and_zero_beta_never() -> None:
    cache = _cache(1.0, seed=1)
    entry = _entry(DELTA_MS, EXPIRY_MS)
    assert _rate(cache, entry, EXPIRY_MS) == 1.0
    assert _rate(_cache(0.0, seed=1), entry, EXPIRY_MS - 1) == 0.0
    assert _rate(cache, _entry(0.0, EXPIRY_MS), EXPIRY_MS - 1) == 0.0  # no measured δ: no early


def test_a_longer_recompute_starts_refreshing_earlier() -> None:
    cache = _cache(1.0, seed=3)
    gap = 300.0
    slow = _rate(cache, _entry(4 * DELTA_MS, EXPIRY_MS), EXPIRY_MS - gap)
    fast = _rate(cache, _entry(DELTA_MS, EXPIRY_MS), EXPIRY_MS - gap)
    assert slow > 5 * fast  # exp(-300/400) vs exp(-300/100)


def test_delta_is_the_measured_loader_time(r: redis.Redis) -> None:
    """δ comes from the loader's time on the cache's clock (here a fake one ticking 2.5 s)."""
    now = [1000.0]

    def loader() -> str:
        now[0] += 2.5
        return "v"

    cache = Cache(r, namespace="delta", clock=lambda: now[0])
    cache.get_or_set("k", loader)
    raw = r.get("distkit:cache:{delta}:k:k")
    assert raw is not None
    size = int(raw[22:26], 16)
    assert raw[26 : 26 + size].split(b"|")[1] == b"2500000"  # compute_us


# -- end to end, real server --------------------------------------------------------------------
@pytest.mark.slow
def test_a_hot_key_is_refreshed_before_it_expires_and_readers_never_miss(r: redis.Redis) -> None:
    metrics = CounterMetrics()
    cache = Cache(
        r, namespace="hot", ttl=2.0, metrics=metrics, random=random.Random(11).random
    )  # β = 1.0, the default
    calls = []

    def loader() -> int:
        calls.append(time.monotonic())
        time.sleep(0.2)  # δ ≈ 200 ms: XFetch starts ~δ·ln(reads per δ) ≈ 1 s ahead of expiry
        return len(calls)

    seen = []
    stop = time.monotonic() + 6.0  # 3 lifetimes of the entry
    while time.monotonic() < stop:
        seen.append(cache.get_or_set("k", loader))
        time.sleep(0.002)  # a steady read load
    assert cache.drain(5)
    assert metrics.count(CacheEvent.MISS) == 1  # only the very first read
    assert len(calls) >= 3  # refreshed, repeatedly, in the background
    assert metrics.count(CacheEvent.EARLY_REFRESH) == len(calls) - 1
    assert seen == sorted(seen) and seen[-1] >= 3  # readers moved on to the refreshed values


def test_an_early_refresh_runs_once_for_many_readers(
    r: redis.Redis, redis_server: RedisServer
) -> None:
    """β is huge, so every read of the entry wants to refresh; two caches stand for two
    processes (separate in-process state, one distributed fill lock)."""
    caches = [Cache(connect(redis_server.url), namespace="once", early_refresh=1e9) for _ in "ab"]
    caches[0].get_or_set("k", lambda: "first")
    release = threading.Event()
    calls = []

    def slow_refresh() -> str:
        calls.append(1)
        release.wait(10)
        return "second"

    barrier = threading.Barrier(20)
    got: list[Any] = []

    def reader(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            got.append(caches[i % 2].get_or_set("k", slow_refresh))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    time.sleep(0.2)  # any refresh that was going to start has started
    release.set()
    assert all(c.drain(10) for c in caches)
    assert len(calls) == 1  # 100 reads wanted a refresh; one ran
    assert got == ["first"] * 100  # and nobody waited for it
    assert caches[1].get("k") == "second"


def test_async_early_refresh_runs_in_a_task(redis_server: RedisServer) -> None:
    import asyncio

    redis_server.client().flushall()

    async def main() -> tuple[list[str], str, int]:
        client = aconnect(redis_server.url)
        cache = AsyncCache(client, namespace="atask", early_refresh=1e9)
        n = [0]

        async def loader() -> str:
            n[0] += 1
            await asyncio.sleep(0.05)
            return f"v{n[0]}"

        first = await cache.get_or_set("k", loader)
        reads = await asyncio.gather(*(cache.get_or_set("k", loader) for _ in range(30)))
        assert await cache.drain(5)
        after = await cache.get("k")
        await client.aclose()
        return [first, *reads], after, n[0]

    reads, after, calls = asyncio.run(main())
    assert reads == ["v1"] * 31  # the refresh never blocks a reader
    assert calls == 2 and after == "v2"
