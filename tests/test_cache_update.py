"""``add``, ``incr`` / ``decr``, ``touch``, ``ttl_of`` and ``delete_many`` on ``Cache`` and
``AsyncCache``, against a real redis-server: Django's semantics, and the freshness guarantee of
``set`` / ``delete`` (C1: a read-through fill that read the key before never lands)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, ConfigError, CounterMetrics
from distcache._core import CacheCore
from distkit.testing import RedisServer

from ._twins import Twin
from .test_cache_freshness import then
from .test_cache_stale_fill import fill_during, loader_of

MISSING = object()
NS = "upd"
BASE = "distkit:cache:{upd}"


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Twin]:
    redis_server.client().flushall()
    t = Twin(request.param, Cache, AsyncCache, redis_server.client, redis_server.async_client)
    yield t
    t.close()


# -- C1: what an update leaves refuses the fills that read before it ---------------------------
def _evict(r: redis.Redis, key: str) -> Callable[[], Any]:
    return lambda: r.delete(BASE + ":k:" + key)


# Each runs while a fill of "k" (whose read found the key empty) is loading; "then evicted":
# the update's entry or tombstone is gone again by the fill's write (expiry, eviction), so only
# the write mark can refuse the fill.
DURING_FILL: dict[str, Callable[[Twin, Any, redis.Redis], tuple[Any, ...]]] = {
    "add": lambda twin, c, r: (c.add("k", "new"),),
    "add then evicted": lambda twin, c, r: (c.add("k", "new"), _evict(r, "k")),
    "delete_many": lambda twin, c, r: (c.delete_many(["k", "other"]),),
    "delete_many then evicted": lambda twin, c, r: (c.delete_many(["k"]), _evict(r, "k")),
}


@pytest.mark.parametrize("how", sorted(DURING_FILL))
def test_a_fill_that_read_before_an_update_never_lands(
    twin: Twin, r: redis.Redis, how: str
) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    cache.set("warm", 0)  # the epoch exists: only the key's entry and mark decide

    def action(c: Any) -> Any:
        return then(
            twin, c, *(s if callable(s) else (lambda s=s: s) for s in DURING_FILL[how](twin, c, r))
        )

    assert fill_during(twin, cache, "k", "old", action) == "old"
    got = cache.get("k", MISSING)
    assert got != "old"  # the fill's value predates the update: never visible
    assert got == ("new" if how == "add" else MISSING)
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 1
    assert cache.get_or_set("k", loader_of(twin, "newer")) == ("new" if how == "add" else "newer")


# -- add -----------------------------------------------------------------------------------------
def test_add_stores_only_when_nothing_live_is_there(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    assert cache.add("a", 1) is True
    assert cache.add("a", 2) is False
    assert cache.get("a") == 1
    cache.set("t", 1, tags=["x"])
    cache.invalidate_tags("x")
    assert cache.add("t", 2) is True  # an invalidated entry is not there
    cache.delete("d")
    assert cache.add("d", 3) is True  # nor is a tombstone
    cache.set("e", 1, ttl=0.05)
    time.sleep(0.1)
    assert cache.add("e", 4) is True  # nor an expired one
    cache.set("n", None)
    assert cache.add("n", 5) is False  # None is a value
    assert [cache.get(k) for k in "tden"] == [2, 3, 4, None]


def test_add_with_tags_and_ttl(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    assert cache.add("a", 1, ttl=30, tags=["g"])
    assert 29 < (cache.ttl_of("a") or 0) <= 30
    cache.invalidate_tags("g")
    assert cache.get("a", MISSING) is MISSING


def test_concurrent_adds_store_one_value(twin: Twin, redis_server: RedisServer) -> None:
    if twin.kind == "sync":
        caches = [Cache(redis_server.client(), namespace=NS) for _ in range(8)]
        wins: list[bool] = [False] * 8
        barrier = threading.Barrier(8)

        def run(c: Cache, i: int) -> None:
            barrier.wait()
            wins[i] = c.add("k", i)

        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate(caches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    else:
        handle = twin.make(namespace=NS).handle
        assert twin.loop is not None

        async def race() -> list[bool]:
            return list(await asyncio.gather(*(handle.add("k", i) for i in range(8))))

        wins = twin.loop.run_until_complete(race())
    assert sorted(wins) == [False] * 7 + [True]
    assert twin.make(namespace=NS).get("k") == wins.index(True)


# -- incr / decr ---------------------------------------------------------------------------------
def test_incr_decr(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    cache.set("n", 41)
    assert cache.incr("n") == 42
    assert cache.incr("n", 10) == 52
    assert cache.decr("n", 12) == 40
    assert cache.get("n") == 40
    with pytest.raises(KeyError):
        cache.incr("missing")
    cache.set("s", "text")
    with pytest.raises(TypeError):
        cache.incr("s")
    cache.set("none", None)
    with pytest.raises(TypeError):
        cache.decr("none")
    for bad in (True, 1.5, "1"):
        with pytest.raises(ConfigError):
            cache.incr("n", bad)
    assert cache.get("n") == 40


def test_incr_keeps_expiry_and_tags(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    cache.set("n", 1, ttl=20, tags=["g"])
    assert cache.incr("n") == 2
    assert 19 < (cache.ttl_of("n") or 0) <= 20
    cache.invalidate_tags("g")
    assert cache.get("n", MISSING) is MISSING
    with pytest.raises(KeyError):
        cache.incr("n")


def test_concurrent_increments_are_never_lost(twin: Twin, redis_server: RedisServer) -> None:
    twin.make(namespace=NS).set("n", 0)
    if twin.kind == "sync":
        caches = [Cache(redis_server.client(), namespace=NS) for _ in range(4)]

        errors: list[BaseException] = []

        def run(c: Cache) -> None:
            try:
                for _ in range(25):
                    c.incr("n")
            except BaseException as exc:  # a thread's error must fail the test, not vanish
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in caches]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
    else:
        assert twin.loop is not None
        handles = [AsyncCache(twin.new_client(), namespace=NS) for _ in range(4)]

        async def run(c: AsyncCache) -> None:
            for _ in range(25):
                await c.incr("n")

        async def all_of() -> None:
            await asyncio.gather(*(run(c) for c in handles))

        twin.loop.run_until_complete(all_of())
    assert twin.make(namespace=NS).get("n") == 100


@pytest.mark.parametrize("key", ["short", "x" * 201, "é" * 150])
def test_incr_errors_name_the_callers_key(twin: Twin, key: str) -> None:
    """A long key is stored under its hash: incr's KeyError still names the caller's key."""
    cache = twin.make(namespace=NS)
    with pytest.raises(KeyError) as missing:
        cache.incr(key)
    assert missing.value.args == (key,)
    with pytest.raises(KeyError) as missing:
        cache.decr(key)
    assert missing.value.args == (key,)


@pytest.mark.parametrize("tag", ["ascii", "café", "用户:7", "🙂"])
def test_non_ascii_tags_work_as_ascii_ones(twin: Twin, tag: str) -> None:
    """A non-ASCII tag is recorded as UTF-8: after an unrelated invalidation its entry is still
    a hit, incr / touch / ttl_of update it, and invalidating the tag still drops it."""
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    cache.set("a", 1, tags=[tag])
    cache.set("n", 5, ttl=50, tags=[tag])
    cache.invalidate_tags("unrelated")  # the epoch moves: every read revalidates
    assert cache.get("a", MISSING) == 1
    assert cache.incr("n") == 6
    assert cache.decr("n", 2) == 4
    assert cache.touch("n", 100) is True
    assert 99 < (cache.ttl_of("n") or 0) <= 100
    assert cache.get_or_set("a", loader_of(twin, "RELOADED"), tags=[tag]) == 1
    assert metrics.count(CacheEvent.DECODE_ERROR) == 0
    cache.invalidate_tags(tag)
    assert cache.get("a", MISSING) is MISSING
    assert cache.get("n", MISSING) is MISSING


def test_a_tag_of_invalid_utf8_is_a_decode_error(twin: Twin, r: redis.Redis) -> None:
    """Planted metadata whose tag bytes are not UTF-8: a miss and a decode error, never raw."""
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    cache.set("k", 5, tags=["café"])
    rkey = BASE + ":k:k"
    raw = r.get(rkey)
    assert isinstance(raw, bytes) and "café".encode() in raw
    r.set(rkey, raw.replace("café".encode(), b"caf\xff\xfe"), keepttl=True)
    cache.invalidate_tags("unrelated")
    assert cache.get("k", MISSING) is MISSING
    with pytest.raises(KeyError):
        cache.incr("k")
    assert metrics.count(CacheEvent.DECODE_ERROR) >= 1


# -- touch / ttl_of ------------------------------------------------------------------------------
def test_touch_and_ttl_of(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    cache.set("k", "v", ttl=0.3)
    assert cache.touch("k", 5) is True
    time.sleep(0.4)
    assert cache.get("k") == "v"
    assert 4 < (cache.ttl_of("k") or 0) <= 5
    assert cache.touch("k", 0.05) is True
    time.sleep(0.1)
    assert cache.get("k", MISSING) is MISSING
    assert cache.touch("k", 5) is False
    assert cache.ttl_of("k") is None
    assert cache.touch("missing") is False


def test_touch_keeps_tags(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    cache.set("k", "v", tags=["g"])
    assert cache.touch("k", 60)
    cache.invalidate_tags("g")
    assert cache.get("k", MISSING) is MISSING


# -- delete_many ---------------------------------------------------------------------------------
def test_delete_many(twin: Twin) -> None:
    cache = twin.make(namespace=NS)
    cache.set_many({"a": 1, "b": 2, "c": 3})
    assert cache.delete_many(["a", "b", "x", "a"]) == 2
    assert cache.get_many(["a", "b", "c"]) == {"c": 3}
    assert cache.delete_many([]) == 0


def test_delete_many_on_many_shards(redis_server: RedisServer) -> None:
    cache = Cache(redis_server.client(), namespace=NS, shards=4)
    keys = [f"k{i}" for i in range(20)]
    cache.set_many(dict.fromkeys(keys, 1))
    assert cache.delete_many(keys[:15]) == 15
    assert cache.get_many(keys) == dict.fromkeys(keys[15:], 1)


# -- the whole class: every update, from every miss state, its entry kept or lost --------------
INITIAL = {
    "absent": lambda c, r: None,
    "tombstone": lambda c, r: c.delete("k"),
    "invalidated": lambda c, r: (c.set("k", 0, tags=["g"]), c.invalidate_tags("g")),
    "expired": lambda c, r: (c.set("k", 0, ttl=0.01), time.sleep(0.05)),
}
UPDATES = {
    "add": lambda c: c.add("k", 1),
    "add+incr": lambda c: (c.add("k", 1), c.incr("k")),
    "add+touch": lambda c: (c.add("k", 1), c.touch("k", 30)),
    "delete_many": lambda c: c.delete_many(["k"]),
}


@pytest.mark.parametrize("evict", [False, True], ids=["kept", "evicted"])
@pytest.mark.parametrize("update", sorted(UPDATES))
@pytest.mark.parametrize("initial", sorted(INITIAL))
def test_no_update_lets_an_older_fill_land(
    redis_server: RedisServer, r: redis.Redis, initial: str, update: str, evict: bool
) -> None:
    """A fill's read, then any update of its key (and maybe the loss of what it wrote), then
    the fill's write: refused, whatever the update and the state the read found."""
    cache = Cache(redis_server.client(), namespace=NS)
    cache.set("warm", 0)
    INITIAL[initial](cache, r)
    core = cache._core
    rkey = core.entry_key("k")
    miss = cache._driver.run(core.read_entry(rkey, None))
    assert miss.__class__.__name__ == "Miss"
    UPDATES[update](cache)
    if evict:
        r.delete(rkey)
    fill = core.fill(
        rkey,
        miss,
        "old",
        ttl=30,
        negative_ttl=None,
        tags=core.tag_args([]),
        type_=None,
        started=core.clock(),
        compute=0.0,
    )
    assert fill is not None
    assert cache._driver.run(fill) is False
    assert cache.get("k", MISSING) != "old"


# -- an invalidation between an update's read and its write ---------------------------------------
@pytest.mark.parametrize("op", ["touch", "incr", "decr"])
@pytest.mark.parametrize("how", ["invalidate_tags", "clear"])
def test_an_update_never_brings_back_an_entry_invalidated_after_its_read(
    twin: Twin, r: redis.Redis, monkeypatch: pytest.MonkeyPatch, op: str, how: str
) -> None:
    cache = twin.make(namespace=NS)
    other = Cache(r, namespace=NS)
    cache.set("k", 5, tags=["t"])
    original = CacheCore.read_entry
    pending = [lambda: other.invalidate_tags("t") if how == "invalidate_tags" else other.clear()]

    def read_then_invalidate(self: CacheCore, rkey: str, type_: Any, quiet: bool = False) -> Any:
        found = yield from original(self, rkey, type_, quiet)
        if pending:
            pending.pop()()  # another process invalidates after the update read the entry
        return found

    monkeypatch.setattr(CacheCore, "read_entry", read_then_invalidate)
    try:
        got = getattr(cache, op)("k")
    except KeyError:
        got = KeyError
    assert got in (False, KeyError)  # the retry read the key gone
    assert cache.get("k", MISSING) is MISSING
    assert other.get("k", MISSING) is MISSING


@pytest.mark.parametrize("op", ["touch", "incr", "decr", "add", "ttl_of"])
@pytest.mark.parametrize("fields", ["3 fields", "signed numbers"])
def test_updates_on_malformed_metadata_are_a_decode_error_and_a_miss(
    twin: Twin, r: redis.Redis, op: str, fields: str
) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    cache.set("warm", 0)  # the epoch exists
    epoch = r.get(BASE + ":epoch")
    assert epoch is not None
    now = int(time.time() * 1000)
    meta = f"{now}|0|600000" if fields == "3 fields" else f"+{now}|0|600000|+1|"
    # the header matches the current epoch, the metadata is not distcache's format
    r.set(BASE + ":k:k", b"dc1:" + epoch + b"jv" + b"%04x" % len(meta) + meta.encode() + b"5")
    try:
        got = cache.add("k", 7) if op == "add" else getattr(cache, op)("k")
    except KeyError:
        got = KeyError
    if op in ("touch", "incr", "decr"):  # a miss, counted as undecodable
        assert got == (False if op == "touch" else KeyError)
        assert metrics.count(CacheEvent.DECODE_ERROR) >= 1
    # add and ttl_of answer as get() does (the read path accepts these metadata): no error
