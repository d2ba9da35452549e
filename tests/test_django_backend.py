"""``distcache.contrib.django.DistCache`` beyond Django's own suite: native async methods, tags,
fenced locks, stampede control and stale-fill refusal through ``get_or_set``, the settings
mapping; against a real redis-server (``test_django_conformance.py`` runs Django's suite)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any
from unittest import mock

import pytest

from distkit import ConfigError, RedisConfig
from distkit.testing import RedisServer

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

if not settings.configured:
    settings.configure(SECRET_KEY="distkit tests: not a secret", USE_TZ=True, CACHES={})
    django.setup()

from distcache import AsyncCache, Cache, NearCache  # noqa: E402
from distcache.contrib.django import DistCache, _redis_config  # noqa: E402
from distlock import AsyncLock, Lock  # noqa: E402

_count = iter(range(1_000_000))


@pytest.fixture
def make(redis_server: RedisServer) -> Any:
    """A factory of backends on the shared server, each on a namespace of its own."""
    redis_server.client().flushall()
    namespace = f"dj{next(_count)}"

    def build(**options: Any) -> DistCache:
        timeout = options.pop("TIMEOUT", 300)
        params = {"TIMEOUT": timeout, "OPTIONS": {"namespace": namespace, **options}}
        return DistCache(redis_server.url, params)

    return build


def test_the_api_on_the_distcache_cache(make: Any) -> None:
    cache = make()
    assert isinstance(cache.cache, Cache)
    cache.set("k", {"a": (1, 2)})
    assert cache.get("k") == {"a": (1, 2)}  # pickled: a tuple stays a tuple
    assert cache.cache.get(cache.make_key("k")) == {"a": (1, 2)}
    cache.set("forever", 1, None)
    assert cache.ttl("forever") is None
    assert 299 < (cache.ttl("k") or 0) <= 300
    assert cache.ttl("missing") == 0
    cache.set("gone", 1, 0)
    assert cache.has_key("gone") is False
    assert cache.add("gone", 1, 0) is True  # as Django's RedisCache: added and gone at once
    assert cache.has_key("gone") is False


@pytest.mark.parametrize("timeout", [float("nan"), "abc", object(), [1], "nan"])
def test_an_invalid_timeout_is_a_config_error_and_changes_nothing(make: Any, timeout: Any) -> None:
    """Not a number of seconds (NaN included): a ``ConfigError`` (a ``ValueError``, as Django's
    RedisCache raises from ``int(timeout)``) before any I/O; the stored value stays."""
    cache = make()
    cache.set("k", "precious", timeout=300)
    calls: list[Any] = [
        lambda: cache.set("k", "new", timeout=timeout),
        lambda: cache.add("other", "new", timeout=timeout),
        lambda: cache.touch("k", timeout=timeout),
        lambda: cache.set_many({"k": "new"}, timeout=timeout),
        lambda: cache.get_or_set("other", "new", timeout=timeout),
        lambda: cache.get_backend_timeout(timeout),
        lambda: asyncio.run(cache.aset("k", "new", timeout=timeout)),
        lambda: asyncio.run(cache.atouch("k", timeout=timeout)),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="timeout"):
            call()
    assert cache.get("k") == "precious"
    assert 299 < (cache.ttl("k") or 0) <= 300
    assert cache.get("other", "absent") == "absent"


def test_a_backend_is_shared_per_process_and_settings(make: Any) -> None:
    a, b = make(), make()
    assert a.cache is b.cache  # Django builds one backend per thread: one pool, one L1
    assert make(stale_if_error=5).cache is not a.cache


def test_async_methods_are_served_by_asynccache_not_threads(make: Any) -> None:
    cache = make()

    async def main() -> list[Any]:
        assert isinstance(cache.acache(), AsyncCache)
        out: list[Any] = []
        await cache.aset("a", 1)
        out.append(await cache.aget("a"))
        out.append(await cache.aadd("a", 2))
        out.append(await cache.aadd("b", 2, tags=["t"]))
        out.append(await cache.aset_many({"c": 3, "d": 4}))
        out.append(await cache.aget_many(["a", "b", "c", "x"]))
        out.append(await cache.aincr("a", 5))
        out.append(await cache.adecr("a"))
        out.append(await cache.atouch("a", 60))
        out.append(await cache.ahas_key("c"))
        out.append(await cache.adelete("c"))
        await cache.adelete_many(["d"])
        out.append(await cache.aget_or_set("e", lambda: 5))

        async def load() -> int:
            return 6

        out.append(await cache.aget_or_set("f", load))
        out.append(await cache.aincr_version("f"))
        out.append(await cache.aget("f", version=2))
        await cache.ainvalidate_tags("t")
        out.append(await cache.aget("b"))
        out.append(await cache.attl("a"))
        await cache.aclear()
        out.append(await cache.aget("a"))
        await cache.aclose()
        return out

    with mock.patch(
        "django.core.cache.backends.base.sync_to_async", side_effect=AssertionError("a thread")
    ):
        got = asyncio.run(main())
    want = [1, False, True, [], {"a": 1, "b": 2, "c": 3}, 6, 5, True, True, True, 5, 6, 2, 6]
    assert got[:15] == [*want, None]
    assert 59 < got[15] <= 60
    assert got[16] is None


def test_each_event_loop_gets_its_own_async_cache(make: Any) -> None:
    cache = make()

    async def which() -> AsyncCache:
        await cache.aset("k", 1)
        return cache.acache()

    first, second = asyncio.run(which()), asyncio.run(which())
    assert first is not second


def test_a_closed_event_loops_async_cache_is_dropped(make: Any) -> None:
    cache = make()
    cache.set("k", 1)
    for _ in range(50):  # asyncio.run / async_to_sync: one new loop per call
        assert asyncio.run(cache.aget("k")) == 1
    assert len(cache._shared.by_loop) <= 2


def test_tags_and_invalidate_tags(make: Any) -> None:
    cache = make()
    cache.set("user:1:profile", "p", tags=["user:1"])
    cache.set_many({"user:1:a": 1, "user:2:a": 2}, tags=["users"])
    assert cache.get_or_set("user:1:posts", list, tags=["user:1"]) == []
    cache.invalidate_tags("user:1")
    assert cache.get_many(["user:1:profile", "user:1:posts", "user:1:a"]) == {"user:1:a": 1}
    cache.invalidate_tags("users")
    assert cache.get("user:2:a") is None


def test_lock_is_a_fenced_distlock_on_the_same_connection(make: Any) -> None:
    cache = make()
    lock = cache.lock("invoice:7", ttl=5)
    assert isinstance(lock, Lock)
    with lock:
        token = lock.fencing_token
        assert token is not None and token > 0
        assert cache.lock("invoice:7", ttl=5).acquire(blocking=False) is False
    with cache.lock("invoice:7", ttl=5) as again:
        assert again.fencing_token is not None and again.fencing_token > token
    with mock.patch("distcache.contrib.django.Lock") as built:
        cache.lock("x", ttl=1)
    assert built.call_args.args[0] is cache.cache._client  # the cache's own connection pool

    async def main() -> int:
        alock = cache.alock("invoice:7", ttl=5)
        assert isinstance(alock, AsyncLock)
        async with alock:
            assert alock.fencing_token is not None
            return alock.fencing_token

    assert asyncio.run(main()) > token


def test_get_or_set_calls_one_loader_for_concurrent_misses(make: Any) -> None:
    calls: list[int] = []

    def load() -> str:
        calls.append(1)
        time.sleep(0.3)
        return "v"

    backends = [make() for _ in range(6)]  # one per thread, as Django builds them
    out: list[Any] = []
    threads = [
        threading.Thread(target=lambda b=b: out.append(b.get_or_set("k", load))) for b in backends
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert out == ["v"] * 6
    assert len(calls) == 1


def test_get_or_set_never_stores_a_value_older_than_a_set(make: Any) -> None:
    cache = make()
    started, release = threading.Event(), threading.Event()

    def load() -> str:
        started.set()
        assert release.wait(10)
        return "old row"

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(cache.get_or_set("k", load)))
    thread.start()
    assert started.wait(10)
    cache.set("k", "new row", 0.05)  # a write during the load, gone again before the fill
    time.sleep(0.1)
    release.set()
    thread.join(10)
    assert out == ["old row"]
    assert cache.get("k") is None  # the load read before the set: never stored


def test_options_map_to_the_cache(make: Any) -> None:
    cache = make(serializer="json", near_cache={"max_entries": 10}, stampede=False, shards=2)
    core = cache.cache
    assert core.near_cache == NearCache(max_entries=10)
    assert core.shards == 2
    cache.set("k", (1, 2))
    assert cache.get("k") == [1, 2]  # JSON: a tuple comes back a list
    cache.cache.close()
    with pytest.raises(ConfigError, match="MAX_ENTRIES"):
        make(MAX_ENTRIES=3).cache  # noqa: B018
    with pytest.raises(ConfigError, match="serializer"):
        make(serializer=42).cache  # noqa: B018


def test_pickled_entries_are_signed_with_the_secret_key(
    make: Any, redis_server: RedisServer
) -> None:
    cache = make()
    cache.set("k", "v")
    # an entry signed with another key is a miss (never unpickled)
    from distcache.contrib.django import _serializer

    with mock.patch.object(settings, "SECRET_KEY", "another secret key, not ours"):
        foreign = Cache(
            redis_server.client(), namespace=cache.cache.namespace, serializer=_serializer(None)
        )
    assert foreign.get(cache.make_key("k"), "miss") == "miss"
    with (
        mock.patch.object(
            settings, "SECRET_KEY_FALLBACKS", ["distkit tests: not a secret"], create=True
        ),
        mock.patch.object(settings, "SECRET_KEY", "rotated"),
    ):
        rotated = Cache(
            redis_server.client(), namespace=cache.cache.namespace, serializer=_serializer(None)
        )
    assert rotated.get(cache.make_key("k")) == "v"  # the old key, kept as a fallback, reads


def test_location_forms() -> None:
    assert (
        _redis_config(["10.0.0.1:7000", "redis://10.0.0.2:7001"], {}).cluster_nodes[1].port == 7001
    )
    assert _redis_config(["h:7000"], {}).mode == "cluster"
    assert _redis_config("redis://h:6380/2", {}).db == 2
    sentinel = _redis_config(
        None, {"mode": "sentinel", "sentinels": ["s1:26379"], "sentinel_service": "mymaster"}
    )
    assert isinstance(sentinel, RedisConfig) and sentinel.mode == "sentinel"


def test_a_location_list_is_a_redis_cluster(cluster: Any) -> None:
    nodes = [f"{host}:{port}" for host, port in cluster.startup_nodes]
    cache = DistCache(nodes, {"OPTIONS": {"namespace": f"djc{next(_count)}"}})
    assert cache.cache.shards == 16  # entries spread over the Cluster's slots
    keys = [f"k{i}" for i in range(20)]
    assert cache.set_many(dict.fromkeys(keys, 1)) == []
    assert cache.get_many(keys) == dict.fromkeys(keys, 1)
    assert cache.add("k0", 2) is False
    assert cache.incr("k1", 4) == 5
    cache.delete_many(keys[:10])
    assert cache.get_many(keys) == {**dict.fromkeys(keys[10:], 1)}
    cache.clear()
    assert cache.get_many(keys) == {}


def _outcome(backend: Any, op: str, args: tuple[Any, ...]) -> Any:
    try:
        return ("ok", getattr(backend, op)(*args))
    except Exception as exc:  # the comparison is of exception types, as Django's callers see
        return ("raised", type(exc).__name__)


# Each program runs on DistCache and on Django's LocMemCache (BaseCache semantics): the results
# of every step must match.
DJANGO_PROGRAMS: dict[str, list[tuple[str, tuple[Any, ...]]]] = {
    "incr-float-delta-on-an-int": [("set", ("n", 1)), ("incr", ("n", 1.5)), ("get", ("n",))],
    "incr-int-on-a-float": [("set", ("n", 2.5)), ("incr", ("n", 1)), ("get", ("n",))],
    "decr-float-delta": [("set", ("n", 1)), ("decr", ("n", 0.25)), ("get", ("n",))],
    "incr-float-then-int": [
        ("set", ("n", 10)),
        ("incr", ("n", 0.5)),
        ("incr", ("n", 2)),
        ("decr", ("n", 1)),
        ("get", ("n",)),
    ],
    "incr-missing": [("incr", ("nope", 1.5)), ("decr", ("nope", 1))],
    "incr-a-string": [("set", ("s", "a")), ("incr", ("s", 1)), ("incr", ("s", 1.5))],
    "add-timeout-0-absent": [
        ("add", ("a", 1, 0)),
        ("get", ("a",)),
        ("has_key", ("a",)),
        ("add", ("a", 2)),
        ("get", ("a",)),
    ],
    "add-timeout-0-present": [
        ("set", ("a", 1)),
        ("add", ("a", 2, 0)),
        ("get", ("a",)),
    ],
    "add-negative-timeout": [("add", ("a", 1, -5)), ("get", ("a",)), ("has_key", ("a",))],
    "add-timeout-0-then-incr": [("add", ("a", 1, 0)), ("incr", ("a", 1))],
}


@pytest.mark.parametrize("program", sorted(DJANGO_PROGRAMS))
def test_incr_decr_and_add_follow_djangos_cache_api(make: Any, program: str) -> None:
    """``incr`` / ``decr`` with a float delta or value, and ``add`` with a timeout of 0 or less,
    behave as Django's own backends (``BaseCache.incr``: ``value + delta``; ``timeout=0``:
    expired at once)."""
    from django.core.cache.backends.locmem import LocMemCache

    ours = make()
    reference = LocMemCache(f"reference-{program}", {"TIMEOUT": 300})
    for op, args in DJANGO_PROGRAMS[program]:
        want = _outcome(reference, op, args)
        got = _outcome(ours, op, args)
        assert got == want, f"{op}{args}: {got} (Django's LocMemCache: {want})"
        assert type(got[1]) is type(want[1]), f"{op}{args}: {got[1]!r} vs {want[1]!r}"


def test_a_float_incr_keeps_the_expiry(make: Any) -> None:
    cache = make()
    cache.set("n", 1, 100)
    assert cache.incr("n", 0.5) == 1.5
    assert 99 < (cache.ttl("n") or 0) <= 100  # as LocMemCache: the expiry stays


def test_async_incr_follows_djangos_cache_api_too(make: Any) -> None:
    cache = make()

    async def main() -> None:
        await cache.aset("n", 1)
        assert await cache.aincr("n", 1.5) == 2.5
        assert await cache.adecr("n", 1) == 1.5
        assert await cache.aget("n") == 1.5
        await cache.aset("s", "a")
        with pytest.raises(TypeError):
            await cache.aincr("s", 1)
        with pytest.raises(ValueError, match="not found"):
            await cache.aincr("missing", 0.5)
        assert await cache.aadd("z", 1, 0) is True
        assert await cache.aget("z") is None

    asyncio.run(main())
