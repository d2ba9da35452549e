"""The cache protocol, written once and free of I/O (see ``distkit._protocol``).

``Cache`` and ``AsyncCache`` own a ``CacheCore`` and only drive its generators (plus the first
``MGET`` of a read, which they send themselves to keep the hit path lean). The core builds keys,
encodes and decodes entries, decides hit / miss / revalidate, and holds the failure policy
(fail-open, circuit breaker, metrics). Key layout, entry envelope and scripts: ``_scripts.py``.

Why a fill is checked at the Redis tier (a timeline; ``seen`` is the epoch the read returned)::

    A: get_or_set(k): MGET -> miss, seen=100 ... loader reads the DB (old row) ........ WRITE
    B:                          update the DB row; invalidate_tags("t") -> epoch 101, t=101
    WRITE(seen=100): epoch is 101 != 100, and t=101 > 100  -> refused, nothing stored

Without the check, A would store the old row after B's invalidation returned, and every reader
would see it until the TTL ran out. ``delete`` is covered the same way by a tombstone: A's read
saw the key empty, the tombstone makes it non-empty, A's WRITE compares and refuses. A's read
also captures the key's write mark, which every ``set`` and ``delete`` replaces and which lives
twice the fill timeout, so A is refused even when B's ``set`` entry is gone again by A's WRITE::

    A: get_or_set(k): MGET -> empty, mark m0 ... loader (old row) ................... WRITE
    B:                         set(k, new, ttl=1) -> mark m1 ... expires / evicted
    WRITE(baseline empty, mark m0): the key is empty again, but the mark is m1 -> refused
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from distkit import (
    AuthenticationFailed,
    ConfigError,
    ConnectionUnavailable,
    DistkitError,
    KeySpace,
    RetryConfig,
    RetryPolicy,
    SerializationError,
    ServerError,
    validate_name,
)
from distkit._clients import client_retry, decodes_responses
from distkit._config import seconds
from distkit._protocol import _REDIS_ERRORS, Command, Eval, Protocol, _translated, monotonic
from distkit._retry import NO_RETRY

from ._breaker import CircuitBreaker
from ._keys import check_key, check_tag
from ._metrics import CacheEvent, CacheMetrics
from ._scripts import BUMP, DELETE, LOOK, REVALIDATE, WRITE
from ._serializers import JsonSerializer, Serializer

__all__ = [
    "CLUSTER_SHARDS",
    "FAILED",
    "FAILURES",
    "PLAIN_KEY_MAX",
    "CacheCore",
    "Check",
    "Clock",
    "Entry",
    "Miss",
    "Prepared",
    "Seconds",
    "TagArgs",
    "check_client",
    "is_cluster_client",
    "retry_policy",
    "shard_count",
    "wall_ms",
]

log = logging.getLogger("distcache")

Seconds = float | timedelta
Clock = Callable[[], float]
TagArgs = tuple[tuple[str, ...], list[str]]  # validated tag names, and their record keys

MAGIC = b"dc1:"
TOMBSTONE = b"dc1~"
_HEAD = 26  # magic 4 + epoch 16 + serializer 1 + kind 1 + metadata length 4
PLAIN_KEY_MAX = 200
_META_MAX = 0xFFFF
_MAX_TAGS = 64
DEFAULT_MAX_VALUE_SIZE = 1 << 20
# The shortest life of a tombstone, write mark or new tag record: the default fill_timeout.
GUARD_FLOOR_MS = 60_000
# Hash slots per namespace on a Redis Cluster when ``shards`` is not given (standalone: 1).
CLUSTER_SHARDS = 16
MAX_SHARDS = 1024

# What a failed Redis call can raise: redis-py's errors (the hit path calls the client itself)
# and distkit's translated ones (from the drivers).
FAILURES: tuple[type[BaseException], ...] = (DistkitError, *_REDIS_ERRORS)

_HIT, _MISS = CacheEvent.HIT, CacheEvent.MISS


class _Failed:
    """The outcome of a read that could not reach Redis (fail-open: treat as a miss, no fill)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = _Failed()


def wall_ms() -> float:
    """The local wall clock in milliseconds: the estimate of the server's clock before a sync."""
    return time.time() * 1000


def _ms(value: float) -> int:
    return max(1, math.ceil(value * 1000))


def check_client(client: Any, *, want_async: bool, cls: str) -> None:
    """Refuse objects that are not redis-py clients of the right kind, with a ``ConfigError``."""
    execute = getattr(client, "execute_command", None)
    if execute is None or not callable(execute):
        raise ConfigError(
            f"{cls} needs a redis-py client (redis.Redis / RedisCluster), "
            f"got {type(client).__name__}"
        )
    if inspect.iscoroutinefunction(execute) != want_async:
        other = "Cache" if want_async else "AsyncCache"
        kind = "a sync" if want_async else "an asyncio"
        raise ConfigError(f"{cls} was given {kind} client; use {other} with it")

    if decodes_responses(client):
        raise ConfigError(
            f"{cls} needs a client that returns bytes, but this one was built with "
            "decode_responses=True; build a second client for distkit without it, e.g. "
            "distkit.connect(url) or redis.Redis.from_url(url)"
        )


def is_cluster_client(client: Any) -> bool:
    """Whether ``client`` is a redis-py Cluster client (sync or asyncio)."""
    import redis.asyncio.cluster
    import redis.cluster

    return isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster))


def shard_count(shards: int | None, client: Any) -> int:
    """Normalise ``shards=``: ``None`` is 1 on one server, ``CLUSTER_SHARDS`` on a Cluster."""
    if shards is None:
        return CLUSTER_SHARDS if is_cluster_client(client) else 1
    if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"shards must be an int from 1 to {MAX_SHARDS}, got {shards!r}")
    return shards


def retry_policy(retry: RetryConfig | RetryPolicy | None, client: Any = None) -> RetryPolicy:
    """Normalise ``retry=``: a cache does not retry by default (fail-open must be fast)."""
    if retry is None:
        given = client_retry(client)  # connect()'s RetryConfig, when one was given
        return NO_RETRY if given is None else RetryPolicy(given)
    if isinstance(retry, RetryPolicy):
        return retry
    if isinstance(retry, RetryConfig):
        return RetryPolicy(retry)
    raise ConfigError(f"retry must be a RetryConfig or RetryPolicy, got {type(retry).__name__}")


class Miss:
    """A read that found no usable entry; ``baseline``, ``epoch`` and ``mark`` are what a fill
    compares (``mark``: the key's write mark as read, ``b""`` none, ``None`` not read)."""

    __slots__ = ("baseline", "epoch", "mark")

    def __init__(self, baseline: str, epoch: bytes | None, mark: bytes | None = None) -> None:
        self.baseline = baseline  # '' nothing, '<len>:<sha1>' these bytes, '!' unknown
        self.epoch = epoch
        self.mark = mark


class Entry:
    """A decoded entry with its metadata: the read-through decides if it is fresh or stale.

    ``expires_ms`` is on the server's clock (``computed_ms`` is the ``TIME`` of the write);
    ``delta_ms`` is the loader's measured time (XFetch's δ).
    """

    __slots__ = ("computed_ms", "delta_ms", "epoch", "expires_ms", "raw", "value")

    def __init__(self, value: Any, raw: bytes, start: int, epoch: bytes | None) -> None:
        computed, compute_us, ttl = raw[_HEAD:start].split(b"|", 3)[:3]
        self.value = value
        self.raw = raw
        self.epoch = epoch
        self.computed_ms = int(computed)
        self.expires_ms = self.computed_ms + int(ttl)
        self.delta_ms = int(compute_us) / 1000

    def miss(self) -> Miss:
        """The ``Miss`` a fill replacing this entry compares against (these very bytes)."""
        return Miss(_baseline(self.raw), self.epoch)


class Check:
    """An entry stamped with an older epoch: valid only if its generations are still current."""

    __slots__ = ("epoch", "header", "ns_gen", "raw", "start", "tags")

    def __init__(
        self,
        raw: bytes,
        start: int,
        ns_gen: str,
        tags: list[tuple[str, str]],
        epoch: bytes | None,
    ) -> None:
        self.raw = raw
        self.start = start  # where the payload begins
        self.header = raw[:start]
        self.ns_gen = ns_gen
        self.tags = tags
        self.epoch = epoch


@dataclass(frozen=True, slots=True)
class Prepared:
    """Validated, encoded entries ready for one WRITE."""

    keys: list[str]
    entries: list[tuple[bytes, bytes]]  # (flags, payload)
    ttl_ms: int
    tag_names: tuple[str, ...]
    tag_keys: list[str]


def _refused() -> Protocol[bool]:
    """A fill refused before any I/O (too slow, or a foreign epoch)."""
    yield from ()
    return False


def _baseline(raw: bytes | None) -> str:
    if raw is None:
        return ""
    return f"{len(raw)}:{hashlib.sha1(raw).hexdigest()}"  # an identity, not a secret


def _number(field: str) -> bool:
    # 1-19 ASCII digits: int() would also take signs, spaces, "_" and 4300-digit numbers
    return 0 < len(field) < 20 and field.isascii() and field.isdigit()


def _metadata(raw: bytes) -> tuple[int, str, list[tuple[str, str]]] | None:
    """``(payload start, ns_gen, [(tag, gen)])`` of an envelope, ``None`` if malformed.

    Every field is checked as the writer formats it, so a planted entry never reaches a
    conversion that could raise later (``Entry``, ``expired``, REVALIDATE's arguments).
    """
    size = raw[22:26]
    if len(size) != 4 or not size.isalnum() or not size.isascii():
        return None
    try:
        start = _HEAD + int(size, 16)
        fields = raw[_HEAD:start].decode("utf-8").split("|")  # tags: any non-reserved str
    except (ValueError, UnicodeDecodeError):
        return None
    if len(raw) < start or len(fields) != 5 or not all(_number(f) for f in fields[:4]):
        return None
    tags: list[tuple[str, str]] = []
    for item in fields[4].split(",") if fields[4] else ():
        name, sep, gen = item.partition("=")
        if not sep or not name or not _number(gen):
            return None
        tags.append((name, gen))
    return start, fields[3], tags


class CacheCore:
    """State and protocol steps of one cache (no I/O; driven by a sync or async driver)."""

    __slots__ = (
        "_base_len",
        "_bases",
        "_entry_prefixes",
        "_hashed_prefix",
        "_hit_keys",
        "_loads",
        "_plain",
        "_prefix_set",
        "_ser_byte",
        "_tag_prefix",
        "breaker",
        "clock",
        "entry_prefix",
        "epoch_key",
        "fill_timeout",
        "fill_timeout_ms",
        "grace_ms",
        "guard_ms",
        "max_value_size",
        "metrics",
        "namespace",
        "negative_ttl",
        "now_ms",
        "ns_key",
        "serializer",
        "shards",
        "strict",
        "ttl",
        "value_type",
    )

    def __init__(
        self,
        *,
        namespace: str,
        ttl: Seconds,
        negative_ttl: Seconds | None,
        value_type: Any,
        serializer: Serializer | None,
        prefix: str,
        max_value_size: int,
        fill_timeout: Seconds,
        strict: bool,
        breaker: CircuitBreaker | bool,
        metrics: CacheMetrics | None,
        clock: Clock,
        shards: int = 1,
    ) -> None:
        self.namespace = validate_name(namespace, what="namespace")
        self.shards = shard_count(shards, None)
        self.ttl = seconds(ttl, field="ttl")
        self.negative_ttl = (
            None
            if negative_ttl is None
            else seconds(negative_ttl, field="negative_ttl", allow_zero=True)
        )
        self.value_type = value_type
        if serializer is None:
            serializer = JsonSerializer()
        if not isinstance(serializer, Serializer):
            raise ConfigError(
                f"serializer must have id, dumps and loads, got {type(serializer).__name__}"
            )
        ser_id = serializer.id
        if not (isinstance(ser_id, bytes) and len(ser_id) == 1 and ser_id.isalpha()):
            raise ConfigError(f"a serializer id must be one ASCII letter, got {ser_id!r}")
        self.serializer = serializer
        self._ser_byte = ser_id[0]
        self._loads = serializer.loads
        # untyped JSON: call json.loads directly (the hit path's decode is one C call)
        self._plain = json.loads if type(serializer) is JsonSerializer else None
        if (
            not isinstance(max_value_size, int)
            or isinstance(max_value_size, bool)
            or max_value_size < 1
        ):
            raise ConfigError(f"max_value_size must be a positive int, got {max_value_size!r}")
        self.max_value_size = max_value_size
        self.fill_timeout = seconds(fill_timeout, field="fill_timeout")
        self.fill_timeout_ms = _ms(self.fill_timeout)
        # How long what refuses fills (write marks, new tag records) lasts: at least
        # the default fill timeout, so that a handle with a shorter fill_timeout than another
        # handle's of the same namespace cannot shorten the other's protection (hostile review).
        self.guard_ms = max(self.fill_timeout_ms, GUARD_FLOOR_MS)
        if not isinstance(strict, bool):
            raise ConfigError(f"strict must be a bool, got {strict!r}")
        self.strict = strict
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self.clock = time.monotonic if clock is monotonic else clock  # one call less per read
        self.breaker: CircuitBreaker | None
        if breaker is True:
            self.breaker = CircuitBreaker(clock=clock)
        elif breaker is False:
            self.breaker = None
        elif isinstance(breaker, CircuitBreaker):
            self.breaker = breaker
        else:
            raise ConfigError(f"breaker must be a CircuitBreaker or a bool, got {breaker!r}")
        if metrics is not None and not callable(getattr(metrics, "record", None)):
            raise ConfigError(f"metrics must have a record() method, got {metrics!r}")
        self.metrics = metrics
        # Stale serving (set by the read-through policy, ``_stampede.py``): entries live
        # ``grace_ms`` past their logical expiry, which reads then check on ``now_ms()``, an
        # estimate of the server's clock in milliseconds.
        self.grace_ms = 0
        self.now_ms: Callable[[], float] = wall_ms
        space = KeySpace(prefix)
        if self.shards == 1:
            self._bases: tuple[str, ...] = (space.key("cache", self.namespace),)
        else:  # the kind names the layout, so no namespace can reach another's shard keys
            kind = f"cache.{self.shards}"
            self._bases = tuple(
                space.key(kind, f"{self.namespace}.{i}") for i in range(self.shards)
            )
        self._entry_prefixes = tuple(b + ":k:" for b in self._bases)
        self._prefix_set = frozenset(b + ":" for b in self._bases)
        base = self._bases[0]  # shard 0 (the only one when shards == 1)
        self.epoch_key = base + ":epoch"
        self.ns_key = base + ":ns"
        self._tag_prefix = base + ":t:"
        self.entry_prefix = base + ":k:"
        self._hashed_prefix = base + ":h:"
        self._base_len = len(base) + 1
        self._hit_keys: dict[str, tuple[str, str, str]] = {}

    # -- keys and arguments --------------------------------------------------------------------
    def entry_key(self, key: object) -> str:
        """The Redis key of cache key ``key`` (hashed with SHA-256 beyond 200 characters).

        With ``shards > 1`` the key lives on shard ``crc32(utf-8 key) % shards`` (of the hex
        digest, for a hashed key).
        """
        if type(key) is not str or not key.isprintable() or len(key) > PLAIN_KEY_MAX:
            key = check_key(key)
            if len(key) > PLAIN_KEY_MAX:
                digest = hashlib.sha256(key.encode()).hexdigest()
                if self.shards == 1:
                    return self._hashed_prefix + digest
                return self._bases[zlib.crc32(digest.encode()) % self.shards] + ":h:" + digest
        elif not key:
            check_key(key)
        if self.shards == 1:
            return self.entry_prefix + key
        return self._entry_prefixes[zlib.crc32(key.encode()) % self.shards] + key

    def hit_keys(self, rkey: str) -> tuple[str, str, str]:
        """The hit path's MGET keys of ``rkey``: entry, epoch, write mark (remembered)."""
        known = self._hit_keys.get(rkey)
        if known is None:
            known = (rkey, self.epoch_of(rkey), self.mark_key(rkey))
            if len(self._hit_keys) >= 4096:
                self._hit_keys.clear()
            self._hit_keys[rkey] = known
        return known

    def mark_key(self, rkey: str) -> str:
        """The write mark of entry key ``rkey``: ``P:cache:{NS}:mk:<key>`` (``:mh:<sha256>``)."""
        cut = self._base_len if self.shards == 1 else rkey.index("}") + 2
        return rkey[:cut] + "m" + rkey[cut:]

    def logical_key(self, rkey: str) -> str:
        """The cache key back from its Redis key (a hashed long key stays a hash), for messages."""
        if self.shards == 1:
            return rkey.removeprefix(self.entry_prefix)
        rest = rkey[rkey.index("}") + 1 :]
        return rest[3:] if rest.startswith(":k:") else rkey

    def base_of(self, rkey: str) -> str:
        """The shard prefix ``P:cache[.N]:{ns[.i]}`` of an entry key (its slot's records)."""
        if self.shards == 1:
            return self._bases[0]
        return rkey[: rkey.index("}") + 1]  # prefix and namespace cannot contain braces

    def epoch_of(self, rkey: str) -> str:
        """The epoch key on the slot of entry key ``rkey`` (the hit path's second MGET key)."""
        if self.shards == 1:
            return self.epoch_key
        return rkey[: rkey.index("}") + 1] + ":epoch"

    def shard_prefixes(self) -> tuple[str, ...]:
        """One key prefix per shard, ``P:cache[.N]:{ns[.i]}:``: every key of the namespace
        (entries, epoch, generation records) starts with one of them; one slot each."""
        return tuple(b + ":" for b in self._bases)

    def split_key(self, rkey: str) -> tuple[str, str] | None:
        """``(shard prefix, rest)`` of a Redis key of this namespace (``rest``: ``k:<key>``,
        ``h:<sha256>``, ``t:<tag>``, ``ns`` or ``epoch``); ``None`` for any other key."""
        end = rkey.find("}")
        if end < 0:
            return None
        prefix = rkey[: end + 2]
        if prefix not in self._prefix_set:
            return None
        return prefix, rkey[end + 2 :]

    def _groups(self, rkeys: list[str]) -> list[tuple[str, list[int]]]:
        """Indices of ``rkeys`` grouped by shard (one group when ``shards == 1``)."""
        if self.shards == 1:
            return [(self._bases[0], list(range(len(rkeys))))]
        groups: dict[str, list[int]] = {}
        for i, rkey in enumerate(rkeys):
            groups.setdefault(self.base_of(rkey), []).append(i)
        return list(groups.items())

    def tags(self, tags: Iterable[str]) -> TagArgs:
        """Validated tag names (deduplicated, in order) and their record keys."""
        if isinstance(tags, str):
            raise ConfigError(f"tags must be a list of str, not a str ({tags!r:.80})")
        try:
            names = tuple(dict.fromkeys(check_tag(t) for t in tags))
        except TypeError:
            raise ConfigError(f"tags must be an iterable of str, got {tags!r:.80}") from None
        if len(names) > _MAX_TAGS:
            raise ConfigError(f"an entry may have at most {_MAX_TAGS} tags, got {len(names)}")
        return names, [self._tag_prefix + t for t in names]

    def ttl_for(self, ttl: Seconds | None) -> float:
        """``ttl`` in seconds (the cache default when ``None``); ``ConfigError`` if not > 0."""
        return self.ttl if ttl is None else seconds(ttl, field="ttl")

    def encode(self, key: str, value: Any, type_: Any) -> bytes:
        """The serializer's bytes for ``value``; ``SerializationError`` if too large."""
        try:
            payload = self.serializer.dumps(value, type_)
        except SerializationError as exc:
            raise SerializationError(f"cache key {key!r:.80}: {exc}", key=key) from exc.__cause__
        if len(payload) > self.max_value_size:
            raise SerializationError(
                f"cache key {key!r:.80}: the encoded {type(value).__name__} is "
                f"{len(payload)} bytes; the limit is {self.max_value_size} (max_value_size)",
                key=key,
            )
        return payload

    def prepare(
        self,
        items: Iterable[tuple[object, Any]],
        ttl: Seconds | None,
        tags: Iterable[str],
        type_: Any,
    ) -> Prepared:
        """Validate and encode entries for a plain ``set`` / ``set_many`` (raises, never I/O)."""
        ttl_ms = _ms(self.ttl_for(ttl))
        names, tag_keys = self.tags(tags)
        self._check_meta(names)
        flags = self.serializer.id + b"v"
        keys, entries = [], []
        for key, value in items:
            rkey = self.entry_key(key)
            keys.append(rkey)
            entries.append((flags, self.encode(str(key), value, type_)))
        return Prepared(keys, entries, ttl_ms, names, tag_keys)

    def _check_meta(self, names: tuple[str, ...]) -> None:
        # metadata: computed_at|compute_us|ttl_ms|ns_gen|tag=gen,... (16-digit generations)
        size = 80 + sum(len(t.encode()) + 17 for t in names)
        if size > _META_MAX:
            raise ConfigError(f"the tags of one entry are too long ({size} bytes of metadata)")

    # -- failure policy ------------------------------------------------------------------------
    def emit(self, event: CacheEvent, count: int = 1) -> None:
        """Report ``event`` to the metrics hook, if any (a failing hook is logged, not raised)."""
        metrics = self.metrics
        if metrics is not None:
            try:
                metrics.record(event, self.namespace, count)
            except Exception:
                log.exception("cache %r: the metrics hook raised", self.namespace)

    def allow(self) -> bool:
        """Whether to call Redis now: ``False`` while the circuit is open (strict: raise)."""
        breaker = self.breaker
        if breaker is None or breaker.allow():
            return True
        self.emit(CacheEvent.SHORT_CIRCUIT)
        if self.strict:
            raise ConnectionUnavailable(
                f"cache {self.namespace!r}: circuit breaker open after repeated failures"
            )
        return False

    def succeeded(self) -> None:
        """A call reached Redis."""
        breaker = self.breaker
        if breaker is not None:
            breaker.record_success()

    def failed(self, exc: BaseException, *, fail_open: bool = True) -> DistkitError:
        """Account for a failed Redis call; return the error to swallow, or raise it.

        Non-Redis errors (bad input, serialization) are re-raised as they are; Redis errors are
        re-raised (translated) when ``strict`` is set or ``fail_open`` is false.
        """
        err = _translated(exc, f"cache {self.namespace!r}")
        if isinstance(err, AuthenticationFailed):  # a misconfiguration: loud, never failed open
            self.emit(CacheEvent.ERROR)
            if err is exc:
                raise err
            raise err from exc
        if not isinstance(err, (ConnectionUnavailable, ServerError)):
            raise exc
        if isinstance(err, ConnectionUnavailable) and self.breaker is not None:
            self.breaker.record_failure()
        self.emit(CacheEvent.ERROR)
        if self.strict or not fail_open:
            if err is exc:
                raise err
            raise err from exc
        where = f"cache {self.namespace!r}"
        text = str(err)
        log.warning("%s (failing open)", text if text.startswith(where) else f"{where}: {text}")
        return err

    # -- reads ---------------------------------------------------------------------------------
    def decode(self, raw: bytes | None, epoch: bytes | None, type_: Any) -> Any:
        """The value of a hit, a ``Miss``, or a ``Check`` when the entry must be revalidated."""
        if raw is None:
            self.emit(_MISS)
            return Miss("", epoch)
        if raw[4:20] == epoch and raw[:4] == MAGIC:
            try:
                if raw[20] == self._ser_byte:
                    start = _HEAD + int(raw[22:26], 16)
                    if len(raw) - start > self.max_value_size:
                        return self._oversized(raw, epoch, start)
                    if self.grace_ms and self.expired(raw, start):
                        self.emit(_MISS)
                        return Miss(_baseline(raw), epoch)
                    payload = raw[start:]
                    plain = self._plain
                    if plain is not None and type_ is None:
                        value = plain(payload)
                    else:
                        value = self._loads(payload, type_)
                    if self.metrics is not None:
                        self.emit(_HIT)
                    return value
            except Exception as exc:
                return self._corrupt(raw, epoch, exc)
        return self._classify(raw, epoch)

    def _classify(self, raw: bytes, epoch: bytes | None) -> Any:
        if raw[:4] == TOMBSTONE:
            self.emit(_MISS)
            return Miss(_baseline(raw), epoch)
        if raw[:4] != MAGIC:
            return self._corrupt(raw, epoch, "not a distcache entry")
        if raw[20:21] != self.serializer.id:
            return self._corrupt(raw, epoch, f"written by serializer {raw[20:21]!r}")
        parsed = _metadata(raw)
        if parsed is None:
            return self._corrupt(raw, epoch, "malformed metadata")
        start, ns_gen, tags = parsed
        if len(raw) - start > self.max_value_size:
            return self._oversized(raw, epoch, start)
        return Check(raw, start, ns_gen, tags, epoch)

    def _corrupt(self, raw: bytes, epoch: bytes | None, why: object) -> Miss:
        log.warning("cache %r: an undecodable entry counts as a miss (%.200s)", self.namespace, why)
        self.emit(CacheEvent.DECODE_ERROR)
        self.emit(_MISS)
        return Miss(_baseline(raw), epoch)

    def _oversized(self, raw: bytes, epoch: bytes | None, start: int) -> Miss:
        # never decoded: a foreign payload this large could expand into millions of objects
        why = f"a {len(raw) - start}-byte payload exceeds max_value_size={self.max_value_size}"
        return self._corrupt(raw, epoch, why)

    def _checked(self, check: Check, code: int, type_: Any) -> Any:
        if code == 1:
            if self.grace_ms and self.expired(check.raw, check.start):
                self.emit(_MISS)
                return Miss(_baseline(check.raw), check.epoch)
            try:
                value = self._loads(check.raw[check.start :], type_)
            except Exception as exc:
                return self._corrupt(check.raw, check.epoch, exc)
            self.emit(_HIT)
            return value
        self.emit(_MISS)
        return Miss("" if code == 0 else "!", check.epoch)

    def _revalidate_step(self, keys: list[str], checks: list[Check]) -> Eval:
        """One REVALIDATE of ``keys`` (all on one shard)."""
        names: dict[str, int] = {}
        args: list[Any] = []
        for check in checks:
            args += (check.header, check.ns_gen, len(check.tags))
            for name, gen in check.tags:
                args += (names.setdefault(name, len(names) + 1), gen)
        base = self.base_of(keys[0])
        record_keys = [base + ":t:" + name for name in names]
        return Eval(
            REVALIDATE,
            [base + ":epoch", base + ":ns", *record_keys, *keys],
            [len(names), *args],
        )

    def recheck(self, rkey: str, check: Check, type_: Any) -> Protocol[Any]:
        """Ask Redis whether an entry with an old epoch stamp is still valid (one script)."""
        codes = yield self._revalidate_step([rkey], [check])
        return self._checked(check, int(codes[0]), type_)

    def read(self, rkey: str, type_: Any) -> Protocol[Any]:
        """One key: ``MGET entry epoch``, then a revalidation if the stamp is old."""
        raw, epoch = yield Command(("MGET", rkey, self.epoch_of(rkey)))
        value = self.decode(raw, epoch, type_)
        if value.__class__ is Check:
            value = yield from self.recheck(rkey, value, type_)
        return value

    def read_many(self, rkeys: list[str], type_: Any) -> Protocol[list[Any]]:
        """Many keys: one ``MGET`` per shard (one slot each, never CROSSSLOT), then one
        revalidation per shard for the entries with old stamps."""
        values: list[Any] = [None] * len(rkeys)
        for base, group in self._groups(rkeys):
            reply = yield Command(("MGET", base + ":epoch", *(rkeys[i] for i in group)))
            epoch = reply[0]
            for i, raw in zip(group, reply[1:], strict=True):
                values[i] = self.decode(raw, epoch, type_)
            stale = [i for i in group if values[i].__class__ is Check]
            if stale:
                checks = [values[i] for i in stale]
                codes = yield self._revalidate_step([rkeys[i] for i in stale], checks)
                for i, check, code in zip(stale, checks, codes, strict=True):
                    values[i] = self._checked(check, int(code), type_)
        return values

    # -- reads with metadata (read-through: expiry, early refresh, stale serving) -------------
    def expired(self, raw: bytes, start: int) -> bool:
        """Whether the entry ``raw`` (metadata ending at ``start``) is past its logical expiry."""
        computed, _, ttl = raw[_HEAD:start].split(b"|", 3)[:3]
        return int(computed) + int(ttl) <= self.now_ms()

    def entry(self, raw: bytes | None, epoch: bytes | None, type_: Any, quiet: bool = False) -> Any:
        """An ``Entry`` (fresh or expired: the caller decides), a ``Miss``, or a ``Check``.

        ``quiet``: a second look within one call; an absent entry is not counted as a miss again.
        """
        if raw is None or (quiet and raw[:4] == TOMBSTONE):
            if not quiet:
                self.emit(_MISS)
            return Miss(_baseline(raw), epoch)
        if raw[4:20] == epoch and raw[:4] == MAGIC and raw[20:21] == self.serializer.id:
            try:
                start = _HEAD + int(raw[22:26], 16)
                if len(raw) - start > self.max_value_size:
                    if quiet:
                        return Miss(_baseline(raw), epoch)
                    return self._oversized(raw, epoch, start)
                plain = self._plain
                if plain is not None and type_ is None:
                    return Entry(plain(raw[start:]), raw, start, epoch)
                return Entry(self._loads(raw[start:], type_), raw, start, epoch)
            except Exception as exc:
                if quiet:  # counted and logged by the first look
                    return Miss(_baseline(raw), epoch)
                return self._corrupt(raw, epoch, exc)
        if quiet and (raw[:4] != MAGIC or raw[20:21] != self.serializer.id):
            return Miss(_baseline(raw), epoch)
        return self._classify(raw, epoch)

    def read_entry(self, rkey: str, type_: Any, quiet: bool = False) -> Protocol[Any]:
        """``read`` for the read-through: an ``Entry`` with its metadata, or a ``Miss``.

        One ``MGET`` of entry, epoch and write mark (what a fill compares)."""
        raw, epoch, mark = yield Command(("MGET", rkey, self.epoch_of(rkey), self.mark_key(rkey)))
        found = self.entry(raw, epoch, type_, quiet)
        if found.__class__ is Entry:
            return found
        return (yield from self.settle(rkey, found, mark, type_))

    def settle(self, rkey: str, found: Any, mark: bytes | None, type_: Any) -> Protocol[Any]:
        """Finish a read-through's look (``found``: not an ``Entry``; ``mark``: read with it).

        A ``Check`` is revalidated; a ``Miss`` gets the write mark. A miss that found no epoch
        looks again with ``LOOK``, which creates the epoch first: a fill never compares against
        an absent epoch, which an invalidation could create and lose again during the load.
        """
        if found.__class__ is Check:
            found = yield from self.recheck_entry(rkey, found, type_, mark)
        if found.__class__ is Miss:
            if found.epoch is None:
                raw, epoch, mark = yield Eval(
                    LOOK, [rkey, self.epoch_of(rkey), self.mark_key(rkey)], []
                )
                found = self.entry(raw, epoch, type_, True)
                if found.__class__ is Check:
                    found = yield from self.recheck_entry(rkey, found, type_, mark)
                if found.__class__ is not Miss:
                    return found
            found.mark = b"" if mark is None else mark
        return found

    def recheck_entry(
        self, rkey: str, check: Check, type_: Any, mark: bytes | None = None
    ) -> Protocol[Any]:
        """``recheck`` for the read-through: an ``Entry`` if still valid, else a ``Miss``
        (with ``mark``, the write mark read with the entry)."""
        codes = yield self._revalidate_step([rkey], [check])
        if int(codes[0]) == 1:
            try:
                value = self._loads(check.raw[check.start :], type_)
                return Entry(value, check.raw, check.start, check.epoch)
            except Exception as exc:
                return self._corrupt(check.raw, check.epoch, exc)
        self.emit(_MISS)
        return Miss("" if int(codes[0]) == 0 else "!", check.epoch, mark)

    # -- writes --------------------------------------------------------------------------------
    def write(self, prepared: Prepared) -> Protocol[None]:
        """Store prepared entries unconditionally (one script per shard touched)."""
        head: list[Any] = [
            "",
            prepared.ttl_ms,
            self.grace_ms,
            len(prepared.tag_names),
            *prepared.tag_names,
            secrets.token_hex(8),  # the new write mark: refuses the fills that read before
            2 * self.guard_ms,
            0,
        ]
        for base, group in self._groups(prepared.keys):
            args = list(head)
            tag_keys = [base + ":t:" + name for name in prepared.tag_names]
            keys = [base + ":epoch", base + ":ns", *tag_keys]
            for i in group:
                flags, payload = prepared.entries[i]
                args += ("*", "*", flags, 0, payload)
                keys += (prepared.keys[i], self.mark_key(prepared.keys[i]))
            yield Eval(WRITE, keys, args)

    def fill(
        self,
        rkey: str,
        miss: Miss,
        value: Any,
        *,
        ttl: float,
        negative_ttl: float | None,
        tags: TagArgs,
        type_: Any,
        started: float,
        compute: float,
        note: str | None = None,
    ) -> Protocol[bool] | None:
        """The write of a loader's result (``None``: nothing to store, ``negative_ttl`` 0).

        The write is refused by Redis if the key (entry or write mark), one of the tags or the
        namespace changed since the read; the protocol then returns ``False``. Encoding happens
        now, so a ``SerializationError`` reaches the caller. ``note``: the key of the failed-load
        note the write deletes (this load succeeded, refused or not).
        """
        negative = value is None and negative_ttl is not None
        if negative:
            assert negative_ttl is not None
            if negative_ttl == 0:
                return None
            ttl = negative_ttl
        key = self.logical_key(rkey)
        payload = self.encode(key, value, type_)
        if self.clock() - started > self.fill_timeout:
            # a tombstone lives fill_timeout: past it, a delete during the load could be missed
            log.info("cache %r: fill of %r took too long; not stored", self.namespace, key)
            self.emit(CacheEvent.STALE_FILL_REJECTED)
            return _refused()
        names, tag_keys = tags
        base = self.base_of(rkey)
        if self.shards > 1:
            tag_keys = [base + ":t:" + name for name in names]
        if miss.epoch is not None and not miss.epoch.isdigit():
            # foreign bytes under the epoch key: what happened since the read is unknown
            log.warning(
                "cache %r: the namespace epoch is not distcache's; not stored", self.namespace
            )
            self.emit(CacheEvent.DECODE_ERROR)
            return _refused()
        seen = miss.epoch.decode() if miss.epoch is not None else "0"
        flags = self.serializer.id + (b"n" if negative else b"v")
        compute_us = max(0, round(compute * 1_000_000))
        if miss.baseline:
            seen_mark: bytes = b"*"  # the bytes compare: a set or delete since changed them
        elif miss.mark is None:
            seen_mark = b"!"  # a read that did not capture the mark: never stored
        else:
            seen_mark = b"=" + miss.mark
        keys = [base + ":epoch", base + ":ns", *tag_keys, rkey, self.mark_key(rkey)]
        if note is not None:
            keys.append(note)
        step = Eval(
            WRITE,
            keys,
            [
                seen,
                _ms(ttl),
                self.grace_ms,
                len(names),
                *names,
                "",
                0,
                0 if note is None else 1,
                miss.baseline,
                seen_mark,
                flags,
                compute_us,
                payload,
            ],
        )
        return self._fill_write(key, step)

    def _fill_write(self, key: str, step: Eval) -> Protocol[bool]:
        codes = yield step
        if int(codes[0]) == 1:
            self.emit(CacheEvent.FILL)
            return True
        why = "key changed" if int(codes[0]) == 0 else "namespace or tag invalidated"
        log.info("cache %r: stale fill of %r refused (%s)", self.namespace, key, why)
        self.emit(CacheEvent.STALE_FILL_REJECTED)
        return False

    def tag_args(self, tags: Iterable[str]) -> TagArgs:
        """Validated tags of one entry and their record keys (``ConfigError`` if invalid)."""
        out = self.tags(tags)
        self._check_meta(out[0])
        return out

    def check_fill_args(
        self, ttl: Seconds | None, negative_ttl: Seconds | None, tags: Iterable[str]
    ) -> tuple[float, float | None, TagArgs]:
        """Validate a read-through's arguments before any I/O."""
        ttl_s = self.ttl_for(ttl)
        neg = (
            None
            if negative_ttl is None
            else seconds(negative_ttl, field="negative_ttl", allow_zero=True)
        )
        return ttl_s, neg, self.tag_args(tags)

    # -- invalidation --------------------------------------------------------------------------
    def delete(self, rkey: str) -> Protocol[bool]:
        """Replace the entry by a tombstone (refusing in-flight fills); ``True`` if one was live."""
        tombstone = TOMBSTONE + secrets.token_hex(8).encode()
        args: list[Any] = [
            tombstone,
            self.fill_timeout_ms,  # the write mark (below) outlives it and refuses older fills
            secrets.token_hex(8),
            2 * self.guard_ms,
        ]
        return bool((yield Eval(DELETE, [rkey, self.mark_key(rkey)], args)))

    def bump(self, record_keys: list[str]) -> Protocol[None]:
        """Move the epoch and stamp it into ``record_keys``: their entries become misses.

        ``record_keys`` are shard 0's; with ``shards > 1`` the same records are bumped on every
        shard, one script each, and the protocol returns only once all of them succeeded (a
        failure is raised: a partial invalidation never reports success).
        """
        base0 = self._bases[0]
        suffixes = [k[len(base0) :] for k in record_keys]
        for base in self._bases:
            keys = [base + ":epoch", *(base + s for s in suffixes)]
            yield Eval(BUMP, keys, [self.guard_ms])
