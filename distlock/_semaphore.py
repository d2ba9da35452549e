"""``Semaphore`` and ``AsyncSemaphore``: at most ``limit`` holders of one name across processes.

One I/O-free core (``SemaphoreCore``) drives both twins through the lock's drivers and handle
classes, so renewal, the lost signal, ``with`` and cancellation safety are the lock's. Each permit
holder gets its own fencing token, greater than every earlier grant of that name; waiters queue
FIFO and are woken by a push, one per freed permit (docs/semaphore.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distkit import (
    ConfigError,
    KeySpace,
    LockError,
    LockNotOwned,
    RetryPolicy,
)
from distkit._keys import validate_name
from distkit._protocol import (
    AsyncDriver,
    Eval,
    Protocol,
    Replicated,
    SyncDriver,
    monotonic,
)
from distkit._units import seconds

from ._core import (
    Clock,
    LockCore,
    Seconds,
    _is_one,
    _ms,
    check_client,
    check_replicas,
    retry_policy,
    warn_own_retries,
)
from ._lock import _AsyncLock, _SyncLock
from ._semaphore_scripts import ACQUIRE, EXTEND, PEEK, RELEASE

if TYPE_CHECKING:
    from distkit import AsyncClient, RetryConfig, SyncClient

__all__ = ["AsyncSemaphore", "Semaphore", "SemaphoreCore"]

_MAX_LIMIT = 2**31  # exact in Lua's doubles with room for the scripts' arithmetic


class SemaphoreCore(LockCore):
    """State and protocol steps of one semaphore handle (no I/O; the lock's handles drive it)."""

    kind = "semaphore"

    __slots__ = (
        "holders_key",
        "limit",
        "limit_key",
        "tokens_key",
    )

    def __init__(
        self,
        name: str,
        limit: int,
        *,
        ttl: Seconds,
        prefix: str,
        clock: Clock,
        fence_retention: Seconds,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        validate_name(name, what="semaphore name")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= _MAX_LIMIT:
            raise ConfigError(f"limit must be an int from 1 to 2**31, got {limit!r}")
        super().__init__(
            name,
            ttl=ttl,
            prefix=prefix,
            clock=clock,
            fence_retention=fence_retention,
            replicas=replicas,
            replica_timeout=replica_timeout,
        )
        self.limit = limit
        keys = KeySpace(prefix)
        self.holders_key = keys.key("sem", self.name, "holders")
        self.tokens_key = keys.key("sem", self.name, "tokens")
        self.fence_key = keys.key("sem", self.name, "fence")
        self.limit_key = keys.key("sem", self.name, "limit")
        self.queue_key = keys.key("sem", self.name, "queue")
        self.qexp_key = keys.key("sem", self.name, "qexp")
        self.wake_prefix = keys.key("sem", self.name, "wake") + ":"
        self.rel_key = keys.key("sem", self.name, "rel")
        self.lease_key = self.holders_key

    def _acquire_call(self, owner: str, wait_ms: int) -> Eval:
        """One ACQUIRE of ``owner`` (``wait_ms``: 0 try only, > 0 queue, -1 leave the queue)."""
        keys = (
            self.holders_key,
            self.tokens_key,
            self.fence_key,
            self.limit_key,
            self.queue_key,
            self.qexp_key,
            self.wake_prefix,
            self.wake_prefix + owner,
        )
        args = (owner, self.ttl_ms, self.retention_ms, wait_ms, self.limit)
        return Eval(ACQUIRE, keys, args, shield=True)  # shield: see LockCore._acquire_call

    def _refused(self, granted: Any, value: Any) -> int | None:
        """Check a refused ACQUIRE's reply; ms until a permit may lapse (None: unknown)."""
        if granted == -1:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            raise ConfigError(
                f"semaphore {self.name!r} is in use with limit {value}; this handle has limit "
                f"{self.limit} (all handles of one name must agree)"
            )
        earliest = int(value)
        return earliest if earliest >= 0 else None

    def _abandon_call(self, owner: str) -> Eval:
        """Release whatever ``owner`` holds and leave the queue (a failed acquire's cleanup)."""
        return self._release_call(owner, True)

    def _release_call(self, owner: str, abandon: bool, *, shield: bool = False) -> Eval:
        keys = (
            self.holders_key,
            self.tokens_key,
            self.fence_key,
            self.queue_key,
            self.qexp_key,
            self.wake_prefix,
            self.wake_prefix + owner,
            self.rel_key,
            self.limit_key,
        )
        member = f"{self.ttl_ms}:{owner}"
        args = (owner, self.retention_ms, 1 if abandon else 0, member, self.limit)
        return Eval(RELEASE, keys, args, shield=shield)

    def _stale_release_call(self, owner: str) -> Eval:
        """The owner-only release of a lost permit's lease (frees nobody else's)."""
        return self._release_call(owner, False, shield=True)

    def release(self) -> Protocol[None]:
        """Give the permit back (handing it to the oldest live waiter, if any)."""
        owner = self.owner
        if owner is None:
            if self._unreleased is None:
                raise LockNotOwned(
                    f"semaphore {self.name!r}: this handle holds no permit", name=self.name
                )
            yield from self._release_stale()
            raise LockNotOwned(
                f"semaphore {self.name!r}: the permit was lost before release (renewal ran out "
                "of time); its lease, if it still stood, was released",
                name=self.name,
            )
        try:
            result = yield self._release_call(owner, False, shield=True)
        finally:
            if self.owner == owner:  # not a newer acquisition's state
                self.clear()
        if result == 0:
            raise LockNotOwned(
                f"semaphore {self.name!r}: the permit of this handle had expired", name=self.name
            )

    def extend(self, ttl: Seconds | None) -> Protocol[None]:
        """Reset this handle's lease to ``ttl`` (default: the semaphore's ttl) from now."""
        owner = self.owner
        if owner is None:
            raise LockNotOwned(
                f"semaphore {self.name!r}: this handle holds no permit", name=self.name
            )
        new_ttl = self.ttl if ttl is None else seconds(ttl, field="ttl")
        sent_at = self.clock()
        keys = (self.holders_key, self.tokens_key, self.limit_key)
        args = (owner, _ms(new_ttl), max(self.retention_ms, _ms(new_ttl)))
        call = Eval(EXTEND, keys, args)
        acks = None
        if self.replicas:
            result, acks = yield Replicated(call, self.replicas, self.replica_timeout, _is_one)
        else:
            result = yield call
        if result != 1:
            if self.owner == owner:
                self.clear()
            raise LockNotOwned(
                f"semaphore {self.name!r}: the permit of this handle had expired", name=self.name
            )
        if acks is not None and acks < self.replicas:
            # after a failover the lease ends at its old expiry: the local estimate keeps it
            raise LockError(
                f"extending semaphore {self.name!r}: only {acks} of {self.replicas} replica(s) "
                f"acknowledged within {self.replica_timeout}s; the permit is still held, "
                "but only until its previous expiry",
                name=self.name,
            )
        if self.owner == owner:
            self.expires_at = sent_at + new_ttl

    def holders(self) -> Protocol[int]:
        """How many permits are held now (live leases by the server clock)."""
        live, _ = yield Eval(PEEK, (self.holders_key,), (self.owner or "",))
        return int(live)

    def locked(self) -> Protocol[bool]:
        """Whether every permit is taken now (an acquire would have to wait)."""
        live = yield from self.holders()
        return live >= self.limit

    def owned(self) -> Protocol[bool]:
        """Whether this handle holds a live permit now, by the server's word."""
        if self.owner is None:
            return False
        _, mine = yield Eval(PEEK, (self.holders_key,), (self.owner,))
        return bool(mine)


def _init(
    self: Any,
    client: Any,
    name: str,
    limit: int,
    *,
    ttl: Seconds,
    blocking_timeout: Seconds | None,
    auto_renew: bool,
    renew_interval: Seconds | None,
    on_lost: Callable[[Any], None] | None,
    prefix: str,
    fence_retention: Seconds,
    retry: RetryConfig | RetryPolicy | None,
    clock: Clock,
    wait_for_replicas: int,
    replica_timeout: Seconds,
) -> SemaphoreCore:
    cls = type(self).__name__
    try:
        check_client(client, want_async=self._is_async, cls=cls)
    except ConfigError as exc:  # the shared check names the lock twins
        text = str(exc).replace("use AsyncLock", "use AsyncSemaphore")
        raise ConfigError(text.replace("use Lock", "use Semaphore")) from None
    wait_timeout = check_replicas(client, wait_for_replicas, replica_timeout, cls=cls)
    core = SemaphoreCore(
        name,
        limit,
        ttl=ttl,
        prefix=prefix,
        clock=clock,
        fence_retention=fence_retention,
        replicas=wait_for_replicas,
        replica_timeout=wait_timeout,
    )
    self._setup(
        core,
        blocking_timeout=blocking_timeout,
        auto_renew=auto_renew,
        renew_interval=renew_interval,
        on_lost=on_lost,
        retry=retry,
    )
    if retry is None:  # connect()'s RetryConfig, when one was given
        self._retry = retry_policy(None, client)
    warn_own_retries(client, self._retry.attempts)
    return core


class Semaphore(_SyncLock):
    """A counting semaphore on one Redis: at most ``limit`` holders, each with a fencing token.

    Every handle holds at most one permit; use one handle per concurrent holder. The API is the
    lock's (``acquire``/``release``/``extend``/``with``/``auto_renew``/``lost``/``on_lost``).

    Args:
        client: a sync redis-py client (``redis.Redis``, ``RedisCluster``, a Sentinel master).
        name: the semaphore's name (non-empty str, no control characters or braces).
        limit: how many holders at most; every handle of one name must give the same limit
            (another one raises ``ConfigError`` at ``acquire``).
        ttl: lease length of one permit; a crashed holder's permit frees after it.
        blocking_timeout: default wait of ``with sem:`` (``None``: wait forever).
        auto_renew: extend the lease in a background thread every ``renew_interval``.
        renew_interval: default ``ttl / 3``.
        on_lost: called with the handle when renewal fails and the permit is lost.
        prefix: key prefix (``{prefix}:sem:{name}:...``).
        fence_retention: how long fencing state and the stored limit outlive the last holder.
        retry: retry policy for transient connection errors.
        clock: monotonic clock in seconds (injectable for tests).
        wait_for_replicas: after each grant, ``WAIT`` until this many replicas acknowledged it.
        replica_timeout: how long one ``WAIT`` may block.

    Raises:
        ConfigError: an argument is invalid.
    """

    def __init__(
        self,
        client: SyncClient,
        name: str,
        limit: int,
        *,
        ttl: Seconds = 30.0,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: Callable[[Any], None] | None = None,
        prefix: str = "distkit",
        fence_retention: Seconds = 3600.0,
        retry: RetryConfig | RetryPolicy | None = None,
        clock: Clock = monotonic,
        wait_for_replicas: int = 0,
        replica_timeout: Seconds = 1.0,
    ) -> None:
        self._sem = _init(
            self,
            client,
            name,
            limit,
            ttl=ttl,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            prefix=prefix,
            fence_retention=fence_retention,
            retry=retry,
            clock=clock,
            wait_for_replicas=wait_for_replicas,
            replica_timeout=replica_timeout,
        )
        self._setup_io(SyncDriver(client, self._retry, f"semaphore {self.name!r}"))

    @property
    def limit(self) -> int:
        """The most holders at once."""
        return self._sem.limit

    def holders(self) -> int:
        """How many permits are held now (one round trip)."""
        return self._driver.run(self._sem.holders())

    def __repr__(self) -> str:
        state = f"held token={self._core.token}" if self._core.owner else "not held"
        return f"<Semaphore {self.name!r} limit={self.limit} ttl={self.ttl}s {state}>"


class AsyncSemaphore(_AsyncLock):
    """The asyncio twin of ``Semaphore`` (same arguments; takes a ``redis.asyncio`` client).

    ``acquire`` and ``release`` are cancellation-safe: a cancelled acquire leaves no permit or
    queue entry behind, and a cancelled release still completes on the server.
    """

    _is_async = True

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        limit: int,
        *,
        ttl: Seconds = 30.0,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: Callable[[Any], None] | None = None,
        prefix: str = "distkit",
        fence_retention: Seconds = 3600.0,
        retry: RetryConfig | RetryPolicy | None = None,
        clock: Clock = monotonic,
        wait_for_replicas: int = 0,
        replica_timeout: Seconds = 1.0,
    ) -> None:
        self._sem = _init(
            self,
            client,
            name,
            limit,
            ttl=ttl,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            prefix=prefix,
            fence_retention=fence_retention,
            retry=retry,
            clock=clock,
            wait_for_replicas=wait_for_replicas,
            replica_timeout=replica_timeout,
        )
        self._setup_io(AsyncDriver(client, self._retry, f"semaphore {self.name!r}"))

    @property
    def limit(self) -> int:
        """The most holders at once."""
        return self._sem.limit

    async def holders(self) -> int:
        """How many permits are held now (one round trip)."""
        return await self._driver.run(self._sem.holders())

    def __repr__(self) -> str:
        state = f"held token={self._core.token}" if self._core.owner else "not held"
        return f"<AsyncSemaphore {self.name!r} limit={self.limit} ttl={self.ttl}s {state}>"
