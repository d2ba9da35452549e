"""The cache contract (C1, C7, S1 of DESIGN.md; issue 6 points 1, 3; issue 8 point 1), against
Cache and AsyncCache on a real redis-server and on the rig's 3-master Cluster (where a namespace
spreads over 16 slots by default): one test body per property, run for both twins on both."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics
from distkit._scripts import registered_scripts
from distkit.testing import RedisServer

from ._topology import TOPOLOGIES, Topology, shard_base
from ._twins import Twin

MISSING = object()


def get_bytes(r: redis.Redis, key: str) -> bytes | None:
    """``r.get(key)``, typed: these clients return bytes."""
    value = r.get(key)
    assert value is None or isinstance(value, bytes)
    return value


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """One standalone server, or the 3-master Cluster (flushed, every script loaded)."""
    topo = Topology(request.param, request)
    client = topo.inspector()
    client.flushall()
    for script in registered_scripts().values():  # loaded: round-trip counts are exact
        for node in [topo.server] if topo.cluster is None else topo.cluster.nodes:
            assert node is not None
            with node.client() as conn:
                conn.script_load(script.source)
    yield topo
    topo.close()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, topology: Topology) -> Iterator[Twin]:
    """Cache (sync) or AsyncCache (async) handles on the topology."""
    t = Twin(request.param, Cache, AsyncCache, topology.sync_client, topology.async_client)
    yield t
    t.close()


@pytest.fixture
def r(topology: Topology) -> Any:
    """Inspection client of the twin's topology (Cluster: server-wide commands on every node)."""
    return topology.inspector()


def loader_of(twin: Twin, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` as a loader of the twin's kind (a coroutine function for AsyncCache)."""
    if twin.kind == "sync":
        return fn

    async def load() -> Any:
        return fn()

    return load


def counting(twin: Twin, value: Any) -> tuple[Callable[[], Any], list[int]]:
    calls: list[int] = []

    def fn() -> Any:
        calls.append(1)
        return value

    return loader_of(twin, fn), calls


def base(cache: Any, key: str, prefix: str = "distkit") -> str:
    """The records' prefix on ``key``'s shard (the documented layout)."""
    return shard_base(cache.namespace, cache.shards, key, prefix)


def entry(cache: Any, key: str) -> str:
    return base(cache, key) + ":k:" + key


def shards_of(cache: Any, keys: Any) -> int:
    """How many shards (one round trip each) ``keys`` touch."""
    return len({base(cache, k) for k in keys})


# What a client can send as a round trip (commands run inside scripts are counted by Redis too,
# so the script-internal GET/SET/... are left out), plus what O(1) invalidation must never use.
_TOP_LEVEL = {"mget", "evalsha", "eval", "scan", "keys", "sscan", "smembers", "unlink"}


def commands(r: redis.Redis) -> dict[str, int]:
    """Round-trip commands sent since the last ``CONFIG RESETSTAT``, by name."""
    stats = r.info("commandstats")
    out = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return {name: n for name, n in out.items() if name in _TOP_LEVEL}


# -- basics ------------------------------------------------------------------------------------
VALUES = [
    {"id": 1, "name": "ünïcode ✓", "nested": {"list": [1, 2.5, None, True]}},
    [1, "two", 3.0],
    "text",
    "",
    0,
    -17,
    2**70,
    1.25,
    True,
    False,
    [],
    {},
]


def test_set_get_round_trip_and_default(twin: Twin) -> None:
    cache = twin.make(namespace="basics")
    assert cache.get("nothing") is None
    assert cache.get("nothing", MISSING) is MISSING
    for i, value in enumerate(VALUES):
        assert cache.set(f"k{i}", value) is True
        assert cache.get(f"k{i}") == value
    assert cache.set("k0", "overwritten")
    assert cache.get("k0") == "overwritten"


def test_none_is_cached_and_distinguishable_from_a_miss(twin: Twin) -> None:
    cache = twin.make(namespace="none")
    assert cache.set("there", None)
    assert cache.get("there", MISSING) is None
    assert cache.get("absent", MISSING) is MISSING
    load, calls = counting(twin, None)
    assert cache.get_or_set("loaded", load) is None
    assert cache.get_or_set("loaded", load) is None
    assert calls == [1]  # the None was cached: no second load
    assert cache.get_many(["there", "absent", "loaded"]) == {"there": None, "loaded": None}


def test_ttl_is_enforced_by_the_server_not_the_client_clock(twin: Twin, r: redis.Redis) -> None:
    frozen = twin.make(namespace="ttl", ttl=60, clock=lambda: 0.0)  # a clock that never moves
    assert frozen.set("default", 1)
    assert 59_000 < r.pttl(entry(frozen, "default")) <= 60_000
    assert frozen.set("short", 1, ttl=0.15)
    assert 0 < r.pttl(entry(frozen, "short")) <= 150
    assert frozen.set("delta", 1, ttl=timedelta(minutes=2))
    assert 119_000 < r.pttl(entry(frozen, "delta")) <= 120_000
    time.sleep(0.2)
    assert frozen.get("short", MISSING) is MISSING  # gone on the server, whatever our clock says
    assert r.exists(entry(frozen, "short")) == 0
    assert frozen.get("default") == 1


def test_get_or_set_ttl_and_negative_ttl(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="neg", ttl=100, negative_ttl=0.5)
    assert cache.get_or_set("found", loader_of(twin, lambda: 1), ttl=30) == 1
    assert 29_000 < r.pttl(entry(cache, "found")) <= 30_000
    load, calls = counting(twin, None)
    assert cache.get_or_set("nope", load) is None
    assert 0 < r.pttl(entry(cache, "nope")) <= 500  # a "not found" lives negative_ttl
    raw = get_bytes(r, entry(cache, "nope"))
    assert raw is not None and raw[21:22] == b"n"  # kind: negative
    assert cache.get_or_set("nope", load) is None
    assert calls == [1]
    never = twin.make(namespace="neg0", negative_ttl=0)  # 0: never cache a None result
    load, calls = counting(twin, None)
    assert never.get_or_set("nope", load) is None
    assert never.get_or_set("nope", load) is None
    assert calls == [1, 1]
    assert r.exists(entry(never, "nope")) == 0
    assert never.set("explicit", None)  # an explicit set of None is a value, not "not found"
    assert never.get("explicit", MISSING) is None


def test_get_or_set_reads_through_once(twin: Twin, r: redis.Redis) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace="rt", metrics=metrics)
    load, calls = counting(twin, {"v": 1})
    for _ in range(3):
        assert cache.get_or_set("k", load, tags=["t"]) == {"v": 1}
    assert calls == [1]
    assert metrics.snapshot() == {"miss": 1, "fill": 1, "hit": 2}


def test_batch_operations_take_one_round_trip(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="batch")
    items = {f"k{i}": {"i": i} for i in range(50)}
    r.config_resetstat()
    assert cache.set_many(items, tags=["all"])
    assert commands(r) == {"evalsha": shards_of(cache, items)}  # one per shard (slot) touched
    r.config_resetstat()
    got = cache.get_many([*items, "missing", "k3"])
    assert commands(r) == {"mget": shards_of(cache, [*items, "missing"])}
    assert got == items
    assert cache.set_many({}) is True
    assert cache.get_many([]) == {}
    r.config_resetstat()
    assert cache.get("k7") == {"i": 7}
    assert commands(r) == {"mget": 1}  # the hit path: one MGET of entry and epoch, no script


def test_delete(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="del", fill_timeout=5)
    cache.set("k", 1)
    assert cache.delete("k") is True
    assert cache.get("k", MISSING) is MISSING
    assert cache.delete("k") is False
    assert cache.delete("never") is False
    assert 0 < r.pttl(entry(cache, "k")) <= 5000  # a tombstone, kept for the fill timeout only
    assert cache.get_or_set("k", loader_of(twin, lambda: 2)) == 2  # a fill after the delete
    assert cache.get("k") == 2


def test_invalidate_tags_is_o1_and_precise(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="tags")
    cache.set("a", 1, tags=["red"])
    cache.set("b", 2, tags=["red", "blue"])
    cache.set("c", 3, tags=["blue"])
    cache.set("d", 4)
    keys_before = r.dbsize()
    r.config_resetstat()
    cache.invalidate_tags("red")
    # O(shards): one script per shard; no SCAN, no KEYS, no per-entry work
    assert commands(r) == {"evalsha": cache.shards}
    # nothing written per entry, no tag sets (at most the epoch and the tag's record on the
    # shards that had none: an empty shard's in-flight fill must see the invalidation too)
    assert keys_before <= r.dbsize() <= keys_before + 2 * (cache.shards - 1)
    assert cache.get_many(["a", "b", "c", "d"]) == {"c": 3, "d": 4}
    cache.invalidate_tags("blue", "green")
    assert cache.get_many(["a", "b", "c", "d"]) == {"d": 4}
    cache.invalidate_tags()  # nothing to do
    cache.set("a", 10, tags=["red"])
    assert cache.get("a") == 10  # entries written after the bump are valid


def test_clear_is_o1_and_per_namespace(twin: Twin, r: redis.Redis) -> None:
    one = twin.make(namespace="one")
    two = twin.make(namespace="two")
    one.set_many({"a": 1, "b": 2}, tags=["t"])
    two.set("a", "other")
    r.config_resetstat()
    one.clear()
    assert commands(r) == {"evalsha": one.shards}
    assert one.get_many(["a", "b"]) == {}
    assert two.get("a") == "other"
    one.set("a", 3)
    assert one.get("a") == 3


def test_unrelated_invalidation_restamps_entries_once(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="restamp")
    cache.set("k", "v", tags=["mine"])
    cache.invalidate_tags("other")
    r.config_resetstat()
    assert cache.get("k") == "v"  # epoch moved: one revalidation script proves it still valid
    assert commands(r) == {"mget": 1, "evalsha": 1}
    r.config_resetstat()
    assert cache.get("k") == "v"
    assert commands(r) == {"mget": 1}  # re-stamped: back on the one-MGET hit path
    stamped = get_bytes(r, entry(cache, "k"))
    assert stamped is not None and stamped[4:20] == get_bytes(r, base(cache, "k") + ":epoch")


def test_lost_generation_records_mean_misses_never_stale_hits(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="lost")
    cache.set("tagged", 1, tags=["t"])
    cache.set("plain", 2)
    tagged, plain = base(cache, "tagged"), base(cache, "plain")
    r.delete(tagged + ":t:t")  # evicted, say
    cache.invalidate_tags("unrelated")
    assert cache.get("tagged", MISSING) is MISSING  # cannot prove it valid: a miss
    assert cache.get("plain") == 2
    r.delete(plain + ":epoch")  # the epoch lost too: recreated, entries rechecked
    assert cache.get("plain") == 2
    r.delete(plain + ":ns")
    r.delete(plain + ":epoch")
    assert cache.get("plain", MISSING) is MISSING


def test_one_key_layout_with_the_namespace_hash_tag(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="lay.out-1", prefix="app")
    long_key = "x" * 300
    cache.set("user:1", 1, tags=["users"])
    cache.set(long_key, 2)
    cache.get_or_set("{brace}:key", loader_of(twin, lambda: 3))
    digest = hashlib.sha256(long_key.encode()).hexdigest()
    user, brace, long = (base(cache, k, "app") for k in ("user:1", "{brace}:key", long_key))
    expected = {
        user + ":t:users",
        user + ":k:user:1",
        brace + ":k:{brace}:key",
        f"{long}:h:{digest}",
        *(b + suffix for b in (user, brace, long) for suffix in (":epoch", ":ns")),
    }
    marks = {user + ":mk:user:1", f"{long}:mh:{digest}"}  # set()'s write marks, short-lived
    expected |= marks
    found = sorted(k.decode() for k in r.keys("*") if isinstance(k, bytes))
    # the read-through's fill lock (distlock) leaves its fencing record, which expires
    fill_lock = [k for k in found if k.startswith("app:cache:lock:{cache.fill.lay.out-1.")]
    assert fill_lock and all(0 < r.pttl(k) <= 30_000 for k in fill_lock)
    assert sorted(set(found) - set(fill_lock)) == sorted(expected)
    assert all(0 < r.pttl(k) <= 2 * 60_000 for k in marks)
    if cache.shards == 1:  # one slot: every key under the namespace's hash tag
        assert user == "app:cache:{lay.out-1}"
    assert cache.get(long_key) == 2
    assert cache.get("x" * 299 + "y", MISSING) is MISSING
    assert cache.get("{brace}:key") == 3


def test_entry_envelope(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="env", ttl=42)

    def slow() -> dict[str, int]:
        time.sleep(0.02)
        return {"a": 1}

    before_ms = int(r.time()[0]) * 1000
    assert cache.get_or_set("k", loader_of(twin, slow), tags=["x", "y"]) == {"a": 1}
    raw = get_bytes(r, entry(cache, "k"))
    assert raw is not None
    epoch = get_bytes(r, base(cache, "k") + ":epoch")
    assert raw[:4] == b"dc1:" and raw[4:20] == epoch
    assert raw[20:22] == b"jv"  # JSON serializer, a value (not a negative entry)
    size = int(raw[22:26], 16)
    computed_at, compute_us, ttl_ms, ns_gen, tags = raw[26 : 26 + size].decode().split("|")
    assert before_ms - 1000 <= int(computed_at) <= before_ms + 5000  # the server's clock
    assert int(compute_us) >= 20_000  # the loader's measured time, for early refresh (XFetch)
    assert ttl_ms == "42000"
    assert ns_gen.encode() == get_bytes(r, base(cache, "k") + ":ns")
    x, y = (get_bytes(r, base(cache, "k") + f":t:{t}") for t in "xy")
    assert x is not None and y is not None
    assert tags == f"x={x.decode()},y={y.decode()}"
    assert raw[26 + size :] == b'{"a":1}'


def test_metrics_count_hits_misses_fills(twin: Twin) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace="m", metrics=metrics)
    cache.get("a")
    cache.set("a", 1)
    cache.get("a")
    cache.get_many(["a", "b"])
    cache.get_or_set("c", loader_of(twin, lambda: 3))
    assert metrics.count(CacheEvent.HIT) == 2
    assert metrics.count("miss", "m") == 3
    assert metrics.count(CacheEvent.FILL, "other") == 0
    assert metrics.snapshot() == {"hit": 2, "miss": 3, "fill": 1}
    metrics.reset()
    assert metrics.snapshot() == {}


def test_a_failing_metrics_hook_does_not_break_the_cache(twin: Twin) -> None:
    class Broken:
        def record(self, event: CacheEvent, namespace: str, count: int = 1) -> None:
            raise RuntimeError("exporter down")

    cache = twin.make(namespace="bm", metrics=Broken())
    assert cache.set("a", 1)
    assert cache.get("a") == 1
    assert cache.get("b") is None


def test_async_cache_is_safe_across_concurrent_tasks(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = redis_server.async_client()
        cache = AsyncCache(client, namespace="tasks")
        await cache.set_many({f"k{i}": i for i in range(20)}, tags=["t"])
        got = await asyncio.gather(*(cache.get(f"k{i}") for i in range(20)))
        assert got == list(range(20))
        await cache.invalidate_tags("t")
        assert await cache.get_many([f"k{i}" for i in range(20)]) == {}
        await client.aclose()

    redis_server.client().flushall()
    asyncio.run(run())
