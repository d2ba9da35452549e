"""No stale fill (C1; issue 6 point 4): a read-through whose loader started before an
invalidation of its key, tag or namespace never stores its result afterwards.

Each test blocks the loader on an event (``threading.Event`` for Cache, ``asyncio.Event`` for
AsyncCache), invalidates while it is blocked, then releases it: deterministic, no sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics
from distkit.testing import RedisServer

from ._twins import SyncView, Twin

MISSING = object()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Twin]:
    redis_server.client().flushall()
    t = Twin(request.param, Cache, AsyncCache, redis_server.client, redis_server.async_client)
    yield t
    t.close()


def fill_during(
    twin: Twin,
    cache: Any,
    key: str,
    value: Any,
    action: Callable[[Any], Any],
    **options: Any,
) -> Any:
    """``cache.get_or_set(key, loader)`` whose loader blocks until ``action(handle)`` has run.

    ``action`` receives the raw handle (Cache, or AsyncCache: then it returns an awaitable).
    Returns what get_or_set returned.
    """
    if twin.kind == "sync":
        started, release = threading.Event(), threading.Event()
        out: list[Any] = []

        def load() -> Any:
            started.set()
            assert release.wait(10)
            return value

        thread = threading.Thread(target=lambda: out.append(cache.get_or_set(key, load, **options)))
        thread.start()
        assert started.wait(10)
        action(cache)
        release.set()
        thread.join(10)
        return out[0]

    assert isinstance(cache, SyncView) and twin.loop is not None
    handle = cache.handle

    async def main() -> Any:
        astarted, arelease = asyncio.Event(), asyncio.Event()

        async def aload() -> Any:
            astarted.set()
            await arelease.wait()
            return value

        task = asyncio.ensure_future(handle.get_or_set(key, aload, **options))
        await asyncio.wait_for(astarted.wait(), 10)
        await action(handle)
        arelease.set()
        return await asyncio.wait_for(task, 10)

    return twin.loop.run_until_complete(main())


def loader_of(twin: Twin, value: Any) -> Callable[[], Any]:
    if twin.kind == "sync":
        return lambda: value

    async def load() -> Any:
        return value

    return load


def test_delete_during_fill(twin: Twin) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace="sf", metrics=metrics)
    got = fill_during(twin, cache, "user:1", "old row", lambda c: c.delete("user:1"))
    assert got == "old row"  # the caller still gets its (concurrent) result...
    assert cache.get("user:1", MISSING) is MISSING  # ...but it never becomes visible
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 1
    assert metrics.count(CacheEvent.FILL) == 0
    assert cache.get_or_set("user:1", loader_of(twin, "new row")) == "new row"  # next read loads
    assert cache.get("user:1") == "new row"


def test_tag_bump_during_fill(twin: Twin) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace="sf", metrics=metrics)
    got = fill_during(
        twin, cache, "k", "old", lambda c: c.invalidate_tags("users"), tags=["users", "x"]
    )
    assert got == "old"
    assert cache.get("k", MISSING) is MISSING
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 1
    assert cache.get_or_set("k", loader_of(twin, "new"), tags=["users"]) == "new"
    assert cache.get("k") == "new"


def test_clear_during_fill(twin: Twin) -> None:
    cache = twin.make(namespace="sf")
    assert fill_during(twin, cache, "k", "old", lambda c: c.clear(), tags=["t"]) == "old"
    assert cache.get("k", MISSING) is MISSING
    assert cache.get_or_set("k", loader_of(twin, "new")) == "new"
    assert cache.get("k") == "new"


def test_set_during_fill_wins(twin: Twin) -> None:
    cache = twin.make(namespace="sf")
    assert fill_during(twin, cache, "k", "loaded", lambda c: c.set("k", "written")) == "loaded"
    assert cache.get("k") == "written"  # the explicit, later write is kept


def test_invalidating_an_entry_that_existed_before_the_fill(twin: Twin) -> None:
    cache = twin.make(namespace="sf")
    cache.set("k", "v0", tags=["t"])
    cache.invalidate_tags("t")  # now an invalid entry sits in Redis
    assert fill_during(twin, cache, "k", "v1", lambda c: c.invalidate_tags("t"), tags=["t"]) == "v1"
    assert cache.get("k", MISSING) is MISSING


def test_an_unrelated_invalidation_does_not_refuse_the_fill(twin: Twin) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace="sf", metrics=metrics)
    other = twin.make(namespace="elsewhere")
    cache.set("warm", 0, tags=["t"])  # the namespace and tag "t" have generation records
    got = fill_during(twin, cache, "k", "v", lambda c: c.invalidate_tags("other"), tags=["t"])
    assert got == "v"
    assert cache.get("k") == "v"
    assert fill_during(twin, cache, "j", "w", lambda c: c.delete("not-j")) == "w"
    assert cache.get("j") == "w"
    other.clear()
    assert cache.get("j") == "w"
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 0
    assert metrics.count(CacheEvent.FILL) == 2


def test_a_record_missing_after_an_invalidation_refuses_the_fill(twin: Twin) -> None:
    """Conservative: a generation record that is absent once the epoch moved may have been
    bumped and then evicted, so the fill is refused. In a namespace or tag never written
    before, that costs one more miss later, never a stale hit."""
    cache = twin.make(namespace="cold")
    got = fill_during(twin, cache, "k", "v", lambda c: c.invalidate_tags("other"), tags=["new"])
    assert got == "v"
    assert cache.get("k", MISSING) is MISSING
    assert cache.get_or_set("k", loader_of(twin, "v2"), tags=["new"]) == "v2"  # records exist now
    assert cache.get("k") == "v2"


def test_a_fill_after_a_delete_is_stored(twin: Twin) -> None:
    cache = twin.make(namespace="sf")
    cache.set("k", 1)
    cache.delete("k")  # leaves a tombstone: a fill that read it is not refused
    assert fill_during(twin, cache, "k", 2, lambda c: c.get("unrelated")) == 2
    assert cache.get("k") == 2


def test_a_fill_is_refused_when_the_epoch_was_lost_during_it(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace="sf")
    cache.set("warm", 0)

    def lose_epoch(c: Any) -> Any:
        r.delete("distkit:cache:{sf}:epoch")  # what happened meanwhile is unknown
        return c.get("unrelated") if twin.kind == "sync" else asyncio.sleep(0)

    assert fill_during(twin, cache, "k", "v", lose_epoch) == "v"
    assert cache.get("k", MISSING) is MISSING


def test_a_fill_slower_than_fill_timeout_is_not_stored(twin: Twin) -> None:
    now = [100.0]
    metrics = CounterMetrics()
    cache = twin.make(namespace="sf", fill_timeout=5, clock=lambda: now[0], metrics=metrics)

    def slow() -> str:
        now[0] += 6  # the tombstone of a delete during this load could have expired
        return "late"

    if twin.kind == "sync":
        load: Callable[[], Any] = slow
    else:

        async def load() -> str:
            return slow()

    assert cache.get_or_set("k", load) == "late"
    assert cache.get("k", MISSING) is MISSING
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 1


def test_stale_fill_from_another_process_is_refused(redis_server: RedisServer) -> None:
    """Two independent clients (as two processes would be): the refusal lives in Redis."""
    redis_server.client().flushall()
    reader = Cache(redis_server.client(), namespace="proc")
    writer = Cache(redis_server.client(), namespace="proc")
    started, release = threading.Event(), threading.Event()

    def load() -> str:
        started.set()
        release.wait(10)
        return "stale"

    thread = threading.Thread(target=lambda: reader.get_or_set("k", load, tags=["t"]))
    thread.start()
    assert started.wait(10)
    writer.invalidate_tags("t")
    release.set()
    thread.join(10)
    assert writer.get("k", MISSING) is MISSING
    assert reader.get("k", MISSING) is MISSING


def _vanish(how: str, writer: Any, r: redis.Redis, rkey: str) -> None:
    """Write ``k`` with ``writer.set`` and make that entry disappear again, as ``how`` says."""
    if how == "expired":
        writer.set("k", "new", ttl=0.05)
        for _ in range(200):
            if not r.exists(rkey):
                break
            threading.Event().wait(0.01)
        assert not r.exists(rkey)
    elif how == "evicted":
        writer.set("k", "new")
        assert r.delete(rkey) == 1
    else:  # tagged, then tag-invalidated: the next read's revalidation deletes it
        writer.set("k", "new", tags=["t"])
        writer.invalidate_tags("t")


@pytest.mark.parametrize("how", ["expired", "evicted", "tag_invalidated"])
@pytest.mark.parametrize("writer_is", ["same_handle", "other_handle"])
def test_a_call_after_set_never_joins_an_older_flight(
    twin: Twin, r: redis.Redis, how: str, writer_is: str
) -> None:
    """Issue 14 item 1, in-process: a ``get_or_set`` that starts after ``set()`` returned must
    not get the result of a load in flight since before it, whatever became of the set() entry
    (the coalescing join compares the write mark too)."""
    cache = twin.make(namespace="join", ttl=60)
    writer = cache if writer_is == "same_handle" else twin.make(namespace="join", ttl=60)
    rkey = cache._core.entry_key("k")
    cache.get("warm")  # the namespace's epoch exists: the fast read path
    if twin.kind == "sync":
        started, release = threading.Event(), threading.Event()
        out: dict[str, Any] = {}

        def old() -> str:
            started.set()
            assert release.wait(10)
            return "old"

        leader = threading.Thread(target=lambda: out.update(a=cache.get_or_set("k", old)))
        leader.start()
        assert started.wait(10)
        _vanish(how, writer, r, rkey)
        late = threading.Thread(target=lambda: out.update(b=cache.get_or_set("k", lambda: "fresh")))
        late.start()
        late.join(2)  # a caller that joined the old flight would still be waiting here
        release.set()
        leader.join(10)
        late.join(10)
        assert out == {"a": "old", "b": "fresh"}
        return
    assert twin.loop is not None
    loop, handle = twin.loop, cache.handle
    astarted, arelease = asyncio.Event(), asyncio.Event()

    async def aold() -> str:
        astarted.set()
        await arelease.wait()
        return "old"

    async def afresh() -> str:
        return "fresh"

    first = loop.create_task(handle.get_or_set("k", aold))
    loop.run_until_complete(asyncio.wait_for(astarted.wait(), 10))
    _vanish(how, writer, r, rkey)
    second = loop.create_task(handle.get_or_set("k", afresh))
    loop.run_until_complete(asyncio.wait([second], timeout=2))
    arelease.set()
    loop.run_until_complete(asyncio.wait([first, second], timeout=10))
    assert (first.result(), second.result()) == ("old", "fresh")
