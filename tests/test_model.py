"""Model-based tests (issue 9 point 1): hypothesis state machines drive the real cache and the real
lock on a real redis-server, step by step, against small reference models; any disagreement is
shrunk to a short, readable program (rule names and arguments are the steps).

Time. TTLs are enforced by Redis (``PX``), so the models keep a *fake* clock: entries get TTLs in
whole fake seconds, while the real TTL given to the cache is ``fake * TTL_SCALE`` (hours) so Redis
never expires anything by itself during a run. The rule ``advance`` moves the fake clock; every
entry whose fake deadline passed is then expired on the server (``PEXPIRE`` to 1 ms, then waited
for) - exactly what Redis does when a TTL runs out - and the model drops it. Evictions of single
records (an entry, a tag record, the namespace record, the epoch) are rules too. For the lock,
lease expiry is a rule that expires the lease key on the server the same way.

Near cache: ``NearCacheMachine`` runs the same program with an L1 in front of each handle; every
read first waits ``near_bound`` (the coherence bound), then must agree with the model exactly,
whichever handle made the change, and whatever Redis evicted or expired.

Scale the walks up with ``DISTKIT_ADVERSARIAL_SCALE`` (see docs/testing.md).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import redis
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from distcache import Cache, NearCache
from distcache._core import Miss
from distcache._stampede import LEADER, Call, _Join, _Publish, _RunState, seen_of
from distkit import ConnectionUnavailable, LockError, connect
from distkit._protocol import SyncDriver
from distkit.testing import FaultProxy, RedisServer
from distlock import FencedStore, Lock, LockNotOwned, StaleFencingToken
from tests._adversarial import examples, fuzz_settings
from tests.test_lock_lost import primed

MISSING = "<miss>"
TTL_SCALE = 3600.0  # real seconds per fake second: Redis never expires anything on its own
KEYS = ["a", "b:c", "日本 ☃", "k" * 230]  # the last is hashed (longer than 200 characters)
TAGS = ["t1", "t2", "t:3"]
VALUES = st.one_of(
    st.none(),
    st.integers(-5, 5),
    st.text(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from("xy"), st.booleans(), max_size=2),
)
HANDLES = ["h0", "h1"]


def _gone(r: redis.Redis, key: str) -> None:
    """Expire ``key`` on the server as its TTL would, and wait until Redis has dropped it."""
    r.pexpire(key, 1)
    deadline = time.monotonic() + 5
    while r.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire"
        time.sleep(0.002)


@dataclass
class Entry:
    """One entry as Redis holds it: value, tags, fake deadline, epoch stamp, generations seen."""

    value: Any
    tags: frozenset[str]
    deadline: int  # fake seconds
    stamp: int  # the epoch it was written (or last revalidated) under
    gens: dict[str, int | None]  # the namespace / tag records' generations at the write


@dataclass
class CacheModel:
    """The reference, at the level of the documented design (``distcache/_scripts.py``).

    Every invalidation moves the epoch and stamps it into the records it invalidates (``ns`` for
    ``clear``, ``t:<tag>`` for a tag). A write records the current generation of its records
    (creating absent ones). A read of an entry stamped with the current epoch is a hit; otherwise
    the entry is revalidated: a hit (re-stamped) if every recorded generation is still current,
    else deleted - so a lost record turns its entries into misses once the epoch next moves, and
    never makes an invalidated entry a hit. ``delete`` reports whether an entry was *present*.
    """

    now: int = 0
    epoch: int = 1
    records: dict[str, int | None] = field(default_factory=dict)
    entries: dict[str, Entry] = field(default_factory=dict)

    def write(self, key: str, value: Any, tags: frozenset[str], ttl: int) -> None:
        names = ["ns", *sorted("t:" + t for t in tags)]
        for name in names:
            if self.records.get(name) is None:
                self.records[name] = self.epoch
        gens = {name: self.records[name] for name in names}
        self.entries[key] = Entry(value, tags, self.now + ttl, self.epoch, gens)

    def read(self, key: str) -> Any:
        entry = self.entries.get(key)
        if entry is None:
            return MISSING
        if entry.stamp != self.epoch:
            if any(self.records.get(n) != g for n, g in entry.gens.items()):
                del self.entries[key]
                return MISSING
            entry.stamp = self.epoch
        return entry.value

    def bump(self, names: list[str]) -> None:
        self.epoch += 1
        for name in names:
            self.records[name] = self.epoch


@dataclass
class Pending:
    """A fill split in two (issue 14): its read happened; its write is a later rule."""

    key: str
    value: Any
    tags: frozenset[str]
    miss: Miss
    forbidden: list[str] = field(default_factory=list)  # what since the read must refuse it
    quiet: bool = True  # nothing at all happened since the read: the write must land
    handle: str = ""  # whose in-process flight the read leads
    flight: Any = None  # the leader's flight state (published at the write)
    mark_lost: bool = False  # the key's write mark was evicted since the read


class CacheMachine(RuleBasedStateMachine):
    """Two ``Cache`` handles (two clients, as two processes) on one namespace vs ``CacheModel``.

    Issue 14's rules: a fill split into its read and its write with any rules between
    (``fill_read`` / ``fill_write``), short TTLs and expiry (``set`` / ``advance``), the loss of
    the epoch, the records and the write marks at any step (``evict_*``, ``flushall``), and a
    third handle with ``stale_if_error`` behind a proxy that an outage rule cuts (``sie_*``):
    no fill whose read preceded a set, delete or invalidation of its key, tags or namespace is
    ever stored, and the stale copy never serves what this handle invalidated.
    """

    server: ClassVar[RedisServer]
    near_bound: ClassVar[float | None] = None  # a near-cache subclass sets its bound
    negative_ttl: ClassVar[int] = 2  # fake seconds

    @classmethod
    def make_cache(cls, client: redis.Redis, **options: Any) -> Cache:
        """Build one handle (the hook for near-cache variants)."""
        return Cache(client, **options)

    def __init__(self) -> None:
        super().__init__()
        self.model = CacheModel()
        self.admin = self.server.client()
        self.admin.flushall()
        self.clients = [self.server.client() for _ in HANDLES]
        self.caches = {
            name: self.make_cache(
                c,
                namespace="model",
                ttl=5 * TTL_SCALE,
                negative_ttl=self.negative_ttl * TTL_SCALE,
                strict=True,
            )
            for name, c in zip(HANDLES, self.clients, strict=True)
        }
        self.core = self.caches["h0"]._core  # key layout only: never used for I/O
        self.pending: list[Pending] = []
        self.proxy = FaultProxy(self.server.address)
        self.proxy.start()
        self.sie_client = connect(
            {"port": self.proxy.port, "socket_timeout": 0.5, "connect_timeout": 0.5}
        )
        self.sie = Cache(
            self.sie_client,
            namespace="model",
            ttl=5 * TTL_SCALE,
            negative_ttl=self.negative_ttl * TTL_SCALE,
            stale_if_error=10 * TTL_SCALE,
            breaker=False,
        )
        self.down = False
        self.kept: dict[str, tuple[Any, frozenset[str]]] = {}  # the sie handle's copies

    def teardown(self) -> None:
        for c in [self.admin, *self.clients, self.sie_client]:
            c.close()
        self.proxy.close()

    def _touch(self, key: str | None = None, names: list[str] | None = None) -> None:
        """Something happened: pending fills are no longer sure to land; a set or delete of
        ``key``, or a bump of ``names``, forbids the ones it concerns."""
        for p in self.pending:
            p.quiet = False
            if key is not None and p.key == key:
                p.forbidden.append(f"write of {key!r}")
            for name in names or ():
                if name == "ns" or name[2:] in p.tags:
                    p.forbidden.append(f"bump of {name}")

    def _forgotten(
        self, key: str | None = None, tags: list[str] | None = None, everything: bool = False
    ) -> None:
        """An invalidation (or update) through ``h0`` / ``h1`` reaches the sie handle's copies
        too: one registry per namespace in the process, whichever handle made it."""
        if everything:
            self.kept.clear()
        if key is not None:
            self.kept.pop(key, None)
        if tags:
            self.kept = {k: v for k, v in self.kept.items() if v[1].isdisjoint(tags)}

    # -- helpers -----------------------------------------------------------------------------
    def _rkey(self, key: str) -> str:
        return self.core.entry_key(key)

    def _record(self, suffix: str) -> str:
        rkey = self._rkey(KEYS[0])
        return rkey[: rkey.index("}") + 1] + ":" + suffix

    # -- operations --------------------------------------------------------------------------
    @rule(
        handle=st.sampled_from(HANDLES),
        key=st.sampled_from(KEYS),
        value=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
        ttl=st.integers(1, 5),
    )
    def set(self, handle: str, key: str, value: Any, tags: frozenset[str], ttl: int) -> None:
        self._touch(key)
        self._forgotten(key)
        assert self.caches[handle].set(key, value, ttl=ttl * TTL_SCALE, tags=sorted(tags))
        self.model.write(key, value, tags, ttl)

    def settle(self) -> None:
        """Before a read: give the near tier's invalidations their bound (no-op without one)."""
        if self.near_bound:
            time.sleep(self.near_bound)

    @rule(handle=st.sampled_from(HANDLES), key=st.sampled_from(KEYS))
    def get(self, handle: str, key: str) -> None:
        self._touch()
        self.settle()
        got = self.caches[handle].get(key, MISSING)
        want = self.model.read(key)
        assert got == want, f"get({key!r}) = {got!r}, model {want!r}"

    @rule(handle=st.sampled_from(HANDLES), keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def get_many(self, handle: str, keys: list[str]) -> None:
        self._touch()
        self.settle()
        got = self.caches[handle].get_many(keys)
        want = {k: v for k in dict.fromkeys(keys) if (v := self.model.read(k)) != MISSING}
        assert got == want

    @rule(
        handle=st.sampled_from(HANDLES),
        key=st.sampled_from(KEYS),
        loaded=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
    )
    def get_or_set(self, handle: str, key: str, loaded: Any, tags: frozenset[str]) -> None:
        self._touch()
        self._get_or_set(self.caches[handle], key, loaded, tags)

    def _get_or_set(self, cache: Cache, key: str, loaded: Any, tags: frozenset[str]) -> Any:
        calls: list[Any] = []

        def loader() -> Any:
            calls.append(loaded)
            return loaded

        self.settle()
        got = cache.get_or_set(key, loader, ttl=3 * TTL_SCALE, tags=sorted(tags))
        cached = self.model.read(key)
        if cached != MISSING:
            assert got == cached and not calls, "a hit must not call the loader"
            return self.model.entries[key].tags
        assert got == loaded and len(calls) == 1
        # a loader's None is a negative entry, with its own ttl
        self.model.write(key, loaded, tags, 3 if loaded is not None else self.negative_ttl)
        return tags

    @rule(handle=st.sampled_from(HANDLES), key=st.sampled_from(KEYS))
    def delete(self, handle: str, key: str) -> None:
        self._touch(key)
        self._forgotten(key)
        was = self.caches[handle].delete(key)
        assert was == (key in self.model.entries)
        self.model.entries.pop(key, None)

    @rule(handle=st.sampled_from(HANDLES), tags=st.lists(st.sampled_from(TAGS), min_size=1))
    def invalidate_tags(self, handle: str, tags: list[str]) -> None:
        self._touch(names=["t:" + t for t in tags])
        self._forgotten(tags=tags)
        self.caches[handle].invalidate_tags(*tags)
        self.model.bump(sorted({"t:" + t for t in tags}))

    @rule(handle=st.sampled_from(HANDLES))
    def clear(self, handle: str) -> None:
        self._touch(names=["ns"])
        self._forgotten(everything=True)
        self.caches[handle].clear()
        self.model.bump(["ns"])

    # -- conditional updates (distcache/_update.py): each write refuses older fills -----------
    @rule(
        handle=st.sampled_from(HANDLES),
        key=st.sampled_from(KEYS),
        value=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
        ttl=st.integers(1, 5),
    )
    def add(self, handle: str, key: str, value: Any, tags: frozenset[str], ttl: int) -> None:
        self.settle()
        self._forgotten(key)  # attempted or not
        stored = self.caches[handle].add(key, value, ttl=ttl * TTL_SCALE, tags=sorted(tags))
        want = self.model.read(key) == MISSING
        assert stored is want, f"add({key!r}) = {stored}, model has {self.model.read(key)!r}"
        self._touch(key if stored else None)
        if stored:
            self.model.write(key, value, tags, ttl)

    @rule(handle=st.sampled_from(HANDLES), key=st.sampled_from(KEYS), delta=st.integers(-3, 3))
    def incr(self, handle: str, key: str, delta: int) -> None:
        self._count(handle, key, delta, down=False)

    @rule(handle=st.sampled_from(HANDLES), key=st.sampled_from(KEYS), delta=st.integers(-3, 3))
    def decr(self, handle: str, key: str, delta: int) -> None:
        self._count(handle, key, delta, down=True)

    def _count(self, handle: str, key: str, delta: int, down: bool) -> None:
        """``incr`` (or ``decr``) ``delta``, checked against the model."""
        self.settle()
        self._forgotten(key)  # whatever the outcome
        cache = self.caches[handle]
        act = (lambda: cache.decr(key, delta)) if down else (lambda: cache.incr(key, delta))
        want = self.model.read(key)
        if want == MISSING:
            with pytest.raises(KeyError):
                act()
            self._touch()
            return
        if type(want) is not int:
            with pytest.raises(TypeError):
                act()
            self._touch()
            return
        self._touch(key)
        now = want - delta if down else want + delta
        assert act() == now
        entry = self.model.entries[key]  # the expiry and the tags stay
        self.model.write(key, now, entry.tags, entry.deadline - self.model.now)

    @rule(handle=st.sampled_from(HANDLES), key=st.sampled_from(KEYS), ttl=st.integers(1, 5))
    def touch(self, handle: str, key: str, ttl: int) -> None:
        self.settle()
        self._forgotten(key)  # whatever the outcome
        want = self.model.read(key)
        done = self.caches[handle].touch(key, ttl * TTL_SCALE)
        assert done is (want != MISSING)
        self._touch(key if done else None)
        if done:
            self.model.write(key, want, self.model.entries[key].tags, ttl)

    @rule(handle=st.sampled_from(HANDLES), keys=st.lists(st.sampled_from(KEYS), max_size=3))
    def delete_many(self, handle: str, keys: list[str]) -> None:
        for key in keys:
            self._touch(key)
            self._forgotten(key)
        count = self.caches[handle].delete_many(keys)
        assert count == sum(k in self.model.entries for k in dict.fromkeys(keys))
        for key in keys:
            self.model.entries.pop(key, None)

    @precondition(lambda self: bool(self.pending))
    @rule(
        handle=st.sampled_from(HANDLES),
        which=st.integers(0, 2),
        op=st.sampled_from(["add", "incr", "touch", "delete_many"]),
        value=st.integers(-5, 5),
        evict=st.booleans(),
    )
    def update_pending_key(self, handle: str, which: int, op: str, value: int, evict: bool) -> None:
        """An update of a key whose fill is loading, its entry then maybe evicted: only the
        write mark the update left can still refuse that fill."""
        key = self.pending[which % len(self.pending)].key
        if op == "add":
            self.add(handle, key, value, frozenset(), 5)
        elif op == "incr":
            self.incr(handle, key, value)
        elif op == "touch":
            self.touch(handle, key, 5)
        else:
            self.delete_many(handle, [key])
        if evict:
            self.evict_entry(key)

    def _update(self, handle: str, key: str, op: str, delta: int) -> None:
        if op == "touch":
            self.touch(handle, key, 5)
        else:
            self._count(handle, key, delta, down=op == "decr")

    @rule(
        handles=st.tuples(st.sampled_from(HANDLES), st.sampled_from(HANDLES)),
        key=st.sampled_from(KEYS),
        ops=st.lists(st.sampled_from(["touch", "incr", "decr"]), min_size=2, max_size=4),
        how=st.sampled_from(["key", "tag", "namespace"]),
        tag=st.sampled_from(TAGS),
        seed=st.integers(-3, 3),
        delta=st.integers(0, 3),
        cut=st.integers(0, 4),
        outage=st.booleans(),
    )
    def updates_around_an_invalidation(
        self,
        handles: tuple[str, str],
        key: str,
        ops: list[str],
        how: str,
        tag: str,
        seed: int,
        delta: int,
        cut: int,
        outage: bool,
    ) -> None:
        """Updates (touch / incr / decr) of an int entry on both sides of an invalidation of it
        (its key, one of its tags, or the namespace) through another handle: every update after
        the invalidation finds nothing (touch ``False``, incr / decr ``KeyError``, each checked
        by the model), and no handle ever reads the value again: neither ``h0`` / ``h1`` nor
        the sie handle, which kept a copy and may have lost Redis before the invalidation."""
        writer, invalidator = handles
        self.set(writer, key, seed, frozenset({tag}), 5)
        cut = min(cut, len(ops))
        for op in ops[:cut]:
            self._update(writer, key, op, delta)
        before = self.model.read(key)
        assert before != MISSING
        if not self.down:  # the sie handle keeps a copy, then maybe loses Redis
            self.sie_get_or_set(key, "<unused>", frozenset())
            assert self.kept[key][0] == before
            if outage:
                self.sie_outage(True)
        if how == "key":
            self.delete(invalidator, key)
        elif how == "tag":
            self.invalidate_tags(invalidator, [tag])
        else:
            self.clear(invalidator)
        assert self.model.read(key) == MISSING
        for op in ops[cut:]:
            self._update(writer, key, op, delta)
        self.settle()
        for handle in HANDLES:
            assert self.caches[handle].get(key, MISSING) == MISSING, f"{key!r} came back"
        assert key not in self.kept
        self.sie_get_or_set(key, "<fresh>", frozenset())  # never the invalidated copy

    # -- time and the server's own behaviour -------------------------------------------------
    @rule(seconds=st.integers(1, 4))
    def advance(self, seconds: int) -> None:
        self._touch()
        self.model.now += seconds
        for key, entry in list(self.model.entries.items()):
            if entry.deadline <= self.model.now:
                _gone(self.admin, self._rkey(key))
                del self.model.entries[key]

    @rule(key=st.sampled_from(KEYS))
    def evict_entry(self, key: str) -> None:
        """Redis evicted (or lost) one entry."""
        self._touch()
        self.admin.delete(self._rkey(key))
        self.model.entries.pop(key, None)

    @rule(record=st.sampled_from(["ns", *("t:" + t for t in TAGS)]))
    def evict_record(self, record: str) -> None:
        """Redis evicted a namespace or tag record: it reads as absent from now on."""
        self._touch()
        self.admin.delete(self._record(record))
        self.model.records[record] = None

    @rule()
    def evict_epoch(self) -> None:
        """A lost epoch comes back as a fresh value: every entry gets revalidated."""
        self._touch()
        if self.admin.delete(self._record("epoch")):
            self.model.epoch += 1

    @rule(key=st.sampled_from(KEYS))
    def evict_mark(self, key: str) -> None:
        """Redis evicted a key's write mark: pending fills of that key become misses."""
        self._touch()
        for p in self.pending:
            p.mark_lost = p.mark_lost or p.key == key
        rkey = self._rkey(key)
        cut = rkey.index("}") + 2  # P:cache:{model}:mk:<key> (or :mh:<sha256>)
        self.admin.delete(rkey[:cut] + "m" + rkey[cut:])

    @rule(key=st.sampled_from(KEYS), ahead_ms=st.integers(-2000, 2000))
    def plant_note(self, key: str, ahead_ms: int) -> None:
        """Foreign bytes shaped as a failed load's note, stamped near the server's clock: no
        caller waited for that load, so it changes nothing (a read-through loads)."""
        sec, usec = self.admin.time()
        note = f"{sec * 1000 + usec // 1000 + ahead_ms}|planted"
        self.admin.set(self.caches["h0"]._policy.error_key(self._rkey(key)), note, px=60_000)

    @rule()
    def flushall(self) -> None:
        """Everything is lost at once (FLUSHALL, a restart without persistence)."""
        self._touch()
        for p in self.pending:
            p.mark_lost = True
        self.admin.flushall()
        self.model.entries.clear()
        self.model.records = dict.fromkeys(self.model.records)
        self.model.epoch += 1

    # -- a fill in two steps ---------------------------------------------------------------
    @precondition(lambda self: len(self.pending) < 3)
    @rule(
        handle=st.sampled_from(HANDLES),
        key=st.sampled_from(KEYS),
        value=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
    )
    def fill_read(self, handle: str, key: str, value: Any, tags: frozenset[str]) -> None:
        """The read of a read-through's miss; the loader then runs across later rules."""
        self._touch()
        cache = self.caches[handle]
        found = cache._driver.run(cache._core.read_entry(self._rkey(key), None))
        want = self.model.read(key)
        if isinstance(found, Miss):
            assert want == MISSING, f"read({key!r}) missed, model {want!r}"
            pending = Pending(key, value, tags, found, handle=handle)
            pending.flight = self._join(handle, key, found)  # it leads its process's flight
            self.pending.append(pending)
        else:
            assert found.value == want, f"read({key!r}) = {found.value!r}, model {want!r}"

    @precondition(lambda self: bool(self.pending))
    @rule(handle=st.sampled_from(HANDLES), which=st.integers(0, 2))
    def fill_write(self, handle: str, which: int) -> None:
        """The write of a split fill: refused if anything it must not outlive happened."""
        # the draw does not depend on Redis's answers (hypothesis replays must draw alike)
        p = self.pending.pop(which % len(self.pending))
        self._touch()
        self._publish(p.handle, p.key, p.flight)
        cache = self.caches[handle]
        core = cache._core
        rkey = self._rkey(p.key)
        negative = p.value is None
        protocol = core.fill(
            rkey,
            p.miss,
            p.value,
            ttl=3 * TTL_SCALE,
            negative_ttl=self.negative_ttl * TTL_SCALE,
            tags=core.tag_args(sorted(p.tags)),
            type_=None,
            started=core.clock(),
            compute=0.0,
        )
        assert protocol is not None
        stored = cache._driver.run(protocol)
        cache._forget([rkey])
        self._forgotten(p.key)
        if p.forbidden:
            assert stored is False, f"a fill of {p.key!r} landed after: {p.forbidden}"
        if p.quiet:
            assert stored is True, f"a fill of {p.key!r} with nothing since its read: refused"
        if stored:
            ttl = self.negative_ttl if negative else 3
            self.model.write(p.key, p.value, p.tags, ttl)

    # -- in-process coalescing across writes (the hostile review of issue 14 item 1) ----------
    def _join(self, handle: str, key: str, miss: Miss) -> tuple[Any, _RunState]:
        """Ask ``handle``'s flow to join the key's flight with what ``miss`` read: ``LEADER``
        (a new flight) or ``TIMED_OUT`` (it joined: with no wait, it times out at once)."""
        cache = self.caches[handle]
        call = Call(self._rkey(key), lambda: None, (), {}, 3.0, None, ((), []), None)
        state = _RunState()
        return cache._flow._step(
            _Join(0.0, seen_of(miss), cache._flow.core.clock()), call, state
        ), state

    def _publish(self, handle: str, key: str, flight: tuple[Any, _RunState] | None) -> None:
        if flight is not None and flight[0] is LEADER:
            call = Call(self._rkey(key), lambda: None, (), {}, 3.0, None, ((), []), None)
            self.caches[handle]._flow._step(_Publish(None), call, flight[1])

    @precondition(lambda self: bool(self.pending))
    @rule(handle=st.sampled_from(HANDLES), which=st.integers(0, 2), value=VALUES)
    def set_then_gone(self, handle: str, which: int, value: Any) -> None:
        """A pending fill's key is set, and that entry is gone again at once (a short ttl that
        ran out, an eviction): what a fill or a coalesced caller must still not outlive."""
        key = self.pending[which % len(self.pending)].key
        self._touch(key)
        self._forgotten(key)
        assert self.caches[handle].set(key, value, ttl=TTL_SCALE)
        self.admin.delete(self._rkey(key))
        self.model.entries.pop(key, None)

    @precondition(lambda self: bool(self.pending))
    @rule(which=st.integers(0, 2))
    def coalesced_caller(self, which: int) -> None:
        """A caller in the process of a pending fill's leader misses the same key: it may join
        that flight only if nothing it must not outlive happened since the leader's read (a
        set, delete or invalidation, whatever became of the set entry since)."""
        p = self.pending[which % len(self.pending)]
        if p.flight is None or p.flight[0] is not LEADER:
            return
        cache = self.caches[p.handle]
        found = cache._driver.run(cache._core.read_entry(self._rkey(p.key), None))
        if not isinstance(found, Miss):
            return
        joined, state = self._join(p.handle, p.key, found)
        if joined is LEADER:
            self._publish(p.handle, p.key, (joined, state))
            p.flight = None  # its flight was replaced: nobody can join it any more
        if p.forbidden and not p.mark_lost:
            assert joined is LEADER, f"a caller of {p.key!r} joined a load older than {p.forbidden}"

    # -- a handle with stale_if_error, and Redis outages -------------------------------------
    @rule(on=st.booleans())
    def sie_outage(self, on: bool) -> None:
        """The sie handle loses Redis (every connection refused) or gets it back."""
        self._touch()
        self.proxy.refuse(on)
        if on:
            self.proxy.cut()
        self.down = on

    @rule(
        key=st.sampled_from(KEYS),
        loaded=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
    )
    def sie_get_or_set(self, key: str, loaded: Any, tags: frozenset[str]) -> None:
        self._touch()
        if not self.down:
            kept_tags = self._get_or_set(self.sie, key, loaded, tags)
            self.kept[key] = (self.model.entries[key].value, kept_tags)
            return
        got = self.sie.get_or_set(key, lambda: loaded, ttl=3 * TTL_SCALE, tags=sorted(tags))
        if key in self.kept:
            assert got == self.kept[key][0], f"{got!r}: not the kept copy {self.kept[key]!r}"
        else:  # dropped by this handle's invalidation: never served from memory
            assert got == loaded, f"{got!r} served from memory for {key!r}: it was invalidated"
            self.kept[key] = (loaded, tags)

    def _sie_invalidate(self, act: Any, model: Any) -> None:
        if self.down:
            with pytest.raises(ConnectionUnavailable):
                act()
        else:
            act()
            model()

    @rule(key=st.sampled_from(KEYS), value=VALUES)
    def sie_set(self, key: str, value: Any) -> None:
        self.kept.pop(key, None)
        self._touch(None if self.down else key)
        if self.down:
            assert self.sie.set(key, value, ttl=TTL_SCALE) is False  # fail-open: not stored
            return
        assert self.sie.set(key, value, ttl=TTL_SCALE)
        self.model.write(key, value, frozenset(), 1)

    @rule(key=st.sampled_from(KEYS))
    def sie_delete(self, key: str) -> None:
        self.kept.pop(key, None)
        self._touch(None if self.down else key)
        self._sie_invalidate(
            lambda: self.sie.delete(key), lambda: self.model.entries.pop(key, None)
        )

    @rule(tags=st.lists(st.sampled_from(TAGS), min_size=1))
    def sie_invalidate_tags(self, tags: list[str]) -> None:
        self.kept = {k: v for k, v in self.kept.items() if v[1].isdisjoint(tags)}
        self._touch(names=None if self.down else ["t:" + t for t in tags])
        self._sie_invalidate(
            lambda: self.sie.invalidate_tags(*tags),
            lambda: self.model.bump(sorted({"t:" + t for t in tags})),
        )

    @rule()
    def sie_clear(self) -> None:
        self.kept.clear()
        self._touch(names=None if self.down else ["ns"])
        self._sie_invalidate(self.sie.clear, lambda: self.model.bump(["ns"]))

    @invariant()
    def nothing_outside_the_prefix(self) -> None:
        for raw in self.admin.keys("*"):  # the namespace's keys, and its fill locks
            assert raw.startswith(
                (b"distkit:cache:{model}:", b"distkit:cache:lock:{cache.fill.model.")
            ), raw


def _fork_try(lock: Lock, out: Any) -> None:
    held_copy = lock.fencing_token is not None
    got = lock.acquire(blocking=False)
    if got:
        lock.release()
    out.put((held_copy, got))


class _Interrupted(BaseException):
    """Stands for KeyboardInterrupt / a signal handler's exception (hypothesis reserves the real
    KeyboardInterrupt to stop a run)."""


class _Interrupting:
    """A sync client whose ``step``-th command raises ``_Interrupted`` (before it is sent, or
    after it ran when ``lose_reply``); with ``step`` -1 every BLPOP fails as a reset would."""

    def __init__(self, client: redis.Redis, step: int, lose_reply: bool) -> None:
        self._client = client
        self._left = step
        self._lose_reply = lose_reply

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._client, attr)

    def disarm(self) -> None:
        """No interruption from now on."""
        self._left = 1 << 30

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._left < 0:
            if args[0] == "BLPOP":
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            return self._client.execute_command(*args, **kwargs)
        self._left -= 1
        if self._left >= 0:
            return self._client.execute_command(*args, **kwargs)
        self._left = 1 << 30  # only once: the cleanup must get through
        if self._lose_reply:
            self._client.execute_command(*args, **kwargs)
        raise _Interrupted


class LockMachine(RuleBasedStateMachine):
    """Three handles of one lock name, plus a fenced value, vs a mutex model."""

    server: ClassVar[RedisServer]
    names: ClassVar[list[str]] = ["h0", "h1", "h2"]

    def __init__(self) -> None:
        super().__init__()
        self.admin = self.server.client()
        self.admin.flushall()
        self.client = self.server.client()
        self.locks = {n: Lock(self.client, "model", ttl=TTL_SCALE) for n in self.names}
        self.store = FencedStore(self.client, "model")
        self.holder: str | None = None  # who holds the lease on the server
        self.believes: set[str] = set()  # handles that think they hold it (an expired one may)
        self.tokens: dict[str, int] = {}  # each handle's token of its latest acquisition
        self.last_token = 0
        self.highest_written = -1
        self.lease_key = self.locks["h0"]._core.lease_key
        self.fence_key = self.locks["h0"]._core.fence_key
        self.queue_key = self.locks["h0"]._core.queue_key

    def teardown(self) -> None:
        self.admin.close()
        self.client.close()

    @initialize()
    def start_empty(self) -> None:
        assert not self.admin.exists(self.lease_key)

    def _granted(self, name: str) -> None:
        token = self.locks[name].fencing_token
        assert token is not None and token > self.last_token, (token, self.last_token)
        self.last_token = self.tokens[name] = token
        self.holder = name
        self.believes.add(name)

    @rule(name=st.sampled_from(names))
    def acquire_nonblocking(self, name: str) -> None:
        if name in self.believes:
            with pytest.raises(LockError, match="already held"):
                self.locks[name].acquire(blocking=False)
            return
        got = self.locks[name].acquire(blocking=False)
        assert got == (self.holder is None), (name, got, self.holder)
        if got:
            self._granted(name)

    @precondition(lambda self: self.holder is not None)
    @rule(name=st.sampled_from(names))
    def acquire_times_out_while_held(self, name: str) -> None:
        if name in self.believes:
            return
        assert self.locks[name].acquire(timeout=0.02) is False

    @rule(name=st.sampled_from(names))
    def release(self, name: str) -> None:
        if self.holder == name:
            self.locks[name].release()
            self.holder = None
        else:
            with pytest.raises(LockNotOwned):
                self.locks[name].release()
        self.believes.discard(name)

    @rule(name=st.sampled_from(names))
    def extend(self, name: str) -> None:
        if self.holder == name:
            self.locks[name].extend()
        else:
            with pytest.raises(LockNotOwned):
                self.locks[name].extend()
            self.believes.discard(name)

    @precondition(lambda self: self.holder is not None)
    @rule()
    def lease_expires(self) -> None:
        """The holder's lease runs out (it paused, crashed, or forgot to extend)."""
        _gone(self.admin, self.lease_key)
        self.holder = None  # the ex-holder still believes it holds: ``believes`` keeps it

    @rule()
    def fencing_state_lost(self) -> None:
        """The fence key is gone (eviction, restart): tokens must still increase."""
        self.admin.delete(self.fence_key)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def fenced_write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.tokens)), label="writer")
        token = self.tokens[name]
        if token >= self.highest_written:
            self.store.write(token, name)
            self.highest_written = token
        else:
            with pytest.raises(StaleFencingToken):
                self.store.write(token, name)
        stored = self.store.read()
        assert stored is not None and stored[1] == self.highest_written

    # -- process and task boundaries (issue 13): a forked copy, an interrupted call, a reset ----

    @rule(name=st.sampled_from(names))
    def forked_child_acquires(self, name: str) -> None:
        """A child forked with a copy of the handle is a new holder: it is granted only if the
        lease is free, never "a retried call" of the parent's owner id."""
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_fork_try, args=(self.locks[name], out))
        child.start()
        held_copy, got = out.get(timeout=20)
        child.join(20)
        assert child.exitcode == 0
        assert held_copy is False  # the child's copy never believes it holds the parent's lease
        assert got == (self.holder is None), (name, got, self.holder)

    @rule(step=st.integers(0, 3), lose_reply=st.booleans(), blocking=st.booleans())
    def interrupted_acquire(self, step: int, lose_reply: bool, blocking: bool) -> None:
        """A fresh handle's acquire is interrupted at its ``step``-th command (before it is sent,
        or after it ran with the reply lost): nothing of it may remain on the server."""
        client = _Interrupting(self.server.client(), step, lose_reply)
        lock = Lock(client, "model", ttl=TTL_SCALE)
        try:
            lock.acquire(blocking=blocking, timeout=0.02 if blocking else None)
        except _Interrupted:
            assert lock.fencing_token is None
        else:
            if lock.fencing_token is not None:  # not interrupted: it really got the lease
                assert self.holder is None
                client.disarm()
                lock.release()
        finally:
            client.close()

    @precondition(lambda self: self.holder is not None)
    @rule()
    def waiter_connection_reset(self) -> None:
        """Every wait of a queued waiter is reset: it gives up, leaving no queue entry behind."""
        client = _Interrupting(self.server.client(), -1, False)
        lock = Lock(client, "model", ttl=TTL_SCALE)
        try:
            assert lock.acquire(timeout=0.05) is False
        except ConnectionUnavailable:
            pass
        finally:
            client.close()
        assert lock.fencing_token is None

    @precondition(lambda self: self.holder is not None)
    @rule()
    def operator_force_release(self) -> None:
        """An operator frees the lock while it is held: the ex-holder still believes it holds
        (its release/extend raise LockNotOwned, its acquire LockError), the next one is granted
        with a higher token."""
        assert Lock.force_release(self.admin, "model") is True
        self.holder = None

    @precondition(lambda self: self.holder is None)
    @rule(forced=st.booleans(), blocking=st.booleans())
    def renewer_in_flight_while_reacquiring(self, forced: bool, blocking: bool) -> None:
        """A renewing handle loses its lease (an operator's force_release, or expiry) while its
        renewer's extension is in flight; it notices (extend() -> LockNotOwned) and acquires
        again. The old renewer's late refusal must never set lost / call on_lost for the new,
        healthy acquisition."""
        lost: list[Any] = []
        lock = Lock(
            self.client,
            "model",
            ttl=TTL_SCALE,
            auto_renew=True,
            renew_interval=0.05,
            on_lost=lost.append,
        )
        entered, gate = threading.Event(), threading.Event()
        run = SyncDriver.run

        def spy(driver: SyncDriver, protocol: Any) -> Any:
            if driver is lock._driver and threading.current_thread().name.startswith(
                "distlock-extend"
            ):
                protocol = primed(protocol)  # it has read the owner id: "in flight"
                entered.set()
                gate.wait(10)
            return run(driver, protocol)

        SyncDriver.run = spy  # type: ignore[method-assign]
        try:
            assert lock.acquire(blocking=False)
            self.last_token = lock.fencing_token or self.last_token
            assert entered.wait(10)
            if forced:
                assert Lock.force_release(self.admin, "model") is True
            else:
                _gone(self.admin, self.lease_key)
            with pytest.raises(LockNotOwned):
                lock.extend()
            old = lock._renewer
            assert lock.acquire(timeout=1.0) if blocking else lock.acquire(blocking=False)
            token = lock.fencing_token
            assert token is not None and token > self.last_token
            self.last_token = token
            gate.set()
            assert old is not None
            old.join(10)
            assert not old.is_alive()
            assert lost == [] and not lock.lost.is_set()
            assert lock.owned() and lock.fencing_token == token
            lock.release()
        finally:
            gate.set()
            SyncDriver.run = run  # type: ignore[method-assign]
            if lock.fencing_token is not None:
                lock.release()

    @precondition(lambda self: self.holder is None)
    @rule(
        pool=st.integers(1, 4),
        extra=st.integers(1, 2),
        give_up=st.booleans(),
        socket_timeout=st.sampled_from([5.0, 0.3, 0.05]),
    )
    def crowded_pool(self, pool: int, extra: int, give_up: bool, socket_timeout: float) -> None:
        """A holder and more waiters than its client's pool has connections share one client
        (with a socket timeout down to 50 ms): the holder's extend and release (and the waiters'
        own, or their clean-up when they give up) never fail for want of a connection or for a
        late BLPOP reply, and nothing is left queued."""
        client = connect(self.server.config(max_connections=pool, socket_timeout=socket_timeout))
        holder = Lock(client, "model", ttl=TTL_SCALE * 10)
        errors: list[BaseException] = []
        try:
            assert holder.acquire(blocking=False)
            self.last_token = holder.fencing_token or self.last_token

            def waiter() -> None:
                lock = Lock(client, "model", ttl=TTL_SCALE * 10)
                try:
                    if lock.acquire(timeout=0.2 if give_up else 5.0):
                        lock.release()
                except Exception as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=waiter) for _ in range(pool + extra)]
            for t in threads:
                t.start()
            time.sleep(0.1)  # the waiters are queued and blocking
            holder.extend()
            holder.release()
            for t in threads:
                t.join(20)
            assert errors == [], errors
        finally:
            if holder.fencing_token is not None:
                holder.release()
            client.close()
        # the fence moved on: the next grant in the model must still be higher
        self.last_token = max(self.last_token, int(self.admin.get(self.fence_key) or 0))

    @invariant()
    def server_agrees(self) -> None:
        for name, lock in self.locks.items():
            assert lock.owned() == (self.holder == name), name
        assert self.locks["h0"].locked() == (self.holder is not None)
        assert self.admin.zcard(self.queue_key) == 0  # nobody waits between steps: no leftovers


def _fork_read(cache: Cache, url: str, key: str, value: Any, tags: list[str], out: Any) -> None:
    """In a child forked with a copy of ``cache``: another handle sets ``key``, then the copy
    reads it (a pre-fork server's module-level cache)."""
    near = cache._near
    held = -1 if near is None else near.stats()["entries"]
    other = Cache(redis.Redis.from_url(url), namespace="model", ttl=5 * TTL_SCALE)
    other.set(key, value, ttl=5 * TTL_SCALE, tags=tags)
    out.put((held, cache.get(key, MISSING)))


class NearCacheMachine(CacheMachine):
    """The same program with a near cache (L1) in front of each handle: after the bound, every
    read agrees with the model, whichever handle (process) made the change."""

    near_bound = 0.01  # seconds; measured lag on loopback is well under a millisecond

    @classmethod
    def make_cache(cls, client: redis.Redis, **options: Any) -> Cache:
        return Cache(client, near_cache=NearCache(), **options)

    def teardown(self) -> None:
        for cache in self.caches.values():
            cache.close()
        super().teardown()

    # -- admin operations and broken links (docs/cache.md, "Near cache") ----------------------
    def _flushed(self) -> None:
        """The model after every key of the namespace is gone (records and epoch included)."""
        self.model.entries.clear()
        self.model.records.clear()
        self.model.epoch += 1

    @rule(command=st.sampled_from(["FLUSHDB", "FLUSHALL"]))
    def flush(self, command: str) -> None:
        """Redis pushes a null invalidation: every L1 empties."""
        self._touch()  # the pending fills' write marks are gone too: as for ``flushall``
        for p in self.pending:
            p.mark_lost = True
        self.admin.execute_command(command)
        self._flushed()

    @rule(handle=st.sampled_from(HANDLES))
    def swapdb_then_clear(self, handle: str) -> None:
        """SWAPDB sends no invalidation; documented: run ``clear()`` (from any process) after."""
        self._touch(names=["ns"])  # the clear: pending fills must not land
        self._forgotten(everything=True)
        for p in self.pending:
            p.mark_lost = True  # db 0 is swapped out with its marks, as by a flush
        self.admin.swapdb(0, 1)
        other = redis.Redis(host=self.server.host, port=self.server.port, db=1)
        other.flushdb()  # the swapped-out data, so that a later swap cannot bring it back
        other.close()
        self._flushed()
        self.caches[handle].clear()
        self.model.bump(["ns"])

    @rule(
        handle=st.sampled_from(HANDLES),
        key=st.sampled_from(KEYS),
        value=VALUES,
        tags=st.frozensets(st.sampled_from(TAGS), max_size=2),
    )
    def forked_child_reads(self, handle: str, key: str, value: Any, tags: frozenset[str]) -> None:
        """A child forked with a copy of a near-cached handle starts with an empty L1 and reads
        another handle's change at once (no listener of its own yet: L1 bypassed, not stale)."""
        self.settle()
        self.caches[handle].get(key, MISSING)  # the parent's L1 may hold the key at the fork
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(
            target=_fork_read,
            args=(self.caches[handle], self.server.url, key, value, sorted(tags), out),
        )
        child.start()
        held, got = out.get(timeout=20)
        child.join(20)
        assert child.exitcode == 0
        self._touch(key)
        self.model.write(key, value, tags, 5)
        assert held == 0, f"the child inherited {held} L1 entries"
        assert got == value, f"the forked child read {got!r} after {value!r} was set"

    @rule(which=st.integers(0, 1))
    def kill_listener(self, which: int) -> None:
        """A listener's connection drops (``CLIENT KILL``): L1 flushed, bypassed, back later."""
        listeners = [c for c in self.admin.client_list() if c.get("name") == "distcache-near:model"]
        if listeners:
            self.admin.client_kill_filter(_id=listeners[which % len(listeners)]["id"])


@pytest.mark.parametrize(
    "machine",
    [CacheMachine, NearCacheMachine, LockMachine],
    ids=["cache", "near-cache", "lock"],
)
def test_state_machine(redis_server: RedisServer, machine: type[RuleBasedStateMachine]) -> None:
    machine.server = redis_server  # type: ignore[attr-defined]
    run_state_machine_as_test(
        machine,
        settings=fuzz_settings(60, stateful_step_count=examples(40)),
    )
