"""Bad-input fuzzing (issue 9 point 4): hypothesis over lock names, cache keys, tags, TTLs,
timeouts and values, and random / corrupt / foreign bytes planted in Redis under distkit's own
keys. Every case ends in a typed distkit error (``ConfigError``, ``SerializationError``,
``ForeignDataError``, ``ServerError``...) or a documented safe behaviour (a cache miss, a lock
not acquired) - never a raw redis-py / pydantic / json exception, a crash, a hang (each operation
runs under a SIGALRM deadline) or code execution.

Example counts are modest (the module runs in well under a minute); scale them up with
``DISTKIT_ADVERSARIAL_SCALE=20`` (see ``tests/_adversarial.py`` and docs/testing.md).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import pickle
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from distcache import (
    AsyncCache,
    Cache,
    CacheEvent,
    CounterMetrics,
    JsonSerializer,
    NearCache,
    PickleSerializer,
    Stampede,
    cached,
)
from distkit import ConfigError, DistkitError, ForeignDataError, SerializationError
from distkit.testing import RedisServer
from distlock import (
    AsyncLock,
    FencedStore,
    Lock,
    LockNotOwned,
    Redlock,
    Semaphore,
    StaleFencingToken,
)
from tests._adversarial import fuzz_settings, no_hang

MISSING = object()
OP_LIMIT = 5.0  # seconds any single operation may take before it counts as a hang


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on the session's server (hypothesis reuses it across examples)."""
    c = redis_server.client()
    c.flushall()
    yield c
    c.close()


def outcome(fn: Callable[[], Any], what: str = "operation") -> tuple[bool, Any]:
    """Run ``fn``: ``(True, result)``, or ``(False, error)`` for a distkit error.

    Anything else (a raw third-party exception) propagates and fails the test; so does a hang.
    """
    with no_hang(OP_LIMIT, what):
        try:
            return True, fn()
        except DistkitError as exc:
            return False, exc


def distkit_keys(r: redis.Redis) -> list[str]:
    return sorted(k.decode("utf-8", "surrogateescape") for k in r.keys("*"))


# -- strategies ----------------------------------------------------------------------------------
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates included
NASTY_TEXT = st.sampled_from(
    ["", " ", "{", "}", "{x}", "a{b}c", "\x00", "\n", "\ud800", "*", "?", "[a]", ":", "::", "\\"]
)
LONG_TEXT = st.integers(1000, 1100).map(lambda n: "x" * n)
NAMES = st.one_of(
    ANY_TEXT,
    NASTY_TEXT,
    LONG_TEXT,
    st.binary(max_size=10),
    st.integers(),
    st.none(),
    st.floats(),
    st.lists(st.text(max_size=3), max_size=2),
)
DURATIONS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.001, max_value=100),
    st.integers(-(10**20), 10**20),
    st.timedeltas(min_value=timedelta(days=-2), max_value=timedelta(days=2)),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.sampled_from([0, -1, 1e-9, 1e9, 1e15, 2**63, float("inf"), float("nan")]),
)


# -- names, keys and tags -----------------------------------------------------------------------
@fuzz_settings(60)
@given(name=NAMES, prefix=st.one_of(st.just("distkit"), NAMES))
def test_lock_names_and_prefixes(client: redis.Redis, name: Any, prefix: Any) -> None:
    client.flushall()
    built, lock = outcome(lambda: Lock(client, name, ttl=5, prefix=prefix), "Lock()")
    if not built:
        assert isinstance(lock, ConfigError), lock
        return
    ok, got = outcome(lambda: lock.acquire(blocking=False), "acquire")
    assert ok and got is True, got
    token = lock.fencing_token
    assert isinstance(token, int) and token > 0
    outcome(lock.release, "release")
    # every key the lock wrote lives under its own hash-tagged family
    family = f"{prefix}:lock:{{{name}}}"
    assert all(k == family or k.startswith(family + ":") for k in distkit_keys(client))


@fuzz_settings(60)
@given(namespace=st.one_of(st.just("default"), NAMES), key=NAMES, tag=NAMES)
def test_cache_keys_tags_and_namespaces(
    client: redis.Redis, namespace: Any, key: Any, tag: Any
) -> None:
    client.flushall()
    built, cache = outcome(lambda: Cache(client, namespace=namespace, strict=True), "Cache()")
    if not built:
        assert isinstance(cache, ConfigError), cache
        return
    ok, stored = outcome(lambda: cache.set(key, "v", tags=[tag]), "set")
    if not ok:
        assert isinstance(stored, ConfigError), stored
        ok, stored = outcome(lambda: cache.set(key, "v"), "set without tag")
        if not ok:
            assert isinstance(stored, ConfigError), stored
            ok, got = outcome(lambda: cache.get(key), "get of an invalid key")
            assert not ok and isinstance(got, ConfigError)
            return
        tag = None
    assert stored is True
    assert outcome(lambda: cache.get(key, MISSING))[1] == "v"
    assert outcome(lambda: cache.get_many([key]))[1] == {key: "v"}
    if tag is not None:
        outcome(lambda: cache.invalidate_tags(tag), "invalidate_tags")
        assert outcome(lambda: cache.get(key, MISSING))[1] is MISSING
    family = f"distkit:cache:{{{namespace}}}:"
    assert all(k.startswith(family) for k in distkit_keys(client)), distkit_keys(client)


@fuzz_settings(40)
@given(
    a=st.tuples(st.sampled_from(["n1", "n:2", "n*"]), ANY_TEXT.filter(bool)),
    b=st.tuples(st.sampled_from(["n1", "n:2", "n*"]), ANY_TEXT.filter(bool)),
)
def test_distinct_cache_keys_never_share_an_entry(
    client: redis.Redis, a: tuple[str, str], b: tuple[str, str]
) -> None:
    """Injectivity under hostile keys: (namespace, key) pairs that differ never collide."""
    client.flushall()
    caches = {ns: Cache(client, namespace=ns) for ns in {a[0], b[0]}}
    ok_a, _ = outcome(lambda: caches[a[0]].set(a[1], "A"))
    ok_b, _ = outcome(lambda: caches[b[0]].set(b[1], "B"))
    if not (ok_a and ok_b):
        return  # an invalid key (ConfigError): nothing stored
    expect_a = "B" if a == b else "A"
    assert caches[a[0]].get(a[1]) == expect_a
    assert caches[b[0]].get(b[1]) == "B"


# -- durations ----------------------------------------------------------------------------------
@fuzz_settings(60)
@given(ttl=DURATIONS, retention=st.one_of(st.just(3600.0), DURATIONS))
def test_lock_ttls(client: redis.Redis, ttl: Any, retention: Any) -> None:
    client.flushall()
    built, lock = outcome(lambda: Lock(client, "ttl", ttl=ttl, fence_retention=retention))
    if not built:
        assert isinstance(lock, ConfigError), lock
        return
    ok, got = outcome(lambda: lock.acquire(blocking=False), "acquire")
    assert ok and got is True, f"a valid ttl={ttl!r} must work, got {got!r}"
    ok, _ = outcome(lock.extend, "extend")
    assert ok
    assert outcome(lock.release)[0]


@fuzz_settings(60)
@given(timeout=DURATIONS, blocking=st.one_of(st.booleans(), st.none(), st.integers(0, 2)))
def test_acquire_timeouts_on_a_free_lock(client: redis.Redis, timeout: Any, blocking: Any) -> None:
    client.flushall()
    lock = Lock(client, "timeouts", ttl=5)
    ok, got = outcome(lambda: lock.acquire(blocking=blocking, timeout=timeout), "acquire")
    if not ok:
        assert isinstance(got, ConfigError), got
        return
    assert got is True
    lock.release()


@fuzz_settings(30)
@given(timeout=st.one_of(st.floats(0, 0.2), st.just(0), st.timedeltas(max_value=timedelta(0))))
def test_acquire_timeouts_on_a_held_lock(client: redis.Redis, timeout: Any) -> None:
    client.flushall()
    holder = Lock(client, "held", ttl=5)
    assert holder.acquire(blocking=False)
    ok, got = outcome(lambda: Lock(client, "held", ttl=5).acquire(timeout=timeout), "acquire")
    assert (ok and got is False) or isinstance(got, ConfigError), got
    holder.release()


@fuzz_settings(10)
@given(timeout=st.one_of(st.floats(1, 1e12), st.sampled_from([None, -1, 1e300, 10**20])))
def test_long_timeouts_on_a_lock_that_is_released(client: redis.Redis, timeout: Any) -> None:
    """A waiter with any accepted timeout gets the lock once its holder's short lease ends."""
    client.flushall()
    holder = Lock(client, "long", ttl=0.2)
    assert holder.acquire(blocking=False)
    ok, got = outcome(lambda: Lock(client, "long", ttl=5).acquire(timeout=timeout), "acquire")
    assert (ok and got is True) or isinstance(got, ConfigError), got


@fuzz_settings(60)
@given(
    ttl=st.one_of(st.just(None), DURATIONS),
    negative_ttl=st.one_of(st.just(None), DURATIONS),
    fill_timeout=st.one_of(st.just(60.0), DURATIONS),
)
def test_cache_ttls(client: redis.Redis, ttl: Any, negative_ttl: Any, fill_timeout: Any) -> None:
    client.flushall()
    built, cache = outcome(
        lambda: Cache(client, negative_ttl=negative_ttl, fill_timeout=fill_timeout, strict=True)
    )
    if not built:
        assert isinstance(cache, ConfigError), cache
        return
    ok, got = outcome(lambda: cache.set("k", 1, ttl=ttl), "set")
    if not ok:
        assert isinstance(got, ConfigError), got
        return
    assert got is True
    assert cache.get("k") == 1
    ok, got = outcome(lambda: cache.get_or_set("none", lambda: None, ttl=ttl))
    assert ok and got is None


# Every numeric option of Cache / AsyncCache (and so of the Django backend's OPTIONS, passed
# through as they are), and of Stampede: the values it must refuse whatever its range, and its
# documented special values (``accept``). Anything else is either accepted (and then works) or
# refused with a ConfigError that names the option.
_NEVER = [-1, -0.5, math.nan, math.inf, -math.inf, True, False, "3", [1]]
NUMERIC_OPTIONS: dict[str, tuple[list[Any], list[Any]]] = {  # option: (refused, accepted)
    "ttl": ([*_NEVER, 0, None, 1e300, 10**400], [1, 0.5, timedelta(seconds=2)]),
    "negative_ttl": ([*_NEVER, 1e300, 10**400], [None, 0, 5]),  # 0: never cache None
    "fill_timeout": ([*_NEVER, 0, None, 1e300, 10**400], [0.5, 60]),
    "early_refresh": ([*_NEVER, None, 10**400], [0, 1, 1e9, 1e300]),  # 0: off; huge: always
    "stale_while_revalidate": ([*_NEVER, None, 1e300, 10**400], [0, 5]),  # 0: off
    "stale_if_error": ([*_NEVER, None, 1e300, 10**400], [0, 5]),  # 0: off
    "stale_if_error_max_bytes": ([*_NEVER, 0, None, 1.5], [1, 64 * 1024 * 1024]),
    "max_background": ([*_NEVER, None, 1.5], [0, 4]),  # 0: no background refresh
    "max_value_size": ([*_NEVER, 0, None, 1.5], [1024, 10**12]),
    "shards": ([*_NEVER, 0, 1.5], [None, 1, 16]),  # None: by topology
    "miss_deadline": ([*_NEVER, 0, 1e300, 10**400], [None, 0.5, 10]),  # None: from the client
}
_NOT_DJANGO = {"ttl", "negative_ttl"}  # the backend's TIMEOUT, and Django's own None handling
STAMPEDE_OPTIONS: dict[str, tuple[list[Any], list[Any]]] = {
    "wait": ([*_NEVER, 0, None, 1e300, 10**400], [0.1, 10]),
    "lock_ttl": ([*_NEVER, 0, None, 1e300, 10**400], [1, 30]),
}
ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**30), 10**30),
    st.sampled_from([None, 10**400, 2**63, 1e-12, timedelta(days=-1), timedelta.max]),
    st.timedeltas(),
)


def _refused_naming(exc: Any, option: str) -> None:
    assert isinstance(exc, ConfigError), exc
    assert option in str(exc), (option, str(exc))


def _cache_works(cache: Any) -> None:
    ok, got = outcome(lambda: cache.get_or_set("k", lambda: 1), "get_or_set")
    assert ok and got == 1, got
    assert outcome(lambda: cache.drain(5), "drain") == (True, True)


@pytest.mark.parametrize("option", sorted(NUMERIC_OPTIONS))
def test_every_numeric_cache_option_table(client: redis.Redis, option: str) -> None:
    refused, accepted = NUMERIC_OPTIONS[option]
    for value in refused:
        for cls, target in ((Cache, client), (AsyncCache, redis.asyncio.Redis())):
            built, got = outcome(partial(cls, target, namespace="opt", **{option: value}))
            assert not built, (cls.__name__, option, value)
            _refused_naming(got, option)
    for value in accepted:
        client.flushall()
        built, cache = outcome(partial(Cache, client, namespace="opt", **{option: value}))
        assert built, (option, value, cache)
        _cache_works(cache)


@pytest.mark.parametrize("option", sorted(STAMPEDE_OPTIONS))
def test_every_numeric_stampede_option_table(client: redis.Redis, option: str) -> None:
    refused, accepted = STAMPEDE_OPTIONS[option]
    for value in refused:
        built, got = outcome(partial(Stampede, **{option: value}))
        assert not built, (option, value)
        _refused_naming(got, option)
    for value in accepted:
        client.flushall()
        stampede = Stampede(**{option: value})
        _cache_works(Cache(client, namespace="opt", stampede=stampede))


@fuzz_settings(40)
@given(option=st.sampled_from(sorted(NUMERIC_OPTIONS)), value=ANY_NUMBER)
def test_numeric_cache_options_are_refused_by_name_or_work(
    client: redis.Redis, option: str, value: Any
) -> None:
    client.flushall()
    built, cache = outcome(lambda: Cache(client, namespace="opt", **{option: value}))
    built_async, _ = outcome(
        lambda: AsyncCache(redis.asyncio.Redis(), namespace="opt", **{option: value})
    )
    assert built == built_async, (option, value)  # the twins validate alike
    if not built:
        _refused_naming(cache, option)
        return
    _cache_works(cache)


@fuzz_settings(20)
@given(option=st.sampled_from(sorted(set(NUMERIC_OPTIONS) - _NOT_DJANGO)), value=ANY_NUMBER)
def test_django_options_are_refused_by_name_or_work(
    redis_server: RedisServer, option: str, value: Any
) -> None:
    """The backend passes these OPTIONS to ``Cache`` as they are (``ttl`` is its TIMEOUT)."""
    django = pytest.importorskip("django")
    from django.conf import settings

    if not settings.configured:
        settings.configure(SECRET_KEY="distkit tests: not a secret", USE_TZ=True, CACHES={})
        django.setup()
    from distcache.contrib.django import DistCache

    backend = DistCache(redis_server.url, {"OPTIONS": {"namespace": "djopt", option: value}})
    built, cache = outcome(lambda: backend.cache, "DistCache.cache")
    if not built:
        _refused_naming(cache, option)
        return
    ok, _ = outcome(lambda: backend.set("k", 1), "set")
    assert ok and backend.get("k") == 1


@pytest.mark.parametrize("draw", [1.0, -0.1, math.nan, 2, "x"])
def test_a_random_source_outside_0_1_is_a_config_error(client: redis.Redis, draw: Any) -> None:
    """XFetch's draw: ``random`` returning 1.0 used to raise a bare ``ValueError`` (log 0)."""
    client.flushall()
    cache = Cache(client, namespace="rnd", early_refresh=1e9, random=lambda: draw)
    ok, got = outcome(lambda: cache.get_or_set("k", lambda: 1))
    assert ok and got == 1  # a miss: no draw
    ok, got = outcome(lambda: cache.get_or_set("k", lambda: 2), "a hit that draws")
    _refused_naming(got, "random")


# -- values -------------------------------------------------------------------------------------
class _Opaque:
    pass


POISON = st.one_of(
    st.binary(max_size=8),
    st.builds(_Opaque),
    st.frozensets(st.integers(), max_size=3),
    st.sets(st.integers(), max_size=3),
    st.just("\ud800 lone surrogate"),
    st.integers(min_value=10**4400, max_value=10**4400 + 10),  # beyond int->str digit limit
    st.complex_numbers(max_magnitude=10),
    st.just(ValueError("x")),
    st.functions(),
)
JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
    ),
    max_leaves=20,
)
VALUES = st.recursive(
    st.one_of(JSONISH, POISON),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


def _poisoned(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_poisoned(v) for v in value)
    if isinstance(value, dict):
        return any(_poisoned(v) for v in value.values())
    if value is None or isinstance(value, (bool, int, float)):
        return isinstance(value, int) and value.bit_length() > 14000
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    return True


def _as_json(value: Any) -> Any:
    """The model of JSON: tuples come back as lists."""
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@fuzz_settings(100)
@given(value=VALUES)
def test_values_round_trip_or_raise_serialization_error(client: redis.Redis, value: Any) -> None:
    client.flushall()
    cache = Cache(client, namespace="values", max_value_size=64 * 1024, strict=True)
    ok, got = outcome(lambda: cache.set("k", value), "set")
    if _poisoned(value):
        assert not ok and isinstance(got, SerializationError), (value, got)
        assert cache.get("k", MISSING) is MISSING
        return
    assert ok and got is True, got
    back = cache.get("k", MISSING)
    assert _same(_as_json(value), back), (value, back)


def test_huge_and_deep_values_raise_serialization_error(client: redis.Redis) -> None:
    cache = Cache(client, namespace="big", max_value_size=1024 * 1024, strict=True)
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    big = "x" * (2 * 1024 * 1024)
    for value in (deep, big, {"k": big}):
        ok, got = outcome(lambda v=value: cache.set("k", v), "set")
        assert not ok and isinstance(got, SerializationError)
        ok, got = outcome(lambda v=value: cache.get_or_set("k", lambda: v), "get_or_set")
        assert not ok and isinstance(got, SerializationError)
    circular: list[Any] = []
    circular.append(circular)
    assert isinstance(outcome(lambda: cache.set("k", circular))[1], SerializationError)
    # a planted deeply nested JSON document is a miss, not a RecursionError
    cache.set("k", [1])
    raw = client.get("distkit:cache:{big}:k:k")
    assert isinstance(raw, bytes)
    head = int(raw[22:26], 16)
    client.set("distkit:cache:{big}:k:k", raw[: 26 + head] + b"[" * 200_000 + b"]" * 200_000)
    assert outcome(lambda: cache.get("k", MISSING))[1] is MISSING


_EXAMPLES = itertools.count()


@fuzz_settings(40)
@given(args=st.lists(VALUES, max_size=3))
def test_cached_arguments_are_keyed_or_refused(client: redis.Redis, args: list[Any]) -> None:
    client.flushall()
    # a namespace per example: each defines a new local function, and a name stays with the
    # first function that took it in its namespace (docs/cache.md)
    cache = Cache(client, namespace=f"dec{next(_EXAMPLES)}", strict=True)
    calls: list[int] = []

    @cached(cache)
    def f(*a: Any) -> int:
        calls.append(1)
        return len(a)

    ok, got = outcome(lambda: f(*args), "call")
    if not ok:
        assert isinstance(got, SerializationError), got
        return
    assert got == len(args)
    assert outcome(lambda: f(*args))[1] == len(args)
    assert len(calls) == 1  # the second call was a hit on the same canonical key


# -- bytes planted under distkit's keys ----------------------------------------------------------
LOCK_KEYS = [
    "{p}:lock:{{n}}",
    "{p}:lock:{{n}}:fence",
    "{p}:lock:{{n}}:rel",
    "{p}:lock:{{n}}:queue",
    "{p}:lock:{{n}}:qexp",
    "{p}:fenced:{{n}}",
]
SEM_KEYS = [  # every key the semaphore's scripts read
    "{p}:sem:{{n}}:holders",
    "{p}:sem:{{n}}:tokens",
    "{p}:sem:{{n}}:fence",
    "{p}:sem:{{n}}:limit",
    "{p}:sem:{{n}}:queue",
    "{p}:sem:{{n}}:qexp",
    "{p}:sem:{{n}}:rel",
]
CACHE_KEYS = [
    "{p}:cache:{{n}}:epoch",
    "{p}:cache:{{n}}:ns",
    "{p}:cache:{{n}}:t:tag",
    "{p}:cache:{{n}}:k:key",
    "{p}:cache:{{n}}:k:other",
    "{p}:cache:{{n}}:ek:key",  # a failed load's note, for the fill lock's waiters
]
SPECIAL_BYTES = st.sampled_from(
    [
        b"",
        b"0",
        b"-1",
        b"nan",
        b"inf",
        b"-inf",
        b"1.5",
        b"1e400",
        b"9" * 40,
        b"9007199254740993",
        b"0000000000000001",
        b"\xff\xfe\x00",
        b"dc1:",
        b"dc1~",
        b"dc1:" + b"9" * 16 + b"jv0000null",
        b"dc1:" + b"0" * 16 + b"jv0005a|b|c" + b"1",
        b"dc1:" + b"1" * 16 + b"pvffff",
        b"owner*",
        b"*",
        pickle.dumps(os.system),
    ]
)
# planted alone as a string in a fence (or a semaphore's limit), these must make an acquire raise
# ForeignDataError: values distlock never writes (not an integer from 0 to 2**53 - 1)
FOREIGN_NUMBERS = {b"", b"nan", b"inf", b"-inf", b"1.5", b"1e400", b"9" * 40, b"9007199254740993",
                   b"-1", b"\xff\xfe\x00", b"dc1:", b"dc1~", b"owner*", b"*"}  # fmt: skip
PLANTS = st.one_of(
    st.tuples(
        st.sampled_from(["string", "list", "hash", "zset", "set"]),
        st.one_of(st.binary(max_size=64), SPECIAL_BYTES),
    ),
    # a failure note's shape, stamped this many ms from the server's clock (near future included)
    st.tuples(st.just("note"), st.integers(-2000, 2000).map(lambda ms: str(ms).encode())),
)


def _plant(r: redis.Redis, key: str, kind: str, data: bytes) -> None:
    r.delete(key)
    if kind == "string":
        r.set(key, data)
    elif kind == "note":  # "<server ms + offset>|text", as distcache writes a failed load's note
        sec, usec = r.time()
        r.set(key, b"%d|planted" % (sec * 1000 + usec // 1000 + int(data)))
        return
    elif kind == "list":
        r.rpush(key, data or b"x")
    elif kind == "hash":
        r.hset(key, data or b"x", data or b"x")
    elif kind == "zset":
        r.zadd(key, {data or b"x": 1})
    else:
        r.sadd(key, data or b"x")
    if data[:1] == b"0":
        r.pexpire(key, 200)  # some plants vanish mid-example, as a TTL would make them


def _written_by(r: redis.Redis, handle: Any) -> list[bytes]:
    """The keys of the name's family holding anything of ``handle``'s owner ids."""
    prefix = handle._core._owner_prefix.encode()
    found = []
    for key in r.keys("distkit:*{n}*"):
        kind = r.type(key)
        if kind == b"string":
            items = [r.get(key) or b""]
        elif kind == b"zset":
            items = r.zrange(key, 0, -1)
        elif kind == b"hash":
            items = r.hkeys(key)
        elif kind == b"list":
            items = r.lrange(key, 0, -1)
        else:
            items = []
        if prefix in key or any(prefix in item for item in items):
            found.append(key)
    return found


def _lock_ops(client: redis.Redis) -> list[tuple[str, Callable[[], Any]]]:
    lock = Lock(client, "n", ttl=1)
    waiter = Lock(client, "n", ttl=1)
    store = FencedStore(client, "n")

    def acquire_wait() -> Any:
        # review item 7: an acquire that raises ForeignDataError has written nothing of its own
        try:
            return waiter.acquire(timeout=0.05)
        except ForeignDataError:
            assert _written_by(client, waiter) == []
            raise

    def acquire() -> Any:
        try:
            return lock.acquire(blocking=False)
        except ForeignDataError:
            assert _written_by(client, lock) == []
            raise

    return [
        ("acquire", acquire),
        ("locked", lock.locked),
        ("owned", lock.owned),
        ("extend", lock.extend),
        ("release", lock.release),
        ("acquire-wait", acquire_wait),
        ("release-unheld", lambda: Lock(client, "n", ttl=1).release()),
        ("fenced-read", store.read),
        ("fenced-write", lambda: store.write(2**40, "v")),
        ("redlock", lambda: Redlock([client], "n", ttl=1).acquire(blocking=False)),
    ]


@fuzz_settings(60)
@given(plants=st.dictionaries(st.sampled_from(LOCK_KEYS), PLANTS, min_size=1, max_size=3))
def test_corrupt_lock_state_ends_in_typed_errors(
    client: redis.Redis, plants: dict[str, tuple[str, bytes]]
) -> None:
    client.flushall()
    for template, (kind, data) in plants.items():
        _plant(client, template.format(p="distkit"), kind, data)
    (only_key, (only_kind, only_data)), *_ = plants.items()
    foreign_fence = (
        len(plants) == 1
        and only_key == "{p}:lock:{{n}}:fence"
        and only_kind == "string"
        and only_data in FOREIGN_NUMBERS
    )
    for what, op in _lock_ops(client):
        ok, got = outcome(op, what)
        if what == "release-unheld":
            assert not ok and isinstance(got, LockNotOwned), got
        if what == "acquire" and foreign_fence:
            assert not ok and isinstance(got, ForeignDataError), (only_data, got)
    # whatever happened, nothing was written outside the lock's own key family
    assert all(
        k.startswith(("distkit:lock:{n}", "distkit:fenced:{n}")) for k in distkit_keys(client)
    )


@fuzz_settings(60)
@given(
    planted=st.one_of(st.sampled_from(sorted(FOREIGN_NUMBERS)), st.binary(max_size=24)),
    token=st.one_of(
        st.integers(min_value=-5, max_value=2**64 + 5),
        st.sampled_from([2**53 - 1, 2**53, 2**53 + 1, 0]),
    ),
)
def test_fenced_store_with_a_planted_token_ends_in_typed_errors(
    client: redis.Redis, planted: bytes, token: int
) -> None:
    """A FencedStore whose stored token is any bytes, written with any int: the write succeeds
    only for a token in [0, 2**53) over a canonical stored int no larger; otherwise ConfigError
    (the token), ForeignDataError (the stored token) or StaleFencingToken, with the hash as it
    was. Never a raw exception, never a stale write accepted (the exact compare)."""
    client.flushall()
    key = "distkit:fenced:{n}"
    client.hset(key, mapping={"token": planted, "value": b"theirs"})
    store = FencedStore(client, "n")
    canonical = planted.isdigit() and str(int(planted)).encode() == planted
    stored = int(planted) if canonical and int(planted) < 2**53 else None
    ok, got = outcome(lambda: store.write(token, "mine"), "fenced-write")
    if not 0 <= token < 2**53:
        assert not ok and isinstance(got, ConfigError), (planted, token, got)
    elif stored is None:
        assert not ok and isinstance(got, ForeignDataError), (planted, token, got)
    elif token < stored:
        assert not ok and isinstance(got, StaleFencingToken), (planted, token, got)
        assert got.highest == stored
    else:
        assert ok, (planted, token, got)
        assert client.hgetall(key) == {b"token": str(token).encode(), b"value": b"mine"}
        return
    assert client.hgetall(key) == {b"token": planted, b"value": b"theirs"}
    ok, got = outcome(store.read, "fenced-read")
    assert ok if stored is not None else isinstance(got, ForeignDataError), (planted, got)


def _semaphore_ops(client: redis.Redis) -> list[tuple[str, Callable[[], Any]]]:
    sem = Semaphore(client, "n", 2, ttl=1)
    waiter = Semaphore(client, "n", 2, ttl=1)

    def acquire_wait() -> Any:
        try:
            return waiter.acquire(timeout=0.05)
        except ForeignDataError:
            assert _written_by(client, waiter) == []
            raise

    def acquire() -> Any:
        try:
            return sem.acquire(blocking=False)
        except ForeignDataError:
            assert _written_by(client, sem) == []
            raise

    return [
        ("acquire", acquire),
        ("holders", sem.holders),
        ("locked", sem.locked),
        ("owned", sem.owned),
        ("extend", sem.extend),
        ("release", sem.release),
        ("acquire-wait", acquire_wait),
        ("release-unheld", lambda: Semaphore(client, "n", 2, ttl=1).release()),
    ]


@fuzz_settings(60)
@given(plants=st.dictionaries(st.sampled_from(SEM_KEYS), PLANTS, min_size=1, max_size=3))
def test_corrupt_semaphore_state_ends_in_typed_errors(
    client: redis.Redis, plants: dict[str, tuple[str, bytes]]
) -> None:
    client.flushall()
    for template, (kind, data) in plants.items():
        _plant(client, template.format(p="distkit"), kind, data)
    (only_key, (only_kind, only_data)), *_ = plants.items()
    foreign_number = (
        len(plants) == 1
        and only_key in ("{p}:sem:{{n}}:fence", "{p}:sem:{{n}}:limit")
        and only_kind == "string"
        and only_data in FOREIGN_NUMBERS
    )
    for what, op in _semaphore_ops(client):
        ok, got = outcome(op, what)
        if what == "release-unheld":
            assert not ok and isinstance(got, LockNotOwned), got
        if what == "acquire" and foreign_number:
            assert not ok and isinstance(got, ForeignDataError), (only_data, got)
    assert all(k.startswith("distkit:sem:{n}:") for k in distkit_keys(client))


# Planted queue entries (lock and semaphore): members, keep-alives and arrival scores, malformed,
# huge, negative, nan. The documented rule (docs/locks.md, "Failures") decides which are waiters.
QUEUE_MEMBERS = st.one_of(
    st.sampled_from(
        ["nocolon", ":x", "0:x", "-5:x", "1.5:x", "abc:x", "5000:", "5000:x*", "5000:a:b",
         "315360000001:x", "315360000000:ghost", "9" * 40 + ":x", "5000:ghost", "1:g", "07:x"]
    ),
    st.text(alphabet="0123456789:*-.ex", max_size=16),
)  # fmt: skip
QUEUE_KEEPS = st.sampled_from(
    ["live", "edge", "far", "past", "nan", "inf", "-inf", "-1", "", "abc", "1e400", "0x10"]
)
QUEUE_SCORES = st.sampled_from([1.0, 0.0, -1.0, -1e300, 1e15, math.inf, -math.inf])
QUEUE_PLANTS = st.lists(st.tuples(QUEUE_MEMBERS, QUEUE_KEEPS, QUEUE_SCORES), max_size=5)
_MAX_TTL_MS = 315_360_000_000


def _plant_queue(r: redis.Redis, family: str, plants: list[tuple[str, str, float]]) -> int:
    """Plant the entries; return the server's now (ms) they were timed from."""
    secs, micros = r.time()
    now = int(secs) * 1000 + int(micros) // 1000
    keeps = {"live": now + 30_000, "edge": now + 55_000, "far": 10**13, "past": now - 1000}
    for member, keep, score in plants:
        r.zadd(f"distkit:{family}:{{n}}:queue", {member: score})
        r.hset(f"distkit:{family}:{{n}}:qexp", member, keeps.get(keep, keep))
    return now


def _waiter(member: bytes, keep: str) -> tuple[int, bytes] | None:
    """The rule the scripts follow: (ttl, owner) for a usable entry, None for a dropped one."""
    ttl, sep, owner = member.partition(b":")
    usable = (
        keep in ("live", "edge")
        and sep == b":"
        and ttl[:1] in b"123456789"
        and ttl.isdigit()
        and len(ttl) <= 12
        and int(ttl) <= _MAX_TTL_MS
        and owner != b""
        and b"*" not in owner
    )
    return (int(ttl), owner) if usable else None


def _first_waiter(
    r: redis.Redis, family: str, plants: list[tuple[str, str, float]]
) -> tuple[int, bytes] | None:
    keep_of = {m.encode(): k for m, k, _ in plants}  # a later plant of a member replaces it
    for member in r.zrange(f"distkit:{family}:{{n}}:queue", 0, -1):
        found = _waiter(member, keep_of[member])
        if found:
            return found
    return None


@fuzz_settings(60)
@given(plants=QUEUE_PLANTS)
def test_planted_lock_queue_entries_are_dropped_never_trusted(
    client: redis.Redis, plants: list[tuple[str, str, float]]
) -> None:
    """Review item 6: a planted waiter is granted only when it looks exactly like one distlock
    writes (a bounded keep-alive, a ttl distlock accepts); every other entry is dropped, so a free
    lock is taken at once, a release never leaves its lease behind, and nothing raises."""
    client.flushall()
    _plant_queue(client, "lock", plants)
    expected = _first_waiter(client, "lock", plants)
    lock = Lock(client, "n", ttl=5)
    with no_hang(OP_LIMIT):
        got = lock.acquire(blocking=False)
    assert got is (expected is None), (plants, expected)
    if got:
        lock.release()
    client.flushall()
    holder = Lock(client, "n", ttl=5)
    assert holder.acquire()
    client.set("distkit:lock:{n}", holder._core.owner + "*", keepttl=True)  # type: ignore[operator]
    _plant_queue(client, "lock", plants)
    expected = _first_waiter(client, "lock", plants)
    with no_hang(OP_LIMIT):
        holder.release()
    pipe = client.pipeline(transaction=True)
    lease, pttl, wake = (
        pipe.get("distkit:lock:{n}").pttl("distkit:lock:{n}").keys("*:wake:*").execute()
    )
    if expected is None:
        assert lease is None and wake == [], (plants, lease, wake)
    else:
        ttl, owner = expected
        if lease is None:  # a handoff of a few ms may have run out already
            assert ttl < 500, (plants, expected)
        else:
            assert lease.rstrip(b"*") == owner and 0 <= pttl <= ttl, (plants, lease, pttl)
            if ttl >= 500:  # (a wake list of a few ms may have run out already)
                assert wake == [b"distkit:lock:{n}:wake:" + owner], (plants, wake)


@fuzz_settings(60)
@given(
    plants=QUEUE_PLANTS,
    holder_scores=st.lists(st.sampled_from([-1.0, 1e15, math.inf, -math.inf, 0.0]), max_size=3),
)
def test_planted_semaphore_queue_entries_are_dropped_never_trusted(
    client: redis.Redis, plants: list[tuple[str, str, float]], holder_scores: list[float]
) -> None:
    """As for the lock, plus planted holders whose expiry is past (or further ahead than ten
    years): each is pruned, so a permit of a free semaphore is granted at once."""
    client.flushall()
    for i, score in enumerate(holder_scores):
        client.zadd("distkit:sem:{n}:holders", {f"ghost{i}": score})
    _plant_queue(client, "sem", plants)
    expected = _first_waiter(client, "sem", plants)
    sem = Semaphore(client, "n", 1, ttl=5)
    with no_hang(OP_LIMIT):
        got = sem.acquire(blocking=False)
    # the oldest usable waiter gets the free permit first (or, with no usable one, this handle)
    holders = client.zrange("distkit:sem:{n}:holders", 0, -1)
    if expected is None:
        assert got and holders == [sem._core.owner.encode()], (plants, holders)  # type: ignore[union-attr]
    else:
        assert not got and holders == [expected[1]], (plants, holders)
    client.flushall()
    holder = Semaphore(client, "n", 1, ttl=5)
    assert holder.acquire()
    _plant_queue(client, "sem", plants)
    expected = _first_waiter(client, "sem", plants)
    with no_hang(OP_LIMIT):
        holder.release()
    holders = client.zrange("distkit:sem:{n}:holders", 0, -1)
    assert holders == ([] if expected is None else [expected[1]]), (plants, holders)


@fuzz_settings(60)
@given(plants=st.dictionaries(st.sampled_from(CACHE_KEYS), PLANTS, min_size=1, max_size=3))
def test_corrupt_cache_state_is_a_miss_or_a_typed_error(
    client: redis.Redis, plants: dict[str, tuple[str, bytes]]
) -> None:
    client.flushall()
    for template, (kind, data) in plants.items():
        _plant(client, template.format(p="distkit"), kind, data)
    metrics = CounterMetrics()
    cache = Cache(client, namespace="n", metrics=metrics)
    # reads and fills fail open: they return, whatever Redis holds
    for what, op in [
        ("get", lambda: cache.get("key", MISSING)),
        ("get_many", lambda: cache.get_many(["key", "other"])),
        ("get_or_set", lambda: cache.get_or_set("key", lambda: "fresh")),
        ("get-after", lambda: cache.get("key", MISSING)),
    ]:
        ok, got = outcome(op, what)
        assert ok, f"{what} raised {got!r} instead of failing open"
        if what == "get_or_set":
            assert got == "fresh"
        elif what.startswith("get") and what != "get_many":
            assert got in (MISSING, "fresh")
    # writes and invalidations may refuse, but only with a distkit error
    for what, op in [
        ("set", lambda: cache.set("key", 1, tags=["tag"])),
        ("delete", lambda: cache.delete("key")),
        ("invalidate_tags", lambda: cache.invalidate_tags("tag")),
        ("clear", cache.clear),
        ("strict-get", lambda: Cache(client, namespace="n", strict=True).get("key")),
    ]:
        outcome(op, what)
    signed = Cache(client, namespace="n", serializer=PickleSerializer([b"k" * 32]))
    assert outcome(lambda: signed.get("key", MISSING))[0]


# -- real entries, mutated, then updated ----------------------------------------------------------
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 120), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 120), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 120), st.integers(0, 255)),
    st.tuples(st.just("digit"), st.integers(0, 120), st.integers(0, 9)),
)
ENTRY_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 2**53, 2**63 - 1, -(2**63)]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.lists(st.integers(0, 3), max_size=2),
)


def _altered(raw: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(raw)
    for how, at, arg in mutations:
        at = at % (len(data) + 1)
        if how == "flip" and at < len(data):
            data[at] ^= arg
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = bytes([arg])
        elif how == "digit" and at < len(data):
            data[at] = ord("0") + arg  # a plausible header digit, a different number
    return bytes(data)


@fuzz_settings(60)
@given(
    value=ENTRY_VALUES,
    tags=st.lists(st.sampled_from(["tag", "t2"]), max_size=2, unique=True),
    mutations=st.lists(MUTATIONS, min_size=1, max_size=3),
    retype=st.sampled_from([None, "list", "hash"]),
    ops=st.lists(st.sampled_from(["touch", "incr", "decr", "get"]), min_size=1, max_size=5),
    delta=st.integers(-(2**64), 2**64),
)
def test_updates_of_mutated_real_entries_end_in_a_miss_or_a_typed_error(
    client: redis.Redis,
    value: Any,
    tags: list[str],
    mutations: list[tuple[str, int, int]],
    retype: str | None,
    ops: list[str],
    delta: int,
) -> None:
    """An entry written by the cache, then altered in Redis (bytes flipped, cut, inserted, or
    the key turned into another type): ``touch`` / ``incr`` / ``decr`` return, report a miss
    (``False`` / ``KeyError``), say the value is no int (``TypeError``) or raise a distkit
    error; never a raw exception or a hang. A value they report is what a read then finds."""
    client.flushall()
    cache = Cache(client, namespace="n")
    assert cache.set("key", value, tags=tags)
    rkey = cache._core.entry_key("key")
    raw = client.get(rkey)
    assert raw is not None
    mutated = _altered(raw, mutations)
    client.delete(rkey)
    if retype == "list":
        client.rpush(rkey, mutated or b"x")
    elif retype == "hash":
        client.hset(rkey, "f", mutated)
    else:
        client.set(rkey, mutated, px=60_000)
    for what in ops:
        refused: Exception | None = None
        with no_hang(OP_LIMIT, what):
            try:
                if what == "touch":
                    assert cache.touch("key", 60) in (True, False)
                elif what == "get":
                    cache.get("key", MISSING)  # fails open: any value or the default
                else:
                    act = cache.incr if what == "incr" else cache.decr
                    now = act("key", delta)
                    assert type(now) is int
                    assert cache.get("key", MISSING) == now, f"{what} reported {now}"
            except (KeyError, TypeError) as exc:
                refused = exc
            except DistkitError:
                pass
        if isinstance(refused, KeyError):  # a miss: the logical key, nothing else
            assert what in ("incr", "decr") and refused.args == ("key",), refused
        elif refused is not None:  # the documented refusal of a value that is no int
            assert what in ("incr", "decr") and "not an int" in str(refused), refused


@fuzz_settings(20)
@given(plants=st.dictionaries(st.sampled_from(LOCK_KEYS + CACHE_KEYS), PLANTS, max_size=3))
def test_corrupt_state_async_twins(
    redis_server: RedisServer, plants: dict[str, tuple[str, bytes]]
) -> None:
    with redis_server.client() as r:
        r.flushall()
        for template, (kind, data) in plants.items():
            _plant(r, template.format(p="distkit"), kind, data)

    async def main() -> None:
        client = redis_server.async_client()
        try:
            lock = AsyncLock(client, "n", ttl=1)
            cache = AsyncCache(client, namespace="n")
            for what, op in [
                ("acquire", lambda: lock.acquire(blocking=False)),
                ("release", lock.release),
                ("get", lambda: cache.get("key", MISSING)),
                ("get_or_set", lambda: cache.get_or_set("key", lambda: _fresh())),
                ("clear", cache.clear),
            ]:
                try:
                    await asyncio.wait_for(op(), OP_LIMIT)
                except DistkitError:
                    assert what in ("acquire", "release", "clear"), what
        finally:
            await client.aclose()

    async def _fresh() -> str:
        return "fresh"

    asyncio.run(main())


def test_decode_errors_are_counted_not_raised(client: redis.Redis, tmp_path: Path) -> None:
    """The metric that tells an operator foreign bytes sit under the cache's keys."""
    metrics = CounterMetrics()
    cache = Cache(client, namespace="m", metrics=metrics)
    client.set("distkit:cache:{m}:k:a", b"\x80\x04\x95 not ours")
    assert cache.get("a", MISSING) is MISSING
    assert metrics.count(CacheEvent.DECODE_ERROR) == 1


@pytest.mark.parametrize(
    "junk",
    [b"garbage", b"\xff\xfe", b"", b"-5", b"1.5e3x", b"99999999999999999999", b"9007199254740993"],
)
def test_an_invalidation_repairs_a_foreign_epoch(client: redis.Redis, junk: bytes) -> None:
    """Foreign bytes under the epoch: reads never fail, fills are skipped, and the next
    invalidation replaces the epoch, after which the cache works normally again."""
    cache = Cache(client, namespace="ep", strict=True)
    cache.set("a", 1)
    client.set("distkit:cache:{ep}:epoch", junk)
    assert cache.get("a", MISSING) in (1, MISSING)  # nothing was invalidated: either is right
    assert cache.get_or_set("b", lambda: 2) == 2
    cache.clear()
    epoch = client.get("distkit:cache:{ep}:epoch")
    assert isinstance(epoch, bytes) and epoch.isdigit() and len(epoch) == 16
    assert cache.get("a", MISSING) is MISSING  # written before the clear: gone
    cache.set("a", 3, tags=["t"])
    assert cache.get("a") == 3
    cache.invalidate_tags("t")
    assert cache.get("a", MISSING) is MISSING


# -- real entries, mutated, under every option set (issue 14 items 6 and 10) ----------------------
class _Typed(BaseModel):
    id: int
    name: str


_PICKLE = PickleSerializer([b"k" * 32])
_LIMIT = 4096  # max_value_size of every fuzzed cache
OPTION_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "stale-while-revalidate": {"stale_while_revalidate": 5},
    "stale-if-error": {"stale_if_error": 5},
    "early-refresh": {"early_refresh": 50.0},
    "near-cache": {"near_cache": NearCache()},
    "typed": {"value_type": _Typed},
    "signed-pickle": {"serializer": _PICKLE},
    "negative": {"negative_ttl": 30},
    "everything": {
        "stale_while_revalidate": 5,
        "stale_if_error": 5,
        "early_refresh": 50.0,
        "near_cache": NearCache(),
        "negative_ttl": 30,
        "serializer": _PICKLE,
    },
}
FIELD_JUNK = st.one_of(
    st.sampled_from(
        [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1_0",
            "9" * 25,
            "9" * 5000,
            "x",
            "1e3",
            "٣",
            "=",
            ",",
            "t=",
            "=1",
            "t=x",
            "t=1,",
            "t=1=2",
            "0x10",
            "nan",
        ]
    ),
    st.text(st.characters(codec="ascii"), max_size=8),
    st.text(max_size=4),
)
MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("field"), st.integers(0, 5), FIELD_JUNK),
    st.tuples(
        st.just("length"),
        st.binary(min_size=4, max_size=4)
        | st.sampled_from([b"0000", b"ffff", b"FFFF", b"-001", b" 1f ", b"1_00", b"0x1f"]),
    ),
    st.tuples(
        st.just("head"),
        st.integers(0, 21),
        st.sampled_from([b"dc2:", b"dc1~", b"DC1:", b"j", b"p", b"m", b"n", b"v", b"x", b"0" * 16]),
    ),
    st.tuples(
        st.just("payload"),
        st.binary(max_size=40)
        | st.sampled_from(
            [b"null", b"[]", b"{}", b'{"id": "x"}', b"1e999", b"[" * 100_000, b"\x80\x04N."]
        ),
    ),
    st.tuples(st.just("oversize")),
)


def _mutate(raw: bytes, mutation: tuple[Any, ...], serializer: Any) -> bytes:
    kind = mutation[0]
    start = 26 + int(raw[22:26], 16)
    meta, payload = raw[26:start], raw[start:]
    if kind == "flip":
        i = mutation[1] % len(raw)
        return raw[:i] + bytes([mutation[2]]) + raw[i + 1 :]
    if kind == "truncate":
        return raw[: mutation[1] % len(raw)]
    if kind == "insert":
        i = mutation[1] % (len(raw) + 1)
        return raw[:i] + mutation[2] + raw[i:]
    if kind == "field":  # one metadata field replaced, the length header kept consistent
        fields = meta.decode().split("|")
        fields[mutation[1] % len(fields)] = mutation[2]
        new = "|".join(fields).encode("utf-8", "surrogatepass")[:0xFFFF]
        return raw[:22] + b"%04x" % len(new) + new + payload
    if kind == "length":
        return raw[:22] + mutation[1] + raw[26:]
    if kind == "head":
        i = mutation[1]
        return raw[:i] + mutation[2] + raw[i + len(mutation[2]) :]
    if kind == "payload":
        return raw[:start] + mutation[1]
    # oversize: a valid payload, larger than max_value_size (a foreign writer with no limit)
    return raw[:start] + serializer.dumps(list(range(2 * _LIMIT)))


def _fuzz_cache(cls: Any, client: Any, options: dict[str, Any], **extra: Any) -> Any:
    return cls(client, namespace="fz", max_value_size=_LIMIT, **options, **extra)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@fuzz_settings(12)
@given(mutation=MUTATIONS, bump=st.booleans())
def test_mutated_real_entries_are_misses_never_exceptions(
    redis_server: RedisServer,
    client: redis.Redis,
    option_set: str,
    kind: str,
    mutation: tuple[Any, ...],
    bump: bool,
) -> None:
    """Entries written by a real Cache with these options, mutated (bytes, metadata fields,
    lengths, envelope versions, an oversized payload), are read by get / get_many /
    get_or_set / @cached: each returns (a miss or a value), never raises; an oversized entry is
    a miss and a ``decode_error``, never decoded."""
    client.flushall()
    options = OPTION_SETS[option_set]
    typed = options.get("value_type") is _Typed
    value: Any = _Typed(id=1, name="a") if typed else {"id": 1, "name": "a"}
    writer = _fuzz_cache(Cache, client, {k: v for k, v in options.items() if k != "near_cache"})

    _FUZZ_VALUE[0] = value
    load = cached(writer, name="fuzz.load", negative_ttl=30)(_fuzz_load)
    writer.set("a", value, tags=["t1", "t2"])
    writer.get_or_set("n", lambda: None)
    load(1)
    keys = ["a", "n", load.key_for(1)]
    serializer = options.get("serializer", JsonSerializer())
    for key in keys:
        rkey = f"distkit:cache:{{fz}}:k:{key}"
        raw = client.get(rkey)
        assert isinstance(raw, bytes), key
        client.set(rkey, _mutate(raw, mutation, serializer), px=60_000)
    if bump:  # the epoch moves on: every entry takes the revalidation path
        writer.invalidate_tags("unrelated")
    writer.close()
    metrics = CounterMetrics()
    if kind == "sync":
        results = _read_all_sync(client, options, metrics, keys, value)
    else:
        results = asyncio.run(_read_all_async(redis_server, options, metrics, keys, value))
    if mutation[0] == "oversize":
        assert results["get"] is MISSING, results
        assert metrics.count(CacheEvent.DECODE_ERROR) >= 1


# One function object per name, decorated anew with each example's handles: a name belongs to
# one function per namespace and process (docs/cache.md), and a function may take it again.
_FUZZ_VALUE: list[Any] = [None]


def _fuzz_load(i: int) -> Any:
    return _FUZZ_VALUE[0]


async def _fuzz_aload(i: int) -> Any:
    return None


def _read_all_sync(
    client: redis.Redis,
    options: dict[str, Any],
    metrics: CounterMetrics,
    keys: list[str],
    value: Any,
) -> dict[str, Any]:
    cache = _fuzz_cache(Cache, client, options, metrics=metrics)

    load = cached(cache, name="fuzz.load", negative_ttl=30)(_fuzz_load)
    results: dict[str, Any] = {}
    try:
        for what, op in [
            ("get", lambda: cache.get("a", MISSING)),
            ("get-negative", lambda: cache.get("n", MISSING)),
            ("get_many", lambda: cache.get_many(keys)),
            ("get_or_set", lambda: cache.get_or_set("a", lambda: value)),
            ("get_or_set-negative", lambda: cache.get_or_set("n", lambda: value)),
            ("cached", lambda: load(1)),
        ]:
            ok, results[what] = outcome(op, what)
            assert ok, f"{what} raised {results[what]!r}"
    finally:
        cache.close()
    return results


async def _read_all_async(
    redis_server: RedisServer,
    options: dict[str, Any],
    metrics: CounterMetrics,
    keys: list[str],
    value: Any,
) -> dict[str, Any]:
    client = redis_server.async_client()
    cache = _fuzz_cache(AsyncCache, client, options, metrics=metrics)

    load = cached(cache, name="fuzz.aload", negative_ttl=30)(_fuzz_aload)

    async def fresh() -> Any:
        return value

    results: dict[str, Any] = {}
    try:
        for what, op in [
            ("get", lambda: cache.get("a", MISSING)),
            ("get-negative", lambda: cache.get("n", MISSING)),
            ("get_many", lambda: cache.get_many(keys)),
            ("get_or_set", lambda: cache.get_or_set("a", fresh)),
            ("get_or_set-negative", lambda: cache.get_or_set("n", fresh)),
            ("cached", lambda: load(1)),
        ]:
            try:
                results[what] = await asyncio.wait_for(op(), OP_LIMIT)
            except DistkitError as exc:
                raise AssertionError(f"{what} raised {exc!r}") from exc
    finally:
        await cache.aclose()
        await client.aclose()
    return results


# Well-formed (1-19 digits, as the metadata check accepts) but absurd or edge times.
PLANTED_TIMES = st.sampled_from(
    ["9999999999999999999", "0000000000000000001", "0", "1", "99999999999999", "315360000000"]
)
UPDATE_OPTIONS = ["default", "stale-while-revalidate", "stale-if-error", "negative"]


@pytest.mark.parametrize("kind", ["sync", "async"])
@fuzz_settings(25)
@given(
    option_set=st.sampled_from(UPDATE_OPTIONS),
    field=st.sampled_from([0, 2]),  # computed_at_ms, ttl_ms
    planted=PLANTED_TIMES,
    other=st.none() | PLANTED_TIMES,
    bump=st.booleans(),
)
def test_updates_of_planted_times_are_typed_never_raw(
    redis_server: RedisServer,
    client: redis.Redis,
    kind: str,
    option_set: str,
    field: int,
    planted: str,
    other: str | None,
    bump: bool,
) -> None:
    """incr / decr / touch / ttl_of / add on an int entry whose computed_at or ttl was planted
    (19-digit, zero, far-future): ``KeyError`` / ``False`` / ``None`` or a result, never a raw
    server error; ``ttl_of`` never reports more than the longest ttl a writer records."""
    client.flushall()
    options = OPTION_SETS[option_set]
    rkey = "distkit:cache:{fz}:k:n"

    def plant() -> None:
        raw = client.get(rkey)
        assert isinstance(raw, bytes)
        start = 26 + int(raw[22:26], 16)
        fields = raw[26:start].split(b"|")
        fields[field] = planted.encode()
        if other is not None:
            fields[2 - field] = other.encode()
        meta = b"|".join(fields)
        client.set(rkey, raw[:22] + b"%04x" % len(meta) + meta + raw[start:], px=60_000)
        if bump:
            client.set("distkit:cache:{fz}:epoch", b"%016d" % (int(raw[4:20]) + 1))

    ops: list[tuple[str, Callable[[Any], Any]]] = [
        ("incr", lambda c: c.incr("n")),
        ("decr", lambda c: c.decr("n", 2)),
        ("touch", lambda c: c.touch("n", 100)),
        ("ttl_of", lambda c: c.ttl_of("n")),
        ("add", lambda c: c.add("n", 1)),
        ("get", lambda c: c.get("n", MISSING)),
    ]
    results: dict[str, Any] = {}
    if kind == "sync":
        cache = _fuzz_cache(Cache, client, options)
        try:
            for what, op in ops:
                cache.set("n", 5, tags=["t"])
                plant()
                with no_hang(OP_LIMIT, what):
                    try:
                        results[what] = op(cache)
                    except KeyError:
                        results[what] = KeyError
        finally:
            cache.close()
    else:

        async def main() -> None:
            aclient = redis_server.async_client()
            acache = _fuzz_cache(AsyncCache, aclient, options)
            try:
                for what, op in ops:
                    await acache.set("n", 5, tags=["t"])
                    plant()
                    try:
                        results[what] = await asyncio.wait_for(op(acache), OP_LIMIT)
                    except KeyError:
                        results[what] = KeyError
            finally:
                await acache.aclose()
                await aclient.aclose()

        asyncio.run(main())
    assert results["incr"] in (KeyError, 6), results
    assert results["decr"] in (KeyError, 3), results
    assert results["touch"] in (True, False), results
    assert results["add"] in (True, False), results
    assert results["ttl_of"] is None or 0 <= results["ttl_of"] <= 10 * 366 * 24 * 3600, results


def test_a_planted_metadata_field_with_a_stale_window_is_a_miss(client: redis.Redis) -> None:
    """Issue 14 item 6: a re-stamped entry whose ``computed_at`` is not a number raised
    ``ValueError`` from get() once a stale window was configured."""
    metrics = CounterMetrics()
    cache = Cache(client, namespace="pm", stale_while_revalidate=5, metrics=metrics)
    cache.set("a", 1)
    rkey = "distkit:cache:{pm}:k:a"
    raw = client.get(rkey)
    assert isinstance(raw, bytes)
    fields = raw[26 : 26 + int(raw[22:26], 16)].split(b"|")
    meta = b"|".join([b"12x4", *fields[1:]])
    client.set(rkey, raw[:4] + b"0" * 16 + raw[20:22] + b"%04x" % len(meta) + meta + b"1")
    assert cache.get("a", MISSING) is MISSING
    assert cache.get_many(["a"]) == {}
    assert metrics.count(CacheEvent.DECODE_ERROR) == 2


@pytest.mark.parametrize("restamp", [False, True], ids=["current-epoch", "old-epoch"])
def test_an_oversized_foreign_entry_is_never_decoded(client: redis.Redis, restamp: bool) -> None:
    """Issue 14 item 10: ``max_value_size`` holds on reads too (a 30 MiB entry under a 1 MiB
    limit decoded into 15 M objects); checked on the raw length, before any decoding."""
    metrics = CounterMetrics()
    cache = Cache(client, namespace="big2", max_value_size=1024, metrics=metrics)
    cache.set("a", 1)
    rkey = "distkit:cache:{big2}:k:a"
    raw = client.get(rkey)
    assert isinstance(raw, bytes)
    head = raw[:4] + b"0" * 16 + raw[20:] if restamp else raw
    start = 26 + int(raw[22:26], 16)
    client.set(rkey, head[:start] + b"[" + b"0," * 600 + b"0]")  # 1203 bytes of valid JSON
    assert cache.get("a", MISSING) is MISSING
    assert cache.get_many(["a"]) == {}
    assert cache.get_or_set("a", lambda: 2) == 2
    assert metrics.count(CacheEvent.DECODE_ERROR) >= 3
    client.set(rkey, head[:start] + b"[" + b"0," * 500 + b"0]")  # 1003 bytes: within the limit
    assert cache.get("a", MISSING) == [0] * 501 or restamp
