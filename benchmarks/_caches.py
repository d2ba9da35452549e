"""Cache contenders for the hit and batch scenarios: floors, distcache, peers, a dict ceiling.

Each factory seeds its own keys in its own format, then returns ``LockOps`` whose first
operation is one measured read (it returns whether it was a hit) and whose second is a no-op, so
the cycle runner of the lock scenarios measures reads without knowing about caches. Async
contenders run each read with ``run_until_complete`` on their own loop; the async floor pays the
same, so compare them to it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio

import distcache

from ._model import CLIENT_OPTIONS, LockContender, LockFactory, LockOps

__all__ = ["BATCH_CONTENDERS", "HIT_CONTENDERS", "KEYS", "BATCH", "value_for"]

KEYS = 1000
BATCH = 100


def value_for(i: int) -> dict[str, Any]:
    """A ~200-byte JSON document (the issue's hot-key value)."""
    return {"id": i, "name": f"user-{i:06d}", "email": f"user{i}@example.com",
            "tags": ["alpha", "beta", "gamma"], "bio": "x" * 90, "active": True}  # fmt: skip


def _noop() -> None:
    return None


def _cycle_reads(read: Callable[[int], object]) -> LockOps:
    keys = itertools.cycle(range(KEYS))

    def one() -> bool:
        return read(next(keys)) is not None

    return LockOps(one, _noop)


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _async_client(client: redis.Redis) -> redis.asyncio.Redis:
    kw = client.connection_pool.connection_kwargs
    return redis.asyncio.Redis(
        host=kw.get("host", "127.0.0.1"),
        port=kw.get("port", 6379),
        db=kw.get("db", 0),
        socket_timeout=CLIENT_OPTIONS["socket_timeout"],
        socket_connect_timeout=CLIENT_OPTIONS["socket_connect_timeout"],
    )


def _floor(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    client = clients[0]
    execute: Callable[..., Any] = client.execute_command
    keys = [f"{name}:{i}" for i in range(KEYS)]
    client.mset({k: json.dumps(value_for(i)) for i, k in enumerate(keys)})
    loads = json.loads
    return _cycle_reads(lambda i: loads(execute("GET", keys[i])))


def _on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[int], Awaitable[object]]) -> LockOps:
    run = loop.run_until_complete
    return _cycle_reads(lambda i: run(read(i)))


def _floor_async(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    clients[0].mset({f"{name}:{i}": json.dumps(value_for(i)) for i in range(KEYS)})
    loop = asyncio.new_event_loop()
    aclient = _async_client(clients[0])
    keys = [f"{name}:{i}" for i in range(KEYS)]

    execute: Callable[..., Awaitable[Any]] = aclient.execute_command

    async def read(i: int) -> object:
        return json.loads(await execute("GET", keys[i]))

    return _on_loop(loop, read)


def _distcache_get(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    cache = distcache.Cache(clients[0], namespace=name, ttl=300)
    cache.set_many({str(i): value_for(i) for i in range(KEYS)})
    keys = [str(i) for i in range(KEYS)]
    get = cache.get
    return _cycle_reads(lambda i: get(keys[i]))


def _distcache_decorator(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    cache = distcache.Cache(clients[0], namespace=name, ttl=300)

    @distcache.cached(cache)
    def load(i: int) -> dict[str, Any]:
        return value_for(i)

    for i in range(KEYS):
        load(i)
    return _cycle_reads(load)


def _distcache_async(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    loop = asyncio.new_event_loop()
    aclient = _async_client(clients[0])
    cache = distcache.AsyncCache(aclient, namespace=name, ttl=300)
    loop.run_until_complete(cache.set_many({str(i): value_for(i) for i in range(KEYS)}))
    keys = [str(i) for i in range(KEYS)]
    return _on_loop(loop, lambda i: cache.get(keys[i]))


def _near(clients: Sequence[redis.Redis], name: str) -> distcache.Cache:
    cache = distcache.Cache(clients[0], namespace=name, ttl=300,
                            near_cache=distcache.NearCache(max_entries=2 * KEYS))  # fmt: skip
    assert cache._near is not None
    assert cache._near.wait_live(10)
    cache.set_many({str(i): value_for(i) for i in range(KEYS)})
    return cache


def _warm(read: Callable[[int], object], near: Any) -> None:
    """Read every key until all are in L1 (the seeding writes' invalidations come back once)."""
    for _ in range(50):
        for i in range(KEYS):
            read(i)
        if near.stats()["entries"] >= KEYS:
            return
        time.sleep(0.01)


def _distcache_near(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    cache = _near(clients, name)
    keys = [str(i) for i in range(KEYS)]
    get = cache.get
    _warm(lambda i: get(keys[i]), cache._near)
    return _cycle_reads(lambda i: get(keys[i]))


def _distcache_near_decorator(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    cache = _near(clients, name)

    @distcache.cached(cache)
    def load(i: int) -> dict[str, Any]:
        return value_for(i)

    _warm(load, cache._near)
    return _cycle_reads(load)


def _distcache_near_async(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    loop = asyncio.new_event_loop()
    cache = distcache.AsyncCache(_async_client(clients[0]), namespace=name, ttl=300,
                                 near_cache=distcache.NearCache(max_entries=2 * KEYS))  # fmt: skip
    assert cache._near is not None
    assert cache._near.wait_live(10)
    loop.run_until_complete(cache.set_many({str(i): value_for(i) for i in range(KEYS)}))
    keys = [str(i) for i in range(KEYS)]
    _warm(lambda i: loop.run_until_complete(cache.get(keys[i])), cache._near)
    return _on_loop(loop, lambda i: cache.get(keys[i]))


def _dogpile(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    from dogpile.cache import make_region
    from dogpile.cache.api import NO_VALUE

    kw = clients[0].connection_pool.connection_kwargs
    region = make_region(key_mangler=lambda k: f"{name}:{k}").configure(
        "dogpile.cache.redis",
        expiration_time=300,
        arguments={
            "host": kw.get("host"),
            "port": kw.get("port"),
            "db": kw.get("db", 0),
            "redis_expiration_time": 600,
            "socket_timeout": 30,
        },
    )
    region.set_multi({str(i): value_for(i) for i in range(KEYS)})
    keys = [str(i) for i in range(KEYS)]
    get = region.get
    return _cycle_reads(lambda i: None if (v := get(keys[i])) is NO_VALUE else v)


def _cashews(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    from cashews import Cache as CashewsCache

    loop = asyncio.new_event_loop()
    cache = CashewsCache()
    cache.setup(_url(clients[0]), client_side=False, socket_timeout=30)

    async def seed() -> None:
        for i in range(KEYS):
            await cache.set(f"{name}:{i}", value_for(i), expire=300)

    loop.run_until_complete(seed())
    keys = [f"{name}:{i}" for i in range(KEYS)]
    return _on_loop(loop, lambda i: cache.get(keys[i]))


def _aiocache(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    from aiocache import RedisCache
    from aiocache.serializers import JsonSerializer

    kw = clients[0].connection_pool.connection_kwargs
    loop = asyncio.new_event_loop()

    async def build() -> Any:
        cache = RedisCache(serializer=JsonSerializer(), endpoint=kw.get("host"),
                           port=kw.get("port"), namespace=name)  # fmt: skip
        for i in range(KEYS):
            await cache.set(str(i), value_for(i), ttl=300)
        return cache

    cache = loop.run_until_complete(build())
    keys = [str(i) for i in range(KEYS)]
    return _on_loop(loop, lambda i: cache.get(keys[i]))


def _dict(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    data = {i: value_for(i) for i in range(KEYS)}
    return _cycle_reads(data.get)


def _batches(read: Callable[[list[Any]], Sequence[object]], keys: list[Any]) -> LockOps:
    starts = itertools.cycle(range(0, KEYS, BATCH))

    def one() -> bool:
        start = next(starts)
        values = read(keys[start : start + BATCH])
        return len(values) == BATCH and all(v is not None for v in values)

    return LockOps(one, _noop)


def _floor_mget(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    client = clients[0]
    keys = [f"{name}:{i}" for i in range(KEYS)]
    client.mset({k: json.dumps(value_for(i)) for i, k in enumerate(keys)})
    execute: Callable[..., Any] = client.execute_command
    return _batches(lambda ks: [json.loads(v) for v in execute("MGET", *ks)], keys)


def _gets(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    client = clients[0]
    keys = [f"{name}:{i}" for i in range(KEYS)]
    client.mset({k: json.dumps(value_for(i)) for i, k in enumerate(keys)})
    execute: Callable[..., Any] = client.execute_command
    return _batches(lambda ks: [json.loads(execute("GET", k)) for k in ks], keys)


def _distcache_get_many(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    cache = distcache.Cache(clients[0], namespace=name, ttl=300)
    cache.set_many({str(i): value_for(i) for i in range(KEYS)})
    keys = [str(i) for i in range(KEYS)]

    def read(ks: list[Any]) -> list[object]:
        found = cache.get_many(ks)
        return [found.get(k) for k in ks]

    return _batches(read, keys)


def _contender(key: str, label: str, role: Any, factory: LockFactory, note: str,
               requires: tuple[str, ...] = ()) -> LockContender:  # fmt: skip
    return LockContender(
        key=key, label=label, role=role, factory=factory, note=note, requires=requires
    )


HIT_CONTENDERS: tuple[LockContender, ...] = (
    _contender("floor", "floor: GET + json.loads", "floor", _floor,
               "raw redis-py: one GET, then json.loads"),
    _contender("floor-async", "floor async: GET + json.loads", "floor", _floor_async,
               "redis.asyncio GET + json.loads, one run_until_complete per read "
               "(compare async contenders to this row)"),
    _contender("distcache", "distcache Cache.get", "distkit", _distcache_get,
               "sync Cache.get: one MGET (entry + namespace epoch), envelope check, JSON"),
    _contender("distcache-decorator", "distcache @cached", "distkit", _distcache_decorator,
               "a @cached function hit (canonical key from the bound arguments)"),
    _contender("distcache-async", "distcache AsyncCache.get", "distkit", _distcache_async,
               "AsyncCache.get, one run_until_complete per read"),
    _contender("distcache-near", "distcache Cache.get, near cache", "distkit", _distcache_near,
               "Cache.get served from the in-process L1 (NearCache), no socket touched"),
    _contender("distcache-near-decorator", "distcache @cached, near cache", "distkit",
               _distcache_near_decorator,
               "a @cached hit from L1 (read-through flow: XFetch check, single-flight bypassed)"),
    _contender("distcache-near-async", "distcache AsyncCache.get, near cache", "distkit",
               _distcache_near_async,
               "AsyncCache.get from L1, one run_until_complete per read"),
    _contender("dogpile", "dogpile.cache redis", "peer", _dogpile,
               "dogpile.cache region on its redis backend (pickle)", ("dogpile.cache",)),
    _contender("cashews", "cashews", "peer", _cashews,
               "cashews Cache on redis, one run_until_complete per read", ("cashews",)),
    _contender("aiocache", "aiocache RedisCache", "peer", _aiocache,
               "aiocache RedisCache with JsonSerializer, one run_until_complete per read",
               ("aiocache",)),
    _contender("dict", "in-process dict (ceiling)", "ceiling", _dict,
               "dict.get: what no network cache can beat"),
)  # fmt: skip

BATCH_CONTENDERS: tuple[LockContender, ...] = (
    _contender("floor-mget", "floor: MGET + json.loads", "floor", _floor_mget,
               "raw redis-py: one MGET of 100 keys, json.loads each"),
    _contender("distcache-get-many", "distcache get_many", "distkit", _distcache_get_many,
               "Cache.get_many of 100 keys: one round trip"),
    _contender("gets", "100 x GET", "peer", _gets,
               "raw redis-py: 100 sequential GETs (what a loop of cache.get costs)"),
)  # fmt: skip
