"""Caches on a real 3-master Redis Cluster (issue 6 point 3, issue 8 point 1).

A namespace's entries spread over ``shards`` hash slots (16 by default on a Cluster client); each
shard has its own epoch and generation records on the entries' slot, so every script and every
MGET runs on one slot (no CROSSSLOT). Invalidations bump every shard and return only once all
did; batches are grouped by shard.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from distcache import AsyncCache, Cache, cached
from distkit import ConfigError, ConnectionUnavailable, DistkitError, aconnect, connect
from distkit.testing import RedisCluster

from ._topology import ClusterInspector

MISSING = object()
NAMESPACES = [f"ns{i}" for i in range(9)]


@pytest.fixture
def client(cluster: RedisCluster) -> Iterator[Any]:
    c = connect(cluster.config())
    ClusterInspector(cluster).flushall()
    yield c
    c.close()


def keys_on_each_node(cluster: RedisCluster, pattern: str) -> dict[int, list[bytes]]:
    """``KEYS pattern`` on every master, by port (only the nodes that hold some)."""
    out: dict[int, list[bytes]] = {}
    for node in cluster.nodes:
        with node.client() as conn:
            found = [k for k in conn.keys(pattern) if isinstance(k, bytes)]
        if found:
            out[node.port] = found
    return out


def test_every_operation_on_a_cluster(cluster: RedisCluster, client: Any) -> None:
    for ns in NAMESPACES:
        cache = Cache(client, namespace=ns)
        assert cache.shards == 16
        items = {f"k{i}": {"ns": ns, "i": i} for i in range(40)}
        assert cache.set_many(items, tags=["all"])
        assert cache.set("one", 1, tags=["a", "b"])
        assert cache.get_many([*items, "one", "missing"]) == {**items, "one": 1}
        assert cache.get("k3") == items["k3"]
        assert cache.get_or_set("loaded", lambda: "x", tags=["b"]) == "x"
        cache.invalidate_tags("b", "zzz")
        assert cache.get("one", MISSING) is MISSING
        assert cache.get("loaded", MISSING) is MISSING
        assert cache.get("k0") == items["k0"]  # revalidated (REVALIDATE on the entry's slot)
        assert cache.get_many(list(items)) == items
        assert cache.delete("k1") is True
        cache.clear()
        assert cache.get_many(list(items)) == {}
        assert cache.get_or_set("k0", lambda: "again") == "again"
    for ns in NAMESPACES:
        cache = Cache(client, namespace=ns)
        by_node = keys_on_each_node(cluster, f"distkit:cache.16:?{ns}.*")
        assert len(by_node) >= 2  # one namespace, several masters
        slots = {key_slot(k) for keys in by_node.values() for k in keys}
        assert len(slots) > 8  # and many slots
        for port, keys in by_node.items():
            for k in keys:
                # every key sits on its shard's slot, beside that shard's epoch and records
                prefix = k[: k.index(b"}") + 1]
                assert key_slot(k) == key_slot(prefix + b":epoch")
                assert cluster.node_for_key(k).port == port
        assert {p.encode() for p in cache.key_prefixes} == {
            k[: k.index(b"}") + 2] for keys in by_node.values() for k in keys
        }


def test_the_key_layout_and_the_shard_of_a_key(client: Any) -> None:
    cache = Cache(client, namespace="lay", prefix="app", shards=4)
    assert cache.key_prefixes == tuple(f"app:cache.4:{{lay.{i}}}:" for i in range(4))
    for key in ("a", "user:1", "ü", "x" * 300):
        cache.set(key, key)
        shard = zlib.crc32(key.encode()) % 4
        if len(key) <= 200:
            assert client.get(f"app:cache.4:{{lay.{shard}}}:k:{key}") is not None
        assert cache.get(key) == key
    # what a near cache parses from an invalidation message, on any shard
    core = cache._core
    assert core.split_key("app:cache.4:{lay.3}:k:a:b") == ("app:cache.4:{lay.3}:", "k:a:b")
    assert core.split_key("app:cache.4:{lay.0}:epoch") == ("app:cache.4:{lay.0}:", "epoch")
    for other in ("app:cache.4:{lay.4}:ns", "app:cache.8:{lay.0}:ns", "app:cache:{lay}:ns", "x"):
        assert core.split_key(other) is None
    single = Cache(client, namespace="lay", prefix="app", shards=1)
    assert single.key_prefixes == ("app:cache:{lay}:",)
    assert single._core.split_key("app:cache:{lay}:t:x") == ("app:cache:{lay}:", "t:x")
    with pytest.raises(ConfigError):
        Cache(client, namespace="x", shards=0)
    with pytest.raises(ConfigError):
        Cache(client, namespace="x", shards=True)


def test_shards_1_keeps_a_namespace_on_one_slot(cluster: RedisCluster, client: Any) -> None:
    cache = Cache(client, namespace="single", shards=1)
    cache.set_many({f"k{i}": i for i in range(30)}, tags=["t"])
    cache.invalidate_tags("t")
    cache.set("x", 1)
    by_node = keys_on_each_node(cluster, "distkit:cache:?single?:*")
    assert len(by_node) == 1
    assert {key_slot(k) for keys in by_node.values() for k in keys} == {key_slot(b"{single}")}


def _one_key_per_shard(shards: int) -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        found.setdefault(zlib.crc32(f"key{i}".encode()) % shards, f"key{i}")
        i += 1
    return [found[s] for s in range(shards)]


def test_invalidations_reach_every_shard(client: Any) -> None:
    cache = Cache(client, namespace="every")
    keys = _one_key_per_shard(cache.shards)
    cache.set_many({k: k for k in keys}, tags=["t"])
    cache.set_many({k + "-other": 1 for k in keys}, tags=["u"])
    assert len(cache.get_many(keys)) == cache.shards
    cache.invalidate_tags("t")
    assert cache.get_many(keys) == {}  # a miss on every shard
    assert len(cache.get_many([k + "-other" for k in keys])) == cache.shards
    cache.set_many({k: k for k in keys})
    cache.clear()
    assert cache.get_many([*keys, *(k + "-other" for k in keys)]) == {}
    # every shard's epoch and namespace record carry a generation of their own
    for prefix in cache.key_prefixes:
        assert client.get(prefix + "epoch") is not None
        assert client.get(prefix + "ns") is not None


@pytest.mark.parametrize("how", ["tag", "clear", "delete"])
def test_stale_fill_is_refused_on_every_shard(client: Any, how: str) -> None:
    cache = Cache(client, namespace=f"sf-{how}")
    keys = _one_key_per_shard(cache.shards)
    cache.set("warm", 0, tags=["t"])
    started = threading.Semaphore(0)
    release = threading.Event()

    def load() -> str:
        started.release()
        release.wait(10)
        return "stale"

    threads = [
        threading.Thread(target=lambda k=k: cache.get_or_set(k, load, tags=["t"])) for k in keys
    ]
    for thread in threads:
        thread.start()
    for _ in keys:
        assert started.acquire(timeout=10)  # every loader read its shard before the invalidation
    if how == "tag":
        cache.invalidate_tags("t")
    elif how == "clear":
        cache.clear()
    else:
        for k in keys:
            cache.delete(k)
    release.set()
    for thread in threads:
        thread.join(10)
    assert cache.get_many(keys) == {}  # no shard accepted a fill that predates the invalidation


def _fill_worker(config: Any, keys: list[str], started: Any, release: Any) -> None:
    cache = Cache(connect(config), namespace="sf-procs", stampede=None)

    def load() -> str:
        started.put(1)
        release.wait(20)
        return "stale"

    threads = [
        threading.Thread(target=lambda k=k: cache.get_or_set(k, load, tags=["t"])) for k in keys
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def test_stale_fills_from_other_processes_are_refused_on_every_shard(
    cluster: RedisCluster, client: Any
) -> None:
    cache = Cache(client, namespace="sf-procs")
    keys = _one_key_per_shard(cache.shards)
    ctx = mp.get_context("spawn")
    started, release = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_fill_worker, args=(cluster.config(), keys[i::2], started, release))
        for i in range(2)
    ]
    for proc in procs:
        proc.start()
    for _ in keys:
        started.get(timeout=60)  # every shard has a fill in flight, its read done
    cache.invalidate_tags("t")
    release.set()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert cache.get_many(keys) == {}


def test_a_partial_invalidation_raises(cluster: RedisCluster, client: Any) -> None:
    cache = Cache(client, namespace="partial", shards=4)
    keys = _one_key_per_shard(4)
    cache.set_many({k: k for k in keys}, tags=["t"])
    client.delete("distkit:cache.4:{partial.2}:epoch")
    client.hset("distkit:cache.4:{partial.2}:epoch", "foreign", "data")  # shard 2 cannot bump
    with pytest.raises(DistkitError):
        cache.invalidate_tags("t")
    with pytest.raises(DistkitError):
        cache.clear()
    client.delete("distkit:cache.4:{partial.2}:epoch")
    cache.invalidate_tags("t")
    assert cache.get_many(keys) == {}


def test_an_unreachable_shard_fails_the_invalidation_loudly(redis_binary: str) -> None:
    with RedisCluster(masters=3, binary=redis_binary) as own:  # paused: not the shared one
        client = connect(own.config(socket_timeout=0.3, connect_timeout=0.3))
        cache = Cache(client, namespace="down", shards=8)
        keys = _one_key_per_shard(8)
        cache.set_many({k: k for k in keys}, tags=["t"])
        victim = own.node_for_key(cache.key_prefixes[5])
        victim.pause()
        try:
            with pytest.raises(ConnectionUnavailable):
                cache.invalidate_tags("t")
        finally:
            victim.resume()
        cache.invalidate_tags("t")
        assert cache.get_many(keys) == {}
        client.close()


def test_the_decorator_and_the_async_cache_on_a_cluster(cluster: RedisCluster, client: Any) -> None:
    sync_cache = Cache(client, namespace="deco")
    calls: list[int] = []

    @cached(sync_cache, tags=lambda uid: [f"user:{uid}"])
    def user(uid: int) -> dict[str, int]:
        calls.append(uid)
        return {"id": uid}

    assert user(1) == user(1) == {"id": 1}
    sync_cache.invalidate_tags("user:1")
    user(1)
    assert calls == [1, 1]

    async def run() -> None:
        aclient = aconnect(cluster.config())
        for ns in NAMESPACES[:4]:
            cache = AsyncCache(aclient, namespace=ns)
            assert cache.shards == 16
            items = {f"k{i}": i for i in range(30)}
            assert await cache.set_many(items, tags=["t"])
            assert await cache.get_many([*items, "c"]) == items
            await cache.invalidate_tags("t")
            assert await cache.get_many(list(items)) == {}

            async def load() -> int:
                return 3

            assert await cache.get_or_set("c", load) == 3
            await cache.clear()
            assert await cache.get("c", MISSING) is MISSING
        await aclient.aclose()

    asyncio.run(run())
