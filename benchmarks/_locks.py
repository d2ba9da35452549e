"""Lock contenders: the floors (raw redis-py), distlock and its peers, each a small adapter.

Adding a lock contender is one factory and one entry in ``LOCK_CONTENDERS``; a scenario then
names it by key. Factories take one client per master, so a Redlock scenario reuses them.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import redis

import distlock

from ._model import LockContender, LockFactory, LockOps

__all__ = ["LOCK_CONTENDERS", "lock_contender"]

# KEYS: lock key;  ARGV: token
# Returns 1 when the key held the token and was deleted, else 0.
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _FloorLock:
    """``SET key token NX PX ttl`` to acquire, one ``EVALSHA`` compare-and-delete to release."""

    __slots__ = ("_count", "_execute", "_key", "_prefix", "_px", "_sha", "_token")

    def __init__(self, client: redis.Redis, name: str, ttl: float) -> None:
        self._execute: Callable[..., Any] = client.execute_command
        self._key = name
        self._px = max(1, round(ttl * 1000))
        self._sha = str(client.script_load(_COMPARE_AND_DELETE))
        self._prefix = secrets.token_hex(8) + ":"
        self._count = itertools.count()
        self._token = ""

    def acquire(self) -> bool:
        """Try once (the uncontended floor never waits)."""
        self._token = token = f"{self._prefix}{next(self._count)}"
        return bool(self._execute("SET", self._key, token, "NX", "PX", self._px))

    def release(self) -> object:
        """Delete the key if it still holds this acquisition's token."""
        return self._execute("EVALSHA", self._sha, 1, self._key, self._token)


class _TokenHandoff:
    """One token in a list: ``BLPOP`` takes it, ``RPUSH`` gives it back.

    The least Redis work a cross-process handoff can cost (the server pushes the token to the
    longest waiter), but not a usable lock: no lease, so a crashed holder keeps it forever.
    """

    __slots__ = ("_execute", "_key")

    def __init__(self, client: redis.Redis, name: str) -> None:
        self._execute: Callable[..., Any] = client.execute_command
        self._key = name

    def acquire(self) -> bool:
        """Block until the token arrives (in 1 s slices, well inside the socket timeout)."""
        while self._execute("BLPOP", self._key, 1) is None:
            pass
        return True

    def release(self) -> object:
        """Hand the token to the longest waiter."""
        return self._execute("RPUSH", self._key, "token")


def _seed_token(client: redis.Redis, name: str) -> None:
    client.delete(name)
    client.rpush(name, "token")


def _floor(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    lock = _FloorLock(clients[0], name, ttl)
    return LockOps(lock.acquire, lock.release)


def _floor_handoff(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    lock = _TokenHandoff(clients[0], name)
    return LockOps(lock.acquire, lock.release)


def _distlock(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    lock = distlock.Lock(clients[0], name, ttl=ttl)
    return LockOps(lock.acquire, lock.release)


def _distlock_redlock(masters: int, fencing: str = "clock") -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        lock = distlock.Redlock(list(clients[:masters]), name, ttl=ttl, fencing=fencing)  # type: ignore[arg-type]
        return LockOps(lock.acquire, lock.release)

    return make


def _distlock_redlock_per_call(masters: int) -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        held: list[distlock.Redlock] = []

        def acquire() -> bool:
            lock = distlock.Redlock(list(clients[:masters]), name, ttl=ttl, fencing="clock")
            got = lock.acquire()
            if got:
                held.append(lock)
            return got

        def release() -> None:
            held.pop().release()

        return LockOps(acquire, release)

    return make


def _pottery_masters(masters: int) -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        return _pottery(clients[:masters], name, ttl)

    return make


def _redis_py(sleep: float | None) -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        options: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
        lock = clients[0].lock(name, timeout=ttl, **options)
        return LockOps(lock.acquire, lock.release)

    return make


def _python_redis_lock(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    import redis_lock

    lock = redis_lock.Lock(clients[0], name, expire=max(1, round(ttl)))
    return LockOps(lock.acquire, lock.release)


def _pottery(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    from pottery import Redlock

    lock = Redlock(key=name, masters=set(clients), auto_release_time=ttl)
    return LockOps(lock.acquire, lock.release)


LOCK_CONTENDERS: dict[str, LockContender] = {
    c.key: c
    for c in (
        LockContender(
            key="floor",
            label="floor: SET NX PX + EVALSHA del",
            role="floor",
            factory=_floor,
            note="raw redis-py: SET key token NX PX ttl, then one EVALSHA compare-and-delete",
        ),
        LockContender(
            key="floor-handoff",
            label="floor: BLPOP/RPUSH token",
            role="floor",
            factory=_floor_handoff,
            prepare=_seed_token,
            note="raw redis-py: one token in a list, BLPOP to take it, RPUSH to pass it on "
            "(a lower bound, not a lock: it has no lease)",
        ),
        LockContender(
            key="distlock",
            label="distlock.Lock",
            role="distkit",
            factory=_distlock,
            note="fencing token on every acquisition (always on), FIFO handoff",
        ),
        LockContender(
            key="redis-py",
            label="redis-py Lock",
            role="peer",
            factory=_redis_py(None),
            note="redis.lock.Lock, default sleep=0.1 s between polls",
        ),
        LockContender(
            key="redis-py-1ms",
            label="redis-py Lock sleep=1ms",
            role="peer",
            factory=_redis_py(0.001),
            note="redis.lock.Lock polling every 1 ms",
        ),
        LockContender(
            key="python-redis-lock",
            label="python-redis-lock",
            role="peer",
            requires=("redis_lock",),
            factory=_python_redis_lock,
            note="redis_lock.Lock: SET NX EX, waiters woken by a BLPOP signal",
        ),
        LockContender(
            key="pottery",
            label="pottery Redlock",
            role="peer",
            requires=("pottery",),
            factory=_pottery,
            note="pottery.Redlock over every server it is given (one in the single-instance "
            "scenarios); thread-pool fan-out, random retry sleep up to 0.2 s",
        ),
        *(
            LockContender(
                key=f"distlock-redlock-{n}",
                label=f"distlock.Redlock x{n}",
                role="distkit",
                factory=_distlock_redlock(n),
                note=f"{n} masters, fencing='clock' (max of the granting masters' tokens)",
            )
            for n in (3, 5)
        ),
        LockContender(
            key="distlock-redlock-3-per-call",
            label="distlock.Redlock x3, a handle per call",
            role="distkit",
            factory=_distlock_redlock_per_call(3),
            note="3 masters, fencing='clock', a new handle per cycle (what @locked([clients]) "
            "does); the per-master connections are shared, so it should cost about a reused one",
        ),
        LockContender(
            key="distlock-redlock-5-quorum",
            label="distlock.Redlock x5 quorum-fenced",
            role="distkit",
            factory=_distlock_redlock(5, "quorum"),
            note="5 masters, fencing='quorum' (token written back to a quorum: one more trip)",
        ),
        *(
            LockContender(
                key=f"pottery-{n}",
                label=f"pottery Redlock x{n}",
                role="peer",
                requires=("pottery",),
                factory=_pottery_masters(n),
                note=f"pottery.Redlock over {n} masters (thread-pool fan-out)",
            )
            for n in (3, 5)
        ),
    )
}


def lock_contender(key: str) -> LockContender:
    """The registered lock contender ``key``."""
    return LOCK_CONTENDERS[key]
