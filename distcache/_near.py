"""The near cache: an in-process L1 in front of Redis, kept coherent by server-pushed invalidation.

``NearCache(...)`` is the configuration a ``Cache`` / ``AsyncCache`` receives; each cache builds
its own ``NearStore`` (a bounded LRU of decoded values) and one listener thread per Redis master.

How an L1 entry disappears when another process changes it: each listener holds one RESP2
connection that runs ``CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX P:cache:{NS}:`` and
then ``SUBSCRIBE __redis__:invalidate``. Redis then publishes, to that very connection, the name
of every key of the namespace that any client modifies (or that expires, is evicted, flushed).
Tracking and subscription live on one connection, so they cannot fail separately: if it breaks,
the listener sees it, the L1 is flushed and bypassed until a new connection is subscribed.

- ``k:<key>`` / ``h:<hash>``: that entry is evicted.
- ``t:<tag>``: entries carrying the tag are evicted (a tag bump, or a record refresh or loss).
- ``ns`` or ``epoch`` without a tag: the whole L1 is flushed (``clear()``, or a lost record).

Why a listener thread for ``AsyncCache`` too: L1 hits complete without yielding to the event
loop, so a listener task could be starved by a coroutine that reads in a loop; a thread gets the
GIL within ``sys.getswitchinterval()`` whatever the loop does.

The fill race (a read that began before an invalidation must not fill L1 after it)::

    A: stamp = (gen, stripe[k])  MGET k -> v1 ..................... put(k, v1, stamp)
    B:                                SET k v2 -> message "k" -> A's listener: stripe[k] += 1
    put: stamp != (gen, stripe[k]) -> refused; had put run first, the message evicts v1 after.

Redis writes the invalidation to the listener's socket before it writes B's reply (both in the
same event-loop turn, tracking first), so once B's write returns, A's stale entry lives only until
A's listener thread runs. Same host, the coherence bound is that thread's scheduling delay (the
hit path polls for unread messages: ~0.5 ms); over a network it also includes the message's
transit from Redis to A, which B's reply does not wait for (measured: 0.35 s of stale hits with
400 ms of added latency towards A only). See docs/cache.md, "The coherence bound"."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import select
import selectors
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis.connection
import redis.sentinel

from distkit import ConfigError
from distkit._config import seconds

from ._core import CacheCore, Entry
from ._metrics import CacheEvent

__all__ = ["ABSENT", "ENTRY_OVERHEAD", "NearCache", "NearStore", "deep_size", "parse_tags"]

log = logging.getLogger("distcache")

CHANNEL = "__redis__:invalidate"
# Bytes accounted per entry besides its key, its raw bytes and its decoded value: the slot (5
# fields), its LRU node and dict slot, its tag-index membership, and the Entry object with its
# numbers. Measured with tracemalloc: 484 bytes with one tag (Python 3.11, 64-bit)
# (tests/test_near_cache.py::test_the_accounted_overhead_covers_what_an_entry_costs).
ENTRY_OVERHEAD = 512
# Bytes added per object of a value to what ``sys.getsizeof`` reports: what it does not see
# (a dict's shared-key table growth, allocator rounding). With it the accounted size of a decoded
# value is at least what tracemalloc measures (tests/test_near_stress.py::test_accounted_*).
PER_OBJECT = 16
_STRIPES = 256
_POLL = 0.0005  # seconds between two checks of the listener sockets on the hit path
# Not part of a value's data even when it refers to them (a model's class, an enum's module).
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
_BACKOFF = (0.02, 2.0)  # a failing listener reconnects after 20 ms, doubling up to 2 s (jittered)
_STEADY = 1.0  # seconds a link must have served for its next failure to restart the backoff
_REPORT_EVERY = 60.0  # seconds between two warnings of a listener that keeps failing


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass(frozen=True, slots=True)
class NearCache:
    """Options of an in-process L1 in front of Redis (``Cache(..., near_cache=NearCache())``).

    Args:
        max_entries: most entries held; the least recently used go first.
        max_bytes: most bytes held (keys, raw and decoded values as measured, per-entry overhead).
        ttl: longest time an entry stays in L1 (never longer than its Redis TTL).
        health_check_interval: the listener pings Redis this often; after two intervals without
            a word from Redis, L1 is bypassed (a silent partition cannot keep stale entries).

    Values are returned as stored, not copied: treat them as immutable (as ``lru_cache``'s).

    Raises:
        ConfigError: an option is invalid.
    """

    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    ttl: float | timedelta = 60.0
    health_check_interval: float | timedelta = 1.0

    def __post_init__(self) -> None:
        for name in ("max_entries", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"NearCache {name} must be a positive int, got {value!r}")
        object.__setattr__(self, "ttl", seconds(self.ttl, field="ttl"))
        object.__setattr__(
            self,
            "health_check_interval",
            seconds(self.health_check_interval, field="health_check_interval"),
        )


class _Slot:
    __slots__ = ("entry", "expires", "size", "tags", "type")

    def __init__(
        self, entry: Entry, type_: Any, expires: float, size: int, tags: tuple[str, ...]
    ) -> None:
        self.entry = entry
        self.type = type_
        self.expires = expires
        self.size = size
        self.tags = tags


def deep_size(value: Any, limit: int = sys.maxsize) -> int:
    """The memory held by ``value``'s object graph, in bytes (stops early once above ``limit``).

    Every object reachable from ``value`` counts once (``sys.getsizeof`` plus ``PER_OBJECT``),
    shared ones too (interned strings, small ints): an over-estimate, never an under-estimate of
    what tracemalloc sees for a decoded value. Classes, modules and functions are not followed.
    """
    total = 0
    seen: set[int] = set()
    level: list[Any] = [value]
    getsizeof = sys.getsizeof
    while level:
        fresh = []
        keys: list[Any] = []
        for obj in level:
            if id(obj) not in seen and not isinstance(obj, _SHARED):
                seen.add(id(obj))
                fresh.append(obj)
                if isinstance(obj, dict):
                    keys += obj  # a dict with str keys shows the GC its values only
        total += sum(map(getsizeof, fresh)) + PER_OBJECT * len(fresh)
        if total > limit:
            return total
        level = gc.get_referents(*fresh)
        level += keys
    return total


def readable(socks: list[Any], timeout: float) -> bool:
    """Whether a socket of ``socks`` has bytes to read or is closed (``poll``: any fd number)."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            for sock in socks:
                poller.register(sock, select.POLLIN)
            return bool(poller.poll(math.ceil(timeout * 1000)))
        with selectors.DefaultSelector() as selector:  # pragma: no cover - no poll (Windows)
            for sock in socks:
                selector.register(sock, selectors.EVENT_READ)
            return bool(selector.select(timeout))
    except (OSError, ValueError):  # closed by its listener meanwhile: the link is going
        return True


def parse_tags(raw: bytes) -> tuple[str, ...] | None:
    """The tag names recorded in an entry envelope (``_scripts.py``), ``None`` if unreadable."""
    try:
        size = int(raw[22:26], 16)
        text = raw[26 : 26 + size].split(b"|")[4]
        return tuple(t.split(b"=", 1)[0].decode() for t in text.split(b",")) if text else ()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


class NearStore:
    """One cache's L1: a bounded LRU, its invalidation listeners, and the fill-race stamps."""

    def __init__(
        self,
        config: NearCache,
        core: CacheCore,
        client: Any,
        *,
        start: bool = True,
    ) -> None:
        self.config = config
        self._ttl = float(config.ttl)  # type: ignore[arg-type]
        self._interval = float(config.health_check_interval)  # type: ignore[arg-type]
        self._max_entries = config.max_entries
        self._max_bytes = config.max_bytes
        self._core = core
        self._clock: Callable[[], float] = core.clock
        self._emit = core.emit
        self._data: OrderedDict[str, _Slot] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._gen = 0
        self._stripes = [0] * _STRIPES
        self._live = False
        self._heard_until = -math.inf  # hits only while Redis spoke within two intervals
        self.pending = 0  # listeners applying invalidations right now
        self._socks: list[Any] = []  # the listeners' sockets (polled by the hit path)
        self._next_poll = -math.inf
        self._dirty = False
        self._offset = 0.0  # server clock minus local clock, seconds
        self._up: dict[int, float] = {}  # listener id -> its heard-until deadline
        self._expected = 1
        self._next_report = -math.inf
        self._unreported = 0  # listener failures logged at debug level since the last warning
        self.prefixes = core.shard_prefixes()  # ``P:cache:{NS}:``, one per shard
        self._listeners: list[_Listener] = []
        self._stop = threading.Event()
        self._connect: list[Callable[[], Any]] = []
        self._client = client
        self._starter: threading.Thread | None = None
        self._forked = False  # a forked child's copy: listeners restart on its next Redis read
        _LIVE_STORES.add(self)
        if start:
            self._launch()

    def _launch(self) -> None:
        self._starter = threading.Thread(
            target=self._start, name=f"distcache-near-start:{self.namespace}", daemon=True
        )
        self._starter.start()

    def _after_fork(self) -> None:
        """In a forked child: empty and bypass L1 until this process's own listeners are up.

        The parent's listener threads do not exist here, and their sockets are the parent's: they
        are closed in the child (the fd only, never shut down, so the parent's links stay up).
        """
        self._lock = threading.Lock()  # a parent thread may have held it at the fork
        for sock in self._socks:
            with contextlib.suppress(Exception):
                sock.close()
        self._socks = []
        self._data.clear()
        self._by_tag.clear()
        self._bytes = 0
        self._gen += 1
        self._up.clear()
        self._live = False
        self._heard_until = -math.inf
        self.pending = 0
        self._dirty = False
        self._next_poll = -math.inf
        self._listeners = []
        self._starter = None
        closed = self._stop.is_set()
        self._stop = threading.Event()
        if closed:
            self._stop.set()
        else:
            self._forked = True

    # -- the hit path ------------------------------------------------------------------------
    def get(self, rkey: str, type_: Any) -> Any:
        """The L1 ``Entry`` of ``rkey`` decoded as ``type_``, or ``ABSENT``."""
        slot = self._data.get(rkey)
        if slot is not None and slot.type is type_:
            now = self._clock()
            if now < slot.expires and now < self._heard_until and not self.pending:
                if now >= self._next_poll:
                    # Invalidations Redis sent that the listener has not applied yet (it waits
                    # for the GIL): at most POLL seconds old, whatever the thread's scheduling.
                    self._next_poll = now + _POLL
                    self._dirty = self._unapplied()
                if self._dirty:
                    if self._core.metrics is not None:
                        self._emit(CacheEvent.NEAR_MISS)
                    return ABSENT
                try:  # noqa: SIM105 - the hit path: no context manager
                    self._data.move_to_end(rkey)
                except KeyError:  # evicted meanwhile: the read overlapped the eviction
                    pass
                if self._core.metrics is not None:
                    self._emit(CacheEvent.NEAR_HIT)
                return slot.entry
        if self._core.metrics is not None:
            self._emit(CacheEvent.NEAR_MISS)
        return ABSENT

    def _unapplied(self) -> bool:
        """Whether a listener socket holds bytes not read yet (a closing one counts as such)."""
        socks = self._socks
        if not socks:
            return False
        return readable(socks, 0.0)

    def stamp(self, rkey: str) -> tuple[int, int] | None:
        """Taken before a Redis read: ``put`` refuses the result if anything moved since."""
        if not self._live:
            if self._forked:
                self._restart()
            return None
        return self._gen, self._stripes[hash(rkey) % _STRIPES]

    def put(self, rkey: str, type_: Any, entry: Entry, stamp: Any) -> bool:
        """Keep an entry just read from Redis, unless an invalidation may have overtaken it."""
        if stamp is None:
            return False
        raw = entry.raw
        tags = parse_tags(raw)
        if tags is None:
            return False
        now = self._clock()
        expires = min(now + self._ttl, entry.expires_ms / 1000.0 - self._offset)
        if expires <= now:
            return False
        size = ENTRY_OVERHEAD + sys.getsizeof(rkey) + sys.getsizeof(raw)
        size += deep_size(entry.value, self._max_bytes - size)
        if size > self._max_bytes:
            return False
        with self._lock:
            if (
                not self._live
                or stamp[0] != self._gen
                or stamp[1] != self._stripes[hash(rkey) % _STRIPES]
            ):
                return False
            self._drop(rkey)
            self._data[rkey] = _Slot(entry, type_, expires, size, tags)
            self._bytes += size
            for tag in tags:
                self._by_tag.setdefault(tag, set()).add(rkey)
            while len(self._data) > self._max_entries or self._bytes > self._max_bytes:
                # popitem, not next(iter(...)): the hit path's unlocked move_to_end between
                # the two would make the iterator raise "OrderedDict mutated during iteration".
                self._forget(*self._data.popitem(last=False))
        return True

    def _restart(self) -> None:
        """A forked child's first Redis read through this L1: start the child's listeners."""
        with self._lock:
            if not self._forked:
                return
            self._forked = False
        self._launch()

    def _drop(self, rkey: str) -> None:
        # under the lock
        slot = self._data.pop(rkey, None)
        if slot is not None:
            self._forget(rkey, slot)

    def _forget(self, rkey: str, slot: _Slot) -> None:
        # under the lock: the bookkeeping of an entry just removed from _data
        self._bytes -= slot.size
        for tag in slot.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(rkey)
                if not keys:
                    del self._by_tag[tag]

    # -- invalidation --------------------------------------------------------------------------
    def evict(self, rkeys: Iterable[str]) -> None:
        """Drop entries, and refuse fills of them that read Redis before now."""
        with self._lock:
            for rkey in rkeys:
                self._stripes[hash(rkey) % _STRIPES] += 1
                self._drop(rkey)

    def evict_tags(self, tags: Iterable[str]) -> None:
        """Drop the entries carrying any of ``tags`` (and refuse fills that read before now)."""
        with self._lock:
            self._gen += 1
            for tag in tags:
                for rkey in list(self._by_tag.get(tag, ())):
                    self._drop(rkey)

    def flush(self) -> None:
        """Drop every entry (and refuse fills that read before now)."""
        with self._lock:
            self._gen += 1
            self._data.clear()
            self._by_tag.clear()
            self._bytes = 0
        self._emit(CacheEvent.NEAR_FLUSH)

    def invalidated(self, keys: list[bytes] | None) -> None:
        """Apply one invalidation message (``None``: the database was flushed)."""
        if keys is None:
            self.flush()
            return
        entries: list[str] = []
        tags: list[str] = []
        everything = False
        epoch = False
        for raw in keys:
            key = raw.decode("utf-8", "replace")
            # P:cache:{NS}:k:<key> | :h:<sha> | :t:<tag> | :ns | :epoch (braces end the base)
            rest = key[key.find("}") + 1 :]
            kind = rest[:3]
            if kind == ":k:" or kind == ":h:":
                entries.append(key)
            elif kind == ":t:":
                tags.append(rest[3:])
            elif rest == ":ns":
                everything = True
            elif rest == ":epoch":
                epoch = True
        if everything or (epoch and not tags):
            self.flush()
            return
        if tags:
            self.evict_tags(tags)
        if entries:
            self.evict(entries)

    # -- listeners -----------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Whether every listener is subscribed (else L1 is empty and bypassed)."""
        return self._live

    def wait_live(self, timeout: float) -> bool:
        """Block until every listener is subscribed (``False`` after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while not self._live:
            if time.monotonic() >= deadline or self._stop.is_set():
                return False
            time.sleep(0.005)
        return True

    def _up_changed(self) -> None:
        # under the lock
        live = len(self._up) == self._expected and not self._stop.is_set()
        self._heard_until = min(self._up.values()) if live else -math.inf
        self._live = live

    def watch(self, sock: Any, on: bool) -> None:
        """Poll ``sock`` on the hit path for unapplied invalidations (``on``), or stop."""
        with self._lock:
            socks = [s for s in self._socks if s is not sock]
            self._socks = [*socks, sock] if on else socks
            self._next_poll = -math.inf

    def listener_up(self, ident: int, offset: float) -> None:
        """A listener is subscribed: fills that read before now are refused (a gap closed)."""
        with self._lock:
            self._gen += 1
            self._offset = offset
            self._up[ident] = self._clock() + 2 * self._interval
            self._next_poll = -math.inf
            self._up_changed()

    def listener_heard(self, ident: int) -> None:
        """Redis spoke on a listener's connection: it is alive until two intervals from now."""
        with self._lock:
            if ident in self._up:
                self._up[ident] = self._clock() + 2 * self._interval
                self._up_changed()

    def listener_down(self, ident: int, error: Exception | None = None) -> None:
        """A listener lost its connection (or failed to make one): flush and bypass L1."""
        with self._lock:
            was = self._up.pop(ident, None)
            self._up_changed()
        why = f" ({error})" if error is not None else ""
        if was is not None:
            self.report(f"near cache invalidation link lost{why}; L1 flushed")
            self.flush()
        elif error is not None and not self._stop.is_set():
            self.report(f"near cache listener cannot subscribe{why}")

    def report(self, what: str) -> None:
        """Log a listener failure: a warning at most once a minute, the others at debug level."""
        now = time.monotonic()
        with self._lock:
            due = now >= self._next_report
            if due:
                self._next_report = now + _REPORT_EVERY
                unreported, self._unreported = self._unreported, 0
            else:
                self._unreported += 1
        if not due:
            log.debug("cache %r: %s", self.namespace, what)
        elif unreported:
            log.warning("cache %r: %s (and %d listener failures in the last minute)",
                        self.namespace, what, unreported)  # fmt: skip
        else:
            log.warning("cache %r: %s", self.namespace, what)

    @property
    def namespace(self) -> str:
        """The namespace of the cache this L1 serves."""
        return self._core.namespace

    def _start(self) -> None:
        """Start one listener per master; on a Cluster, keep following its masters.

        Every ``health_check_interval`` the Cluster's slot map is read again: a master that
        appeared (a reshard onto a new node, a replica promoted) gets a listener, and until it is
        subscribed L1 is flushed and bypassed; a master that left has its listener retired.
        """
        backoff = 0.05
        current: dict[object, _Listener] = {}
        cluster = getattr(self._client, "nodes_manager", None) is not None
        while not self._stop.is_set():
            try:
                endpoints = _endpoints(self._client, self._interval, self.namespace)
            except Exception as exc:
                self.report(f"near cache cannot find Redis: {exc}")
                self._stop.wait(backoff * random.uniform(0.5, 1.0))
                backoff = min(2 * backoff, _BACKOFF[1])
                continue
            backoff = 0.05
            self._follow(current, endpoints)
            if not cluster:
                return
            self._stop.wait(self._interval)

    def _follow(self, current: dict[object, _Listener], endpoints: list[Endpoint]) -> None:
        wanted = dict(endpoints)
        gone = [key for key in current if key not in wanted]
        new = [key for key in wanted if key not in current]
        if not gone and not new:
            return
        if current:
            log.warning("cache %r: near cache: the masters changed; L1 flushed", self.namespace)
        for key in gone:
            listener = current.pop(key)
            listener.retired.set()
            self.listener_down(id(listener))
        with self._lock:
            self._expected = len(wanted)  # not live until the new listeners are subscribed
            self._up_changed()
        self.flush()
        for key in new:
            listener = _Listener(self, wanted[key])
            current[key] = listener
            self._listeners.append(listener)
            listener.start()

    def close(self) -> None:
        """Stop the listeners and empty L1 (idempotent)."""
        self._stop.set()
        with self._lock:
            self._up.clear()
            self._up_changed()
        if self._starter is not None and self._starter is not threading.current_thread():
            self._starter.join(timeout=5)
        for listener in self._listeners:
            listener.join(timeout=5)
        with self._lock:
            self._gen += 1
            self._data.clear()
            self._by_tag.clear()
            self._bytes = 0

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._stop.is_set()

    def stats(self) -> dict[str, int]:
        """Entries and accounted bytes held now."""
        with self._lock:
            return {"entries": len(self._data), "bytes": self._bytes}


def finalizer(owner: object, store: NearStore) -> None:
    """Stop ``store``'s listeners when ``owner`` is garbage-collected without ``close()``."""
    weakref.finalize(owner, _stop, weakref.ref(store))


def _stop(ref: weakref.ref[NearStore]) -> None:
    store = ref()
    if store is not None:  # its Event, not a bound method: a forked child has a new one
        store._stop.set()


# Every store, so that a forked child can reset them all (os.register_at_fork below).
_LIVE_STORES: weakref.WeakSet[NearStore] = weakref.WeakSet()


def _after_fork() -> None:
    for store in list(_LIVE_STORES):
        store._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)


# -- listener connections ----------------------------------------------------------------------
_PASSED = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "credential_provider",
    "socket_connect_timeout",
)


def _connection_factory(
    kwargs: dict[str, Any], cls: type, interval: float, name: str
) -> Callable[[], Any]:
    kw = {k: v for k, v in kwargs.items() if k in _PASSED and v is not None}
    kw.update(protocol=2, socket_timeout=max(interval, 0.5), client_name=name)
    cls_name = cls.__name__
    target: Any
    if "SSL" in cls_name:
        kw.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
        target = redis.connection.SSLConnection
    elif "Unix" in cls_name:
        kw.pop("host", None)
        kw.pop("port", None)
        target = redis.connection.UnixDomainSocketConnection
    else:
        kw.pop("path", None)
        target = redis.connection.Connection
    return lambda: target(**kw)


def _sentinel_endpoint(pool: Any, interval: float, name: str) -> Callable[[], Any]:
    """A factory that asks the sentinels for the current master at every (re)connection.

    Works for the sync and the asyncio Sentinel pools alike (the listener is a thread, so it
    asks through a sync ``Sentinel`` built from the same sentinel addresses and credentials).
    After a failover the old link breaks (L1 flushed and bypassed), and the next connection
    goes to the promoted master.
    """
    manager = pool.sentinel_manager
    addresses = []
    sentinel_kwargs: dict[str, Any] = {}
    for sentinel in manager.sentinels:
        kw = sentinel.connection_pool.connection_kwargs
        addresses.append((kw["host"], kw["port"]))
        sentinel_kwargs = {
            k: v
            for k, v in kw.items()
            if k in ("username", "password", "socket_connect_timeout") and v is not None
        }
    sentinel_kwargs["socket_timeout"] = max(interval, 0.5)
    finder = redis.sentinel.Sentinel(addresses, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]
    service = pool.service_name
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"}
    cls = pool.connection_class

    def make() -> Any:
        host, port = finder.discover_master(service)  # type: ignore[no-untyped-call,unused-ignore]
        return _connection_factory({**kwargs, "host": host, "port": port}, cls, interval, name)()

    return make


Endpoint = tuple[object, Callable[[], Any]]  # (what it is: a master's address, a factory)


def _endpoints(client: Any, interval: float, namespace: str) -> list[Endpoint]:
    """One connection factory per master (one for a standalone server or a Sentinel service)."""
    name = f"distcache-near:{namespace}"
    manager = getattr(client, "nodes_manager", None)
    if manager is None:
        pool = client.connection_pool
        if getattr(pool, "sentinel_manager", None) is not None:
            return [("sentinel", _sentinel_endpoint(pool, interval, name))]
        if "host" not in pool.connection_kwargs and "path" not in pool.connection_kwargs:
            raise ConfigError("the near cache needs a client with a fixed address")
        make = _connection_factory(pool.connection_kwargs, pool.connection_class, interval, name)
        return [("server", make)]
    kwargs = dict(getattr(client, "connection_kwargs", None) or manager.connection_kwargs)
    cls = kwargs.get("connection_class", redis.connection.Connection)
    last: Exception | None = None
    for node in list(manager.startup_nodes.values()):
        seed = _connection_factory({**kwargs, "host": node.host, "port": node.port}, cls,
                                   interval, name)()  # fmt: skip
        try:
            seed.connect()
            seed.send_command("CLUSTER", "SLOTS")
            slots = seed.read_response()
        except Exception as exc:
            last = exc
            continue
        finally:
            seed.disconnect()
        masters = sorted({(s[2][0].decode(), int(s[2][1])) for s in slots})
        return [
            ((h, p), _connection_factory({**kwargs, "host": h, "port": p}, cls, interval, name))
            for h, p in masters
        ]
    raise ConfigError(f"no Cluster node answered CLUSTER SLOTS ({last})")


class _Listener(threading.Thread):
    """One master's invalidation connection: subscribe, apply messages, ping, reconnect."""

    def __init__(self, store: NearStore, make: Callable[[], Any]) -> None:
        super().__init__(name=f"distcache-near:{store.namespace}", daemon=True)
        self._store = store
        self._make = make
        self.retired = threading.Event()  # its master left the cluster's slot map

    def run(self) -> None:
        store = self._store
        stop = store._stop
        ident = id(self)
        backoff = _BACKOFF[0]
        while not stop.is_set() and not self.retired.is_set():
            conn = None
            began = time.monotonic()
            error: Exception | None = None
            try:
                conn = self._make()  # may ask the sentinels, which may have no master yet
                offset = self._subscribe(conn)
                began = time.monotonic()
                self._serve(conn, offset)
            except Exception as exc:
                error = exc
            finally:
                store.listener_down(ident, error)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.disconnect()
            # A link that served a while restarts the backoff; one that fails at once (every
            # attempt the same way) keeps doubling it, so a stuck listener cannot storm Redis.
            if time.monotonic() - began >= _STEADY:
                backoff = _BACKOFF[0]
            stop.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(2 * backoff, _BACKOFF[1])

    def _subscribe(self, conn: Any) -> float:
        """Connect, turn tracking on and subscribe; the server clock's offset to the local one."""
        store = self._store
        conn.connect()
        conn.send_command("CLIENT", "ID")
        own = conn.read_response()
        before = store._clock()
        conn.send_command("TIME")
        secs, micros = conn.read_response()
        after = store._clock()
        offset = int(secs) + int(micros) / 1e6 - (before + after) / 2
        prefixes: list[str] = []
        for prefix in store.prefixes:
            prefixes += ("PREFIX", prefix)
        conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", own, "BCAST", *prefixes)
        conn.read_response()
        conn.send_command("SUBSCRIBE", CHANNEL)
        reply = conn.read_response()
        if not (isinstance(reply, list) and reply[0] == b"subscribe"):
            raise ConnectionError(f"unexpected reply to SUBSCRIBE: {reply!r:.100}")
        return offset

    def _serve(self, conn: Any, offset: float) -> None:
        store = self._store
        stop = store._stop
        ident = id(self)
        interval = store._interval
        next_ping = time.monotonic() + interval
        awaiting_pong = False
        sock = conn._sock
        # The hit path polls the socket from before L1 goes live: an invalidation that arrives
        # before this thread reaches its loop (it may wait for the GIL) already bypasses L1.
        store.watch(sock, True)
        try:
            self._apply(conn)  # messages read with the SUBSCRIBE reply: older than the gen bump
            # Only now: every read that starts after this line is tracked (a fill that read
            # before it is refused by the generation bump in listener_up).
            store.listener_up(ident, offset)
            while not stop.is_set() and not self.retired.is_set():
                wait = min(0.2, max(0.0, next_ping - time.monotonic()))
                # Wait without consuming: until this thread has the GIL back and has applied the
                # bytes, readers see them pending in the socket (NearStore.get bypasses L1).
                if readable([sock], wait):
                    if self._apply(conn):
                        awaiting_pong = False
                    store.listener_heard(ident)
                next_ping, awaiting_pong = self._ping(conn, next_ping, awaiting_pong)
        finally:
            store.watch(sock, False)

    def _apply(self, conn: Any) -> bool:
        """Apply every message received; whether a PONG was among them."""
        store = self._store
        pong = False
        store.pending += 1
        try:
            while conn.can_read(timeout=0):
                message = conn.read_response()
                if isinstance(message, list) and message:
                    if message[0] == b"message":
                        store.invalidated(message[2])
                    elif message[0] == b"pong":
                        pong = True
        finally:
            store.pending -= 1
        return pong

    def _ping(self, conn: Any, next_ping: float, awaiting_pong: bool) -> tuple[float, bool]:
        """Ping when due; a PING left unanswered for a whole interval breaks the link."""
        if time.monotonic() < next_ping:
            return next_ping, awaiting_pong
        if awaiting_pong:
            raise ConnectionError("no PONG within one health-check interval")
        conn.send_command("PING")
        return time.monotonic() + self._store._interval, True
