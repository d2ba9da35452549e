"""Freshness at the edges (issue 14 items 1-3 and the suspected fill items; C1, C8).

1. A fill whose read preceded a ``set`` never lands, whatever happens to the ``set`` entry
   afterwards (expiry, a revalidation deleting it, eviction): the write mark.
2. ``stale_if_error``'s in-process copy obeys this process's invalidations, never keeps a fill
   Redis refused, and keeps a ``None`` for ``negative_ttl``.
3. Losing the epoch at any moment of a fill costs misses only, also when the read found none.
Suspected: a write delayed past the tombstone; a failure note outliving a later load.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from pydantic import BaseModel, field_validator

from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics, Stampede
from distkit import ConnectionUnavailable, connect
from distkit.testing import FaultProxy, RedisServer

from ._twins import Twin
from .test_cache_stale_fill import fill_during, loader_of

MISSING = object()
NS = "fresh"
BASE = "distkit:cache:{fresh}"


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Twin]:
    redis_server.client().flushall()
    t = Twin(request.param, Cache, AsyncCache, redis_server.client, redis_server.async_client)
    yield t
    t.close()


def then(twin: Twin, c: Any, *steps: Callable[[], Any]) -> Any:
    """Run ``steps`` (plain callables on Redis or the handle) inside a ``fill_during`` action;
    for AsyncCache the action must return an awaitable."""
    if twin.kind == "sync":
        for step in steps:
            step()
        return None

    async def run() -> None:
        for step in steps:
            out = step()
            if asyncio.iscoroutine(out):
                await out

    return run()


def sleep(twin: Twin, seconds: float) -> Callable[[], Any]:
    if twin.kind == "sync":
        return lambda: time.sleep(seconds)
    return lambda: asyncio.sleep(seconds)


# -- item 1: a set() during a fill, whose entry is gone again by the fill's write ------------------
SET_THEN_GONE = {
    "expired": lambda twin, c, r: (c.set("k", "new", ttl=0.05), sleep(twin, 0.15)),
    "revalidated away": lambda twin, c, r: (
        c.set("k", "new", tags=["t"]),
        c.invalidate_tags("t"),
        c.get("k"),  # the reader's revalidation deletes the invalid entry
    ),
    "evicted": lambda twin, c, r: (c.set("k", "new"), (lambda: r.delete(BASE + ":k:k"))),
}


@pytest.mark.parametrize("how", sorted(SET_THEN_GONE))
def test_a_fill_that_read_before_a_set_never_lands(twin: Twin, r: redis.Redis, how: str) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    cache.set("warm", 0, tags=["t"])  # the epoch and records exist: only the key decides

    def action(c: Any) -> Any:
        steps = SET_THEN_GONE[how](twin, c, r)
        return then(twin, c, *(s if callable(s) else (lambda s=s: s) for s in steps))

    # the steps are built eagerly for the async twin (coroutines awaited in order)
    # the fill is untagged: only the key (not a tag record) can tell it the set happened
    assert fill_during(twin, cache, "k", "old", action) == "old"
    assert cache.get("k", MISSING) is MISSING  # "old" predates the set: never visible
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 1
    assert cache.get_or_set("k", loader_of(twin, "newer")) == "newer"
    assert cache.get("k") == "newer"  # the next fill, which read after the set, is stored


def test_a_fill_that_read_after_the_set_is_stored(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace=NS)
    cache.set("k", "v0", ttl=0.05)
    time.sleep(0.1)  # the set's entry expired; its write mark is still there
    assert fill_during(twin, cache, "k", "v1", lambda c: then(twin, c)) == "v1"
    assert cache.get("k") == "v1"


def test_a_lost_write_mark_costs_a_miss_only(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace=NS)
    cache.set("k", "v0", ttl=0.05)
    time.sleep(0.1)  # the read sees the key empty and the set's mark

    def lose(c: Any) -> Any:
        return then(twin, c, lambda: r.delete(BASE + ":mk:k"))

    assert fill_during(twin, cache, "k", "v1", lose) == "v1"
    assert cache.get("k", MISSING) is MISSING  # unknown what happened: refused
    assert cache.get_or_set("k", loader_of(twin, "v2")) == "v2"
    assert cache.get("k") == "v2"


def test_set_many_marks_every_key(twin: Twin, r: redis.Redis) -> None:
    cache = twin.make(namespace=NS)
    cache.set("warm", 0)

    def action(c: Any) -> Any:
        return then(twin, c, lambda: c.set_many({"k": "new", "j": 1}, ttl=0.05), sleep(twin, 0.15))

    assert fill_during(twin, cache, "k", "old", action) == "old"
    assert cache.get("k", MISSING) is MISSING


# -- suspected: a write that arrives later than the tombstone lives --------------------------------
def test_a_delayed_write_after_the_tombstone_expired_is_refused(r: redis.Redis) -> None:
    """A fill that passed its fill_timeout check just in time, whose WRITE then arrives after
    the delete's tombstone (fill_timeout) expired: the write mark (2 x fill_timeout) refuses it."""
    r.flushall()
    cache = Cache(r, namespace=NS, fill_timeout=0.2)
    core = cache._core
    rkey = core.entry_key("k")
    cache.set("warm", 0)
    miss = cache._driver.run(core.read_entry(rkey, None))  # the fill's read: empty
    cache.delete("k")
    time.sleep(0.3)  # the tombstone is gone; the key reads empty again
    assert r.get(rkey) is None
    protocol = core.fill(
        rkey,
        miss,
        "old",
        ttl=10,
        negative_ttl=None,
        tags=((), []),
        type_=None,
        started=core.clock(),  # as if the client's check passed just before sending
        compute=0.0,
    )
    assert protocol is not None
    assert cache._driver.run(protocol) is False
    assert cache.get("k", MISSING) is MISSING


# -- item 3: the epoch lost during a fill ----------------------------------------------------------
LOSSES: dict[str, Callable[[redis.Redis], Any]] = {
    "epoch deleted": lambda r: r.delete(BASE + ":epoch"),
    "flushall": lambda r: r.flushall(),
    "epoch and records deleted": lambda r: r.delete(BASE + ":epoch", BASE + ":t:t", BASE + ":ns"),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_an_invalidation_then_epoch_loss_during_a_fill(
    twin: Twin, r: redis.Redis, loss: str, warm: bool
) -> None:
    """cold namespace -> fill reads (no epoch) -> invalidation creates the epoch -> the epoch is
    lost -> the fill's WRITE: refused (the old code stored the pre-invalidation value)."""
    cache = twin.make(namespace=NS)
    if warm:
        cache.set("warm", 0, tags=["t"])

    def action(c: Any) -> Any:
        return then(twin, c, lambda: c.invalidate_tags("t"), lambda: LOSSES[loss](r))

    assert fill_during(twin, cache, "k", "old", action, tags=["t"]) == "old"
    assert cache.get("k", MISSING) is MISSING
    assert cache.get_or_set("k", loader_of(twin, "new"), tags=["t"]) == "new"
    assert cache.get("k") == "new"  # one miss later, fills land again


def test_a_cold_namespace_caches_at_the_first_fill(twin: Twin, r: redis.Redis) -> None:
    metrics = CounterMetrics()
    cache = twin.make(namespace=NS, metrics=metrics)
    assert r.get(BASE + ":epoch") is None
    assert cache.get_or_set("k", loader_of(twin, 1)) == 1
    assert cache.get("k") == 1  # the look created the epoch before the load: stored
    assert metrics.count(CacheEvent.STALE_FILL_REJECTED) == 0


def test_a_fill_whose_read_saw_no_epoch_is_refused_if_none_at_write(r: redis.Redis) -> None:
    """The script's own rule (for any caller that skips the look): seen 0 and no epoch now."""
    r.flushall()
    cache = Cache(r, namespace=NS)
    core = cache._core
    rkey = core.entry_key("k")
    from distcache._core import Miss

    protocol = core.fill(
        rkey,
        Miss("", None, b""),
        "old",
        ttl=10,
        negative_ttl=None,
        tags=((), []),
        type_=None,
        started=core.clock(),
        compute=0.0,
    )
    assert protocol is not None
    assert cache._driver.run(protocol) is False
    assert r.get(BASE + ":epoch") is not None  # created: the next read can compare


# -- suspected: a failure note outliving a later, successful load --------------------------------
def test_a_refused_fill_clears_the_failure_note(r: redis.Redis) -> None:
    r.flushall()
    cache = Cache(r, namespace=NS, stampede=Stampede(wait=5))
    note_key = cache._policy.error_key(cache._core.entry_key("k"))
    # a failure noted before this caller asked: not its own, so it loads
    r.set(note_key, f"{int(time.time() * 1000) - 60_000}|RuntimeError: earlier", px=60_000)
    # this load succeeds but its fill is refused (a delete meanwhile)
    sync = Twin("sync", Cache, AsyncCache, lambda: r, lambda: None)
    assert fill_during(sync, cache, "k", "v", lambda c: c.delete("k")) == "v"
    assert r.get(note_key) is None  # a waiter now loads itself instead of raising LoaderError


# -- item 2: the stale_if_error copy obeys local invalidations -------------------------------------
@pytest.fixture
def down(redis_server: RedisServer) -> Iterator[tuple[FaultProxy, redis.Redis]]:
    redis_server.client().flushall()
    with FaultProxy(redis_server.address) as prx:
        client = connect({"port": prx.port, "socket_timeout": 0.5, "connect_timeout": 0.5})
        yield prx, client
        client.close()


def outage(prx: FaultProxy) -> None:
    prx.refuse(True)
    prx.cut()


INVALIDATIONS: dict[str, Callable[[Cache], Any]] = {
    "delete": lambda c: c.delete("k"),
    "set": lambda c: c.set("k", "written"),
    "tag": lambda c: c.invalidate_tags("t"),
    "clear": lambda c: c.clear(),
}


@pytest.mark.parametrize("read", ["loaded", "hit"])
@pytest.mark.parametrize("how", sorted(INVALIDATIONS))
def test_sie_copy_obeys_local_invalidations(
    down: tuple[FaultProxy, redis.Redis], how: str, read: str
) -> None:
    prx, client = down
    cache = Cache(client, namespace=NS, ttl=30, stale_if_error=60, breaker=False)
    if read == "hit":
        cache.set("k", "v1", tags=["t"])
        assert cache.get_or_set("k", lambda: "unused", tags=["t"]) == "v1"  # a hit, kept
    else:
        assert cache.get_or_set("k", lambda: "v1", tags=["t"]) == "v1"  # a load, kept
    INVALIDATIONS[how](cache)
    outage(prx)
    assert cache.get_or_set("k", lambda: "v2", tags=["t"]) == "v2"  # not v1: it was invalidated


def test_sie_copy_is_dropped_by_an_invalidation_that_failed(
    down: tuple[FaultProxy, redis.Redis],
) -> None:
    prx, client = down
    cache = Cache(client, namespace=NS, ttl=30, stale_if_error=60, breaker=False)
    assert cache.get_or_set("k", lambda: "v1") == "v1"
    outage(prx)
    with pytest.raises(ConnectionUnavailable):
        cache.delete("k")
    assert cache.get_or_set("k", lambda: "v2") == "v2"


def test_sie_never_keeps_a_refused_fill(down: tuple[FaultProxy, redis.Redis]) -> None:
    prx, client = down
    cache = Cache(client, namespace=NS, ttl=30, stale_if_error=60, breaker=False)
    started, release = threading.Event(), threading.Event()

    def load() -> str:
        started.set()
        assert release.wait(10)
        return "stale"

    thread = threading.Thread(target=lambda: cache.get_or_set("k", load))
    thread.start()
    assert started.wait(10)
    other = Cache(connect({"port": prx.target[1]}), namespace=NS)
    other.delete("k")  # another process: this process only learns it from the refusal
    release.set()
    thread.join(10)
    outage(prx)
    assert cache.get_or_set("k", lambda: "loaded") == "loaded"


def test_sie_keeps_none_for_negative_ttl(down: tuple[FaultProxy, redis.Redis]) -> None:
    prx, client = down
    now = [100.0]
    cache = Cache(
        client,
        namespace=NS,
        ttl=30,
        negative_ttl=1,
        stale_if_error=5,
        breaker=False,
        clock=lambda: now[0],
    )
    assert cache.get_or_set("k", lambda: None) is None
    outage(prx)
    assert cache.get_or_set("k", lambda: "x") is None  # within negative_ttl + the window
    now[0] += 7  # past negative_ttl (1 s) + stale_if_error (5 s); within ttl (30 s)
    assert cache.get_or_set("k", lambda: "x") == "x"


def test_sie_copy_is_dropped_by_a_set_while_the_circuit_is_open(
    redis_server: RedisServer,
) -> None:
    """Hostile review: with the breaker open, set() returned before dropping this process's
    stale_if_error copy, so the value it replaced kept being served."""
    import asyncio

    from distcache import AsyncCache, CircuitBreaker
    from distkit.testing import FaultProxy

    with FaultProxy(redis_server.address) as proxy:
        client = proxy.client(socket_timeout=0.2)
        cache = Cache(client, namespace="sie-open", ttl=60, stale_if_error=60,
                      breaker=CircuitBreaker(failure_threshold=1, reset_timeout=30))  # fmt: skip
        assert cache.get_or_set("k", lambda: "old") == "old"
        proxy.refuse(True)
        proxy.cut()
        cache.get("x")  # a failure: the circuit opens
        assert cache.set("k", "new") is False
        assert cache.get_or_set("k", lambda: "new") == "new"
        client.close()
        proxy.refuse(False)

        async def main() -> None:
            aclient = proxy.async_client(socket_timeout=0.2)
            breaker = CircuitBreaker(failure_threshold=1, reset_timeout=30)
            acache = AsyncCache(
                aclient, namespace="sie-open-a", ttl=60, stale_if_error=60, breaker=breaker
            )

            async def old() -> str:
                return "old"

            async def new() -> str:
                return "new"

            assert await acache.get_or_set("k", old) == "old"
            proxy.refuse(True)
            proxy.cut()
            await acache.get("x")
            assert await acache.set("k", "new") is False
            assert await acache.get_or_set("k", new) == "new"
            await aclient.aclose()

        asyncio.run(main())


@pytest.mark.parametrize("op", ["set", "delete"])
def test_a_writer_with_a_shorter_fill_timeout_still_refuses_older_fills(
    redis_server: RedisServer, op: str
) -> None:
    """Hostile review: a tombstone or write mark lived the *writer's* fill_timeout, so another
    service with a shorter one let a reader's (longer, still allowed) fill land after it."""
    client = connect(redis_server.config())
    reader = Cache(client, namespace=f"mixed-{op}", ttl=60)  # fill_timeout 60 s (default)
    writer = Cache(client, namespace=f"mixed-{op}", ttl=60, fill_timeout=0.5)
    reader.get("warm")
    writer.get("warm")
    done = threading.Event()

    def load() -> str:
        done.wait(5)
        time.sleep(1.2)  # past the writer's fill_timeout, well inside the reader's
        return "old"

    thread = threading.Thread(target=lambda: reader.get_or_set("k", load))
    thread.start()
    time.sleep(0.2)
    if op == "set":
        writer.set("k", "new", ttl=0.3)  # gone again before the fill lands
    else:
        writer.delete("k")
    done.set()
    thread.join(10)
    assert reader.get("k", "<miss>") == "<miss>"
    client.close()


class _Row(BaseModel):
    """A value whose decoding can be made slow (a hit that read before an invalidation)."""

    v: str

    @field_validator("v")
    @classmethod
    def _slow(cls, value: str) -> str:
        gate = _DECODE_GATE[0]
        if gate is not None:
            _DECODE_GATE[0] = None
            gate[0].set()
            assert gate[1].wait(10)
        return value


_DECODE_GATE: list[tuple[threading.Event, threading.Event] | None] = [None]
ROW_INVALIDATIONS = {**INVALIDATIONS, "set": lambda c: c.set("k", _Row(v="written"))}


@pytest.mark.parametrize("when", ["before", "during_fill", "during_hit"])
@pytest.mark.parametrize("who", ["same_handle", "other_handle"])
@pytest.mark.parametrize("how", sorted(INVALIDATIONS))
def test_sie_copy_obeys_every_invalidation_of_this_process(
    down: tuple[FaultProxy, redis.Redis], how: str, who: str, when: str
) -> None:
    """Issue 14 item 2 leftovers (hostile review): the copy must obey an invalidation made
    through any handle of the namespace in this process, also one made while the call that
    would keep the copy was in flight (its fill's write then failed: Redis went down; or its hit
    was still decoding)."""
    prx, client = down
    options: dict[str, Any] = {"ttl": 30, "stale_if_error": 60, "breaker": False}
    cache = Cache(client, namespace=NS, value_type=_Row, **options)
    other = (
        Cache(client, namespace=NS, value_type=_Row, **options) if who == "other_handle" else cache
    )
    cache.get("warm")
    tags = ["t"]
    if when == "before":
        assert cache.get_or_set("k", lambda: _Row(v="v1"), tags=tags).v == "v1"
        ROW_INVALIDATIONS[how](other)
        outage(prx)
    else:
        started, release = threading.Event(), threading.Event()
        if when == "during_hit":
            cache.set("k", _Row(v="v1"), tags=tags)
            _DECODE_GATE[0] = (started, release)
            loader: Callable[[], _Row] = lambda: _Row(v="unused")  # noqa: E731
        else:

            def loader() -> _Row:
                started.set()
                assert release.wait(10)
                return _Row(v="v1")

        out: list[_Row] = []
        thread = threading.Thread(
            target=lambda: out.append(cache.get_or_set("k", loader, tags=tags))
        )
        thread.start()
        assert started.wait(10)
        ROW_INVALIDATIONS[how](other)
        if when == "during_fill":
            outage(prx)  # the fill's write fails: the caller keeps a copy only if allowed
        release.set()
        thread.join(10)
        assert out[0].v == "v1"  # the call itself was concurrent with the invalidation
        outage(prx)
    assert cache.get_or_set("k", lambda: _Row(v="v2"), tags=tags).v == "v2"
