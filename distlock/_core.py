"""The single-instance lock protocol, written once and free of I/O (see ``distkit._protocol``).

``Lock`` and ``AsyncLock`` own a ``LockCore`` and only drive its generators. The core holds the
handle's state: the owner id of the current acquisition, its fencing token and a conservative
local estimate of when the lease ends (measured from *before* the request was sent, so the
estimate can only be early, never late).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import redis.exceptions as rex

from distkit import (
    ConfigError,
    ConnectionUnavailable,
    ForeignDataError,
    KeySpace,
    LockError,
    LockNotAcquired,
    LockNotOwned,
    RetryPolicy,
)
from distkit._clients import client_retry, decodes_responses, is_config
from distkit._keys import validate_name
from distkit._protocol import Cleanup, Command, Eval, Pop, Protocol, Replicated, monotonic
from distkit._units import seconds

from ._scripts import ACQUIRE, EXTEND, FORCE_RELEASE, MAX_WAIT_MS, RELEASE

if TYPE_CHECKING:
    from distkit import RetryConfig

__all__ = ["Clock", "LockCore", "Seconds"]

log = logging.getLogger("distlock")

Seconds = float | timedelta
Clock = Callable[[], float]

# How long past its planned wait a queued waiter stays eligible for a handoff.
_QUEUE_GRACE = 0.5
_DEFAULT_RETENTION = 3600.0
# Shorter waits are not worth a BLPOP: leave the queue (one call) instead.
_MIN_WAIT = 0.002
# Connection failures during a wait, each followed by a successful ACQUIRE, before giving up.
_MAX_LOST_POPS = 3
_REL_MARK_MS = 10_000


def _ms(value: float) -> int:
    return max(1, math.ceil(value * 1000))


def _timed_out(exc: BaseException) -> bool:
    """Whether a ``ConnectionUnavailable`` came from a read timeout (not a reset)."""
    return isinstance(exc.__cause__, (TimeoutError, asyncio.TimeoutError, rex.TimeoutError))


def _is_grant(reply: Any) -> bool:
    return isinstance(reply, (list, tuple)) and len(reply) == 2 and reply[0] == 1


def _is_token(reply: Any) -> bool:
    return reply is not None


def _is_one(reply: Any) -> bool:
    return bool(reply == 1)


def check_replicas(client: Any, replicas: Any, timeout: Seconds, *, cls: str) -> float:
    """Validate ``wait_for_replicas`` / ``replica_timeout``; return the timeout in seconds."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise ConfigError(f"wait_for_replicas must be an int >= 0, got {replicas!r}")
    out = seconds(timeout, field="replica_timeout")
    if replicas and (
        hasattr(client, "nodes_manager") or not callable(getattr(client, "client", None))
    ):
        raise ConfigError(
            f"{cls}(wait_for_replicas=...) needs a standalone or Sentinel-managed client "
            f"(WAIT must run on the connection that wrote), got {type(client).__name__}"
        )
    return out


def check_client(client: Any, *, want_async: bool, cls: str) -> None:
    """Refuse objects that are not redis-py clients of the right kind, with a ``ConfigError``."""
    execute = getattr(client, "execute_command", None)
    if execute is None or not callable(execute):
        raise ConfigError(
            f"{cls} needs a redis-py client (redis.Redis / RedisCluster), "
            f"got {type(client).__name__}"
        )
    is_async = inspect.iscoroutinefunction(execute)
    if is_async != want_async:
        other = "AsyncLock" if is_async else "Lock"
        kind = "an asyncio" if is_async else "a sync"
        raise ConfigError(f"{cls} was given {kind} client; use {other} with it")

    if decodes_responses(client):
        raise ConfigError(
            f"{cls} needs a client that returns bytes, but this one was built with "
            "decode_responses=True; build a second client for distkit without it, e.g. "
            "distkit.connect(url) or redis.Redis.from_url(url)"
        )


def own_retries(client: Any) -> int:
    """How many times ``client`` retries a failed command itself (redis-py's ``Retry``; 0 for
    clients of ``distkit.connect()``, which switch it off, and for shapes we cannot read)."""
    try:
        getter = getattr(client, "get_retry", None)
        retry = getter() if callable(getter) else getattr(client, "retry", None)
        count = retry.get_retries() if retry is not None else 0
    except Exception:
        return 0
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()
_WARNED_LOCK = threading.Lock()


def warn_own_retries(client: Any, attempts: int) -> None:
    """Log once per client that retries failed commands itself: its retries and distkit's
    ``attempts`` multiply (redis-py retries below distkit, inside every attempt)."""
    count = own_retries(client)
    if not count:
        return
    with _WARNED_LOCK:
        try:
            if client in _WARNED:
                return
            _WARNED.add(client)
        except TypeError:  # not weak-referenceable: warn every time rather than never
            pass
    log.warning(
        "this %s retries failed commands itself (%d retries, with its own backoff), inside each "
        "of distlock's %d attempts and its clean-up try: a dead server costs up to "
        "%d x socket_timeout plus both "
        "backoffs; build the client with distkit.connect() (or redis-py's "
        "retry=Retry(NoBackoff(), 0)) for the attempts x socket_timeout bound (docs/locks.md)",
        type(client).__name__,
        count,
        attempts,
        (attempts + 1) * (count + 1),
    )


def retry_policy(retry: RetryConfig | RetryPolicy | None, client: Any = None) -> RetryPolicy:
    """Normalise the ``retry=`` argument of a lock or cache."""
    if retry is None:
        given = client_retry(client)
        return RetryPolicy() if given is None else RetryPolicy(given)
    if isinstance(retry, RetryPolicy):
        return retry
    if is_config(retry, "RetryConfig"):
        return RetryPolicy(retry)
    raise ConfigError(f"retry must be a RetryConfig or RetryPolicy, got {type(retry).__name__}")


class _CheckedClock:
    """A caller's ``clock=``, checked at every reading: a finite number of seconds, never below
    the reading before (else ``ConfigError``; an acquire in progress then releases whatever it
    was granted, as after any error)."""

    __slots__ = ("_clock", "_last", "_mutex")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last = -math.inf
        # read and compare as one step: two threads' readings must not be compared crosswise
        self._mutex = threading.Lock()

    def __call__(self) -> float:
        with self._mutex:
            value: Any = self._clock()
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ConfigError(
                    f"clock must return seconds as a finite int or float, but {self._clock!r} "
                    f"returned {value!r}"
                )
            if value < self._last:
                raise ConfigError(
                    f"clock must be monotonic, but {self._clock!r} went backwards from "
                    f"{self._last!r} to {value!r}"
                )
            self._last = value
            return float(value)


# Every live core, so that a forked child can re-seed them all: parent and child would otherwise
# draw the same owner ids, and the ACQUIRE script grants "a retried call of the same owner".
_LIVE_CORES: weakref.WeakSet[LockCore] = weakref.WeakSet()


def _after_fork() -> None:
    global _WARNED_LOCK
    _WARNED_LOCK = threading.Lock()  # a parent thread may have held it at the fork
    for core in list(_LIVE_CORES):
        core._reseed()


class LockCore:
    """State and protocol steps of one lock handle (no I/O; driven by a sync or async driver)."""

    __slots__ = (
        "__weakref__",
        "_busy",
        "_owner_prefix",
        "_owner_seq",
        "_unreleased",
        "clock",
        "expires_at",
        "fence_key",
        "lease_key",
        "name",
        "owner",
        "qexp_key",
        "queue_key",
        "rel_key",
        "rel_ms",
        "replica_timeout",
        "replicas",
        "retention_ms",
        "token",
        "ttl",
        "ttl_ms",
        "wake_prefix",
    )

    # what the handle is called in error messages
    kind = "lock"

    def __init__(
        self,
        name: str,
        *,
        ttl: Seconds,
        prefix: str,
        clock: Clock,
        fence_retention: Seconds,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self.name = validate_name(name, what="lock name")
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self.ttl = seconds(ttl, field="ttl")
        self.ttl_ms = _ms(self.ttl)
        # A retried release is recognised this long after the first one (per-owner marker).
        self.retention_ms = max(_ms(seconds(fence_retention, field="fence_retention")), self.ttl_ms)
        self.rel_ms = min(self.retention_ms, max(self.ttl_ms, _REL_MARK_MS))
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self.clock: Clock = clock if clock is monotonic else _CheckedClock(clock)
        keys = KeySpace(prefix)
        self.lease_key = keys.key("lock", self.name)
        self.fence_key = keys.key("lock", self.name, "fence")
        self.rel_key = keys.key("lock", self.name, "rel")
        self.queue_key = keys.key("lock", self.name, "queue")
        self.qexp_key = keys.key("lock", self.name, "qexp")
        self.wake_prefix = keys.key("lock", self.name, "wake") + ":"
        self.owner: str | None = None
        self.token: int | None = None
        self.expires_at = 0.0
        # The owner of an acquisition this handle declared lost by its own estimate (renewal ran
        # out of time) whose lease may still stand: release() and the next acquire() free it.
        self._unreleased: str | None = None
        # Owner ids: random per handle, a counter per acquisition (unique, and cheaper than
        # fresh randomness on every call). A forked child re-seeds both (_after_fork).
        self._owner_prefix = secrets.token_hex(8)
        self._owner_seq = itertools.count(1)
        # One acquire at a time per handle: two threads acquiring through one handle would
        # overwrite each other's state (refused with a LockError instead).
        self._busy = threading.Lock()
        _LIVE_CORES.add(self)

    def _reseed(self) -> None:
        """In a forked child: a fresh owner-id sequence, and nothing held (the lease is the
        parent's: the child must not release or extend it as if it were its own)."""
        self._owner_prefix = secrets.token_hex(8)
        self._owner_seq = itertools.count(1)
        self._busy = threading.Lock()
        if isinstance(self.clock, _CheckedClock):  # another thread may have held its mutex
            self.clock._mutex = threading.Lock()
        self.clear()
        self._unreleased = None

    def new_owner(self) -> str:
        """A fresh owner id for one acquisition attempt."""
        return f"{self._owner_prefix}{next(self._owner_seq):x}"

    # -- state ---------------------------------------------------------------------------------
    def _granted(self, owner: str, token: Any, sent_at: float) -> None:
        self.owner = owner
        self.token = int(token)
        self.expires_at = sent_at + self.ttl

    def clear(self) -> None:
        """Forget the current acquisition (after release, or once it is known to be lost)."""
        self.owner = None
        self.token = None
        self.expires_at = 0.0

    def lose(self) -> None:
        """Forget the current acquisition as lost by the local estimate, remembering its owner:
        its lease may still stand on the server (an extension that landed late, a paused
        holder), so ``release()`` and the next ``acquire()`` still send its owner-only release."""
        owner = self.owner
        self.clear()
        if owner is not None:
            self._unreleased = owner

    def _stale_release_call(self, owner: str) -> Eval:
        """The owner-only release of a lost acquisition's lease (frees nobody else's)."""
        keys = self._release_keys(self.wake_prefix + owner)
        return Eval(RELEASE, keys, (owner, self.retention_ms, 0, self.rel_ms), shield=True)

    def _release_stale(self) -> Protocol[int]:
        """Send the release of the lost acquisition remembered by ``lose()``, if any; its reply
        (1: a lease stood and was freed, 0: nothing of it was left), -1 when none was owed."""
        stale, self._unreleased = self._unreleased, None
        if stale is None:
            return -1
        reply = yield self._stale_release_call(stale)
        return int(reply)

    def remaining(self) -> float:
        """Seconds left on the lease by the conservative local estimate (0 when not held)."""
        if self.owner is None:
            return 0.0
        return max(0.0, self.expires_at - self.clock())

    def remaining_or_zero(self) -> float:
        """``remaining()``, or 0 when the ``clock=`` reading fails (``ConfigError``): a lease
        the clock cannot time is not claimed (the renewer then declares it lost)."""
        try:
            return self.remaining()
        except ConfigError:
            return 0.0

    # -- protocols -----------------------------------------------------------------------------
    def check_timeout(self, blocking: bool, timeout: Seconds | None) -> float | None:
        """Validate ``acquire``'s arguments; return the timeout in seconds (``None``: forever)."""
        if not isinstance(blocking, bool):
            raise ConfigError(f"blocking must be a bool, got {blocking!r}")
        if timeout is None or (isinstance(timeout, (int, float)) and timeout == -1):
            return None
        if not blocking:
            raise ConfigError("a timeout cannot be given with blocking=False")
        return seconds(timeout, field="timeout", allow_zero=True)

    def acquire(self, blocking: bool, timeout: float | None, max_block: float) -> Protocol[bool]:
        """Try to take the lease; when blocking, queue for a handoff until ``timeout``.

        Timing: ``timeout`` bounds the call to about ``timeout`` plus one round trip (the wait
        on the wake list ends one measured round trip before the deadline, then one call leaves
        the queue). A lease handed over through the wake list is timed from the send time of the
        ACQUIRE call just before the wait: the handoff happened after that call ran (it would
        have been granted otherwise), so the estimate stays early.
        """
        if self.owner is not None:
            raise LockError(
                f"{self.kind} {self.name!r} is already held by this handle (handles are not "
                "reentrant)",
                name=self.name,
            )
        if not self._busy.acquire(blocking=False):
            raise LockError(
                f"{self.kind} {self.name!r}: another acquire is in progress on this handle "
                "(one handle is one holder; give each thread or task its own handle)",
                name=self.name,
            )
        try:
            return (yield from self._acquire(blocking, timeout, max_block))
        finally:
            self._busy.release()

    def _acquire(self, blocking: bool, timeout: float | None, max_block: float) -> Protocol[bool]:
        if self._unreleased is not None:
            # A lost acquisition's lease may still stand: free it first (owner-only), or this
            # handle would queue behind its own leftover until the TTL.
            yield from self._release_stale()
        owner = self.new_owner()
        wake_key = self.wake_prefix + owner
        deadline = None if timeout is None else self.clock() + timeout
        queued = False
        rtt: float | None = None  # the last ACQUIRE's measured round trip
        # before any reply: the longest round trip assumed, twice the longest single wait
        # (max_block is half the socket timeout, capped at 1 s); a timed acquire whose timeout is
        # under twice this (4 s by default) starts with a try
        first_rtt = 2 * max_block
        lost_pops = 0
        unwritten = False  # the server said it wrote nothing of owner's: no clean-up to run
        try:
            while True:
                block = left = max_block
                if deadline is not None:
                    left = max(0.0, deadline - self.clock())
                    block = min(block, left)
                # the scripts drop a queue entry kept alive further ahead than MAX_WAIT_MS
                wait_ms = 0
                if blocking and block > 0:
                    wait_ms = min(_ms(block + _QUEUE_GRACE), MAX_WAIT_MS)
                if deadline is not None and left < 2 * (rtt or first_rtt) + _MIN_WAIT:
                    # No wait fits before the deadline (the reply, a wait and a call to leave
                    # the queue): try without queueing, so no second call is needed to leave and
                    # the call ends by about timeout + RTT. Before the first reply the round trip
                    # is unknown: assumed as long as a successful one can be (see first_rtt).
                    wait_ms = 0
                sent_at = self.clock()
                call = self._acquire_call(owner, wait_ms)
                if self.replicas:
                    granted, value = yield from self._replicated(call, _is_grant)
                else:
                    granted, value = yield call
                if granted == 1:
                    self._granted(owner, value, sent_at)
                    return True
                rtt = self.clock() - sent_at
                try:
                    lapse_ms = self._refused(granted, value)
                except ConfigError:  # the reply says this call wrote nothing (another limit)
                    unwritten = not queued
                    raise
                queued = queued or wait_ms > 0
                if not blocking:
                    return False
                if deadline is not None:
                    now = self.clock()
                    # the wait's reply arrives about one round trip after the server gives up
                    block = min(block, deadline - now - rtt)
                    if block < _MIN_WAIT:
                        if not queued:
                            return False
                        return (yield from self._leave(owner))
                    if wait_ms == 0:  # a try: queue now (the next call), then wait
                        continue
                if lapse_ms is not None:  # a holder may crash before anyone hands off
                    block = min(block, lapse_ms / 1000 + 0.001)
                try:
                    if self.replicas:  # a handoff: the BLPOP's own write follows the grant's
                        token = yield from self._replicated(Pop(wake_key, block), _is_token)
                    else:
                        token = yield Pop(wake_key, block)
                except ConnectionUnavailable as exc:
                    # A reset may have swallowed a handed-over token: the next ACQUIRE of the
                    # same owner (retried per policy, on a new connection) answers with the grant.
                    # A read timeout is not counted: a healthy server may end a BLPOP late, and
                    # a dead one fails that ACQUIRE (per the retry policy) instead.
                    if not _timed_out(exc):
                        lost_pops += 1
                    if lost_pops > _MAX_LOST_POPS:
                        raise
                    continue
                if token is not None:
                    self._granted(owner, token, sent_at)
                    return True
                if deadline is not None and deadline - self.clock() <= 0:
                    return (yield from self._leave(owner))
        except GeneratorExit:
            raise
        except BaseException:
            # Cancelled or failed after a request may have reached the server (even a lost reply
            # can be a grant, or a queue entry that a release hands the lease to later): release
            # whatever this owner holds and leave the queue, one try. If that fails too, the
            # lease (or queue entry) ends with its TTL.
            if self.owner is None and not unwritten:
                yield Cleanup(self._abandon_call(owner))
            raise

    def _acquire_call(self, owner: str, wait_ms: int) -> Eval:
        """One ACQUIRE of ``owner`` (``wait_ms``: 0 try only, > 0 queue, -1 leave the queue)."""
        keys = (
            self.lease_key,
            self.fence_key,
            self.queue_key,
            self.qexp_key,
            self.wake_prefix + owner,
        )
        # shield: a cancelled caller waits for the reply, so the cleanup cannot overtake this
        # call on another connection (and the call then grant an orphan)
        args = (owner, self.ttl_ms, self.retention_ms, wait_ms)
        return Eval(ACQUIRE, keys, args, shield=True)

    def _refused(self, granted: Any, value: Any) -> int | None:
        """Check a refused ACQUIRE's reply; ms until the lease may lapse (None: unknown)."""
        pttl = int(value)
        if pttl == -1:
            raise ForeignDataError(
                f"lock key {self.lease_key!r} exists without an expiry: "
                "it was not written by distlock"
            )
        return pttl if pttl > 0 else None

    def _abandon_call(self, owner: str) -> Eval:
        """Release whatever ``owner`` holds and leave the queue (a failed acquire's cleanup)."""
        keys = self._release_keys(self.wake_prefix + owner)
        return Eval(RELEASE, keys, (owner, self.retention_ms, 1, self.rel_ms))

    def _leave(self, owner: str) -> Protocol[bool]:
        """Timed out while queued: leave the queue in one call, unless the lease was handed over
        meanwhile (then it is granted, timed from this call)."""
        sent_at = self.clock()
        call = self._acquire_call(owner, -1)
        if self.replicas:
            granted, value = yield from self._replicated(call, _is_grant)
        else:
            granted, value = yield call
        if granted == 1:
            self._granted(owner, value, sent_at)
            return True
        return False

    def _replicated(self, step: Eval | Pop, needed: Any) -> Protocol[Any]:
        """Run a granting ``step`` and WAIT for the replicas; raise if they did not acknowledge.

        Raising inside ``acquire`` releases the unacknowledged lease (its cleanup handler).
        Why (asynchronous replication, Sentinel failover)::

            A: acquire -> master grants ... master dies before replicating the grant
            sentinels promote the replica (no lease there) -> B: acquire -> granted: 2 holders

        With the WAIT, A is told "granted" only once a replica has the lease.
        """
        reply, acks = yield Replicated(step, self.replicas, self.replica_timeout, needed)
        if acks is not None and acks < self.replicas:
            raise LockNotAcquired(
                f"lock {self.name!r} was granted but only {acks} of {self.replicas} replica(s) "
                f"acknowledged it within {self.replica_timeout}s; released it (a failover "
                "could have lost it)",
                name=self.name,
            )
        return reply

    def _release_keys(self, wake_key: str) -> tuple[str, ...]:
        return (
            self.lease_key,
            self.rel_key,
            self.fence_key,
            self.queue_key,
            self.qexp_key,
            self.wake_prefix,
            wake_key,
        )

    def release(self) -> Protocol[None]:
        """Release the lease if this handle holds it (handing it to the next waiter, if any).

        Raises:
            LockNotOwned: the handle holds nothing, the lease had expired or was taken, or the
                renewal declared it lost (its lease, if it still stood, was released first).
        """
        owner = self.owner
        if owner is None:
            if self._unreleased is None:
                raise LockNotOwned(f"lock {self.name!r} is not held by this handle", name=self.name)
            yield from self._release_stale()
            raise LockNotOwned(
                f"lock {self.name!r} was lost before release (renewal ran out of time); "
                "its lease, if it still stood, was released",
                name=self.name,
            )
        keys = self._release_keys(self.wake_prefix + owner)
        args = (owner, self.retention_ms, 0, self.rel_ms)
        try:
            result = yield Eval(RELEASE, keys, args, shield=True)
        finally:
            if self.owner == owner:  # not a newer acquisition's state
                self.clear()
        if result == 0:
            raise LockNotOwned(
                f"lock {self.name!r} was no longer held by this handle (lease expired or taken)",
                name=self.name,
            )

    def extend(self, ttl: Seconds | None) -> Protocol[None]:
        """Reset the lease to ``ttl`` (default: the lock's ttl) from now; owner only."""
        owner = self.owner
        if owner is None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle", name=self.name)
        new_ttl = self.ttl if ttl is None else seconds(ttl, field="ttl")
        sent_at = self.clock()
        call = Eval(EXTEND, (self.lease_key,), (owner, _ms(new_ttl)))
        acks = None
        if self.replicas:
            result, acks = yield Replicated(call, self.replicas, self.replica_timeout, _is_one)
        else:
            result = yield call
        if result != 1:
            if self.owner == owner:
                self.clear()
            raise LockNotOwned(
                f"lock {self.name!r} was no longer held by this handle (lease expired or taken)",
                name=self.name,
            )
        if acks is not None and acks < self.replicas:
            # The master has the new expiry, the replicas may not: after a failover the lease
            # ends at the old one, so the local estimate keeps it.
            raise LockError(
                f"extending lock {self.name!r}: only {acks} of {self.replicas} replica(s) "
                f"acknowledged within {self.replica_timeout}s; the lease is still held, "
                "but only until its previous expiry",
                name=self.name,
            )
        if self.owner == owner:
            self.expires_at = sent_at + new_ttl

    def locked(self) -> Protocol[bool]:
        """Whether anyone holds the lease now."""
        return bool((yield Command(("EXISTS", self.lease_key))))

    def owned(self) -> Protocol[bool]:
        """Whether this handle holds the lease now, by the server's word."""
        owner = self.owner
        if owner is None:
            return False
        value = yield Command(("GET", self.lease_key))
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return value in (owner, owner + "*")  # "*": waiters are queued behind the holder


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)


def force_release(name: str, *, prefix: str, fence_retention: Seconds) -> Protocol[list[Any]]:
    """Free lock ``name`` whoever holds it, handing it to the next waiter; the fence is kept.

    Result: the script's reply, ``[0]`` free, ``[1, holder]`` freed, ``[2, holder, next]``
    handed over (owner ids as ``bytes``). A key that is not a lock (no TTL, or not a string) is
    ``ForeignDataError``, and nothing is deleted.
    """
    name = validate_name(name, what="lock name")
    keys = KeySpace(prefix)
    retention = _ms(seconds(fence_retention, field="fence_retention"))
    reply = yield Eval(
        FORCE_RELEASE,
        (
            keys.key("lock", name),
            keys.key("lock", name, "fence"),
            keys.key("lock", name, "queue"),
            keys.key("lock", name, "qexp"),
            keys.key("lock", name, "wake") + ":",
        ),
        (retention,),
    )
    if int(reply[0]) == -1:
        kind = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
        raise ForeignDataError(
            f"{keys.key('lock', name)!r} is not a lock (a {kind} without an expiry or of another "
            "type): it holds data distkit did not write; nothing deleted"
        )
    return list(reply)
