"""Caches on a real 3-master Redis Cluster (issue 6 point 3, S1): every key of one namespace hashes
to one slot, so each script and each MGET runs on one node (no CROSSSLOT), and namespaces spread
over the masters."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from distcache import AsyncCache, Cache, cached
from distkit import aconnect, connect
from distkit.testing import RedisCluster

MISSING = object()
NAMESPACES = [f"ns{i}" for i in range(9)]


@pytest.fixture
def client(cluster: RedisCluster) -> Iterator[Any]:
    c = connect(cluster.config())
    c.flushall()
    yield c
    c.close()


def test_every_operation_on_a_cluster(cluster: RedisCluster, client: Any) -> None:
    for ns in NAMESPACES:
        cache = Cache(client, namespace=ns)
        items = {f"k{i}": {"ns": ns, "i": i} for i in range(20)}
        assert cache.set_many(items, tags=["all"])
        assert cache.set("one", 1, tags=["a", "b"])
        assert cache.get_many([*items, "one", "missing"]) == {**items, "one": 1}
        assert cache.get("k3") == items["k3"]
        assert cache.get_or_set("loaded", lambda: "x", tags=["b"]) == "x"
        cache.invalidate_tags("b", "zzz")
        assert cache.get("one", MISSING) is MISSING
        assert cache.get("loaded", MISSING) is MISSING
        assert cache.get("k0") == items["k0"]  # revalidated (REVALIDATE on the same slot)
        assert cache.delete("k1") is True
        cache.clear()
        assert cache.get_many(list(items)) == {}
        assert cache.get_or_set("k0", lambda: "again") == "again"
    # every key of a namespace is on its namespace's slot; the namespaces use several masters
    for ns in NAMESPACES:
        node = cluster.node_for_key(f"distkit:cache:{{{ns}}}:epoch").client()
        keys = node.keys(f"distkit:cache:?{ns}?:*")
        assert len(keys) > 5
        assert all(isinstance(k, bytes) for k in keys)
        assert {key_slot(k) for k in keys if isinstance(k, bytes)} == {
            key_slot(b"{%s}" % ns.encode())
        }
        node.close()
    assert len({cluster.node_for_key(f"{{{ns}}}").port for ns in NAMESPACES}) == 3


def test_stale_fill_is_refused_on_a_cluster(client: Any) -> None:
    cache = Cache(client, namespace="sf")
    cache.set("warm", 0, tags=["t"])
    started, release = threading.Event(), threading.Event()

    def load() -> str:
        started.set()
        release.wait(10)
        return "stale"

    thread = threading.Thread(target=lambda: cache.get_or_set("k", load, tags=["t"]))
    thread.start()
    assert started.wait(10)
    cache.invalidate_tags("t")
    release.set()
    thread.join(10)
    assert cache.get("k", MISSING) is MISSING


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
            assert await cache.set_many({"a": 1, "b": 2}, tags=["t"])
            assert await cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
            await cache.invalidate_tags("t")
            assert await cache.get_many(["a", "b"]) == {}

            async def load() -> int:
                return 3

            assert await cache.get_or_set("c", load) == 3
            await cache.clear()
            assert await cache.get("c", MISSING) is MISSING
        await aclient.aclose()

    asyncio.run(run())
