"""The near cache (issue 7 points 4-5, property C6): the bounded L1 store with a fake clock, and
its coherence against a real redis-server and the rig's Cluster (another client writes; the
invalidation link is killed), for Cache and AsyncCache."""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, ConfigError, CounterMetrics, NearCache
from distcache._core import Entry
from distcache._near import ABSENT, ENTRY_OVERHEAD, NearStore, deep_size
from distkit.testing import RedisCluster, RedisServer

BOUND = 0.5  # seconds: generous for a loaded 2-core CI box; the measured lag is ~1 ms


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def envelope(value: bytes, *, computed_ms: int, ttl_ms: int, tags: tuple[str, ...] = ()) -> bytes:
    """An entry as WRITE stores it (``_scripts.py``): header, metadata, JSON payload."""
    tag_text = ",".join(f"{t}=0000000000000001" for t in tags)
    meta = f"{computed_ms}|0|{ttl_ms}|0000000000000001|{tag_text}".encode()
    return b"dc1:" + b"0" * 16 + b"jv" + f"{len(meta):04x}".encode() + meta + value


def entry(value: Any, *, ttl_ms: int = 60_000, tags: tuple[str, ...] = (), size: int = 10) -> Entry:
    """An ``Entry`` of ``value`` written now (server clock = wall clock) lasting ``ttl_ms``."""
    raw = envelope(b"x" * size, computed_ms=int(time.time() * 1000), ttl_ms=ttl_ms, tags=tags)
    return Entry(value, raw, len(raw) - size, None)


@pytest.fixture
def clock() -> FakeClock:
    """The fake clock of the unit tests."""
    return FakeClock()


def store_for(clock: FakeClock, **options: Any) -> tuple[NearStore, CounterMetrics]:
    """An L1 without listeners, marked as subscribed (offset: wall clock minus fake clock)."""
    metrics = CounterMetrics()
    cache = Cache(redis.Redis(), namespace="unit", clock=clock, metrics=metrics)
    store = NearStore(NearCache(**options), cache._core, None, start=False)
    store.listener_up(1, time.time() - clock())
    return store, metrics


def fill(store: NearStore, key: str, value: Any, **kw: Any) -> bool:
    """Put ``value`` under ``key`` the way a read does: stamp, then put."""
    return store.put(key, None, entry(value, **kw), store.stamp(key))


# -- the store, with a fake clock ------------------------------------------------------------------
def test_lru_order_and_max_entries(clock: FakeClock) -> None:
    store, _ = store_for(clock, max_entries=3)
    for k in "abc":
        assert fill(store, k, k)
    assert store.get("a", None).value == "a"  # a is now the most recent
    assert fill(store, "d", "d")
    assert store.get("b", None) is ABSENT  # the least recently used went
    assert [store.get(k, None).value for k in "acd"] == ["a", "c", "d"]
    assert store.stats()["entries"] == 3


def test_max_bytes_bounds_the_accounted_size(clock: FakeClock) -> None:
    store, _ = store_for(clock, max_bytes=20_000)
    for i in range(200):
        fill(store, f"k{i}", "v" * 500, size=500)
        assert store.stats()["bytes"] <= 20_000
    held = store.stats()["entries"]
    assert 5 < held < 200
    assert store.get("k199", None) is not ABSENT and store.get("k0", None) is ABSENT
    # a value larger than the whole budget is not kept at all (and evicts nothing)
    assert not fill(store, "huge", "v" * 30_000, size=30_000)
    assert store.stats()["entries"] == held


def test_near_ttl_with_a_fake_clock(clock: FakeClock) -> None:
    store, metrics = store_for(clock, ttl=5)
    fill(store, "k", 1)
    clock.now += 4.9
    store.listener_heard(1)
    assert store.get("k", None).value == 1
    clock.now += 0.2
    store.listener_heard(1)
    assert store.get("k", None) is ABSENT
    assert metrics.count(CacheEvent.NEAR_HIT) == 1 and metrics.count(CacheEvent.NEAR_MISS) == 1


def test_the_redis_ttl_caps_the_near_ttl(clock: FakeClock) -> None:
    store, _ = store_for(clock, ttl=60)
    fill(store, "k", 1, ttl_ms=2000)
    clock.now += 1.9
    store.listener_heard(1)
    assert store.get("k", None).value == 1
    clock.now += 0.2  # the Redis entry has expired: so has the copy
    store.listener_heard(1)
    assert store.get("k", None) is ABSENT
    assert not fill(store, "gone", 1, ttl_ms=-1)  # an already expired entry is not kept


def test_silence_from_redis_bypasses_the_store(clock: FakeClock) -> None:
    store, _ = store_for(clock, health_check_interval=1.0)
    fill(store, "k", 1)
    clock.now += 1.9
    assert store.get("k", None).value == 1
    clock.now += 0.2  # two health-check intervals without a word: a silent partition
    assert store.get("k", None) is ABSENT
    store.listener_heard(1)
    assert store.get("k", None).value == 1  # the link spoke again: nothing was missed on it


def test_a_read_overtaken_by_an_invalidation_does_not_fill(clock: FakeClock) -> None:
    store, _ = store_for(clock)
    key = "distkit:cache:{unit}:k:k"
    for invalidate in (
        lambda: store.evict([key]),
        lambda: store.evict_tags(["t"]),
        store.flush,
        lambda: store.invalidated([key.encode()]),
        lambda: store.invalidated(None),
    ):
        stamp = store.stamp(key)  # the read starts ...
        invalidate()  # ... an invalidation arrives while it is in flight ...
        assert not store.put(key, None, entry(1), stamp)  # ... its result is refused
        assert store.get(key, None) is ABSENT
    stamp = store.stamp(key)
    others = [f"other{i}" for i in range(50)]
    store.evict([k for k in others if hash(k) % 256 != hash(key) % 256])  # other stripes
    assert store.put(key, None, entry(1), stamp)


def test_while_disconnected_nothing_is_served_or_kept(clock: FakeClock) -> None:
    store, metrics = store_for(clock)
    fill(store, "k", 1)
    stamp = store.stamp("k")
    store.listener_down(1)
    assert store.get("k", None) is ABSENT and store.stats()["entries"] == 0
    assert store.stamp("k") is None and not store.put("k", None, entry(1), stamp)
    assert metrics.count(CacheEvent.NEAR_FLUSH) == 1
    store.listener_up(1, time.time() - clock())
    assert not store.put("k", None, entry(1), stamp)  # read before the link came back
    assert fill(store, "k", 1)


def test_invalidation_messages(clock: FakeClock) -> None:
    store, _ = store_for(clock)
    base = "distkit:cache:{unit}"
    fill(store, f"{base}:k:a", 1, tags=("red",))
    fill(store, f"{base}:k:b", 2, tags=("blue",))
    fill(store, f"{base}:k:c", 3)
    assert store.get(f"{base}:k:a", None).value == 1
    store.invalidated([f"{base}:k:c".encode()])
    assert store.get(f"{base}:k:c", None) is ABSENT
    store.invalidated([f"{base}:epoch".encode(), f"{base}:t:red".encode()])  # a tag bump
    assert store.get(f"{base}:k:a", None) is ABSENT
    assert store.get(f"{base}:k:b", None).value == 2  # other tags stay
    store.invalidated([f"{base}:epoch".encode(), f"{base}:ns".encode()])  # clear()
    assert store.stats()["entries"] == 0
    fill(store, f"{base}:k:b", 2)
    store.invalidated([f"{base}:epoch".encode()])  # the epoch alone: cause unknown, flush
    assert store.stats()["entries"] == 0


def test_options_are_validated() -> None:
    for bad in ({"max_entries": 0}, {"max_bytes": -1}, {"ttl": 0}, {"max_entries": True}):
        with pytest.raises(ConfigError):
            NearCache(**bad)
    with pytest.raises(ConfigError, match="near_cache"):
        Cache(redis.Redis(), near_cache={"max_entries": 1})  # type: ignore[arg-type]


def test_the_accounted_overhead_covers_what_an_entry_costs(clock: FakeClock) -> None:
    """Point 5: per-entry memory, measured with tracemalloc, is within what is accounted."""
    store, _ = store_for(clock, max_entries=100_000, max_bytes=1 << 30)
    n = 2000
    items = [(f"distkit:cache:{{unit}}:k:user:{i}", entry({"id": i, "name": f"u{i}"}, tags=("t",)))
             for i in range(n)]  # fmt: skip
    stamps = [store.stamp(k) for k, _ in items]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for (key, e), stamp in zip(items, stamps, strict=True):
        assert store.put(key, None, e, stamp)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # what put() allocates per entry (slot, LRU node, tag index), beside the key and the Entry
    # the read produced (both accounted too: sys.getsizeof(key), raw bytes, deep value size)
    e = items[0][1]
    own = sys.getsizeof(e) + sum(sys.getsizeof(getattr(e, a)) for a in ("computed_ms",
                                 "expires_ms", "delta_ms"))  # fmt: skip
    per_entry = used / n + own
    print(f"near cache overhead: {per_entry:.0f} bytes per entry (accounted {ENTRY_OVERHEAD})")
    assert per_entry <= ENTRY_OVERHEAD
    accounted = store.stats()["bytes"] / n
    assert accounted >= per_entry + deep_size(items[0][1].value)


# -- against a real server ---------------------------------------------------------------------
def kill_listeners(client: redis.Redis, namespace: str) -> int:
    """``CLIENT KILL`` the near cache's invalidation connections of ``namespace``."""
    killed = 0
    for info in client.client_list():
        if info.get("name") == f"distcache-near:{namespace}":
            client.client_kill_filter(_id=info["id"])
            killed += 1
    return killed


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``predicate()`` held (fails after ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.0005)
    return time.monotonic() - start


class Handle:
    """One near-cached cache (sync, or async driven on a private loop) and a plain writer."""

    def __init__(self, kind: str, server: RedisServer, namespace: str, **options: Any) -> None:
        self.kind = kind
        self.metrics = CounterMetrics()
        self.writer = Cache(server.client(), namespace=namespace)
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        near = NearCache(**options)
        if self.loop is None:
            self.cache: Any = Cache(
                server.client(), namespace=namespace, near_cache=near, metrics=self.metrics
            )
        else:
            self.cache = AsyncCache(
                server.async_client(), namespace=namespace, near_cache=near, metrics=self.metrics
            )
        assert self.cache._near.wait_live(5)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``cache.name(*args, **kwargs)``, awaited for the async twin."""
        out = getattr(self.cache, name)(*args, **kwargs)
        return out if self.loop is None else self.loop.run_until_complete(out)

    def get(self, key: str) -> Any:
        """``cache.get(key)``."""
        return self.call("get", key)

    def close(self) -> None:
        """Stop the near cache and close everything."""
        if self.loop is None:
            self.cache.close()
            self.cache._client.close()
        else:
            self.loop.run_until_complete(self.cache.aclose())
            self.loop.run_until_complete(self.cache._client.aclose())
            self.loop.close()
        self.writer._client.close()


@pytest.fixture(params=["sync", "async"])
def handle(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Handle]:
    """A near-cached Cache or AsyncCache on the shared server, and a writer without L1."""
    redis_server.client().flushall()
    h = Handle(request.param, redis_server, "near")
    yield h
    h.close()


SLACK = 2  # reads that may meet an unapplied PONG on the listener socket and ask Redis


def settle(read: Callable[[], Any], handle: Handle) -> None:
    """Read until the entry is in L1 and the seeding write's invalidation has come and gone."""
    read()
    time.sleep(0.05)
    wait_for(lambda: read() is not None and handle.cache._near.stats()["entries"] == 1)


def mget_calls(client: redis.Redis) -> int:
    """How many MGETs the server has run."""
    return int(client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))


def test_hits_are_served_from_process_memory(handle: Handle, r: redis.Redis) -> None:
    handle.writer.set("k", {"v": 1})
    settle(lambda: handle.get("k"), handle)
    before = mget_calls(r)
    for _ in range(50):
        assert handle.get("k") == {"v": 1}
    # none reached Redis, but for a read that met a PONG not yet applied (it then asks Redis)
    assert mget_calls(r) - before <= SLACK
    assert handle.metrics.count(CacheEvent.NEAR_HIT) >= 50 - SLACK


@pytest.mark.parametrize("change", ["set", "delete", "tag", "clear"])
def test_another_clients_change_evicts_the_copy(handle: Handle, change: str) -> None:
    handle.writer.set("k", {"v": 1}, tags=["t"])
    handle.writer.set("other", {"v": 9}, tags=["u"])
    wait_for(lambda: handle.get("k") == {"v": 1} and handle.cache._near.stats()["entries"] >= 1)
    handle.get("other")
    if change == "set":
        handle.writer.set("k", {"v": 2}, tags=["t"])
        expected: Any = {"v": 2}
    elif change == "delete":
        handle.writer.delete("k")
        expected = None
    elif change == "tag":
        handle.writer.invalidate_tags("t")
        expected = None
    else:
        handle.writer.clear()
        expected = None
    lag = wait_for(lambda: handle.get("k") == expected, timeout=BOUND)
    assert lag < BOUND
    if change in ("set", "delete", "tag"):  # an unrelated entry survives precise invalidations
        assert handle.get("other") == {"v": 9}


def test_own_writes_are_read_back_at_once(handle: Handle) -> None:
    handle.call("set", "k", 1)
    assert handle.get("k") == 1
    handle.call("set", "k", 2)
    assert handle.get("k") == 2  # no wait: the local copy went with the write
    handle.call("delete", "k")
    assert handle.get("k") is None
    handle.call("set", "k", 3, tags=["t"])
    assert handle.get("k") == 3
    handle.call("invalidate_tags", "t")
    assert handle.get("k") is None
    handle.call("set", "k", 4)
    assert handle.get("k") == 4
    handle.call("clear")
    assert handle.get("k") is None


def test_the_copy_respects_the_redis_ttl(handle: Handle) -> None:
    handle.writer.set("k", 1, ttl=0.4)
    assert handle.get("k") == 1
    time.sleep(0.45)
    assert handle.get("k") is None


def test_a_killed_link_flushes_bypasses_and_comes_back(handle: Handle, r: redis.Redis) -> None:
    handle.writer.set("k", 1)
    wait_for(lambda: handle.get("k") == 1 and handle.cache._near.stats()["entries"] == 1)
    assert kill_listeners(r, "near") == 1
    wait_for(lambda: handle.metrics.count(CacheEvent.NEAR_FLUSH) >= 1, timeout=2)
    handle.writer.set("k", 2)  # written while the link may be down: must be seen anyway
    assert handle.get("k") == 2
    assert handle.cache._near.wait_live(5)  # reconnected
    wait_for(lambda: handle.get("k") == 2 and handle.cache._near.stats()["entries"] == 1)
    handle.writer.set("k", 3)
    wait_for(lambda: handle.get("k") == 3, timeout=BOUND)


def test_close_stops_the_listener(handle: Handle, r: redis.Redis) -> None:
    handle.writer.set("k", 1)
    handle.get("k")
    handle.call("close" if handle.kind == "sync" else "aclose")
    assert handle.cache._near.closed and not handle.cache._near.live
    wait_for(lambda: kill_listeners(r, "near") == 0, timeout=2)
    assert handle.get("k") == 1  # still a working cache, without L1
    handle.writer.set("k", 2)
    assert handle.get("k") == 2


def test_read_through_and_cached_use_the_near_cache(handle: Handle, r: redis.Redis) -> None:
    calls: list[int] = []

    if handle.kind == "sync":

        def load() -> int:
            calls.append(1)
            return 7

        loader: Any = load
    else:

        async def aload() -> int:
            calls.append(1)
            return 7

        loader = aload
    assert handle.call("get_or_set", "rt", loader) == 7
    settle(lambda: handle.call("get_or_set", "rt", loader), handle)
    before = mget_calls(r)
    for _ in range(20):
        assert handle.call("get_or_set", "rt", loader) == 7
    assert mget_calls(r) - before <= SLACK and calls == [1]
    handle.writer.set("rt", 8)
    wait_for(lambda: handle.call("get_or_set", "rt", loader) == 8, timeout=BOUND)


def test_near_cache_on_a_cluster(cluster: RedisCluster) -> None:
    for node in cluster.nodes:
        node.client().flushall()
    client = cluster.client()
    writer = Cache(cluster.client(), namespace="nc")
    cache = Cache(client, namespace="nc", near_cache=NearCache())
    try:
        assert cache._near is not None and cache._near.wait_live(10)
        keys = [f"key{i}" for i in range(40)]  # spread over the namespace's shards and masters
        writer.set_many({k: 1 for k in keys}, tags=["t"])
        for k in keys:
            assert cache.get(k) == 1
        wait_for(lambda: all(cache.get(k) == 1 for k in keys)
                 and cache._near.stats()["entries"] == len(keys))  # fmt: skip
        writer.set_many({k: 2 for k in keys[::2]})
        wait_for(lambda: all(cache.get(k) == 2 for k in keys[::2]), timeout=BOUND)
        assert all(cache.get(k) == 1 for k in keys[1::2])
        writer.invalidate_tags("t")
        wait_for(lambda: all(cache.get(k) is None for k in keys[1::2]), timeout=BOUND)
        killed = sum(kill_listeners(node.client(), "nc") for node in cluster.nodes)
        assert killed == len(cluster.nodes)
        writer.set(keys[0], 3)
        assert cache.get(keys[0]) == 3
        assert cache._near.wait_live(10)
    finally:
        cache.close()
        client.close()
        writer._client.close()


def test_get_many_serves_what_l1_holds_and_reads_the_rest(handle: Handle, r: redis.Redis) -> None:
    handle.writer.set_many({"a": 1, "b": 2})
    settle(lambda: handle.get("a"), handle)  # "a" in L1; "b" not
    before = mget_calls(r)
    for _ in range(20):
        assert handle.call("get_many", ["a", "b", "c"]) == {"a": 1, "b": 2}
    assert mget_calls(r) - before <= 20 + SLACK  # one MGET per call, for "b" and "c" only
    for _ in range(20):
        assert handle.call("get_many", ["a"]) == {"a": 1}
    assert mget_calls(r) - before <= 20 + 2 * SLACK  # "a" alone: never asked Redis
    handle.writer.set("a", 10)  # another client's write evicts the copy
    wait_for(lambda: handle.call("get_many", ["a", "b"]) == {"a": 10, "b": 2}, timeout=BOUND)


@pytest.mark.slow
def test_near_cache_follows_a_master_that_joins_the_cluster(redis_binary: str) -> None:
    """A reshard onto a new master: its listener starts within a health-check interval (L1 is
    flushed and bypassed meanwhile), so its writes evict the copy like any other master's."""
    from redis.crc import key_slot

    with RedisCluster(masters=3, binary=redis_binary) as cl:
        writer = Cache(cl.client(), namespace="grow", shards=1)
        client = cl.client()
        near = NearCache(health_check_interval=0.2)
        cache = Cache(client, namespace="grow", shards=1, near_cache=near)
        try:
            assert cache._near is not None and cache._near.wait_live(10)
            writer.set("k", 1)
            wait_for(lambda: cache.get("k") == 1 and cache._near.stats()["entries"] == 1)
            new = cl.add_master()
            cl.migrate_slot(key_slot(cache._core.entry_key("k").encode()), new)
            # read again: the copy now comes from the new master
            wait_for(lambda: cache.get("k") == 1 and cache._near.stats()["entries"] == 1)
            writer.set("k", 2)  # on the new master
            lag = wait_for(lambda: cache.get("k") == 2, timeout=BOUND + 0.2)
            assert lag < BOUND + 0.2
            assert cache._near.wait_live(10)  # four listeners now
            writer.set("k", 3)
            wait_for(lambda: cache.get("k") == 3, timeout=BOUND)
        finally:
            cache.close()
            client.close()
            writer._client.close()
