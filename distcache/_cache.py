"""``Cache`` and ``AsyncCache``: thin sync / asyncio twins over one ``CacheCore``.

Both twins validate and encode through the core, send the hit path's single ``MGET`` themselves
(no generator, no step objects: the hit path must cost no more than a raw ``GET``), and drive
every other protocol with distkit's drivers. Reads and fills fail open; invalidations never do,
because a lost invalidation would let a stale entry be served once Redis is back.
"""

from __future__ import annotations

import asyncio
import random as _random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from typing_extensions import TypeVar as DefaultTypeVar

from distkit import ConfigError, RetryConfig, RetryPolicy
from distkit._config import seconds
from distkit._protocol import AsyncDriver, SyncDriver, monotonic

from . import _handshake, _update
from ._breaker import CircuitBreaker
from ._core import (
    DEFAULT_MAX_VALUE_SIZE,
    FAILED,
    FAILURES,
    CacheCore,
    Check,
    Clock,
    Entry,
    Miss,
    Seconds,
    TagArgs,
    _ms,
    check_client,
    retry_policy,
    shard_count,
)
from ._metrics import CacheEvent, CacheMetrics
from ._near import ABSENT, NearCache, NearStore, finalizer
from ._serializers import Serializer
from ._stampede import DEFAULT_STALE_BYTES, AsyncFlow, Call, ReadThrough, Stampede, SyncFlow
from ._stampede import miss_deadline as miss_deadline_of

if TYPE_CHECKING:
    from distkit import AsyncClient, SyncClient

__all__ = ["AsyncCache", "Cache"]

_T = TypeVar("_T")
_D = TypeVar("_D")
# The type of the cache's values, for type checkers only: ``cache: Cache[User] = Cache(...)``
# (unannotated: ``Cache[Any]``). The decoding type at run time is ``value_type=``.
_V = DefaultTypeVar("_V", default=Any)
_C = TypeVar("_C", bound="SyncClient | AsyncClient")


def _delta(delta: object) -> int:
    """``incr``'s ``delta``: an int (``ConfigError`` otherwise: a bool or float is a bug)."""
    if type(delta) is not int:
        raise ConfigError(f"delta must be an int, got {delta!r:.80}")
    return delta


class _CacheBase(Generic[_C, _V]):
    """What both twins share: construction, validation and read-only state."""

    _is_async = False
    _execute: Any  # the client's execute_command, sync or async

    def __init__(
        self,
        client: _C,
        *,
        namespace: str = "default",
        ttl: Seconds = 300.0,
        negative_ttl: Seconds | None = None,
        value_type: Any = None,
        serializer: Serializer | None = None,
        prefix: str = "distkit",
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        fill_timeout: Seconds = 60.0,
        strict: bool = False,
        breaker: CircuitBreaker | bool = True,
        metrics: CacheMetrics | None = None,
        retry: RetryConfig | RetryPolicy | None = None,
        clock: Clock = monotonic,
        shards: int | None = None,
        stampede: Stampede | None = Stampede(),  # noqa: B008 - a frozen value
        early_refresh: float = 1.0,
        stale_while_revalidate: Seconds = 0.0,
        stale_if_error: Seconds = 0.0,
        stale_if_error_max_bytes: int = DEFAULT_STALE_BYTES,
        max_background: int = 4,
        random: Callable[[], float] = _random.random,
        near_cache: NearCache | None = None,
        miss_deadline: Seconds | None = None,
    ) -> None:
        check_client(client, want_async=self._is_async, cls=type(self).__name__)
        self._core = CacheCore(
            namespace=namespace,
            ttl=ttl,
            negative_ttl=negative_ttl,
            value_type=value_type,
            serializer=serializer,
            prefix=prefix,
            max_value_size=max_value_size,
            fill_timeout=fill_timeout,
            strict=strict,
            breaker=breaker,
            metrics=metrics,
            clock=clock,
            shards=shard_count(shards, client),
        )
        self._client = client
        self._retry = retry_policy(retry, client)
        # The hit path sends its MGET itself; with retries configured, the drivers do it all.
        self._fast = self._retry.attempts == 1
        self._policy = ReadThrough(
            self._core,
            stampede=stampede,
            early_refresh=early_refresh,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            max_background=max_background,
            random=random,
            clock=self._core.clock,
            prefix=prefix,
            miss_deadline=miss_deadline_of(miss_deadline, client),
            stale_if_error_max_bytes=stale_if_error_max_bytes,
        )
        self._execute = client.execute_command
        self._setup_io()
        self._near: NearStore | None = None
        if near_cache is not None:
            if not isinstance(near_cache, NearCache):
                raise ConfigError(f"near_cache must be a NearCache, got {near_cache!r:.80}")
            self._near = NearStore(near_cache, self._core, client)
            finalizer(self, self._near)

    def _setup_io(self) -> None:
        raise NotImplementedError

    @property
    def namespace(self) -> str:
        """The namespace: the unit of ``clear()`` (its entries spread over ``shards`` slots)."""
        return self._core.namespace

    @property
    def shards(self) -> int:
        """How many hash slots the namespace's entries spread over (1: all on one slot)."""
        return self._core.shards

    @property
    def key_prefixes(self) -> tuple[str, ...]:
        """One Redis key prefix per shard; every key of the namespace starts with one of them,
        and all keys under one prefix share a Cluster slot (for tracking / invalidation)."""
        return self._core.shard_prefixes()

    @property
    def ttl(self) -> float:
        """The default time to live of entries, in seconds."""
        return self._core.ttl

    @property
    def metrics(self) -> CacheMetrics | None:
        """The metrics hook events are reported to (``None``: not counted)."""
        return self._core.metrics

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The circuit breaker guarding reads and fills (``None``: disabled)."""
        return self._core.breaker

    @property
    def near_cache(self) -> NearCache | None:
        """The near cache's options (``None``: no L1, every read asks Redis)."""
        return None if self._near is None else self._near.config

    def _near_found(self, rkey: str, type_: Any, found: Any, stamp: Any) -> Any:
        """``_lookup``'s outcome of a Redis read made for the near cache (an L1 miss)."""
        if found.__class__ is not Entry:
            return found  # a Miss, or FAILED
        core = self._core
        if found.expires_ms <= core.now_ms():  # kept for stale serving: a miss for get()
            core.emit(CacheEvent.MISS)
            return found.miss()
        core.emit(CacheEvent.HIT)
        assert self._near is not None
        self._near.put(rkey, type_, found, stamp)
        return found.value

    def _forget(self, rkeys: list[str]) -> None:
        """Drop this process's copies of ``rkeys``: L1 and stale_if_error's (after a local
        write, delete or fill)."""
        self._policy.forget(rkeys)
        if self._near is not None:
            self._near.evict(rkeys)

    def _near_many(
        self, keys: list[str], rkeys: list[str]
    ) -> tuple[dict[str, Any], list[str], list[str]]:
        """``get_many``'s L1 pass: the hits served from memory, and the keys left for Redis."""
        near = self._near
        if near is None:
            return {}, keys, rkeys
        found: dict[str, Any] = {}
        rest: list[str] = []
        rest_r: list[str] = []
        type_ = self._core.value_type
        for key, rkey in zip(keys, rkeys, strict=True):
            entry = near.get(rkey, type_)
            if entry is ABSENT:
                rest.append(key)
                rest_r.append(rkey)
            else:
                found[key] = entry.value
        return found, rest, rest_r

    @staticmethod
    def _merged(found: dict[str, Any], keys: list[str], values: list[Any]) -> dict[str, Any]:
        for key, value in zip(keys, values, strict=True):
            if value.__class__ is not Miss:
                found[key] = value
        return found

    def __repr__(self) -> str:
        return f"<{type(self).__name__} namespace={self.namespace!r} ttl={self.ttl}s>"


class Cache(_CacheBase["SyncClient", _V]):
    """A Redis cache: TTLs, read-through, tag and namespace invalidation, safe serialization.

    Args:
        client: a sync redis-py client (``redis.Redis``, ``RedisCluster``, a Sentinel master).
        namespace: the cache's namespace; ``clear()`` empties it.
        ttl: default time to live (seconds or ``timedelta``); entries expire on the server.
        negative_ttl: time to live of a loader's ``None`` result (``0``: never cache ``None``;
            ``None``: like any value).
        value_type: the type values decode to (a pydantic model, dataclass, ``list[X]``...).
        serializer: ``JsonSerializer()`` by default; ``PickleSerializer(keys)`` on opt-in.
        prefix: key prefix (``{prefix}:cache:{namespace}:...``).
        max_value_size: largest encoded value in bytes; larger ones raise ``SerializationError``.
        fill_timeout: a read-through whose loader takes longer does not store its result.
        strict: raise Redis errors instead of failing open.
        breaker: ``True`` (a default ``CircuitBreaker``), ``False``, or a breaker to share.
        metrics: a hook receiving events (``CounterMetrics()`` counts them in memory).
        retry: retry transient errors of reads and writes (default: no retries).
        clock: monotonic clock in seconds (injectable for tests).
        shards: hash slots the namespace's entries spread over (``crc32(key) % shards``), each
            with its own copy of the epoch and generation records; ``None``: 1 on one server,
            16 on a ``RedisCluster`` client. Every process sharing a namespace must use the
            same value (it is part of the key layout, like ``prefix``).
        near_cache: ``NearCache(...)`` keeps hits in process memory, evicted by Redis-pushed
            invalidations (``docs/cache.md``, "Near cache"); ``close()`` stops its listener.
        stampede: how concurrent misses of a key collapse into one loader call
            (``Stampede(lock=True, wait=10.0, on_timeout="load", lock_ttl=30.0)``: in-process
            single-flight plus a ``distlock`` fill lock, bounded waits); ``None``: no control.
        early_refresh: XFetch's β: a read refreshes a fresh entry in the background when
            ``now - δ·β·ln(rand()) >= expiry`` (δ: the loader's measured time); 0: never. Any
            finite β >= 0 is accepted; a huge one (``1e9``) refreshes on nearly every read.
        stale_while_revalidate: seconds after expiry during which ``get_or_set`` returns the
            expired value at once and refreshes it in the background (0: off).
        stale_if_error: seconds after expiry during which ``get_or_set`` returns the expired
            value if the loader raises or Redis is down (0: off). Entries live ``ttl`` plus
            the larger window in Redis: no value is ever served later than that.
        stale_if_error_max_bytes: with ``stale_if_error``, the last values of up to 1024 keys
            are kept in process memory (for when Redis is down); their serialized sizes add
            up to at most this many bytes (default 64 MiB; least recently used go first, a
            larger value is not kept). They are kept serialized and decoded anew on each
            serve (what is served is what was stored, not a caller's mutated object); a
            decoded value may take several times its serialized size (JSON: about 9x).
        max_background: background refreshes running at once, at most (one per key). 0: none
            at all: early refresh never fires, and ``stale_while_revalidate`` serves the stale
            value until its window ends, then loads inline.
        random: uniform ``[0, 1)`` source for XFetch (injectable: a seeded ``Random().random``);
            a draw outside ``[0, 1)`` raises ``ConfigError``.
        miss_deadline: the longest a read-through miss spends on Redis, not counting its
            loader or its wait for another caller's load (seconds or ``timedelta``); then the
            remaining Redis steps are skipped (fail-open: the loader's result, not stored).
            ``None``: twice the client's socket timeout (10 s if it has none).

    Raises:
        ConfigError: an argument is invalid.
    """

    _driver: SyncDriver

    def _setup_io(self) -> None:
        self._driver = SyncDriver(self._client, self._retry, f"cache {self.namespace!r}")
        self._flow = SyncFlow(self, self._policy)
        _handshake.install(self._client)  # a fresh connection's handshake obeys miss_deadline

    def _near_lookup(self, rkey: str, type_: Any) -> Any:
        """``_lookup`` through the near cache: L1 first; a hit read from Redis fills L1."""
        near = self._near
        assert near is not None
        found = near.get(rkey, type_)
        if found is not ABSENT:
            return found.value
        stamp = near.stamp(rkey)  # before the read: put() refuses it if an invalidation came
        core = self._core
        if not core.allow():
            return FAILED
        try:
            found = self._driver.run(core.read_entry(rkey, type_))
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        core.succeeded()
        return self._near_found(rkey, type_, found, stamp)

    def _lookup(self, rkey: str, type_: Any) -> Any:
        """The value of a hit, a ``Miss``, or ``FAILED`` (Redis failed; already accounted for)."""
        if self._near is not None:
            return self._near_lookup(rkey, type_)
        core = self._core
        breaker = core.breaker
        if self._fast and (breaker is None or breaker.healthy):
            try:
                raw, epoch = self._execute("MGET", rkey, core.epoch_of(rkey))
            except FAILURES as exc:
                core.failed(exc)
                return FAILED
            value = core.decode(raw, epoch, type_)
            if value.__class__ is not Check:
                return value
            protocol = core.recheck(rkey, value, type_)
        else:
            protocol = core.read(rkey, type_)
        if not core.allow():
            protocol.close()
            return FAILED
        try:
            value = self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        core.succeeded()
        return value

    @overload
    def get(self, key: str) -> _V | None: ...
    @overload
    def get(self, key: str, default: _D) -> _V | _D: ...
    def get(self, key: str, default: Any = None) -> Any:
        """The cached value of ``key``, or ``default`` on a miss (or when Redis fails).

        Raises:
            ConfigError: ``key`` is not a valid key.
        """
        core = self._core
        value = self._lookup(core.entry_key(key), core.value_type)
        return default if value.__class__ is Miss or value is FAILED else value

    def get_many(self, keys: Iterable[str]) -> dict[str, _V]:
        """The hits among ``keys``, by key: from L1 first, then one round trip per shard.

        Raises:
            ConfigError: a key is not valid.
        """
        core = self._core
        keys = list(keys)
        rkeys = [core.entry_key(k) for k in keys]
        found, keys, rkeys = self._near_many(keys, rkeys)
        if not keys or not core.allow():
            return found
        try:
            values = self._driver.run(core.read_many(rkeys, core.value_type))
        except FAILURES as exc:
            core.failed(exc)
            return found
        core.succeeded()
        return self._merged(found, keys, values)

    def set(
        self, key: str, value: _V, *, ttl: Seconds | None = None, tags: Iterable[str] = ()
    ) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` (default: the cache's), tagged with ``tags``.

        Returns ``False`` if Redis could not be reached (``strict``: raises instead).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: ``value`` cannot be encoded, or exceeds ``max_value_size``.
        """
        prepared = self._core.prepare([(key, value)], ttl, tags, self._core.value_type)
        return self._write(prepared)

    def set_many(
        self,
        mapping: Mapping[str, _V],
        *,
        ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Store every item of ``mapping`` (one trip per shard); ``False`` if Redis failed.

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: a value cannot be encoded, or exceeds ``max_value_size``.
        """
        prepared = self._core.prepare(mapping.items(), ttl, tags, self._core.value_type)
        if not prepared.keys:
            return True
        return self._write(prepared)

    def _write(self, prepared: Any) -> bool:
        core = self._core
        if not core.allow():  # circuit open: nothing written, yet this process's copies go (C8)
            self._forget(prepared.keys)
            return False
        try:
            self._driver.run(core.write(prepared))
        except FAILURES as exc:
            core.failed(exc)
            return False
        finally:
            self._forget(prepared.keys)
        core.succeeded()
        return True

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], _T],
        *,
        ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> _T:
        """The cached value of ``key``; on a miss, ``loader()``'s result, stored unless stale.

        The result is not stored if ``key`` was deleted or set, or its tags or the namespace
        invalidated, while the loader ran. With Redis down, returns ``loader()`` (fail-open).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: the loader's result cannot be encoded.
        """
        core = self._core
        ttl_s, neg, tag_args = core.check_fill_args(ttl, core.negative_ttl, tags)
        return self._get_or_set(
            core.entry_key(key), loader, (), {}, ttl_s, neg, tag_args, core.value_type
        )

    def _get_or_set(
        self,
        rkey: str,
        loader: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ttl: float,
        negative_ttl: float | None,
        tags: TagArgs,
        type_: Any,
    ) -> _T:
        """``get_or_set`` with validated arguments (the decorator validates once, up front)
        and the Redis key ``rkey``; the loader is called as ``loader(*args, **kwargs)``."""
        call = Call(rkey, loader, args, kwargs, ttl, negative_ttl, tags, type_)
        return self._flow.get_or_set(call)  # type: ignore[no-any-return]

    def drain(self, timeout: Seconds | None = None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: as long as it takes) for the background
        refreshes of early refresh / stale-while-revalidate; ``False`` if some still run."""
        limit = None if timeout is None else seconds(timeout, field="timeout", allow_zero=True)
        return self._flow.drain(limit)

    def delete(self, key: str) -> bool:
        """Remove ``key`` (and refuse fills that read it before); ``True`` if it was cached.

        Raises:
            ConfigError: ``key`` is not a valid key.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        core = self._core
        rkey = core.entry_key(key)
        try:
            return bool(self._invalidate(core.delete(rkey)))
        finally:
            self._forget([rkey])

    def invalidate_tags(self, *tags: str) -> None:
        """Make every entry tagged with any of ``tags`` a miss, in O(number of tags).

        Raises:
            ConfigError: a tag is not valid.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        names, record_keys = self._core.tags(tags)
        if record_keys:
            try:
                self._invalidate(self._core.bump(record_keys))
            finally:
                self._policy.forget_tags(names)
                if self._near is not None:
                    self._near.evict_tags(names)

    def clear(self) -> None:
        """Make every entry of the namespace a miss, in O(1).

        Raises:
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        try:
            self._invalidate(self._core.bump([self._core.ns_key]))
        finally:
            self._policy.forget_all()
            if self._near is not None:
                self._near.flush()

    def close(self) -> None:
        """Stop the near cache's listener threads and empty it (the client stays open)."""
        if self._near is not None:
            self._near.close()

    def _invalidate(self, protocol: Any) -> Any:
        core = self._core
        try:
            out = self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc, fail_open=False)
            raise  # pragma: no cover - failed() raises when fail_open is false
        core.succeeded()
        return out

    # -- conditional updates (``_update.py``): every write refuses the fills that read before --
    def _apply(self, protocol: Any, rkeys: list[str], *, fail_open: bool, failed: Any) -> Any:
        """Run an update protocol; Redis failures return ``failed`` (``fail_open``) or raise."""
        core = self._core
        if fail_open and not core.allow():
            protocol.close()
            self._forget(rkeys)
            return failed
        try:
            out = self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc, fail_open=fail_open)
            return failed
        finally:
            self._forget(rkeys)
        core.succeeded()
        return out

    def add(
        self, key: str, value: _V, *, ttl: Seconds | None = None, tags: Iterable[str] = ()
    ) -> bool:
        """Store ``value`` under ``key`` only if no live entry is there; ``True`` if stored.

        Like ``set``, a stored value refuses the read-through fills that read the key before.
        Returns ``False`` if Redis could not be reached (``strict``: raises instead).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: ``value`` cannot be encoded, or exceeds ``max_value_size``.
        """
        core = self._core
        p = core.prepare([(key, value)], ttl, tags, core.value_type)
        protocol = _update.add(
            core, p.keys[0], p.entries[0][1], p.ttl_ms, p.tag_names, core.value_type
        )
        return bool(self._apply(protocol, p.keys, fail_open=True, failed=False))

    def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the int stored under ``key`` (expiry and tags kept); the new value.

        Raises:
            KeyError: no live entry under ``key``.
            TypeError: the value is not an int.
            ConfigError: ``key`` is not a valid key.
            ConnectionUnavailable: Redis could not be reached (a count never fails open).
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.incr(core, rkey, _delta(delta), core.value_type)
        try:
            return int(self._apply(protocol, [rkey], fail_open=False, failed=None))
        except KeyError:
            raise KeyError(key) from None  # the caller's key, not a long key's hashed Redis key

    def decr(self, key: str, delta: int = 1) -> int:
        """``incr(key, -delta)``."""
        return self.incr(key, -_delta(delta))

    def _combine(self, key: str, fn: Callable[[Any], Any]) -> Any:
        """Replace the live value under ``key`` by ``fn(value)`` as ``incr`` does (expiry and
        tags kept); the new value. For adapters (Django's ``incr`` is ``value + delta``).

        Raises:
            KeyError: no live entry under ``key``.
            ConnectionUnavailable: Redis could not be reached.
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.combine(core, rkey, fn, core.value_type)
        return self._apply(protocol, [rkey], fail_open=False, failed=None)

    def touch(self, key: str, ttl: Seconds | None = None) -> bool:
        """Give the live entry under ``key`` a new ``ttl`` (default: the cache's), from now;
        ``False`` if there is none or Redis could not be reached (``strict``: raises).

        Raises:
            ConfigError: invalid key or ttl.
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.touch(core, rkey, _ms(core.ttl_for(ttl)), core.value_type)
        return bool(self._apply(protocol, [rkey], fail_open=True, failed=False))

    def ttl_of(self, key: str) -> float | None:
        """Seconds left before the entry under ``key`` expires; ``None`` if none is live (or
        Redis could not be reached).

        Raises:
            ConfigError: ``key`` is not a valid key.
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.ttl_of(core, rkey, core.value_type)
        out: float | None = self._apply(protocol, [], fail_open=True, failed=None)
        return out

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove every key in ``keys`` as ``delete`` does (one script per shard); how many
        were cached.

        Raises:
            ConfigError: a key is not valid.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        core = self._core
        rkeys = [core.entry_key(k) for k in keys]
        if not rkeys:
            return 0
        return int(self._apply(_update.delete_many(core, rkeys), rkeys, fail_open=False, failed=0))


class AsyncCache(_CacheBase["AsyncClient", _V]):
    """The asyncio twin of ``Cache`` (same arguments; takes a ``redis.asyncio`` client)."""

    _is_async = True

    _driver: AsyncDriver

    def _setup_io(self) -> None:
        self._driver = AsyncDriver(self._client, self._retry, f"cache {self.namespace!r}")
        self._flow = AsyncFlow(self, self._policy)

    async def _near_lookup(self, rkey: str, type_: Any) -> Any:
        """``_lookup`` through the near cache: L1 first; a hit read from Redis fills L1."""
        near = self._near
        assert near is not None
        found = near.get(rkey, type_)
        if found is not ABSENT:
            return found.value
        stamp = near.stamp(rkey)  # before the read: put() refuses it if an invalidation came
        core = self._core
        if not core.allow():
            return FAILED
        try:
            found = await self._driver.run(core.read_entry(rkey, type_))
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        core.succeeded()
        return self._near_found(rkey, type_, found, stamp)

    async def _lookup(self, rkey: str, type_: Any) -> Any:
        """The value of a hit, a ``Miss``, or ``FAILED`` (Redis failed; already accounted for)."""
        if self._near is not None:
            return await self._near_lookup(rkey, type_)
        core = self._core
        breaker = core.breaker
        if self._fast and (breaker is None or breaker.healthy):
            try:
                raw, epoch = await self._driver.execute("MGET", rkey, core.epoch_of(rkey))
            except FAILURES as exc:
                core.failed(exc)
                return FAILED
            value = core.decode(raw, epoch, type_)
            if value.__class__ is not Check:
                return value
            protocol = core.recheck(rkey, value, type_)
        else:
            protocol = core.read(rkey, type_)
        if not core.allow():
            protocol.close()
            return FAILED
        try:
            value = await self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        core.succeeded()
        return value

    @overload
    async def get(self, key: str) -> _V | None: ...
    @overload
    async def get(self, key: str, default: _D) -> _V | _D: ...
    async def get(self, key: str, default: Any = None) -> Any:
        """The cached value of ``key``, or ``default`` on a miss (or when Redis fails).

        Raises:
            ConfigError: ``key`` is not a valid key.
        """
        core = self._core
        value = await self._lookup(core.entry_key(key), core.value_type)
        return default if value.__class__ is Miss or value is FAILED else value

    async def get_many(self, keys: Iterable[str]) -> dict[str, _V]:
        """The hits among ``keys``, by key: from L1 first, then one round trip per shard.

        Raises:
            ConfigError: a key is not valid.
        """
        core = self._core
        keys = list(keys)
        rkeys = [core.entry_key(k) for k in keys]
        found, keys, rkeys = self._near_many(keys, rkeys)
        if not keys or not core.allow():
            return found
        try:
            values = await self._driver.run(core.read_many(rkeys, core.value_type))
        except FAILURES as exc:
            core.failed(exc)
            return found
        core.succeeded()
        return self._merged(found, keys, values)

    async def set(
        self, key: str, value: _V, *, ttl: Seconds | None = None, tags: Iterable[str] = ()
    ) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` (default: the cache's), tagged with ``tags``.

        Returns ``False`` if Redis could not be reached (``strict``: raises instead).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: ``value`` cannot be encoded, or exceeds ``max_value_size``.
        """
        prepared = self._core.prepare([(key, value)], ttl, tags, self._core.value_type)
        return await self._write(prepared)

    async def set_many(
        self,
        mapping: Mapping[str, _V],
        *,
        ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Store every item of ``mapping`` (one trip per shard); ``False`` if Redis failed.

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: a value cannot be encoded, or exceeds ``max_value_size``.
        """
        prepared = self._core.prepare(mapping.items(), ttl, tags, self._core.value_type)
        if not prepared.keys:
            return True
        return await self._write(prepared)

    async def _write(self, prepared: Any) -> bool:
        core = self._core
        if not core.allow():  # circuit open: nothing written, yet this process's copies go (C8)
            self._forget(prepared.keys)
            return False
        try:
            await self._driver.run(core.write(prepared))
        except FAILURES as exc:
            core.failed(exc)
            return False
        finally:
            self._forget(prepared.keys)
        core.succeeded()
        return True

    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[_T]],
        *,
        ttl: Seconds | None = None,
        tags: Iterable[str] = (),
    ) -> _T:
        """The cached value of ``key``; on a miss, ``await loader()``, stored unless stale.

        The result is not stored if ``key`` was deleted or set, or its tags or the namespace
        invalidated, while the loader ran. With Redis down, returns the loader's (fail-open).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: the loader's result cannot be encoded.
        """
        core = self._core
        ttl_s, neg, tag_args = core.check_fill_args(ttl, core.negative_ttl, tags)
        return await self._get_or_set(
            core.entry_key(key), loader, (), {}, ttl_s, neg, tag_args, core.value_type
        )

    async def _get_or_set(
        self,
        rkey: str,
        loader: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ttl: float,
        negative_ttl: float | None,
        tags: TagArgs,
        type_: Any,
    ) -> _T:
        """``get_or_set`` with validated arguments (the decorator validates once, up front)
        and the Redis key ``rkey``; the loader is called as ``loader(*args, **kwargs)``."""
        call = Call(rkey, loader, args, kwargs, ttl, negative_ttl, tags, type_)
        return await self._flow.get_or_set(call)  # type: ignore[no-any-return]

    async def drain(self, timeout: Seconds | None = None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: as long as it takes) for the background
        refreshes of early refresh / stale-while-revalidate; ``False`` if some still run."""
        limit = None if timeout is None else seconds(timeout, field="timeout", allow_zero=True)
        return await self._flow.drain(limit)

    async def delete(self, key: str) -> bool:
        """Remove ``key`` (and refuse fills that read it before); ``True`` if it was cached.

        Raises:
            ConfigError: ``key`` is not a valid key.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        core = self._core
        rkey = core.entry_key(key)
        try:
            return bool(await self._invalidate(core.delete(rkey)))
        finally:
            self._forget([rkey])

    async def invalidate_tags(self, *tags: str) -> None:
        """Make every entry tagged with any of ``tags`` a miss, in O(number of tags).

        Raises:
            ConfigError: a tag is not valid.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        names, record_keys = self._core.tags(tags)
        if record_keys:
            try:
                await self._invalidate(self._core.bump(record_keys))
            finally:
                self._policy.forget_tags(names)
                if self._near is not None:
                    self._near.evict_tags(names)

    async def clear(self) -> None:
        """Make every entry of the namespace a miss, in O(1).

        Raises:
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        try:
            await self._invalidate(self._core.bump([self._core.ns_key]))
        finally:
            self._policy.forget_all()
            if self._near is not None:
                self._near.flush()

    async def aclose(self) -> None:
        """Stop the near cache's listener threads and empty it (the client stays open)."""
        if self._near is not None:
            await asyncio.to_thread(self._near.close)

    async def _invalidate(self, protocol: Any) -> Any:
        core = self._core
        try:
            out = await self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc, fail_open=False)
            raise  # pragma: no cover - failed() raises when fail_open is false
        core.succeeded()
        return out

    # -- conditional updates (``_update.py``): every write refuses the fills that read before --
    async def _apply(self, protocol: Any, rkeys: list[str], *, fail_open: bool, failed: Any) -> Any:
        """Run an update protocol; Redis failures return ``failed`` (``fail_open``) or raise."""
        core = self._core
        if fail_open and not core.allow():
            protocol.close()
            self._forget(rkeys)
            return failed
        try:
            out = await self._driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc, fail_open=fail_open)
            return failed
        finally:
            self._forget(rkeys)
        core.succeeded()
        return out

    async def add(
        self, key: str, value: _V, *, ttl: Seconds | None = None, tags: Iterable[str] = ()
    ) -> bool:
        """Store ``value`` under ``key`` only if no live entry is there; ``True`` if stored.

        Like ``set``, a stored value refuses the read-through fills that read the key before.
        Returns ``False`` if Redis could not be reached (``strict``: raises instead).

        Raises:
            ConfigError: invalid key, ttl or tag.
            SerializationError: ``value`` cannot be encoded, or exceeds ``max_value_size``.
        """
        core = self._core
        p = core.prepare([(key, value)], ttl, tags, core.value_type)
        protocol = _update.add(
            core, p.keys[0], p.entries[0][1], p.ttl_ms, p.tag_names, core.value_type
        )
        return bool(await self._apply(protocol, p.keys, fail_open=True, failed=False))

    async def incr(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the int stored under ``key`` (expiry and tags kept); the new value.

        Raises:
            KeyError: no live entry under ``key``.
            TypeError: the value is not an int.
            ConfigError: ``key`` is not a valid key.
            ConnectionUnavailable: Redis could not be reached (a count never fails open).
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.incr(core, rkey, _delta(delta), core.value_type)
        try:
            return int(await self._apply(protocol, [rkey], fail_open=False, failed=None))
        except KeyError:
            raise KeyError(key) from None  # the caller's key, not a long key's hashed Redis key

    async def decr(self, key: str, delta: int = 1) -> int:
        """``incr(key, -delta)``."""
        return await self.incr(key, -_delta(delta))

    async def _combine(self, key: str, fn: Callable[[Any], Any]) -> Any:
        """``Cache._combine`` (``fn`` runs on the loop, between two round trips)."""
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.combine(core, rkey, fn, core.value_type)
        return await self._apply(protocol, [rkey], fail_open=False, failed=None)

    async def touch(self, key: str, ttl: Seconds | None = None) -> bool:
        """Give the live entry under ``key`` a new ``ttl`` (default: the cache's), from now;
        ``False`` if there is none or Redis could not be reached (``strict``: raises).

        Raises:
            ConfigError: invalid key or ttl.
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.touch(core, rkey, _ms(core.ttl_for(ttl)), core.value_type)
        return bool(await self._apply(protocol, [rkey], fail_open=True, failed=False))

    async def ttl_of(self, key: str) -> float | None:
        """Seconds left before the entry under ``key`` expires; ``None`` if none is live (or
        Redis could not be reached).

        Raises:
            ConfigError: ``key`` is not a valid key.
        """
        core = self._core
        rkey = core.entry_key(key)
        protocol = _update.ttl_of(core, rkey, core.value_type)
        out: float | None = await self._apply(protocol, [], fail_open=True, failed=None)
        return out

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Remove every key in ``keys`` as ``delete`` does (one script per shard); how many
        were cached.

        Raises:
            ConfigError: a key is not valid.
            ConnectionUnavailable: Redis could not be reached (invalidations never fail open).
        """
        core = self._core
        rkeys = [core.entry_key(k) for k in keys]
        if not rkeys:
            return 0
        return int(
            await self._apply(_update.delete_many(core, rkeys), rkeys, fail_open=False, failed=0)
        )
