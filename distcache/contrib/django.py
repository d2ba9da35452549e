"""A Django cache backend on ``distcache``: ``BACKEND = "distcache.contrib.django.DistCache"``.

``LOCATION`` is a redis URL, or a list of ``host:port`` (or URLs) for a Redis Cluster's startup
nodes; ``OPTIONS["redis"]`` holds any other ``distkit.RedisConfig`` field (Sentinel: ``mode``,
``sentinels``, ``sentinel_service``; TLS, timeouts, pool size). The other ``OPTIONS`` are
``Cache`` options (see ``OPTION_NAMES``). Django's ``TIMEOUT`` is the default time to live
(``None``: no expiry, i.e. ``distkit``'s ten-year maximum; ``0`` or less: not stored, and
deleted). Values are pickled and HMAC-signed with a key derived from ``SECRET_KEY`` (entries
signed under ``SECRET_KEY_FALLBACKS`` still read), unless ``OPTIONS["serializer"]`` says
otherwise. The async methods run on an ``AsyncCache`` built for the running event loop, never
through ``sync_to_async``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings  # type: ignore[import-untyped]
from django.core.cache.backends.base import (  # type: ignore[import-untyped]
    DEFAULT_TIMEOUT,
    BaseCache,
)
from django.utils.crypto import salted_hmac  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]

from distkit import ConfigError, RedisConfig, SerializationError, aconnect, connect
from distkit._fork import renew_locks_after_fork
from distkit._units import MAX_SECONDS
from distlock import AsyncLock, Lock

from .. import AsyncCache, Cache, JsonSerializer, NearCache, PickleSerializer, Stampede
from .._serializers import Serializer

__all__ = ["OPTION_NAMES", "DistCache"]

# OPTIONS passed to ``Cache`` as they are (after the conversions below).
OPTION_NAMES = frozenset(
    {
        "namespace",
        "prefix",
        "serializer",
        "near_cache",
        "stampede",
        "breaker",
        "metrics",
        "strict",
        "shards",
        "max_value_size",
        "fill_timeout",
        "early_refresh",
        "stale_while_revalidate",
        "stale_if_error",
        "stale_if_error_max_bytes",
        "max_background",
        "miss_deadline",
        "retry",
    }
)
_SALT = "distcache.contrib.django.DistCache"


def _signing_keys() -> list[str]:
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())]
    return [salted_hmac(_SALT, "pickle", secret=s, algorithm="sha256").hexdigest() for s in secrets]


def _serializer(value: Any) -> Serializer:
    if value is None or value == "pickle":
        return PickleSerializer(_signing_keys())
    if value == "json":
        return JsonSerializer()
    if isinstance(value, str):
        value = import_string(value)
    if isinstance(value, type):
        value = value()
    if not isinstance(value, Serializer):
        raise ConfigError(
            f"OPTIONS['serializer'] must be 'pickle', 'json' or a Serializer: {value!r}"
        )
    return value


def _redis_config(location: Any, extra: Mapping[str, Any]) -> RedisConfig:
    """``LOCATION`` (a URL, or Cluster startup nodes) plus ``OPTIONS['redis']``."""
    if isinstance(location, (list, tuple)):
        nodes = []
        for node in location:
            parts = urlsplit(node if "://" in node else f"redis://{node}")
            nodes.append(f"{parts.hostname}:{parts.port or 6379}")
        return RedisConfig(**{"mode": "cluster", "cluster_nodes": nodes, **extra})
    if location:
        return RedisConfig(str(location), **extra)
    return RedisConfig(**extra)


def _cache_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - OPTION_NAMES - {"redis"}
    if unknown:
        raise ConfigError(
            f"DistCache: unknown OPTIONS {sorted(unknown)}; known: {sorted(OPTION_NAMES)}"
        )
    out = {k: v for k, v in options.items() if k != "redis"}
    out.setdefault("namespace", "django")
    out["serializer"] = _serializer(options.get("serializer"))
    near = options.get("near_cache")
    if near is True:
        out["near_cache"] = NearCache()
    elif isinstance(near, Mapping):
        out["near_cache"] = NearCache(**near)
    elif near is False:
        out["near_cache"] = None
    stampede = options.get("stampede", Stampede())
    if isinstance(stampede, Mapping):
        out["stampede"] = Stampede(**stampede)
    elif stampede is False:
        out["stampede"] = None
    metrics = options.get("metrics")
    if isinstance(metrics, str):
        out["metrics"] = import_string(metrics)()
    return out


class _Shared:
    """One sync ``Cache`` and one ``AsyncCache`` per event loop, for every backend instance
    with the same settings in this process (Django builds one instance per thread)."""

    _FORK_LOCKS = ("lock",)

    def __init__(self, config: RedisConfig, options: dict[str, Any]) -> None:
        self.config = config
        self.options = options
        self.lock = threading.Lock()
        renew_locks_after_fork(self)
        self.sync: Cache | None = None
        self.by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncCache] = (
            weakref.WeakKeyDictionary()
        )

    def cache(self) -> Cache:
        with self.lock:
            if self.sync is None:
                self.sync = Cache(connect(self.config), **self.options)
            return self.sync

    def acache(self) -> AsyncCache:
        loop = asyncio.get_running_loop()
        with self.lock:
            found = self.by_loop.get(loop)
            if found is None:
                # a finished loop's cache holds that loop alive (its sockets): drop it, and stop
                # its near cache's listener (asyncio.run / async_to_sync: one loop per call)
                for dead in [done for done in self.by_loop if done.is_closed()]:
                    stale = self.by_loop.pop(dead)
                    if stale._near is not None:
                        stale._near.close()
                found = self.by_loop[loop] = AsyncCache(aconnect(self.config), **self.options)
            return found


_SHARED: dict[tuple[Any, ...], _Shared] = {}
_SHARED_LOCK = threading.Lock()


def _renew_shared_lock() -> None:
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()  # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_renew_shared_lock)


def _shared(location: Any, options: Mapping[str, Any]) -> _Shared:
    # the pid: a forked child builds its own clients (sockets are never shared across fork)
    key = (os.getpid(), repr(location), repr(sorted(options.items(), key=lambda kv: kv[0])))
    with _SHARED_LOCK:
        found = _SHARED.get(key)
        if found is None:
            config = _redis_config(location, options.get("redis", {}))
            found = _SHARED[key] = _Shared(config, _cache_options(options))
        return found


def _unpickled(exc: SerializationError) -> BaseException:
    """Django's callers expect the serializer's own error (``pickle.PickleError``...) for a
    value it cannot encode; a too large value stays a ``SerializationError``."""
    cause = exc.__cause__
    return cause if isinstance(cause, Exception) else exc


class DistCache(BaseCache):  # type: ignore[misc]
    """Django's cache API on a distcache ``Cache`` / ``AsyncCache`` (fail-open reads, fills
    refused after a write or invalidation, stampede control, tags, fenced locks)."""

    def __init__(self, server: Any, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._shared = _shared(server, params.get("OPTIONS", {}))

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def cache(self) -> Cache:
        """The sync ``distcache.Cache`` this backend runs on (built on first use)."""
        return self._shared.cache()

    def acache(self) -> AsyncCache:
        """The ``distcache.AsyncCache`` of the running event loop (built on first use)."""
        return self._shared.acache()

    def _ttl(self, timeout: Any) -> float:
        """Django's timeout in seconds: ``None`` is no expiry (ten years); ``0`` not stored.

        Raises:
            ConfigError: not a number (NaN included), before any I/O.
        """
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return MAX_SECONDS
        try:
            ttl = float(timeout)
        except OverflowError:  # an int beyond float range: capped as any long timeout
            ttl = math.inf if timeout > 0 else -math.inf
        except (TypeError, ValueError):
            ttl = math.nan
        if math.isnan(ttl):  # NaN would compare as "0 or less" and delete the key
            raise ConfigError(
                f"a cache timeout must be a number of seconds or None, got {timeout!r:.80}"
            )
        return max(0.0, min(ttl, MAX_SECONDS))

    def get_backend_timeout(self, timeout: Any = DEFAULT_TIMEOUT) -> float | None:
        """The time to live in seconds (``None``: no expiry; ``0``: not stored)."""
        ttl = self._ttl(timeout)
        return None if ttl == MAX_SECONDS else ttl

    def _keys(self, keys: Iterable[Any], version: int | None) -> dict[str, Any]:
        return {self.make_and_validate_key(key, version=version): key for key in keys}

    # -- the Django API ------------------------------------------------------------------------
    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """The cached value, or ``default``."""
        return self.cache.get(self.make_and_validate_key(key, version=version), default)

    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        """Store ``value`` (tagged with ``tags``); a timeout of ``0`` or less deletes the key."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            self.cache.delete(rkey)
            return
        try:
            self.cache.set(rkey, value, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc

    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Store ``value`` only if the key holds nothing; ``True`` if stored."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        try:
            if ttl == 0:  # as Django's RedisCache: stored and gone at once
                self.cache._core.encode(rkey, value, None)
                return self.cache.ttl_of(rkey) is None
            return self.cache.add(rkey, value, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        """A new timeout for a cached key; ``False`` if it is not cached."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            return self.cache.delete(rkey)
        return self.cache.touch(rkey, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        """Remove the key; ``True`` if it was cached."""
        return self.cache.delete(self.make_and_validate_key(key, version=version))

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """The cached ones among ``keys``."""
        names = self._keys(keys, version)
        return {names[k]: v for k, v in self.cache.get_many(names).items()}

    def has_key(self, key: Any, version: int | None = None) -> bool:
        """Whether the key is cached (``None`` counts as a value)."""
        missing = object()
        return self.get(key, missing, version=version) is not missing

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Add ``delta`` to a cached number (expiry kept); ``ValueError`` if it is not cached.

        As Django's ``BaseCache.incr`` (``LocMemCache``, ``DatabaseCache``...): the new value is
        ``value + delta``, so a float delta or value gives a float, and a value that cannot be
        added to raises ``TypeError``. Atomic against other writers (a compare-and-set of the
        entry, as ``distcache.Cache.incr``).
        """
        rkey = self.make_and_validate_key(key, version=version)
        try:
            return self.cache._combine(rkey, lambda value: value + delta)
        except KeyError:
            raise ValueError(f"Key '{key}' not found") from None

    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> list[Any]:
        """Store every item; the keys that could not be stored (all of them if Redis failed)."""
        if not data:
            return []
        names = self._keys(data, version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            self.cache.delete_many(names)
            return []
        values = {rkey: data[key] for rkey, key in names.items()}
        try:
            stored = self.cache.set_many(values, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc
        return [] if stored else list(data)

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """Remove every key."""
        names = self._keys(keys, version)
        if names:
            self.cache.delete_many(names)

    def clear(self) -> None:
        """Make every entry of the namespace a miss (every alias sharing the namespace)."""
        self.cache.clear()

    def close(self, **kwargs: Any) -> None:
        """Nothing: Django calls this after every request; the pooled clients stay open."""

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> Any:
        """The cached value; on a miss ``default`` (called if callable) is stored and returned,
        with stampede control (one caller computes it) and refused if the key changed meanwhile.
        """
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        loader: Callable[[], Any] = default if callable(default) else (lambda: default)
        if ttl == 0:
            missing = object()
            found = self.cache.get(rkey, missing)
            return loader() if found is missing else found
        return self.cache.get_or_set(rkey, loader, ttl=ttl, tags=tags)

    # -- beyond Django's API -------------------------------------------------------------------
    def ttl(self, key: Any, version: int | None = None) -> float | None:
        """Seconds left (django-redis's ``ttl``): ``None`` without expiry, ``0`` if not cached."""
        left = self.cache.ttl_of(self.make_and_validate_key(key, version=version))
        if left is None:
            return 0
        return None if left > MAX_SECONDS - 366 * 24 * 3600 else left

    def invalidate_tags(self, *tags: str) -> None:
        """Make every entry tagged with any of ``tags`` a miss (fills in flight are refused)."""
        self.cache.invalidate_tags(*tags)

    def lock(self, name: str, ttl: float = 30.0, **kwargs: Any) -> Lock:
        """A fenced ``distlock.Lock`` on this cache's connection (``with cache.lock(...)``)."""
        kwargs.setdefault("prefix", self._shared.options.get("prefix", "distkit"))
        return Lock(self.cache._client, name, ttl=ttl, **kwargs)

    def alock(self, name: str, ttl: float = 30.0, **kwargs: Any) -> AsyncLock:
        """The ``AsyncLock`` twin of ``lock`` on the running loop's connection."""
        kwargs.setdefault("prefix", self._shared.options.get("prefix", "distkit"))
        lock: AsyncLock = AsyncLock(self.acache()._client, name, ttl=ttl, **kwargs)
        return lock

    # -- async, served by AsyncCache -----------------------------------------------------------
    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        """``get`` on the running loop's ``AsyncCache``."""
        return await self.acache().get(self.make_and_validate_key(key, version=version), default)

    async def aset(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        """``set`` on the running loop's ``AsyncCache``."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            await self.acache().delete(rkey)
            return
        try:
            await self.acache().set(rkey, value, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc

    async def aadd(
        self,
        key: Any,
        value: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """``add`` on the running loop's ``AsyncCache``."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        cache = self.acache()
        try:
            if ttl == 0:
                cache._core.encode(rkey, value, None)
                return await cache.ttl_of(rkey) is None
            return await cache.add(rkey, value, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        """``touch`` on the running loop's ``AsyncCache``."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            return await self.acache().delete(rkey)
        return await self.acache().touch(rkey, ttl)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        """``delete`` on the running loop's ``AsyncCache``."""
        return await self.acache().delete(self.make_and_validate_key(key, version=version))

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        """``get_many`` on the running loop's ``AsyncCache``."""
        names = self._keys(keys, version)
        return {names[k]: v for k, v in (await self.acache().get_many(names)).items()}

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        """``has_key`` on the running loop's ``AsyncCache``."""
        missing = object()
        return await self.aget(key, missing, version=version) is not missing

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """``incr`` on the running loop's ``AsyncCache``."""
        rkey = self.make_and_validate_key(key, version=version)
        try:
            return await self.acache()._combine(rkey, lambda value: value + delta)
        except KeyError:
            raise ValueError(f"Key '{key}' not found") from None

    async def aset_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> list[Any]:
        """``set_many`` on the running loop's ``AsyncCache``."""
        if not data:
            return []
        names = self._keys(data, version)
        ttl = self._ttl(timeout)
        if ttl == 0:
            await self.acache().delete_many(names)
            return []
        values = {rkey: data[key] for rkey, key in names.items()}
        try:
            stored = await self.acache().set_many(values, ttl=ttl, tags=tags)
        except SerializationError as exc:
            raise _unpickled(exc) from exc
        return [] if stored else list(data)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        """``delete_many`` on the running loop's ``AsyncCache``."""
        names = self._keys(keys, version)
        if names:
            await self.acache().delete_many(names)

    async def aclear(self) -> None:
        """``clear`` on the running loop's ``AsyncCache``."""
        await self.acache().clear()

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing, as ``close``."""

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
        tags: Iterable[str] = (),
    ) -> Any:
        """``get_or_set`` on the running loop's ``AsyncCache`` (``default`` may be a sync or
        async callable)."""
        rkey = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)

        async def loader() -> Any:
            value = default() if callable(default) else default
            return await value if inspect.isawaitable(value) else value

        cache = self.acache()
        if ttl == 0:
            missing = object()
            found = await cache.get(rkey, missing)
            return await loader() if found is missing else found
        return await cache.get_or_set(rkey, loader, ttl=ttl, tags=tags)

    async def ainvalidate_tags(self, *tags: str) -> None:
        """``invalidate_tags`` on the running loop's ``AsyncCache``."""
        await self.acache().invalidate_tags(*tags)

    async def attl(self, key: Any, version: int | None = None) -> float | None:
        """``ttl`` on the running loop's ``AsyncCache``."""
        left = await self.acache().ttl_of(self.make_and_validate_key(key, version=version))
        if left is None:
            return 0
        return None if left > MAX_SECONDS - 366 * 24 * 3600 else left
