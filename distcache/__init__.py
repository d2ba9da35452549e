"""distcache: Redis caches with read-through, O(1) invalidation and stale-fill protection.

``Cache`` / ``AsyncCache`` store entries in a small versioned envelope (JSON by default, signed
pickle on opt-in), expire them on the server, invalidate them by key, by tag or by namespace in
O(1), refuse a read-through's result when it may predate an invalidation, and fail open (with a
circuit breaker) when Redis is down. ``@cached`` caches functions, coroutine functions and
methods under canonical keys; ``register_unkeyed`` keeps framework objects (a request, a
session) out of those keys. Errors: ``CacheError`` ⊃ ``SerializationError`` (``distkit``'s
tree); bad arguments raise ``ConfigError``.
"""

from distkit import CacheError, ConfigError, ConnectionUnavailable, SerializationError

from ._breaker import CircuitBreaker
from ._cache import AsyncCache, Cache
from ._decorator import (
    AsyncCachedFunction,
    AsyncCachedMethod,
    CachedFunction,
    CachedMethod,
    cached,
)
from ._keys import register_unkeyed
from ._metrics import CacheEvent, CacheMetrics, CounterMetrics
from ._near import NearCache
from ._serializers import JsonSerializer, PickleSerializer, Serializer
from ._stampede import Stampede

__all__ = [
    "AsyncCache",
    "AsyncCachedFunction",
    "AsyncCachedMethod",
    "Cache",
    "CacheError",
    "CacheEvent",
    "CacheMetrics",
    "CachedFunction",
    "CachedMethod",
    "CircuitBreaker",
    "ConfigError",
    "ConnectionUnavailable",
    "CounterMetrics",
    "JsonSerializer",
    "NearCache",
    "PickleSerializer",
    "SerializationError",
    "Serializer",
    "Stampede",
    "cached",
    "register_unkeyed",
]
