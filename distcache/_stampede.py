"""Read-through under load: one loader per key, early refresh (XFetch), bounded stale serving.

The decisions are written once, as generators (``ReadThrough.run`` and ``ReadThrough.refresh``)
that yield steps ("look the key up", "join the in-process flight", "take the fill lock", "call
the loader", ...); ``SyncFlow`` runs them with threads, ``AsyncFlow`` with asyncio.

A miss, in three processes (P1 leads; ``L`` is the distributed fill lock, a ``distlock.Lock``)::

    P1 t1: MGET miss -> flight: leader -> L acquired -> MGET miss -> loader ... WRITE -> release
    P1 t2: MGET miss -> flight: waits for t1 ..................................-> t1's value
    P2 t1: MGET miss -> flight: leader -> L: queued (BLPOP) ................... handoff -> MGET hit
    P3 t1: MGET miss -> flight: leader -> L: queued (BLPOP) ........................... -> MGET hit

Every wait is bounded by ``Stampede.wait``; then the caller serves the expired value (within
the staleness bound) or calls the loader itself (``on_timeout``). A loader that raises reaches
every in-process waiter, and the fill lock is released before the exception propagates.

Clocks. An entry's expiry is ``computed_at_ms + ttl_ms`` on the *server's* clock (``TIME`` in
the WRITE script), the one clock every process sees. Each cache estimates it as its monotonic
``clock()`` plus an offset measured with one ``TIME`` round trip (re-measured every minute), so
client wall clocks never matter and an injected fake clock moves time for tests. The hard bound on
staleness is kept by Redis itself: an entry's key lives ``ttl + grace`` (``PX``), and
``grace`` is the largest stale window, so no read can return it later than that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, cast

from distkit import ConfigError, DistkitError, LoaderError
from distkit._config import seconds
from distkit._errors import redact
from distkit._protocol import Command, Eval, Protocol
from distlock import AsyncLock, Lock

from ._core import FAILED, FAILURES, GUARD_FLOOR_MS, CacheCore, Clock, Entry, Miss, TagArgs
from ._handshake import Deadline, enter, leave, until
from ._handshake import OutOfTime as _OutOfTime
from ._metrics import CacheEvent
from ._near import ABSENT
from ._scripts import NOW

if TYPE_CHECKING:
    from ._cache import AsyncCache, Cache

__all__ = ["AsyncFlow", "ReadThrough", "ServerClock", "Stampede", "SyncFlow"]

log = logging.getLogger("distcache")

Seconds = float | timedelta
Random = Callable[[], float]

_RESYNC = 60.0  # seconds between two measurements of the server clock's offset
_FAR = 40.0  # XFetch: farther than 40 δβ from expiry, P(refresh) < 5e-18; skip the draw
_STALE_STORE = 1024  # last values kept in memory for stale_if_error while Redis is down
DEFAULT_STALE_BYTES = 64 * 1024 * 1024  # ... and their serialized bytes, at most (the option)
_DROPS_KEPT = 4096  # per namespace: recent key invalidations a stale copy is checked against
_MAX_ERROR_TEXT = 300  # characters of a failed load's note
_MAX_NOTE_BYTES = 32 + 4 * _MAX_ERROR_TEXT  # a stamp, "|", and the text in UTF-8
_NOTE_FUTURE_MS = 1000.0  # how far past the server clock's estimate a note's stamp may be
_NOTE_MARGIN_MS = 5.0  # clock estimates of two processes differ by their errors, plus this
_IDLE = 5.0  # seconds the sync fill-lock renewer waits for work before its thread exits
_DEFAULT_SOCKET_TIMEOUT = 5.0  # distkit's RedisConfig default, for clients that set none
# A flight is joined only while every write mark set since it started still lives (a mark lives
# at least twice GUARD_FLOOR_MS, whichever handle wrote it).
_JOIN_MAX_AGE = 2 * GUARD_FLOOR_MS / 1000


@dataclass(frozen=True, slots=True)
class Stampede:
    """How concurrent misses of one key are collapsed into one loader call.

    Args:
        lock: also take a distributed fill lock (``distlock.Lock``), so that one process in
            the whole fleet loads; ``False``: one load per process (in-process single-flight).
        wait: the longest a caller waits for another caller's load (seconds or ``timedelta``).
        on_timeout: after ``wait``: ``"load"`` calls the loader itself; ``"stale"`` serves the
            expired value if one is within the staleness bound (else loads).
        lock_ttl: lease of the fill lock; renewed while the loader runs, so it only matters
            when a loading process dies (its waiters then take over after at most this long,
            or after ``wait``, whichever is first).

    Raises:
        ConfigError: an argument is invalid.
    """

    lock: bool = True
    wait: Seconds = 10.0
    on_timeout: Literal["load", "stale"] = "load"
    lock_ttl: Seconds = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.lock, bool):
            raise ConfigError(f"lock must be a bool, got {self.lock!r}")
        if self.on_timeout not in ("load", "stale"):
            raise ConfigError(f"on_timeout must be 'load' or 'stale', got {self.on_timeout!r}")
        object.__setattr__(self, "wait", seconds(self.wait, field="wait"))
        object.__setattr__(self, "lock_ttl", seconds(self.lock_ttl, field="lock_ttl"))


class ServerClock:
    """The server's clock in milliseconds, estimated from the local monotonic clock."""

    __slots__ = ("_clock", "_offset_ms", "_synced_at", "error_ms")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._offset_ms: float | None = None
        self._synced_at = 0.0
        self.error_ms = 0.0  # half the round trip of the last measurement (its uncertainty)

    def due(self) -> bool:
        """Whether the offset should be (re)measured."""
        return self._offset_ms is None or self._clock() - self._synced_at >= _RESYNC

    def sync(self, route_key: str) -> Protocol[None]:
        """Measure the offset with one ``TIME`` on the node of ``route_key``."""
        before = self._clock()
        server_ms = yield Eval(NOW, [route_key], [])
        after = self._clock()
        self._offset_ms = int(server_ms) - (before + after) * 500
        self.error_ms = (after - before) * 500 + 1  # TIME is read in whole milliseconds
        self._synced_at = after

    def now_ms(self) -> float:
        """The estimate (the local wall clock until the first measurement)."""
        offset = self._offset_ms
        if offset is None:
            return time.time() * 1000
        return self._clock() * 1000 + offset


class _Outcome:
    """A loader call's result or exception, and how long it took."""

    __slots__ = ("error", "seconds", "value")

    def __init__(self, value: Any, error: BaseException | None, seconds_: float) -> None:
        self.value = value
        self.error = error
        self.seconds = seconds_


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


LEADER = _Marker("LEADER")
TIMED_OUT = _Marker("TIMED_OUT")
LOOKUP = _Marker("LOOKUP")
LOAD = _Marker("LOAD")
RELEASE = _Marker("RELEASE")
WAITED = _Marker("WAITED")  # an _Acquire that got the lock after queueing behind its holder


class _Join:
    """Join the key's in-process flight: ``LEADER``, the leader's ``_Outcome``, or ``TIMED_OUT``.

    ``seen`` is what this caller's read found (the entry's baseline, the epoch and the write
    mark). Only a flight whose leader read the same joins: otherwise a write or an invalidation
    landed between the two reads, and the flight's loader may have read the source before it (a
    timeline)::

        t1: MGET miss (epoch 7) -> leader -> loader reads the old row ............ value v1
        t2:                          invalidate_tags(...) returns (epoch 8)
        t3:                                              MGET miss (epoch 8) -> join? no: leads

    Had t3 joined, it would return v1 although its call began after the invalidation returned.
    The write mark covers a ``set()`` whose entry is gone again by t3 (expired, evicted, or
    revalidated away): the key reads empty as at t1, but the mark differs. A mark outlives
    ``_JOIN_MAX_AGE``; an older flight is never joined.

    A caller whose own read failed (``seen`` is ``None``: Redis unreachable from this process)
    cannot tell whether another process invalidated the key since a flight began, so it joins
    only a flight that started after its own call began (``begun``, on the flow's clock). An
    older flight's latecomers wait for it to end (at most ``wait``) and then share one follow-up
    flight, led by the first of them: at most two loads of a key at once per process, and every
    value handed out comes from a load that started after the call began.
    """

    __slots__ = ("begun", "seen", "wait")

    def __init__(self, wait: float, seen: Seen, begun: float) -> None:
        self.wait = wait
        self.seen = seen
        self.begun = begun


Seen = tuple[str, bytes | None, bytes | None] | None  # a read: baseline, epoch, write mark


def seen_of(miss: Miss | None) -> Seen:
    """What a read that found ``miss`` saw, as a join compares it (``None``: Redis failed)."""
    return None if miss is None else (miss.baseline, miss.epoch, miss.mark)


class _Acquire:
    """Take the fill lock: ``True`` (at once), ``WAITED`` (after queueing behind another
    holder), ``False`` (not within ``timeout``) or ``FAILED``."""

    __slots__ = ("blocking", "timeout")

    def __init__(self, blocking: bool, timeout: float) -> None:
        self.blocking = blocking
        self.timeout = timeout


class _Fill:
    """Run a fill's write (failing open)."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Protocol[bool]) -> None:
        self.protocol = protocol


class _Publish:
    """Hand the outcome to the flight's waiters (``None``: the leader gave up; they go on)."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: _Outcome | None) -> None:
        self.outcome = outcome


class _MarkFailed:
    """Tell the processes queued on the fill lock that the loader raised (best effort)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _Relookup:
    """Look again under the fill lock (one ``MGET``: entry, epoch, failure note); result:
    ``(Entry | Miss | FAILED, note)``, the note of a failed load later than ``since_ms``."""

    __slots__ = ("since_ms",)

    def __init__(self, since_ms: float) -> None:
        self.since_ms = since_ms


class _Spawn:
    """Refresh the key in the background (skipped if one runs already or the pool is full)."""

    __slots__ = ("entry",)

    def __init__(self, entry: Entry) -> None:
        self.entry = entry


Step = Any
Flow = Generator[Step, Any, Any]


class Call:
    """One read-through call: the key, the loader and its arguments, the fill's options."""

    __slots__ = (
        "args",
        "kwargs",
        "loader",
        "negative_ttl",
        "rkey",
        "since",
        "tags",
        "ttl",
        "type_",
    )

    def __init__(
        self,
        rkey: str,
        loader: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ttl: float,
        negative_ttl: float | None,
        tags: TagArgs,
        type_: Any,
    ) -> None:
        self.rkey = rkey
        self.loader = loader
        self.args = args
        self.kwargs = kwargs
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.tags = tags
        self.type_ = type_
        self.since = 0  # this process's invalidation count before the call's first read


# a load's serialized value (None: read from the entry bytes), expiry, tags, entry bytes, size
_Kept = tuple[bytes | None, float, tuple[str, ...], bytes | None, int]


def _entry_tags(raw: bytes) -> set[str] | None:
    """The tag names recorded in an entry's metadata (``None``: unreadable)."""
    try:
        start = 26 + int(raw[22:26], 16)
        text = raw[26:start].decode("utf-8").split("|")[4]
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return {t.split("=", 1)[0] for t in text.split(",") if t}


class _Forgotten:
    """This process's invalidations of one namespace, shared by all its handles' stale stores.

    Every invalidation moves ``seq``; a copy is kept only if no invalidation that could concern
    it happened since its call began (``since``): a key's own drop, or any tag invalidation or
    clear (``wide``, coarse: a copy not kept only costs a load while Redis is down).
    """

    __slots__ = ("floor", "guard", "keys", "seq", "stores", "wide")

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.seq = 0
        self.wide = 0  # the last tag invalidation or clear
        self.keys: OrderedDict[str, int] = OrderedDict()  # recent key drops (LRU)
        self.floor = 0  # the latest drop no longer in ``keys``
        self.stores: weakref.WeakSet[_StaleStore] = weakref.WeakSet()

    def dropped_since(self, rkey: str, since: int) -> bool:
        """Whether ``rkey`` may have been invalidated after ``since`` (call under ``guard``)."""
        return self.wide > since or self.keys.get(rkey, self.floor) > since

    def note(self, rkeys: Iterable[str]) -> None:
        """Record drops of ``rkeys`` (call under ``guard``)."""
        self.seq += 1
        keys = self.keys
        for rkey in rkeys:
            keys[rkey] = self.seq
            keys.move_to_end(rkey)
        while len(keys) > _DROPS_KEPT:
            self.floor = max(self.floor, keys.popitem(last=False)[1])

    # Any handle of the namespace calls these, with or without a store of its own. With no
    # store in the process there is no copy to drop and no call whose ``put`` could be refused
    # (a store exists before its handle's first call), so nothing is noted.
    def drop(self, rkeys: Iterable[str]) -> None:
        """Forget ``rkeys`` in every store of the namespace."""
        with self.guard:
            if not self.stores:
                return
            rkeys = list(rkeys)
            self.note(rkeys)
            for store in self.stores:
                for rkey in rkeys:
                    store._discard(rkey)

    def drop_tags(self, names: Iterable[str]) -> None:
        """Forget every value tagged with one of ``names`` (or whose tags cannot be read)."""
        with self.guard:
            if not self.stores:
                return
            wanted = set(names)
            self.seq += 1
            self.wide = self.seq
            for store in self.stores:
                for rkey, (_, _, tags, raw, _) in list(store._data.items()):
                    found = _entry_tags(raw) if raw is not None else set(tags)
                    if found is None or not wanted.isdisjoint(found):
                        store._discard(rkey)

    def clear(self) -> None:
        """Forget everything in every store of the namespace."""
        with self.guard:
            if not self.stores:
                return
            self.seq += 1
            self.wide = self.seq
            for store in self.stores:
                store._data.clear()
                store._bytes = 0


_FORGOTTEN: dict[str, _Forgotten] = {}  # by namespace (its epoch key): one per process
_FORGOTTEN_GUARD = threading.Lock()


def _forgotten(namespace_key: str) -> _Forgotten:
    with _FORGOTTEN_GUARD:
        group = _FORGOTTEN.get(namespace_key)
        if group is None:
            group = _FORGOTTEN[namespace_key] = _Forgotten()
        return group


class _StaleStore:
    """The last value of recently read keys, for ``stale_if_error`` while Redis is down (LRU).

    Bounded twice: at most ``size`` keys and ``max_bytes`` of serialized values (the least
    recently used go first; a value larger than ``max_bytes`` on its own is not kept).

    It keeps bytes, never the caller's object: a copy is decoded anew each time it is served, so
    a caller that mutates a value it was returned cannot change what is served later.

    It obeys every invalidation of its namespace made in this process, through any handle:
    ``drop`` (set, delete, a refused fill), ``drop_tags`` and ``clear`` reach every store of the
    namespace, and ``put`` refuses a value whose call began before such an invalidation. An
    entry's tags are those of the entry read, or the caller's for a load.
    """

    __slots__ = ("__weakref__", "_bytes", "_data", "_group", "_max_bytes", "_size")

    def __init__(self, size: int, namespace_key: str, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._data: OrderedDict[str, _Kept] = OrderedDict()
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0  # the sum of the kept entries' sizes
        self._group = _forgotten(namespace_key)
        with self._group.guard:
            self._group.stores.add(self)

    def sequence(self) -> int:
        """The invalidation count now: what a call notes before its read (``put``'s ``since``)."""
        return self._group.seq

    def put(
        self,
        rkey: str,
        data: bytes | None,
        expires_ms: float,
        since: int,
        tags: tuple[str, ...] = (),
        raw: bytes | None = None,
    ) -> None:
        """Keep the value of entry bytes ``raw`` (``data`` ``None``), or a load's serialized
        value ``data`` tagged ``tags``, unless the key may have been invalidated in this
        process after ``since``."""
        size = len(data) if data is not None else 0 if raw is None else len(raw)
        group = self._group
        with group.guard:
            if group.dropped_since(rkey, since):
                return
            self._discard(rkey)
            if size > self._max_bytes:
                return  # would evict everything else and still not fit
            self._data[rkey] = (data, expires_ms, tags, raw, size)
            self._bytes += size
            kept = self._data
            while len(kept) > self._size or self._bytes > self._max_bytes:
                self._bytes -= kept.popitem(last=False)[1][4]

    def _discard(self, rkey: str) -> None:
        """Forget ``rkey`` here (call under the group's guard)."""
        kept = self._data.pop(rkey, None)
        if kept is not None:
            self._bytes -= kept[4]

    def get(self, rkey: str) -> tuple[bytes, float] | None:
        """The kept serialized value of ``rkey`` and its expiry (server clock, ms)."""
        with self._group.guard:
            kept = self._data.get(rkey)
        if kept is None:
            return None
        data, expires_ms, _, raw, _ = kept
        if data is None:  # an entry's bytes: the value follows the header and metadata
            assert raw is not None
            data = raw[26 + int(raw[22:26], 16) :]
        return data, expires_ms

    def drop(self, rkeys: Iterable[str]) -> None:
        """Forget ``rkeys`` (in every store of the namespace)."""
        self._group.drop(rkeys)

    def drop_tags(self, names: Iterable[str]) -> None:
        """Forget every value tagged with one of ``names`` (or whose tags cannot be read)."""
        self._group.drop_tags(names)

    def clear(self) -> None:
        """Forget everything (in every store of the namespace)."""
        self._group.clear()


def _ms(value: float) -> int:
    return max(0, math.ceil(value * 1000))


def _describe(exc: BaseException) -> str:
    """A loader's exception as other processes' waiters see it (URL passwords redacted)."""
    return redact(f"{type(exc).__name__}: {exc}")[:_MAX_ERROR_TEXT]


class ReadThrough:
    """The read-through policy of one cache and its protocols (no I/O).

    ``beta`` is XFetch's β (0: no early refresh); ``stale_while_revalidate`` and
    ``stale_if_error`` are windows in seconds after expiry; ``grace`` (their maximum) is how long
    Redis keeps an entry past its expiry, the hard bound on the staleness of anything served.
    """

    __slots__ = (
        "_group",
        "_store",
        "beta",
        "clock",
        "core",
        "deadline",
        "grace_ms",
        "max_background",
        "prefix",
        "random",
        "sie_ms",
        "slow",
        "stampede",
        "swr_ms",
    )

    def __init__(
        self,
        core: CacheCore,
        *,
        stampede: Stampede | None,
        early_refresh: float,
        stale_while_revalidate: Seconds,
        stale_if_error: Seconds,
        max_background: int,
        random: Random,
        clock: Clock,
        prefix: str,
        miss_deadline: float = math.inf,
        stale_if_error_max_bytes: int = DEFAULT_STALE_BYTES,
    ) -> None:
        if stampede is not None and not isinstance(stampede, Stampede):
            raise ConfigError(f"stampede must be a Stampede or None, got {stampede!r}")
        if (
            not isinstance(early_refresh, (int, float))
            or isinstance(early_refresh, bool)
            or not 0 <= early_refresh <= sys.float_info.max  # an int beyond floats, too
        ):
            raise ConfigError(
                f"early_refresh (XFetch's β) must be finite and >= 0, got {early_refresh!r:.80}"
            )
        if (
            not isinstance(max_background, int)
            or isinstance(max_background, bool)
            or max_background < 0
        ):
            raise ConfigError(f"max_background must be an int >= 0, got {max_background!r}")
        if not callable(random):
            raise ConfigError(f"random must return floats in [0, 1), got {random!r}")
        if (
            not isinstance(stale_if_error_max_bytes, int)
            or isinstance(stale_if_error_max_bytes, bool)
            or stale_if_error_max_bytes < 1
        ):
            raise ConfigError(
                f"stale_if_error_max_bytes must be an int >= 1, got {stale_if_error_max_bytes!r}"
            )
        self.core = core
        self.prefix = prefix
        self.stampede = stampede
        self.beta = float(early_refresh)
        self.swr_ms = _ms(
            seconds(stale_while_revalidate, field="stale_while_revalidate", allow_zero=True)
        )
        self.sie_ms = _ms(seconds(stale_if_error, field="stale_if_error", allow_zero=True))
        self.grace_ms = max(self.swr_ms, self.sie_ms)
        self.max_background = max_background
        self.random = random
        self.clock = ServerClock(clock)
        self._group = _forgotten(core.epoch_key)
        self._store = (
            _StaleStore(_STALE_STORE, core.epoch_key, stale_if_error_max_bytes)
            if self.sie_ms
            else None
        )
        core.grace_ms = self.grace_ms
        core.now_ms = self.clock.now_ms
        self.deadline = miss_deadline
        breaker = core.breaker
        slow = None if breaker is None else breaker.slow_call
        self.slow = miss_deadline / 4 if slow is None else slow

    # -- the miss path's deadline (C5) ---------------------------------------------------------
    def succeeded(self, took: float) -> None:
        """A Redis step answered after ``took`` seconds: slower than ``slow``, a breaker failure."""
        if took <= self.slow:
            self.core.succeeded()
            return
        breaker = self.core.breaker
        if breaker is not None:
            breaker.record_failure()

    def out_of_time(self, state: _RunState) -> bool:
        """Whether the call has used up its Redis time (the first time: a breaker failure)."""
        if state.spent < state.deadline:
            return False
        if not state.late:
            state.late = True
            breaker = self.core.breaker
            if breaker is not None:
                breaker.record_failure()
            log.warning(
                "cache %r: a read-through spent its %gs deadline on Redis; skipping the rest "
                "(failing open)",
                self.core.namespace,
                state.deadline,
            )
        return True

    # -- decisions -----------------------------------------------------------------------------
    def early(self, entry: Entry, now_ms: float) -> bool:
        """XFetch: refresh early when ``now - δ·β·ln(rand()) >= expiry`` (rand in (0, 1])."""
        scale = entry.delta_ms * self.beta
        if scale <= 0 or entry.expires_ms - now_ms > scale * _FAR:
            return False  # P < exp(-_FAR): not worth a random draw on the hit path
        draw = self.random()
        # out of range, log(0) would raise a bare ValueError on the hit path
        if draw.__class__ not in (float, int) or not 0.0 <= draw < 1.0:
            raise ConfigError(f"random must return floats in [0, 1), got {draw!r:.80}")
        gap = -scale * math.log(1.0 - draw)
        return now_ms + gap >= entry.expires_ms

    def _late_ms(self, entry_expires_ms: float) -> float:
        """How late past expiry, upper estimate (the clock's uncertainty counts against us)."""
        return self.clock.now_ms() + self.clock.error_ms - entry_expires_ms

    def _servable(self, stale: Entry | None, window_ms: int) -> bool:
        return stale is not None and self._late_ms(stale.expires_ms) <= window_ms

    @property
    def lock_prefix(self) -> str:
        """The fill locks' key prefix: ``{prefix}:cache``, so their keys
        (``{prefix}:cache:lock:{name}``) can never be a user's ``Lock`` under ``{prefix}``."""
        return f"{self.prefix}:cache"

    def lock_name(self, rkey: str) -> str:
        """The fill lock's name for ``rkey`` (keys: ``{prefix}:cache:lock:{name}``)."""
        digest = hashlib.sha256(rkey.encode()).hexdigest()[:32]
        return f"cache.fill.{self.core.namespace}.{digest}"

    def error_key(self, rkey: str) -> str:
        """Where a failed load of ``rkey`` is noted for waiters in other processes.

        ``{base}:ek:<key>`` (or ``:eh:<sha256>``): the entry's slot, outside the entries' space.
        """
        base = self.core.base_of(rkey)
        return base + ":e" + rkey[len(base) + 1 :]

    def relookup(self, rkey: str, type_: Any, since_ms: float) -> Protocol[Any]:
        """The second look, under the fill lock: the entry, and a failed load's note."""
        core = self.core
        raw, epoch, note, mark = yield Command(
            ("MGET", rkey, core.epoch_of(rkey), self.error_key(rkey), core.mark_key(rkey))
        )
        found = core.entry(raw, epoch, type_, True)  # counted by the first look
        if found.__class__ is not Entry:
            found = yield from core.settle(rkey, found, mark, type_)
        # A note stamped later than the server's clock can be (with both estimates' errors and a
        # second of slack) was not written by distcache: foreign bytes, ignored.
        until_ms = self.clock.now_ms() + 2 * self.clock.error_ms + _NOTE_FUTURE_MS
        return found, _fresh_note(note, since_ms, until_ms)

    def sequence(self) -> int:
        """This process's invalidation count of the namespace (a call notes it before reading)."""
        return 0 if self._store is None else self._store.sequence()

    def _remember(self, call: Call, value: Any, expires_ms: float, raw: bytes) -> None:
        if self._store is not None:
            self._store.put(call.rkey, None, expires_ms, call.since, raw=raw)

    def _loaded(self, call: Call, value: Any, stored: bool | None) -> None:
        """Keep a loader's result for ``stale_if_error``, unless Redis refused it as stale."""
        store = self._store
        if store is None:
            return
        ttl = call.ttl
        if value is None and call.negative_ttl is not None:
            ttl = call.negative_ttl
        if stored is False or ttl <= 0:
            store.drop((call.rkey,))
            return
        try:  # kept serialized: what is served is what was stored, not the caller's object
            data = self.core.serializer.dumps(value, call.type_)
        except Exception:  # not encodable (its fill failed the same way): nothing to keep
            store.drop((call.rkey,))
            return
        store.put(call.rkey, data, self.clock.now_ms() + ttl * 1000, call.since, call.tags[0])

    # A handle without stale_if_error keeps no copies, but its invalidations reach the copies
    # of the namespace's other handles in this process all the same.
    def forget(self, rkeys: Iterable[str]) -> None:
        """Drop the ``stale_if_error`` copies of ``rkeys`` (a local set, delete or fill)."""
        self._group.drop(rkeys)

    def forget_tags(self, names: Iterable[str]) -> None:
        """Drop the ``stale_if_error`` copies tagged with any of ``names``."""
        self._group.drop_tags(names)

    def forget_all(self) -> None:
        """Drop every ``stale_if_error`` copy (a local ``clear``)."""
        self._group.clear()

    def _fill(
        self, call: Call, miss: Miss, outcome: _Outcome, started: float, held: bool = False
    ) -> Flow:
        """Store the loader's result; the flow's value: ``True`` stored, ``False`` refused,
        ``None`` not attempted or Redis failed."""
        protocol = self.core.fill(
            call.rkey,
            miss,
            outcome.value,
            ttl=call.ttl,
            negative_ttl=call.negative_ttl,
            tags=call.tags,
            type_=call.type_,
            started=started,
            compute=outcome.seconds,
            note=self.error_key(call.rkey) if held else None,
        )
        if protocol is None:
            return None
        return (yield _Fill(protocol))

    # -- protocols -----------------------------------------------------------------------------
    def plain_hit(self, found: Entry, call: Call) -> bool:
        """Whether ``found`` is a hit that needs no step at all (the drivers' fast path).

        Fresh (or no stale window to consider) and too far from its expiry for XFetch to draw:
        counted and returned at once. Anything else goes through ``run``, which then makes the
        one random draw itself.
        """
        now = self.clock.now_ms()
        if now >= found.expires_ms and self.grace_ms:
            return False
        scale = found.delta_ms * self.beta
        if scale > 0 and found.expires_ms - now <= scale * _FAR:
            return False
        self.core.emit(CacheEvent.HIT)
        self._remember(call, found.value, found.expires_ms, found.raw)
        return True

    def run(self, call: Call, found: Any = LOOKUP, started: float | None = None) -> Flow:
        """One ``get_or_set``: the value, from the cache, another caller's load, or the loader.

        ``found`` / ``started``: the first look, when the driver already made it.
        """
        core = self.core
        if started is None:
            started = core.clock()
        if found is LOOKUP:
            found = yield LOOKUP
        stale: Entry | None = None
        miss: Miss | None
        if found.__class__ is Entry:
            now = self.clock.now_ms()
            late = now - found.expires_ms
            if late < 0 or not self.grace_ms:  # no stale window: Redis expired it if it was due
                core.emit(CacheEvent.HIT)
                self._remember(call, found.value, found.expires_ms, found.raw)
                if self.beta and self.early(found, now):
                    yield _Spawn(found)
                return found.value
            core.emit(CacheEvent.MISS)
            if self._servable(found, self.swr_ms):
                core.emit(CacheEvent.STALE_SERVED)
                yield _Spawn(found)
                return found.value
            stale = found if self._servable(found, self.grace_ms) else None
            miss = found.miss()
        elif found is FAILED:
            miss = None
            kept = self._store.get(call.rkey) if self._store is not None else None
            if kept is not None and self._late_ms(kept[1]) <= self.sie_ms:
                try:  # a fresh object each time: no earlier caller's mutation shows
                    value = core.serializer.loads(kept[0], call.type_)
                except Exception:  # undecodable now (a type_ it does not fit): load instead
                    value = kept = None
                if kept is not None:
                    core.emit(CacheEvent.STALE_SERVED)  # Redis is down: do not hammer the loader
                    return value
        else:
            miss = found
        policy = self.stampede
        if policy is None:
            return (yield from self._load(call, miss, stale, started))
        wait = float(policy.wait)  # type: ignore[arg-type]
        joined = yield _Join(wait, seen_of(miss), started)
        if joined is not LEADER:
            if joined.__class__ is _Outcome:
                core.emit(CacheEvent.COALESCED)
                if joined.error is not None:
                    if self._servable(stale, self.sie_ms):
                        core.emit(CacheEvent.STALE_SERVED)
                        return stale.value  # type: ignore[union-attr]
                    raise joined.error
                return joined.value
            core.emit(CacheEvent.WAIT_TIMEOUT)
            if policy.on_timeout == "stale" and self._servable(stale, self.grace_ms):
                core.emit(CacheEvent.STALE_SERVED)
                return stale.value  # type: ignore[union-attr]
            return (yield from self._load(call, miss, stale, started))
        outcome: _Outcome | None = None
        held = False
        try:
            if miss is not None and policy.lock:
                # A failure noted later than this (by another process's estimate of the server
                # clock, hence the margin) happened while this caller waited; an older one, or
                # one too close to tell, is not this caller's: it then loads (the safe side).
                asked_ms = self.clock.now_ms() + 2 * self.clock.error_ms + _NOTE_MARGIN_MS
                got = yield _Acquire(True, wait)
                if got is True or got is WAITED:
                    held = True
                    # Taken at once, nobody's load was waited for: any note is not this
                    # caller's (a planted one must not turn the key into a LoaderError).
                    again, failed = yield _Relookup(asked_ms if got is WAITED else math.inf)
                    if again.__class__ is Entry:
                        if not self.grace_ms or self.clock.now_ms() < again.expires_ms:
                            core.emit(CacheEvent.COALESCED)  # another process loaded it
                            outcome = _Outcome(again.value, None, 0.0)
                            self._remember(call, again.value, again.expires_ms, again.raw)
                            return again.value
                        miss = again.miss()
                    elif again is FAILED:
                        miss = None
                    else:
                        miss = again
                    if miss is not None and failed is not None:
                        # the load this caller waited for raised, in another process
                        key = core.logical_key(call.rkey)
                        error = LoaderError(
                            f"cache {core.namespace!r}: the loader of {key!r:.80} raised in "
                            f"another process while this caller waited: {failed}",
                            key=key,
                        )
                        outcome = _Outcome(None, error, 0.0)
                        if self._servable(stale, self.sie_ms):
                            core.emit(CacheEvent.STALE_SERVED)
                            return stale.value  # type: ignore[union-attr]
                        raise error
                elif got is False:
                    core.emit(CacheEvent.WAIT_TIMEOUT)
                    if policy.on_timeout == "stale" and self._servable(stale, self.grace_ms):
                        core.emit(CacheEvent.STALE_SERVED)
                        outcome = _Outcome(stale.value, None, 0.0)  # type: ignore[union-attr]
                        return stale.value  # type: ignore[union-attr]
                else:  # FAILED: Redis is down; load without it (fail-open)
                    miss = None
            outcome = yield LOAD
            if outcome.error is not None:
                if held:
                    yield _MarkFailed(_describe(outcome.error))
                if self._servable(stale, self.sie_ms):
                    core.emit(CacheEvent.STALE_SERVED)
                    return stale.value  # type: ignore[union-attr]
                raise outcome.error
            stored = None
            if miss is not None:
                stored = yield from self._fill(call, miss, outcome, started, held)
            self._loaded(call, outcome.value, stored)
            return outcome.value
        finally:
            # The lock first: its next holder is another process, which still has to read the
            # entry; this process's waiters get the outcome a moment later, from memory. The
            # publish runs even if the release is interrupted (a cancel, KeyboardInterrupt):
            # else the flight stays, and later callers join it and wait for nothing.
            try:
                if held:
                    yield RELEASE
            finally:
                yield _Publish(outcome)

    def _load(self, call: Call, miss: Miss | None, stale: Entry | None, started: float) -> Flow:
        """Call the loader without coordination (stampede control off, or a wait timed out)."""
        outcome = yield LOAD
        if outcome.error is not None:
            if self._servable(stale, self.sie_ms):
                self.core.emit(CacheEvent.STALE_SERVED)
                return stale.value  # type: ignore[union-attr]
            raise outcome.error
        stored = None
        if miss is not None:
            stored = yield from self._fill(call, miss, outcome, started)
        self._loaded(call, outcome.value, stored)
        return outcome.value

    def refresh(self, call: Call, seen: Entry) -> Flow:
        """A background refresh of an entry that was read as ``seen`` (at most one runs)."""
        core = self.core
        started = core.clock()
        miss = seen.miss()
        held = False
        try:
            if self.stampede is not None and self.stampede.lock:
                got = yield _Acquire(False, 0.0)
                if got is not True:
                    return None  # another process refreshes it (or Redis is down)
                held = True
                again, _ = yield _Relookup(math.inf)
                if again.__class__ is Entry:
                    if again.computed_ms > seen.computed_ms:
                        return None  # refreshed meanwhile
                    miss = again.miss()
                elif again is FAILED:
                    return None
                else:
                    miss = again
            outcome = yield LOAD
            if outcome.error is not None:
                core.emit(CacheEvent.REFRESH_ERROR)
                log.warning(
                    "cache %r: background refresh of %r failed: %r",
                    core.namespace,
                    core.logical_key(call.rkey),
                    outcome.error,
                )
                return None
            if (yield from self._fill(call, miss, outcome, started, held)) is False:
                self.forget((call.rkey,))  # Redis refused it: the key changed since the read
            return None
        finally:
            if held:
                yield RELEASE


# -- drivers -----------------------------------------------------------------------------------
# Every flow, so that a forked child can forget the parent's in-process state (flights led by
# parent threads, the renewer's thread): os.register_at_fork at the end of this module.
_LIVE_FLOWS: weakref.WeakSet[SyncFlow | AsyncFlow] = weakref.WeakSet()


def _after_fork() -> None:
    global _FORGOTTEN_GUARD
    # A parent thread may have held these at the fork: the child's copies would never be freed.
    _FORGOTTEN_GUARD = threading.Lock()
    for group in list(_FORGOTTEN.values()):
        group.guard = threading.Lock()
    for flow in list(_LIVE_FLOWS):
        flow._after_fork()


class _Renewer:
    """One daemon thread per ``Cache`` extends the fill locks held while loaders run.

    (``distlock``'s ``auto_renew`` starts a thread per acquisition: one per miss here. Loaders
    are usually far shorter than the renewal interval, so this thread mostly sleeps; it exits
    after ``_IDLE`` seconds without a lock to renew.)
    """

    def __init__(self, interval: float, namespace: str) -> None:
        self._interval = interval
        self._namespace = namespace
        self._cond = threading.Condition()
        self._held: dict[int, tuple[Lock, float]] = {}
        self._thread: threading.Thread | None = None

    def add(self, lock: Lock) -> None:
        with self._cond:
            self._held[id(lock)] = (lock, time.monotonic() + self._interval)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"distcache-fill-renew-{self._namespace}", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def remove(self, lock: Lock) -> None:
        with self._cond:
            self._held.pop(id(lock), None)
            self._cond.notify()  # re-plan: the next due time, or the idle countdown

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._held:
                    self._cond.wait(_IDLE)
                    if not self._held:
                        self._thread = None
                        return
                    continue
                now = time.monotonic()
                due = [lock for lock, at in self._held.values() if at <= now]
                if not due:
                    self._cond.wait(min(at for _, at in self._held.values()) - now)
                    continue
                for lock in due:
                    self._held[id(lock)] = (lock, now + self._interval)
            for lock in due:
                try:
                    lock.extend()
                except DistkitError as exc:  # lost (or Redis down): the WRITE still compares
                    log.warning("cache %r: renewing a fill lock: %s", self._namespace, exc)
                    self.remove(lock)


class _SyncFlight:
    """One in-process load of a key: its outcome, its leader's read and start, and ``next``,
    the follow-up flight of callers that began after it started and could not read Redis."""

    __slots__ = ("done", "next", "outcome", "seen", "started")

    def __init__(self, seen: Seen, started: float) -> None:
        self.done = threading.Event()
        self.outcome: _Outcome | None = None
        self.seen = seen
        self.started = started  # math.inf: a follow-up whose load has not started yet
        self.next: _SyncFlight | None = None


class _AsyncFlight:
    """``_SyncFlight`` for one event loop: the outcome is a future of that loop."""

    __slots__ = ("future", "next", "seen", "started")

    def __init__(self, loop: asyncio.AbstractEventLoop, seen: Seen, started: float) -> None:
        self.future: asyncio.Future[_Outcome | None] = loop.create_future()
        self.seen = seen
        self.started = started  # math.inf: a follow-up whose load has not started yet
        self.next: _AsyncFlight | None = None


async def _wait_for(future: asyncio.Future[_Outcome | None], limit: float) -> Any:
    """``future``'s result, or ``TIMED_OUT`` after ``limit`` seconds (the future is left be)."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), limit)
    except asyncio.TimeoutError:
        return TIMED_OUT


class _RunState:
    """One call's flight and fill lock, and the Redis time it has spent against its deadline."""

    __slots__ = ("deadline", "flight", "late", "lock", "spent")

    def __init__(self, deadline: float = math.inf, spent: float = 0.0) -> None:
        self.flight: Any = None
        self.lock: Any = None
        self.deadline = deadline
        self.spent = spent
        self.late = False  # the deadline has passed (reported once)


def miss_deadline(value: Seconds | None, client: Any) -> float:
    """``miss_deadline`` in seconds; ``None``: twice the client's socket timeout."""
    if value is not None:
        return seconds(value, field="miss_deadline")
    timeout: Any = None
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        timeout = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    else:  # RedisCluster keeps the connection kwargs on its nodes manager
        manager = getattr(client, "nodes_manager", None)
        timeout = (getattr(manager, "connection_kwargs", None) or {}).get("socket_timeout")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        timeout = _DEFAULT_SOCKET_TIMEOUT
    return 2 * float(timeout)


_RELEASE_ERRORS: tuple[type[BaseException], ...] = (DistkitError, *FAILURES)


class _ReloadWithin:
    """``script``, whose NOSCRIPT fallback (a second round trip) is sent only if time is left.

    A cold script cache (restart, failover, ``SCRIPT FLUSH``) turns every script call into two
    round trips; on a slow server the second could overrun the miss deadline by a whole trip.
    """

    __slots__ = ("_expired", "_script")

    def __init__(self, script: Any, expired: Callable[[], bool]) -> None:
        self._script = script
        self._expired = expired

    def __call__(self, client: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._script(client, keys, args, before_reload=self._check)

    def _check(self) -> None:
        if self._expired():
            raise _OutOfTime from None


def _bounded(protocol: Protocol[Any], expired: Callable[[], bool]) -> Protocol[Any]:
    """``protocol``, stopped with ``_OutOfTime`` before any round trip once ``expired()``.

    Only for protocols that leave nothing behind when stopped between two steps (the cache's
    reads and writes; a lock's non-blocking acquire, which has one step).
    """
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = protocol.throw(error) if error is not None else protocol.send(send)
        except StopIteration as stop:
            return stop.value
        if expired():
            protocol.close()
            raise _OutOfTime
        if type(step) is Eval:
            step = step._replace(script=cast(Any, _ReloadWithin(step.script, expired)))
        error = None
        try:
            send = yield step
        except BaseException as exc:
            send, error = None, exc


def _fresh_note(raw: Any, since_ms: float, until_ms: float = math.inf) -> str | None:
    """The text of a failure note written after ``since_ms`` (server clock), else ``None``.

    A note distcache could not have written (stamped after ``until_ms``, or longer than its
    notes are) is foreign: ``None``, as for no note (the caller loads)."""
    if not isinstance(raw, bytes) or len(raw) > _MAX_NOTE_BYTES:
        return None
    stamp, _, text = raw.partition(b"|")
    try:
        stamped = int(stamp)
    except ValueError:
        return None
    if stamped < since_ms or stamped > until_ms:
        return None  # an older failure (this caller did not wait for that load), or foreign
    return text.decode("utf-8", "replace")


_timeout: Any = getattr(asyncio, "timeout", None)  # Python 3.11+; wait_for before


async def _within(limit: float, step: Callable[[], Awaitable[Any]]) -> Any:
    """``await step()``, cancelled after ``limit`` seconds (``asyncio.TimeoutError``)."""
    if _timeout is None:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(step(), limit)
    async with _timeout(limit):
        return await step()


def _log_release_error(core: CacheCore, exc: BaseException) -> None:
    log.warning("cache %r: releasing a fill lock failed: %s", core.namespace, exc)


def _release_quietly(lock: Lock, core: CacheCore) -> None:
    """Release a fill lock after its caller has returned (its deadline had passed)."""
    try:
        lock.release()
    except _RELEASE_ERRORS as exc:
        _log_release_error(core, exc)


async def _arelease_quietly(lock: AsyncLock, core: CacheCore) -> None:
    """``_release_quietly`` for ``AsyncLock``."""
    try:
        await lock.release()
    except _RELEASE_ERRORS as exc:
        _log_release_error(core, exc)


class SyncFlow:
    """Runs ``ReadThrough`` protocols for a ``Cache``: threads, ``threading`` primitives."""

    def __init__(self, cache: Cache, policy: ReadThrough) -> None:
        self.cache = cache
        self.policy = policy
        self.core = policy.core
        self._guard = threading.Lock()
        self._flights: dict[str, _SyncFlight] = {}
        self._refreshing: set[str] = set()
        self._threads: set[threading.Thread] = set()
        policy_ = policy.stampede
        ttl = 30.0 if policy_ is None else float(policy_.lock_ttl)  # type: ignore[arg-type]
        self._renewer = _Renewer(ttl / 3, policy.core.namespace)
        _LIVE_FLOWS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's loads, refreshes and renewer thread are not here."""
        self._guard = threading.Lock()
        self._flights = {}
        self._refreshing = set()
        self._threads = set()
        self._renewer = _Renewer(self._renewer._interval, self.core.namespace)

    def get_or_set(self, call: Call) -> Any:
        """Run ``ReadThrough.run`` for ``call`` (a plain hit returns without driving it)."""
        clock = self.core.clock
        started = clock()
        policy = self.policy
        store = policy._store
        call.since = 0 if store is None else store._group.seq  # policy.sequence(), inlined
        near = self.cache._near
        if near is not None:  # the hottest path: an L1 hit needs no flight state at all
            found = near.get(call.rkey, call.type_)
            if found.__class__ is Entry and policy.plain_hit(found, call):
                return found.value
        state = _RunState(policy.deadline)
        if near is None:
            found = self._read_redis(call, False, state, started)
            if found.__class__ is Entry and policy.plain_hit(found, call):
                return found.value
        elif found is ABSENT:
            found = self._read(call, False, state, started, near_missed=True)
            if found.__class__ is Entry and policy.plain_hit(found, call):
                return found.value
        state.spent = max(state.spent, clock() - started)
        return self._drive(self.policy.run(call, found, started), call, state)

    def drain(self, timeout: float | None) -> bool:
        """Wait for background refreshes to finish; ``False`` if some still run at ``timeout``.

        ``True`` means every refresh thread started so far has ended (joined), not merely that
        its work is done: a thread leaves ``_threads`` only here, once it is dead.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._guard:
                threads = list(self._threads)
            if not threads:
                return True
            for thread in threads:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(left)
                if thread.is_alive():
                    return False
            with self._guard:
                self._threads.difference_update(threads)

    def _drive(self, flow: Flow, call: Call, state: _RunState | None = None) -> Any:
        if state is None:
            state = _RunState()
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value
            send, error = None, None
            try:
                send = self._step(step, call, state)
            except BaseException as exc:
                error = exc

    def _read(
        self, call: Call, quiet: bool, state: _RunState, begun: float, near_missed: bool = False
    ) -> Any:
        """LOOKUP through the near cache, if any (the look under the fill lock asks Redis);
        ``begun``: when ``state.spent`` was last brought up to date; ``near_missed``: the caller
        already found nothing in the near cache."""
        near = self.cache._near
        if near is None or quiet:
            return self._read_redis(call, quiet, state, begun)
        if not near_missed:
            found = near.get(call.rkey, call.type_)
            if found is not ABSENT:
                return found
        stamp = near.stamp(call.rkey)  # before the read: put() refuses it if overtaken
        found = self._read_redis(call, quiet, state, begun)
        if found.__class__ is Entry and found.expires_ms > self.policy.clock.now_ms():
            near.put(call.rkey, call.type_, found, stamp)
        return found

    def _read_redis(self, call: Call, quiet: bool, state: _RunState, begun: float) -> Any:
        core = self.core
        rkey = call.rkey
        breaker = core.breaker
        clock = self.policy.clock
        if self.cache._fast and (breaker is None or breaker.healthy) and not clock.due():
            # A fresh connection's handshake is bounded too (``_expiry``, built only then).
            ends = begun + state.deadline - state.spent
            outer = enter(core.clock, ends)
            begun = core.clock()
            keys = core.hit_keys(rkey)
            execute = self.cache._execute
            try:
                # The hit path: one MGET of entry and epoch, as get(). Anything but a valid
                # entry reads again with the write mark (a fill's baseline must come from the
                # same atomic read as the absence it fills): a third key costs every hit more
                # than the second round trip costs a miss.
                raw, epoch = execute("MGET", keys[0], keys[1])
                found = None if raw is None else core.entry(raw, epoch, call.type_, True)
                if found.__class__ is not Entry:
                    if core.clock() >= ends:
                        raise _OutOfTime  # no second round trip once the deadline has passed
                    raw, epoch, mark = execute("MGET", keys[0], keys[1], keys[2])
            except _OutOfTime:
                self._overran(state)
                return FAILED
            except FAILURES as exc:
                core.failed(exc)
                return FAILED
            finally:
                leave(outer)
            took = core.clock() - begun
            if took > self.policy.slow:
                self.policy.succeeded(took)
            if found.__class__ is Entry:
                return found
            found = core.entry(raw, epoch, call.type_, quiet)
            if found.__class__ is Entry:
                return found
            if found.__class__ is Miss and epoch is not None:
                found.mark = b"" if mark is None else mark
                return found
            protocol = core.settle(rkey, found, mark, call.type_)
        else:
            protocol = core.read_entry(rkey, call.type_, quiet)
        if not core.allow():
            protocol.close()
            return FAILED
        driver = self.cache._driver
        expired = self._expiry(state, begun)
        started = core.clock()
        try:
            with until(expired):
                if clock.due():
                    driver.run(_bounded(clock.sync(core.epoch_of(rkey)), expired))
                found = driver.run(_bounded(protocol, expired))
        except _OutOfTime:
            self._overran(state)
            return FAILED
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        self.policy.succeeded(core.clock() - started)
        return found

    def _expiry(self, state: _RunState, begun: float) -> Deadline:
        """Whether the call's deadline has passed (``state.spent`` as of ``begun``)."""
        return Deadline(self.core.clock, begun + state.deadline - state.spent)

    def _overran(self, state: _RunState) -> None:
        state.spent = max(state.spent, state.deadline)
        self.policy.out_of_time(state)

    def _timed(self, state: _RunState, fn: Callable[[Callable[[], bool]], Any]) -> Any:
        """``fn(expired)`` (one Redis step, to stop once ``expired()``), its time charged to
        the call; ``FAILED`` if it failed or ran out of time."""
        clock = self.core.clock
        begun = clock()
        try:
            expired = self._expiry(state, begun)
            with until(expired):
                out = fn(expired)
        except _OutOfTime:
            self._overran(state)
            return FAILED
        except FAILURES as exc:
            state.spent += clock() - begun
            self.core.failed(exc)
            return FAILED
        took = clock() - begun
        state.spent += took
        self.policy.succeeded(took)
        return out

    def _step(self, step: Step, call: Call, state: _RunState) -> Any:
        core = self.core
        if step is LOOKUP:
            if self.policy.out_of_time(state):
                return FAILED
            begun = core.clock()
            found = self._read(call, False, state, begun)
            state.spent += core.clock() - begun
            return found
        if step is LOAD:
            begun = core.clock()
            try:
                value = call.loader(*call.args, **call.kwargs)
            except Exception as exc:
                return _Outcome(None, exc, core.clock() - begun)
            return _Outcome(value, None, core.clock() - begun)
        cls = step.__class__
        if cls is _Join:
            follow: _SyncFlight | None = None
            with self._guard:
                flight = self._flights.get(call.rkey)
                now = core.clock()
                if (
                    flight is None
                    or flight.seen != step.seen
                    or now - flight.started >= _JOIN_MAX_AGE
                ):
                    state.flight = self._flights[call.rkey] = _SyncFlight(step.seen, now)
                    return LEADER
                if step.seen is None and flight.started < step.begun:
                    follow = flight.next  # its load may predate an invalidation: not joined
                    if follow is None:
                        follow = flight.next = state.flight = _SyncFlight(None, math.inf)
            if follow is not None:
                try:
                    flight.done.wait(step.wait)
                except BaseException:
                    if state.flight is follow:
                        self._abandon(call.rkey, flight, follow)
                    raise
                if state.flight is follow:  # this caller leads the follow-up
                    with self._guard:
                        self._promote(call.rkey, flight)
                    return LEADER
                flight = follow
            if flight.done.wait(step.wait) and flight.outcome is not None:
                return flight.outcome
            return TIMED_OUT
        if cls is _Publish:
            flight = state.flight
            if flight is not None:
                with self._guard:
                    if self._flights.get(call.rkey) is flight:
                        del self._flights[call.rkey]
                    self._promote(call.rkey, flight)
                flight.outcome = step.outcome
                flight.done.set()
            return None
        if cls is _Acquire:
            if self.policy.out_of_time(state) or not core.allow():
                return FAILED
            policy = self.policy.stampede
            assert policy is not None
            lock = Lock(
                self.cache._client,
                self.policy.lock_name(call.rkey),
                ttl=policy.lock_ttl,
                auto_renew=False,  # the cache's one renewer thread extends it
                prefix=self.policy.lock_prefix,
                fence_retention=policy.lock_ttl,  # no fencing needed: the WRITE compares
                retry=self.cache._retry,
            )
            # driven here, not by lock.acquire(): a NOSCRIPT reload must not overrun the deadline
            got = self._timed(
                state,
                lambda expired: lock._driver.run(
                    _bounded(lock._core.acquire(False, None, lock._driver.max_block), expired)
                ),
            )
            if got is False and step.blocking:
                # Queued behind another caller's load: that wait is bounded by Stampede.wait,
                # not by the deadline (which bounds this caller's own Redis round trips).
                try:
                    got = lock.acquire(blocking=True, timeout=step.timeout)
                except FAILURES as exc:
                    core.failed(exc)
                    return FAILED
                core.succeeded()
                if got is True:
                    state.lock = lock
                    self._renewer.add(lock)
                    return WAITED
            if got is True:
                state.lock = lock
                self._renewer.add(lock)
            return got
        if step is RELEASE:
            lock, state.lock = state.lock, None
            if lock is not None:
                self._renewer.remove(lock)
                if self.policy.out_of_time(state):
                    # The caller's time is up: release behind its back (the lease would expire
                    # anyway, but other processes' fills would wait for it meanwhile).
                    threading.Thread(
                        target=_release_quietly,
                        args=(lock, core),
                        name=f"distcache-fill-release-{core.namespace}",
                        daemon=True,
                    ).start()
                    return None
                try:
                    lock.release()
                except _RELEASE_ERRORS as exc:
                    _log_release_error(core, exc)
            return None
        if cls is _Fill:
            if self.policy.out_of_time(state) or not core.allow():
                step.protocol.close()
                return None
            stored = self._timed(
                state, lambda expired: self.cache._driver.run(_bounded(step.protocol, expired))
            )
            if stored is FAILED:
                stored = None
            near = self.cache._near
            if near is not None:  # this process's L1 copy, if any, is older (the stale copy:
                near.evict([call.rkey])  # _loaded replaces it, or drops it if refused)
            return stored
        if cls is _Relookup:
            if self.policy.out_of_time(state) or not core.allow():
                return FAILED, None
            again = self._timed(
                state,
                lambda expired: self.cache._driver.run(
                    _bounded(self.policy.relookup(call.rkey, call.type_, step.since_ms), expired)
                ),
            )
            return (FAILED, None) if again is FAILED else again
        if cls is _MarkFailed:
            if self.policy.out_of_time(state):
                return None
            return self._timed(state, lambda expired: self._mark_failed(step, call))
        if cls is _Spawn:
            self._spawn(call, step.entry)
            return None
        raise TypeError(f"unknown read-through step {step!r}")  # pragma: no cover

    def _promote(self, rkey: str, flight: _SyncFlight) -> None:
        """Start ``flight``'s follow-up, if any: it becomes the key's flight (call under
        ``_guard``; once per follow-up, by whichever comes first: the end of ``flight`` or its
        leader's wait running out)."""
        follow = flight.next
        if follow is None:
            return
        flight.next = None
        follow.started = self.core.clock()
        current = self._flights.get(rkey)
        if current is None or current is flight:
            self._flights[rkey] = follow

    def _abandon(self, rkey: str, flight: _SyncFlight, follow: _SyncFlight) -> None:
        """The follow-up's leader was interrupted before it led: release its waiters."""
        with self._guard:
            if flight.next is follow:
                flight.next = None
            if self._flights.get(rkey) is follow:
                del self._flights[rkey]
        follow.done.set()  # outcome None: its waiters go on without it

    def _mark_failed(self, step: _MarkFailed, call: Call) -> None:
        """Note a failed load for the processes queued on the fill lock (best effort)."""
        policy = self.policy
        assert policy.stampede is not None
        px = max(1, _ms(float(policy.stampede.wait)))  # type: ignore[arg-type]
        note = f"{int(policy.clock.now_ms())}|{step.text}"
        try:
            self.cache._execute("SET", policy.error_key(call.rkey), note, "PX", px)
        except FAILURES as exc:
            log.warning("cache %r: noting a failed load: %s", self.core.namespace, exc)

    def _spawn(self, call: Call, entry: Entry) -> None:
        # ``_refreshing`` (keys whose refresh still works) is the bound; ``_threads`` also holds
        # threads past their work but not yet ended, until drain() or this prunes them.
        with self._guard:
            if call.rkey in self._refreshing or len(self._refreshing) >= self.policy.max_background:
                return
            self._refreshing.add(call.rkey)
            self._threads = {t for t in self._threads if t.is_alive()}
            thread = threading.Thread(
                target=self._refresh,
                args=(call, entry),
                name=f"distcache-refresh-{self.core.namespace}",
                daemon=True,
            )
            self._threads.add(thread)
        if entry.expires_ms > self.policy.clock.now_ms():
            self.core.emit(CacheEvent.EARLY_REFRESH)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had (interpreter exit, a thread limit)
            with self._guard:
                self._refreshing.discard(call.rkey)
                self._threads.discard(thread)
            log.warning("cache %r: background refresh not started: %s", self.core.namespace, exc)

    def _refresh(self, call: Call, entry: Entry) -> None:
        try:
            self._drive(self.policy.refresh(call, entry), call)
        except Exception:
            self.core.emit(CacheEvent.REFRESH_ERROR)
            log.exception("cache %r: background refresh failed", self.core.namespace)
        finally:
            with self._guard:
                self._refreshing.discard(call.rkey)


class AsyncFlow:
    """Runs ``ReadThrough`` protocols for an ``AsyncCache``: tasks and futures on one loop."""

    def __init__(self, cache: AsyncCache, policy: ReadThrough) -> None:
        self.cache = cache
        self.policy = policy
        self.core = policy.core
        # by key: the flight (loops on other threads read it: they look at its future's loop
        # first, and leave a flight of another loop alone)
        self._flights: dict[str, _AsyncFlight] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._releases: set[asyncio.Task[Any]] = set()  # fill-lock work left behind by a deadline
        _LIVE_FLOWS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's flights and tasks are not here."""
        self._flights = {}
        self._refreshing = set()
        self._tasks = set()
        self._releases = set()

    async def get_or_set(self, call: Call) -> Any:
        """Run ``ReadThrough.run`` for ``call`` (a plain hit returns without driving it)."""
        clock = self.core.clock
        started = clock()
        call.since = self.policy.sequence()
        near = self.cache._near
        if near is not None:  # the hottest path: an L1 hit needs no flight state at all
            found = near.get(call.rkey, call.type_)
            if found.__class__ is Entry and self.policy.plain_hit(found, call):
                return found.value
        state = _RunState(self.policy.deadline)
        if near is None or found is ABSENT:
            missed = near is not None
            found = await self._timed(
                state, lambda: self._read(call, False, near_missed=missed), accounted=True
            )
            if found.__class__ is Entry and self.policy.plain_hit(found, call):
                return found.value
        return await self._drive(self.policy.run(call, found, started), call, state)

    async def drain(self, timeout: float | None) -> bool:
        """Wait for background refreshes to finish; ``False`` if some still run at ``timeout``."""
        tasks = set(self._tasks)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending and not self._tasks

    async def _drive(self, flow: Flow, call: Call, state: _RunState | None = None) -> Any:
        if state is None:
            state = _RunState()
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.throw(error) if error is not None else flow.send(send)
            except StopIteration as stop:
                return stop.value
            send, error = None, None
            try:
                send = await self._step(step, call, state)
            except BaseException as exc:
                error = exc

    async def _read(self, call: Call, quiet: bool, near_missed: bool = False) -> Any:
        """LOOKUP through the near cache, if any (the look under the fill lock asks Redis);
        ``near_missed``: the caller already found nothing in the near cache."""
        near = self.cache._near
        if near is None or quiet:
            return await self._read_redis(call, quiet)
        if not near_missed:
            found = near.get(call.rkey, call.type_)
            if found is not ABSENT:
                return found
        stamp = near.stamp(call.rkey)  # before the read: put() refuses it if overtaken
        found = await self._read_redis(call, quiet)
        if found.__class__ is Entry and found.expires_ms > self.policy.clock.now_ms():
            near.put(call.rkey, call.type_, found, stamp)
        return found

    async def _read_redis(self, call: Call, quiet: bool) -> Any:
        core = self.core
        rkey = call.rkey
        breaker = core.breaker
        clock = self.policy.clock
        if self.cache._fast and (breaker is None or breaker.healthy) and not clock.due():
            begun = core.clock()
            keys = core.hit_keys(rkey)
            execute = self.cache._driver.execute
            try:  # the hit path: as the sync twin's (entry and epoch; the mark on a non-hit)
                raw, epoch = await execute("MGET", keys[0], keys[1])
                found = None if raw is None else core.entry(raw, epoch, call.type_, True)
                if found.__class__ is not Entry:
                    raw, epoch, mark = await execute("MGET", keys[0], keys[1], keys[2])
            except FAILURES as exc:
                core.failed(exc)
                return FAILED
            took = core.clock() - begun
            if took > self.policy.slow:
                self.policy.succeeded(took)
            if found.__class__ is Entry:
                return found
            found = core.entry(raw, epoch, call.type_, quiet)
            if found.__class__ is Entry:
                return found
            if found.__class__ is Miss and epoch is not None:
                found.mark = b"" if mark is None else mark
                return found
            protocol = core.settle(rkey, found, mark, call.type_)
        else:
            protocol = core.read_entry(rkey, call.type_, quiet)
        if not core.allow():
            protocol.close()
            return FAILED
        driver = self.cache._driver
        begun = core.clock()
        try:
            if clock.due():
                await driver.run(clock.sync(core.epoch_of(rkey)))
            found = await driver.run(protocol)
        except FAILURES as exc:
            core.failed(exc)
            return FAILED
        self.policy.succeeded(core.clock() - begun)
        return found

    async def _timed(
        self, state: _RunState, step: Callable[[], Awaitable[Any]], accounted: bool = False
    ) -> Any:
        """``await step()`` (Redis round trips) within what is left of the call's deadline.

        Its time is charged to the call; ``FAILED`` if it failed or ran out of time (then
        cancelled: every step is safe to cancel; a fill lock's acquire leaves nothing behind).
        ``accounted``: the step reports to the breaker itself.
        """
        clock = self.core.clock
        left = state.deadline - state.spent
        begun = clock()
        try:
            out = await (step() if left == math.inf else _within(max(0.0, left), step))
        except asyncio.TimeoutError:  # the deadline (a Redis timeout is redis-py's own class)
            state.spent = max(state.deadline, state.spent + clock() - begun)
            self.policy.out_of_time(state)
            return FAILED
        except FAILURES as exc:
            state.spent += clock() - begun
            if accounted:
                raise
            self.core.failed(exc)
            return FAILED
        took = clock() - begun
        state.spent += took
        if not accounted:
            self.policy.succeeded(took)
        return out

    async def _step(self, step: Step, call: Call, state: _RunState) -> Any:
        core = self.core
        if step is LOOKUP:
            if self.policy.out_of_time(state):
                return FAILED
            return await self._timed(state, lambda: self._read(call, False), accounted=True)
        if step is LOAD:
            begun = core.clock()
            try:
                value = await call.loader(*call.args, **call.kwargs)
            except Exception as exc:
                return _Outcome(None, exc, core.clock() - begun)
            return _Outcome(value, None, core.clock() - begun)
        cls = step.__class__
        if cls is _Join:
            now = core.clock()
            loop = asyncio.get_running_loop()
            flight = self._flights.get(call.rkey)
            if (
                flight is None
                or flight.future.get_loop() is not loop
                or flight.seen != step.seen
                or now - flight.started >= _JOIN_MAX_AGE
            ):
                state.flight = self._flights[call.rkey] = _AsyncFlight(loop, step.seen, now)
                return LEADER
            if step.seen is None and flight.started < step.begun:
                follow = flight.next  # its load may predate an invalidation: not joined
                if follow is None:
                    follow = flight.next = state.flight = _AsyncFlight(loop, None, math.inf)
                try:
                    await _wait_for(flight.future, step.wait)
                except BaseException:
                    if state.flight is follow:
                        self._abandon(call.rkey, flight, follow)
                    raise
                if state.flight is follow:  # this caller leads the follow-up
                    self._promote(call.rkey, flight)
                    return LEADER
                flight = follow
            outcome = await _wait_for(flight.future, step.wait)
            return TIMED_OUT if outcome is None else outcome
        if cls is _Publish:
            flight = state.flight
            if flight is not None:
                if self._flights.get(call.rkey) is flight:
                    del self._flights[call.rkey]
                self._promote(call.rkey, flight)
                if not flight.future.done():
                    flight.future.set_result(step.outcome)
            return None
        if cls is _Acquire:
            if self.policy.out_of_time(state) or not core.allow():
                return FAILED
            policy = self.policy.stampede
            assert policy is not None
            lock = AsyncLock(
                self.cache._client,
                self.policy.lock_name(call.rkey),
                ttl=policy.lock_ttl,
                auto_renew=True,  # a task: cheap, unlike a thread
                prefix=self.policy.lock_prefix,
                fence_retention=policy.lock_ttl,  # no fencing needed: the WRITE compares
                retry=self.cache._retry,
            )
            got = await self._timed(state, lambda: self._acquire(lock))
            if got is False and step.blocking:
                # Queued behind another caller's load: that wait is bounded by Stampede.wait,
                # not by the deadline (which bounds this caller's own Redis round trips).
                try:
                    got = await lock.acquire(blocking=True, timeout=step.timeout)
                except FAILURES as exc:
                    core.failed(exc)
                    return FAILED
                core.succeeded()
                if got is True:
                    state.lock = lock
                    return WAITED
            if got is True:
                state.lock = lock
            return got
        if step is RELEASE:
            lock, state.lock = state.lock, None
            if lock is not None:
                if self.policy.out_of_time(state):
                    # The caller's time is up: release behind its back (the lease would expire
                    # anyway, but other processes' fills would wait for it meanwhile).
                    task = asyncio.get_running_loop().create_task(_arelease_quietly(lock, core))
                    self._releases.add(task)
                    task.add_done_callback(self._releases.discard)
                    return None
                # within what is left of the deadline (a NOSCRIPT reload is a second round
                # trip); past it, the release finishes behind the caller's back
                task = asyncio.get_running_loop().create_task(_arelease_quietly(lock, core))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
                left = state.deadline - state.spent
                begun = core.clock()
                try:
                    await (
                        task if left == math.inf else _within(left, lambda: asyncio.shield(task))
                    )
                except asyncio.TimeoutError:
                    state.spent = max(state.deadline, state.spent + core.clock() - begun)
                    self.policy.out_of_time(state)
                    return None
                state.spent += core.clock() - begun
            return None
        if cls is _Fill:
            if self.policy.out_of_time(state) or not core.allow():
                step.protocol.close()
                return None
            stored = await self._timed(state, lambda: self.cache._driver.run(step.protocol))
            if stored is FAILED:
                stored = None
            near = self.cache._near
            if near is not None:  # this process's L1 copy, if any, is older (the stale copy:
                near.evict([call.rkey])  # _loaded replaces it, or drops it if refused)
            return stored
        if cls is _Relookup:
            if self.policy.out_of_time(state) or not core.allow():
                return FAILED, None
            again = await self._timed(
                state,
                lambda: self.cache._driver.run(
                    self.policy.relookup(call.rkey, call.type_, step.since_ms)
                ),
            )
            return (FAILED, None) if again is FAILED else again
        if cls is _MarkFailed:
            if self.policy.out_of_time(state):
                return None
            return await self._timed(state, lambda: self._mark_failed(step, call))
        if cls is _Spawn:
            self._spawn(call, step.entry)
            return None
        raise TypeError(f"unknown read-through step {step!r}")  # pragma: no cover

    async def _acquire(self, lock: AsyncLock) -> bool:
        """``lock.acquire(blocking=False)``; if the caller's deadline cancels it, the acquire is
        left to finish in the background instead of being awaited.

        distlock's ``AsyncLock.acquire`` is cancellation-safe: a cancelled acquire removes any
        lease it may have been granted, but that clean-up is one more round trip on a slow
        server, and the caller's time is up. A lease granted just before the cancel arrived
        (the acquire returned ``True`` unseen) is released here too.
        """
        task = asyncio.ensure_future(lock.acquire(blocking=False))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            self._releases.add(task)
            core = self.core

            def settled(done: asyncio.Task[bool]) -> None:
                self._releases.discard(done)
                if done.cancelled() or done.exception() is not None or not done.result():
                    return
                late = done.get_loop().create_task(_arelease_quietly(lock, core))
                self._releases.add(late)
                late.add_done_callback(self._releases.discard)

            task.add_done_callback(settled)
            raise

    def _promote(self, rkey: str, flight: _AsyncFlight) -> None:
        """Start ``flight``'s follow-up, if any: it becomes the key's flight (once, by whichever
        comes first: the end of ``flight`` or its leader's wait running out)."""
        follow = flight.next
        if follow is None:
            return
        flight.next = None
        follow.started = self.core.clock()
        current = self._flights.get(rkey)
        if current is None or current is flight:
            self._flights[rkey] = follow

    def _abandon(self, rkey: str, flight: _AsyncFlight, follow: _AsyncFlight) -> None:
        """The follow-up's leader was interrupted before it led: release its waiters."""
        if flight.next is follow:
            flight.next = None
        if self._flights.get(rkey) is follow:
            del self._flights[rkey]
        if not follow.future.done():
            follow.future.set_result(None)  # its waiters go on without it

    async def _mark_failed(self, step: _MarkFailed, call: Call) -> None:
        """Note a failed load for the processes queued on the fill lock (best effort)."""
        policy = self.policy
        assert policy.stampede is not None
        px = max(1, _ms(float(policy.stampede.wait)))  # type: ignore[arg-type]
        note = f"{int(policy.clock.now_ms())}|{step.text}"
        try:
            await self.cache._driver.execute("SET", policy.error_key(call.rkey), note, "PX", px)
        except FAILURES as exc:
            log.warning("cache %r: noting a failed load: %s", self.core.namespace, exc)

    def _spawn(self, call: Call, entry: Entry) -> None:
        if call.rkey in self._refreshing or len(self._tasks) >= self.policy.max_background:
            return
        self._refreshing.add(call.rkey)
        if entry.expires_ms > self.policy.clock.now_ms():
            self.core.emit(CacheEvent.EARLY_REFRESH)
        task = asyncio.get_running_loop().create_task(
            self._refresh(call, entry), name=f"distcache-refresh-{self.core.namespace}"
        )
        self._tasks.add(task)
        rkey = call.rkey

        # A done callback, not a ``finally`` in _refresh: a task cancelled before its first
        # step (asyncio.run() ending, loop shutdown) never runs its body, and would hold the
        # key and a max_background slot forever (and drain() would say False forever).
        def ended(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            self._refreshing.discard(rkey)

        task.add_done_callback(ended)

    async def _refresh(self, call: Call, entry: Entry) -> None:
        try:
            await self._drive(self.policy.refresh(call, entry), call)
        except Exception:
            self.core.emit(CacheEvent.REFRESH_ERROR)
            log.exception("cache %r: background refresh failed", self.core.namespace)


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)
