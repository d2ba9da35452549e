"""Cache and AsyncCache expose the same names and parameters (issue 6 point 8); the front door
is curated; bad input raises typed errors before any I/O (point 6)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import redis

import distcache
from distcache import AsyncCache, Cache, ConfigError
from distkit import connect
from distkit.testing import RedisServer, free_port

IO_METHODS = {
    "get",
    "get_many",
    "set",
    "set_many",
    "delete",
    "get_or_set",
    "invalidate_tags",
    "clear",
    "drain",
    "add",
    "incr",
    "decr",
    "touch",
    "ttl_of",
    "delete_many",
}


def _surface(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(inspect.getattr_static(cls, name), property):
            out[name] = "property"
        elif callable(member):
            out[name] = [
                (p.name, p.kind, p.default) for p in inspect.signature(member).parameters.values()
            ]
    return out


_POS = inspect.Parameter.POSITIONAL_OR_KEYWORD
_EMPTY = inspect.Parameter.empty


def test_the_twins_have_identical_public_surfaces() -> None:
    sync, async_ = _surface(Cache), _surface(AsyncCache)
    # the one allowed difference: close() / aclose() (the near cache's listener)
    assert sync.pop("close") == async_.pop("aclose") == [("self", _POS, _EMPTY)]
    assert inspect.iscoroutinefunction(AsyncCache.aclose)
    assert sync.keys() == async_.keys()
    assert sync == async_  # names, parameter names, kinds and defaults
    for name in sync:
        if sync[name] == "property" or name == "__init__":
            continue
        assert not inspect.iscoroutinefunction(getattr(Cache, name)), name
        assert inspect.iscoroutinefunction(getattr(AsyncCache, name)) == (name in IO_METHODS)
    assert set(IO_METHODS) <= sync.keys()


def test_the_front_door() -> None:
    assert set(distcache.__all__) >= {
        "Cache",
        "AsyncCache",
        "cached",
        "CacheError",
        "SerializationError",
        "JsonSerializer",
        "PickleSerializer",
        "CircuitBreaker",
        "CounterMetrics",
        "CacheMetrics",
    }
    assert distcache.CacheError is __import__("distkit").CacheError


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def cache() -> Cache:
    """A cache on a port nothing listens on: input errors must come before any I/O."""
    return Cache(connect({"port": free_port(), "connect_timeout": 0.2}), namespace="input")


@pytest.mark.parametrize("key", [1, b"bytes", None, ("a",), "", "tab\there", "nul\x00"])
def test_keys_of_the_wrong_type_or_form(cache: Cache, key: Any) -> None:
    for call in (
        lambda: cache.get(key),
        lambda: cache.set(key, 1),
        lambda: cache.delete(key),
        lambda: cache.get_or_set(key, lambda: 1),
        lambda: cache.get_many(["ok", key]),
        lambda: cache.set_many({key: 1}),
    ):
        with pytest.raises(ConfigError):
            call()


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "10", True])
def test_bad_ttls(cache: Cache, ttl: Any) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        cache.set("k", 1, ttl=ttl)
    with pytest.raises(ConfigError, match="ttl"):
        cache.get_or_set("k", lambda: 1, ttl=ttl)
    with pytest.raises(ConfigError, match="ttl"):
        Cache(cache._client, ttl=ttl)


@pytest.mark.parametrize(
    "tags", ["one", [""], ["a|b"], ["a,b"], ["a=b"], ["{x}"], [1], ["x" * 300], None]
)
def test_bad_tags(cache: Cache, tags: Any) -> None:
    with pytest.raises(ConfigError):
        cache.set("k", 1, tags=tags)
    if isinstance(tags, list):
        with pytest.raises(ConfigError):
            cache.invalidate_tags(*tags)


@pytest.mark.parametrize(
    "options",
    [
        {"namespace": "{x}"},
        {"namespace": ""},
        {"namespace": 3},
        {"prefix": "a{b"},
        {"negative_ttl": -1},
        {"fill_timeout": 0},
        {"strict": "yes"},
        {"max_value_size": -5},
        {"metrics": object()},
        {"clock": 5},
        {"retry": 3},
    ],
)
def test_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Cache(redis.Redis(), **options)


def test_a_client_of_the_wrong_kind(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="AsyncCache"):
        Cache(redis_server.async_client())
    with pytest.raises(ConfigError, match="use Cache"):
        AsyncCache(redis_server.client())
    with pytest.raises(ConfigError, match="redis-py client"):
        Cache(object())


def test_too_many_tags(cache: Cache) -> None:
    with pytest.raises(ConfigError, match="at most"):
        cache.set("k", 1, tags=[f"t{i}" for i in range(100)])


def test_repr_and_properties(r: redis.Redis) -> None:
    cache = Cache(r, namespace="p", ttl=12)
    assert repr(cache) == "<Cache namespace='p' ttl=12.0s>"
    assert cache.namespace == "p" and cache.ttl == 12.0
    assert cache.metrics is None and cache.breaker is not None
    assert Cache(r, breaker=False).breaker is None
