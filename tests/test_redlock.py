"""The Redlock contract (L1, L2, L3, L6), for Redlock and AsyncRedlock over 3 and 5 real masters.

Every test body runs four times: {sync, async} x {3, 5 masters}. The masters are the session's
five independent servers (the first three for N=3); nothing here kills or pauses them
(tests/test_redlock_faults.py does that on servers of its own).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from distkit import (
    AuthenticationFailed,
    ConfigError,
    ForeignDataError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RedisConfig,
    RedlockConfig,
    aconnect,
    connect,
)
from distkit.testing import IndependentMasters, RedisCluster, RedisServer
from distlock import AsyncRedlock, Redlock

from ._twins import SyncView

NAME = "rl"


def lease(name: str) -> str:
    return f"distkit:lock:{{{name}}}"


def fence(name: str) -> str:
    return f"distkit:lock:{{{name}}}:fence"


class Rig:
    """Redlock (sync) or AsyncRedlock (async, behind a SyncView) handles over N masters."""

    def __init__(self, kind: str, servers: list[RedisServer]) -> None:
        self.kind = kind
        self.servers = servers
        self.n = len(servers)
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self._raw = [s.client() for s in servers]
        self._clients: list[Any] = []

    def clients(self) -> list[Any]:
        """One client of this rig's kind per master (short timeouts, no redis-py retry)."""
        make = connect if self.kind == "sync" else aconnect
        out = [make(s.config(socket_timeout=2.0, retry={"attempts": 1})) for s in self.servers]
        self._clients.extend(out)
        return out

    def make(self, name: str = NAME, clients: Any = None, **kwargs: Any) -> Any:
        """A new handle on its own clients (``clients`` overrides: a list or a RedlockConfig)."""
        target = self.clients() if clients is None else clients
        if self.kind == "sync":
            return Redlock(target, name, **kwargs)
        assert self.loop is not None
        return SyncView(AsyncRedlock(target, name, **kwargs), self.loop)

    @property
    def raw(self) -> list[redis.Redis]:
        """Plain clients, to inspect or tamper with every master directly (once settled)."""
        self.settle()
        return self._raw

    def settle(self) -> None:
        """Let async stragglers finish: a fan-out returns at its quorum and leaves the slower
        masters' tasks running, but a SyncView runs its loop only during a call."""
        if self.loop is not None:
            pending = asyncio.all_tasks(self.loop)
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))

    def leases(self, name: str = NAME) -> list[bytes | None]:
        """The lease value on every master (``None``: not held there)."""
        return [c.get(lease(name)) for c in self.raw]

    def lease_keys(self, name: str = NAME) -> list[list[bytes]]:
        """``KEYS distkit:lock:{name}`` on every master."""
        return [c.keys(lease(name)) for c in self.raw]

    def fences(self, name: str = NAME) -> list[int]:
        """The last token each master's fence key records (0 when it has none)."""
        out = []
        for c in self.raw:
            value = c.get(fence(name))
            out.append(0 if value is None else int(value.split(b":")[0]))
        return out

    def close(self) -> None:
        for c in self._raw:
            c.close()
        if self.loop is None:
            for c in self._clients:
                c.close()
            return
        self.settle()
        for c in self._clients:
            self.loop.run_until_complete(c.aclose())
        self.loop.close()


@pytest.fixture(params=[3, 5], ids=["3masters", "5masters"])
def servers(request: pytest.FixtureRequest, masters: IndependentMasters) -> list[RedisServer]:
    """The first N of the session's five masters, all flushed."""
    for server in masters.servers:
        server.client().flushall()
    return masters.servers[: request.param]


@pytest.fixture(params=["sync", "async"])
def rig(request: pytest.FixtureRequest, servers: list[RedisServer]) -> Iterator[Rig]:
    r = Rig(request.param, servers)
    yield r
    r.close()


class StepClock:
    """A fake monotonic clock that moves ``step`` seconds forward on every reading."""

    def __init__(self, step: float) -> None:
        self.now = time.monotonic()
        self.step = step
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.step
        return self.now


# -- basics -------------------------------------------------------------------------------------
def test_acquire_release_and_state(rig: Rig) -> None:
    a = rig.make(ttl=10)
    b = rig.make(ttl=10)
    assert a.quorum == rig.n // 2 + 1
    assert not a.locked() and not a.owned()
    assert a.fencing_token is None and a.validity == 0.0
    assert a.acquire(blocking=False)
    assert isinstance(a.fencing_token, int) and a.fencing_token > 0
    assert 9.5 < a.validity <= 10 - 10 * 0.01  # ttl - elapsed - drift
    assert a.locked() and b.locked()
    assert a.owned() and not b.owned()
    assert not b.acquire(blocking=False)
    assert b.fencing_token is None
    held = rig.leases()
    # a quorum holds one owner; acquire returns once a quorum granted, so a straggler may not
    holders = [v for v in held if v is not None]
    assert len(holders) >= a.quorum, held
    assert len(set(holders)) == 1, held
    assert all(
        0 < c.pttl(lease(NAME)) <= 10_000
        for c, v in zip(rig.raw, held, strict=True)
        if v is not None
    )
    assert "held token=" in repr(a.handle if rig.kind == "async" else a)
    a.release()
    assert a.fencing_token is None and not a.locked()
    assert rig.lease_keys() == [[]] * rig.n
    assert b.acquire(blocking=False)
    b.release()
    assert rig.lease_keys() == [[]] * rig.n


def test_handle_is_not_reentrant(rig: Rig) -> None:
    a = rig.make(ttl=10)
    assert a.acquire()
    with pytest.raises(LockError, match="already held by this handle"):
        a.acquire()
    a.release()


def test_blocking_acquire_times_out_and_leaves_nothing(rig: Rig) -> None:
    a = rig.make(ttl=10)
    b = rig.make(ttl=10, retry_delay=0.05)
    assert a.acquire()
    held = rig.leases()
    started = time.monotonic()
    assert b.acquire(timeout=0.3) is False
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.3 + 0.5, elapsed
    assert b.fencing_token is None
    assert rig.leases() == held  # b's failed tries touched nothing of a's
    a.release()
    assert b.acquire(timeout=1)
    b.release()


def test_retry_count_bounds_the_attempts(rig: Rig) -> None:
    a = rig.make(ttl=10)
    b = rig.make(ttl=10, retry_count=2, retry_delay=0.1)
    assert a.acquire()
    started = time.monotonic()
    assert b.acquire() is False  # blocking, no timeout: gives up after 1 + 2 attempts
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 0.2 + 0.5, elapsed  # two random delays in [0.05, 0.1]
    zero = rig.make(ttl=10, retry_count=0)
    started = time.monotonic()
    assert zero.acquire() is False
    assert time.monotonic() - started < 0.5
    a.release()


def test_context_manager_and_lock_not_acquired(rig: Rig) -> None:
    a = rig.make(ttl=10)
    b = rig.make(ttl=10, blocking_timeout=0.2, retry_delay=0.05)
    with a:
        assert a.owned()
        started = time.monotonic()
        with pytest.raises(LockNotAcquired) as info, b:
            pass
        assert info.value.name == NAME
        assert time.monotonic() - started < 0.2 + 0.5
    assert not a.locked()
    assert rig.lease_keys() == [[]] * rig.n


def test_ensure_held_and_validity(rig: Rig) -> None:
    a = rig.make(ttl=0.5, node_timeout=0.05)
    with pytest.raises(LockLost):
        a.ensure_held()
    assert a.acquire()
    a.ensure_held()
    v1 = a.validity
    time.sleep(0.05)
    assert a.validity < v1
    time.sleep(0.5)
    assert a.validity == 0.0
    with pytest.raises(LockLost, match="run out"):
        a.ensure_held()


# -- validity = ttl - elapsed - drift (L6) ------------------------------------------------------
@pytest.mark.parametrize("fencing", ["clock", "quorum"])
@pytest.mark.parametrize("drift_factor", [0.01, 0.1])
def test_validity_is_ttl_minus_elapsed_minus_drift(
    rig: Rig, drift_factor: float, fencing: str
) -> None:
    """Each clock reading moves 1 s: elapsed = 1 s (2 s with the quorum write-back, which reads
    the clock once more); the validity read then costs 1 s more."""
    clock = StepClock(1.0)
    a = rig.make(ttl=10, clock=clock, drift_factor=drift_factor, fencing=fencing)
    assert a.acquire(blocking=False)
    drift = 10 * drift_factor + 0.002
    # expires_at = started + ttl - drift; validity reads the clock once more
    reads = 2.0 if fencing == "clock" else 3.0
    assert a.validity == pytest.approx(10 - drift - reads, abs=1e-9)
    a.release()


def test_acquire_whose_elapsed_time_eats_the_ttl_fails_and_leaves_nothing(rig: Rig) -> None:
    clock = StepClock(9.95)  # elapsed 9.95 s > ttl - drift = 9.898 s
    a = rig.make(ttl=10, clock=clock)
    tokens_before = rig.fences()
    assert a.acquire(blocking=False) is False
    assert a.fencing_token is None and a.validity == 0.0
    assert not a.owned()
    assert rig.lease_keys() == [[]] * rig.n  # granted on every master, then released everywhere
    assert all(after > before for after, before in zip(rig.fences(), tokens_before, strict=True))
    b = rig.make(ttl=10)
    assert b.acquire(blocking=False)  # nothing was left held
    b.release()


def test_blocking_acquire_with_no_validity_left_gives_up_by_retry_count(rig: Rig) -> None:
    a = rig.make(ttl=10, clock=StepClock(9.95), retry_count=2, retry_delay=0.01)
    assert a.acquire() is False
    assert rig.lease_keys() == [[]] * rig.n


# -- quorum = N // 2 + 1 (L6) -------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 8))
def test_quorum_is_a_strict_majority(n: int) -> None:
    clients = [redis.Redis(host="127.0.0.1", port=20000 + i) for i in range(n)]  # no I/O
    assert Redlock(clients, "q").quorum == n // 2 + 1
    assert AsyncRedlock([redis.asyncio.Redis(port=20000 + i) for i in range(n)], "q").quorum == (
        n // 2 + 1
    )


def test_minority_held_elsewhere_still_grants_majority_does_not(rig: Rig) -> None:
    """Another owner on N - quorum masters: granted; on one more: refused, nothing left."""
    spare = rig.n - (rig.n // 2 + 1)
    for c in rig.raw[:spare]:
        c.set(lease(NAME), "intruder", px=10_000)
    a = rig.make(ttl=10)
    assert a.acquire(blocking=False)
    assert rig.leases()[:spare] == [b"intruder"] * spare
    a.release()
    assert rig.leases() == [b"intruder"] * spare + [None] * (rig.n - spare)
    rig.raw[spare].set(lease(NAME), "intruder", px=10_000)
    assert a.acquire(blocking=False) is False
    assert rig.leases() == [b"intruder"] * (spare + 1) + [None] * (rig.n - spare - 1)


# -- owner-only (L2) ----------------------------------------------------------------------------
PLANTS = {
    "wrong-type": lambda c: c.rpush(lease(NAME), "not-a-lease"),
    "hash": lambda c: c.hset(lease(NAME), "f", "v"),
    # a string lease without an expiry (the hostile re-review: Redlock took it for a holder and
    # waited for ever, where Lock raises ForeignDataError)
    "no-expiry": lambda c: c.set(lease(NAME), "planted"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_foreign_data_on_a_quorum_raises_at_once_and_leaves_nothing(rig: Rig, plant: str) -> None:
    """Foreign data under the lease key on a quorum of masters: no retry can win, so a blocking
    acquire raises ForeignDataError instead of spinning, after releasing the grants it got; on
    a minority only, the lock is still granted."""
    a = rig.make(ttl=10, retry_delay=0.01)
    planted = rig.raw[: a.quorum]
    for c in planted:
        PLANTS[plant](c)
    started = time.monotonic()
    with pytest.raises(ForeignDataError):
        a.acquire()
    assert time.monotonic() - started < 5
    rig.settle()
    assert [c.type(lease(NAME)) for c in rig.raw[a.quorum :]] == [b"none"] * (rig.n - a.quorum)
    assert a.fencing_token is None
    planted[0].delete(lease(NAME))  # now a minority holds foreign data: a quorum can form
    assert a.acquire(timeout=2)
    a.release()
    for c in planted[1:]:
        c.delete(lease(NAME))


def test_a_wrong_password_on_every_master_raises_authentication_failed(rig: Rig) -> None:
    """Every master refuses the credentials: acquire() raises AuthenticationFailed at once (as
    Lock does) instead of retrying forever; acquire(timeout) raises too, not a bare False."""
    admins = [s.client() for s in rig.servers]
    for c in admins:
        c.ping()  # this connection stays authenticated after the password is set
        c.config_set("requirepass", "right")
    try:
        make = connect if rig.kind == "sync" else aconnect
        clients = [make(s.config(password="wrong", retry={"attempts": 1})) for s in rig.servers]
        rig._clients.extend(clients)
        for timeout in (None, 0.5):
            a = rig.make(clients=clients, ttl=5)
            started = time.monotonic()
            with pytest.raises(AuthenticationFailed):
                a.acquire(timeout=timeout)
            assert time.monotonic() - started < 5
    finally:
        for c in admins:
            c.config_set("requirepass", "")
            c.close()


def test_non_owner_release_and_extend_raise_and_touch_nothing(rig: Rig) -> None:
    a = rig.make(ttl=10)
    b = rig.make(ttl=10)
    assert a.acquire()
    held = rig.leases()
    with pytest.raises(LockNotOwned):
        b.release()
    with pytest.raises(LockNotOwned):
        b.extend()
    assert rig.leases() == held
    assert a.owned()
    a.release()


def test_expired_owner_cannot_release_or_extend_the_next_holders_lock(rig: Rig) -> None:
    a = rig.make(ttl=0.2, node_timeout=0.05)
    b = rig.make(ttl=10)
    assert a.acquire()
    time.sleep(0.3)
    assert b.acquire(blocking=False)
    held = rig.leases()
    with pytest.raises(LockNotOwned):
        a.release()
    assert a.acquire(blocking=False) is False
    with pytest.raises(LockNotOwned):
        a.extend()
    assert rig.leases() == held
    assert b.owned()
    b.release()
    assert rig.lease_keys() == [[]] * rig.n


def test_release_refused_by_a_majority_raises_and_spares_the_other_owner(rig: Rig) -> None:
    """a's lease was replaced by another owner's on a majority: release fails there only."""
    a = rig.make(ttl=10)
    assert a.acquire()
    q = rig.n // 2 + 1
    for c in rig.raw[:q]:
        c.set(lease(NAME), "other", px=10_000)
    with pytest.raises(LockNotOwned, match="quorum"):
        a.release()
    assert rig.leases() == [b"other"] * q + [None] * (rig.n - q)


# -- extend (L6: a quorum within validity) -------------------------------------------------------
def test_extend_resets_the_lease_on_every_master(rig: Rig) -> None:
    a = rig.make(ttl=0.5, node_timeout=0.05)
    assert a.acquire()
    a.extend(5)
    # extend returns once a quorum extended; a straggler's extension lands just after
    assert sum(1 for c in rig.raw if c.pttl(lease(NAME)) > 4000) >= a.quorum
    assert 4.5 < a.validity <= 5
    time.sleep(0.6)
    assert a.owned()
    a.extend()  # back to the lock's ttl
    assert sum(1 for c in rig.raw if 0 < c.pttl(lease(NAME)) <= 500) >= a.quorum
    a.release()


def test_extend_without_a_quorum_fails_and_forgets_the_lease(rig: Rig) -> None:
    a = rig.make(ttl=10)
    assert a.acquire()
    q = rig.n // 2 + 1
    for c in rig.raw[: rig.n - q + 1]:  # lost on enough masters that no quorum remains
        c.delete(lease(NAME))
    with pytest.raises(LockNotOwned, match="extended"):
        a.extend()
    assert a.fencing_token is None
    with pytest.raises(LockNotOwned):
        a.release()


def test_auto_renew_keeps_the_lease_past_its_ttl(rig: Rig) -> None:
    a = rig.make(ttl=0.4, node_timeout=0.05, auto_renew=True)
    b = rig.make(ttl=10)
    with a:
        if rig.kind == "async":
            assert rig.loop is not None
            rig.loop.run_until_complete(asyncio.sleep(0.9))
        else:
            time.sleep(0.9)
        assert a.owned()
        assert not b.acquire(blocking=False)
        assert not a.lost.is_set()
    assert rig.lease_keys() == [[]] * rig.n


# -- fencing (L3) -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["clock", "quorum"])
def test_tokens_strictly_increase_across_successive_holders(rig: Rig, mode: str) -> None:
    handles = [rig.make(ttl=10, fencing=mode) for _ in range(3)]
    tokens = []
    for i in range(12):
        h = handles[i % 3]
        assert h.acquire(blocking=False)
        tokens.append(h.fencing_token)
        h.release()
        if i == 5:  # one master loses its fencing state: tokens keep increasing
            rig.raw[0].delete(fence(NAME))
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), tokens


def test_token_is_the_maximum_over_the_granting_masters(rig: Rig) -> None:
    ahead = int(rig.raw[0].time()[0]) * 1_000_000 + 10**9  # a counter 1000 s ahead, on one master
    rig.raw[0].set(fence(NAME), ahead, px=60_000)
    q = rig.n // 2 + 1
    for c in rig.raw[q:]:  # the deciding quorum is masters 0..q-1, so master 0 counts
        c.set(lease(NAME), "someone-else", px=60_000)
    a = rig.make(ttl=10)
    assert a.acquire(blocking=False)
    assert a.fencing_token == ahead + 1
    a.release()


def test_quorum_fencing_writes_the_token_back_to_a_quorum(rig: Rig) -> None:
    """fencing="quorum": the max token reaches a quorum of fence keys before acquire returns.

    So when the holder crashes (no release, which would also record its token everywhere) and
    the master that issued the high token loses its state, the next majority, which intersects
    the written quorum, still issues a higher token. fencing="clock" writes nothing back.
    """
    ahead = int(rig.raw[0].time()[0]) * 1_000_000 + 10**9  # one master's counter 1000 s ahead
    q = rig.n // 2 + 1
    # Acquire decides at the first quorum of replies: a foreign lease on every master but the
    # first q makes that quorum exactly masters 0..q-1, so master 0's reply always counts.
    for c in rig.raw[q:]:
        c.set(lease(NAME), "someone-else", px=60_000)
    rig.raw[0].set(fence(NAME), ahead, px=60_000)
    clock_mode = rig.make(ttl=10, fencing="clock")
    assert clock_mode.acquire(blocking=False)
    assert clock_mode.fencing_token == ahead + 1
    assert sum(1 for t in rig.fences() if t >= ahead + 1) == 1  # only the master that issued it
    clock_mode.release()

    for c in rig.raw:
        c.delete(fence(NAME))
    rig.raw[0].set(fence(NAME), ahead, px=60_000)
    a = rig.make(ttl=0.3, node_timeout=0.05, fencing="quorum")
    assert a.acquire(blocking=False)
    token = a.fencing_token
    assert token == ahead + 1
    assert sum(1 for t in rig.fences() if t >= token) >= q
    time.sleep(0.35)  # a crashes: its lease expires without a release
    rig.raw[0].delete(fence(NAME))  # and the master that was ahead restarts empty
    for c in rig.raw[q:]:
        c.delete(lease(NAME))
    b = rig.make(ttl=10, fencing="quorum")
    assert b.acquire(blocking=False)
    assert b.fencing_token is not None and b.fencing_token > token
    b.release()


# -- configuration ------------------------------------------------------------------------------
def test_redlock_config_is_accepted(rig: Rig) -> None:
    config = RedlockConfig(
        masters=tuple(s.config(socket_timeout=2.0, retry={"attempts": 1}) for s in rig.servers)
    )
    a = rig.make(clients=config, ttl=10)
    assert a.quorum == rig.n // 2 + 1
    with a:
        assert a.owned()
        assert all(v is not None for v in rig.leases())
    assert rig.lease_keys() == [[]] * rig.n
    handle = a.handle if rig.kind == "async" else a
    drivers = handle._driver.clients
    if rig.kind == "async":
        assert rig.loop is not None
        for c in drivers:
            rig.loop.run_until_complete(c.aclose())
    else:
        for c in drivers:
            c.close()


def _sync_clients(servers: list[RedisServer]) -> list[redis.Redis]:
    return [s.client() for s in servers]


def _bad(servers: list[RedisServer]) -> dict[str, tuple[Callable[[], Any], str]]:
    """Bad constructions of Redlock, each with the ConfigError message it must raise."""
    good = _sync_clients(servers)
    return {
        "no clients": (lambda: Redlock([], "x"), "at least one master"),
        "a single client": (lambda: Redlock(good[0], "x"), "sequence of clients"),
        "a url string": (lambda: Redlock("redis://localhost", "x"), "sequence of clients"),
        "duplicate master": (
            lambda: Redlock([good[0], servers[0].client(), *good[1:]], "x"),
            "same master twice",
        ),
        "one server as 127.0.0.1 and localhost": (
            lambda: Redlock([redis.Redis(host="localhost", port=servers[0].port), *good], "x"),
            r"same master twice: clients 0 \(localhost:\d+/0\) and 1 \(127\.0\.0\.1:",
        ),
        "one server as db 0 and db 1": (
            lambda: Redlock(
                [*good, redis.Redis(host="127.0.0.1", port=servers[0].port, db=1)], "x"
            ),
            r"same master twice: clients 0 \(127\.0\.0\.1:\d+/0\) and \d \(.*:\d+/1\)",
        ),
        "async client": (
            lambda: Redlock([s.async_client() for s in servers], "x"),
            "asyncio client",
        ),
        "not a client": (lambda: Redlock([object()], "x"), "redis-py client"),
        "node_timeout too large": (
            lambda: Redlock(good, "x", ttl=1, node_timeout=0.5),
            "much smaller than ttl",
        ),
        "node_timeout not a number": (lambda: Redlock(good, "x", node_timeout="1"), "node_timeout"),
        "drift_factor negative": (lambda: Redlock(good, "x", drift_factor=-0.1), "drift_factor"),
        "drift_factor 0.5": (lambda: Redlock(good, "x", drift_factor=0.5), "drift_factor"),
        "drift_factor nan": (lambda: Redlock(good, "x", drift_factor=math.nan), "drift_factor"),
        "drift_factor bool": (lambda: Redlock(good, "x", drift_factor=True), "drift_factor"),
        "retry_count negative": (lambda: Redlock(good, "x", retry_count=-1), "retry_count"),
        "retry_count float": (lambda: Redlock(good, "x", retry_count=1.5), "retry_count"),
        "retry_count bool": (lambda: Redlock(good, "x", retry_count=True), "retry_count"),
        "retry_delay negative": (lambda: Redlock(good, "x", retry_delay=-1), "retry_delay"),
        "fencing unknown": (lambda: Redlock(good, "x", fencing="wall"), "fencing"),
        "bad name": (lambda: Redlock(good, "a{b}"), "name"),
        "bad ttl": (lambda: Redlock(good, "x", ttl=0), "ttl"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no clients",
        "a single client",
        "a url string",
        "duplicate master",
        "one server as 127.0.0.1 and localhost",
        "one server as db 0 and db 1",
        "async client",
        "not a client",
        "node_timeout too large",
        "node_timeout not a number",
        "drift_factor negative",
        "drift_factor 0.5",
        "drift_factor nan",
        "drift_factor bool",
        "retry_count negative",
        "retry_count float",
        "retry_count bool",
        "retry_delay negative",
        "fencing unknown",
        "bad name",
        "bad ttl",
    ],
)
def test_bad_input_is_a_config_error(masters: IndependentMasters, case: str) -> None:
    build, message = _bad(masters.servers)[case]
    with pytest.raises(ConfigError, match=message):
        build()


def test_async_twin_refuses_sync_clients(masters: IndependentMasters) -> None:
    with pytest.raises(ConfigError, match="sync client"):
        AsyncRedlock(_sync_clients(masters.servers), "x")
    with pytest.raises(ConfigError, match="at least one master"):
        AsyncRedlock([], "x")


def test_redis_cluster_is_refused(cluster: RedisCluster, masters: IndependentMasters) -> None:
    """A RedisCluster is one deployment, not independent masters: use Lock with it."""
    sync_cluster = cluster.client()
    try:
        with pytest.raises(ConfigError, match="RedisCluster"):
            Redlock([sync_cluster, *_sync_clients(masters.servers[:2])], "x")
    finally:
        sync_cluster.close()
    async_cluster = cluster.async_client()  # no I/O until first use
    with pytest.raises(ConfigError, match="RedisCluster"):
        AsyncRedlock([async_cluster], "x")


def test_redlock_config_rejects_a_cluster_master() -> None:
    with pytest.raises((ConfigError, ValueError), match="standalone"):
        RedlockConfig(masters=(RedisConfig(mode="cluster", host="127.0.0.1", port=7000),))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_one_server_behind_another_address_is_refused_at_first_use(
    masters: IndependentMasters, kind: str
) -> None:
    """A master reached through a second address (a proxy, an alias: nothing the settings tell)
    is found at the first acquire by its server identity (INFO server's run_id): ConfigError
    naming both clients, before any lease is taken. Otherwise one server would grant a quorum."""
    from distkit.testing import FaultProxy

    servers = masters.servers[:2]
    for server in servers:
        server.client().flushall()
    with FaultProxy(servers[0].address) as proxy:
        configs = [servers[0].config(), proxy.config(), servers[1].config()]
        pattern = r"masters 0 \(127\.0\.0\.1:\d+/0\) and 1 \(127\.0\.0\.1:\d+/0\) are the same"
        if kind == "sync":
            lock: Any = Redlock([connect(c) for c in configs], "dup-probe", ttl=5)
            with pytest.raises(ConfigError, match=pattern):
                lock.acquire(blocking=False)
            with pytest.raises(ConfigError, match=pattern):  # every later use too
                lock.acquire(timeout=0.1)
        else:

            async def scenario() -> None:
                alock = AsyncRedlock([aconnect(c) for c in configs], "dup-probe", ttl=5)
                with pytest.raises(ConfigError, match=pattern):
                    await alock.acquire(blocking=False)
                with pytest.raises(ConfigError, match=pattern):
                    await alock.acquire(timeout=0.1)

            asyncio.run(scenario())
        for server in servers:
            assert server.client().keys("distkit:lock:{dup-probe}*") == []


@pytest.mark.parametrize("ttl", [0.001, 0.004, 0.01, 0.02, 0.25, 1, 10, 24.9, 25, 30, 3600])
def test_the_default_node_timeout_is_valid_for_every_ttl(
    masters: IndependentMasters, ttl: float
) -> None:
    """docs/redlock.md: default node_timeout = min(0.5 s, max(5 ms, ttl / 50), ttl / 4): a ttl
    that is accepted never fails on a node_timeout the caller did not pass."""
    lock = Redlock(_sync_clients(masters.servers[:3]), "nt-default", ttl=ttl)
    node_timeout = lock._core.node_timeout  # type: ignore[attr-defined]
    assert node_timeout == min(0.5, max(0.005, ttl / 50), ttl / 4)
    assert 0 < node_timeout < ttl / 2
    with pytest.raises(ConfigError, match="node_timeout"):  # one passed explicitly still is checked
        Redlock(_sync_clients(masters.servers[:3]), "nt-default", ttl=ttl, node_timeout=ttl / 2)
