"""``Lock`` and ``AsyncLock``: one Redis, fencing tokens, FIFO handoff, renewal, a loud lost signal.

Both twins drive the same ``LockCore`` protocols; they add only I/O, a renewal thread or task,
and the context-manager glue. Why the holder must still check its fencing token (a timeline)::

    A: acquire (token 17) ... GC pause / SIGSTOP ..................... write(17) -> rejected
    B:                        lease of A expires -> acquire (token 18) -> write(18) ok

The lease alone cannot stop A's late write; the resource must compare tokens (``FencedStore``,
or the SQL pattern in docs/fencing.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from typing_extensions import Self

from distkit import (
    ConfigError,
    DistkitError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RetryPolicy,
)
from distkit._fork import renew_locks_after_fork
from distkit._protocol import AsyncDriver, SyncDriver, monotonic, settled
from distkit._units import seconds

from ._core import (
    Clock,
    LockCore,
    Seconds,
    check_client,
    check_replicas,
    force_release,
    retry_policy,
    warn_own_retries,
)
from ._reentry import AsyncReentry, SyncReentry, check_reentrant, track

if TYPE_CHECKING:
    from distkit import AsyncClient, RetryConfig, SyncClient

__all__ = ["AsyncLock", "Lock"]

log = logging.getLogger(__name__)


_timeout: Any = getattr(asyncio, "timeout", None)  # Python 3.11+


async def _within(limit: float, call: Any) -> Any:
    """``await call`` cut after ``limit`` seconds (``asyncio.TimeoutError``): ``asyncio.timeout``
    where it exists (3.11+), whose cancellation cannot be lost the way ``wait_for``'s can."""
    if _timeout is None:  # pragma: no cover - Python 3.10
        return await asyncio.wait_for(call, limit)
    async with _timeout(limit):
        return await call


_L = TypeVar("_L", bound="_LockBase[Any]")
# How often the renewer re-reads the lease estimate while an extension is in flight.
_RENEW_POLL = 0.05
_E = TypeVar("_E", threading.Event, asyncio.Event)


class _LockBase(Generic[_E]):
    """What both twins share: validation, state accessors and the lost signal's bookkeeping."""

    _core: LockCore
    _lost: _E
    _is_async = False

    def _setup(
        self,
        core: LockCore,
        *,
        blocking_timeout: Seconds | None,
        auto_renew: bool,
        renew_interval: Seconds | None,
        on_lost: Callable[[Any], None] | None,
        retry: RetryConfig | RetryPolicy | None,
        reentrant: bool = False,
    ) -> None:
        self._core = core
        self._reentrant = check_reentrant(reentrant)
        self._blocking_timeout = (
            None
            if blocking_timeout is None
            else seconds(blocking_timeout, field="blocking_timeout", allow_zero=True)
        )
        if not isinstance(auto_renew, bool):
            raise ConfigError(f"auto_renew must be a bool, got {auto_renew!r}")
        self._auto_renew = auto_renew
        interval = self._core.ttl / 3 if renew_interval is None else renew_interval
        self._renew_interval = seconds(interval, field="renew_interval")
        if self._renew_interval >= self._core.ttl:
            raise ConfigError(
                f"renew_interval ({self._renew_interval}s) must be shorter than ttl "
                f"({self._core.ttl}s)"
            )
        if on_lost is not None and not callable(on_lost):
            raise ConfigError(f"on_lost must be callable, got {on_lost!r}")
        self._on_lost = on_lost
        self._retry = retry_policy(retry)

    @property
    def name(self) -> str:
        """The lock's name."""
        return self._core.name

    @property
    def ttl(self) -> float:
        """The lease length in seconds."""
        return self._core.ttl

    @property
    def fencing_token(self) -> int | None:
        """The fencing token of the current acquisition; ``None`` when this handle holds nothing."""
        return self._core.token

    @property
    def validity(self) -> float:
        """Seconds left on the lease by a conservative local estimate (0.0 when not held)."""
        return self._core.remaining()

    @property
    def lost(self) -> _E:
        """Set when a held lease was lost (renewal failed); an Event (sync) / asyncio.Event."""
        return self._lost

    def ensure_held(self) -> None:
        """Raise ``LockLost`` unless this handle holds an unexpired lease (local check, no I/O).

        Raises:
            LockLost: the lost signal is set, or the lease's local estimate ran out.
        """
        if self._lost.is_set():
            raise LockLost(f"lock {self.name!r} was lost", name=self.name)
        if self._core.owner is None:
            raise LockLost(f"lock {self.name!r} is not held by this handle", name=self.name)
        if self._core.remaining() <= 0:
            raise LockLost(f"the lease of lock {self.name!r} has run out", name=self.name)

    def _fire_lost(self) -> None:
        self._set_lost()
        self._call_on_lost()

    def _set_lost(self) -> None:
        log.warning("lock %r lost its lease", self.name)
        self._lost.set()

    def _call_on_lost(self) -> None:
        if self._on_lost is not None:
            try:
                self._on_lost(self)
            except Exception:
                log.exception("on_lost callback of lock %r raised", self.name)

    def _not_acquired(self, timeout: float | None) -> LockNotAcquired:
        return LockNotAcquired(f"lock {self.name!r} not acquired within {timeout}s", name=self.name)

    def __repr__(self) -> str:
        state = f"held token={self._core.token}" if self._core.owner else "not held"
        return f"<{type(self).__name__} {self.name!r} ttl={self.ttl}s {state}>"


class _SyncLock(_LockBase[threading.Event]):
    """The I/O half of the sync handles (``Lock``, ``Redlock``): one driver, one renewal thread."""

    _driver: SyncDriver
    _FORK_LOCKS: ClassVar[tuple[str, ...]] = ("_lost_guard",)

    def _setup_io(self, driver: SyncDriver) -> None:
        self._driver = driver
        self._lost = threading.Event()
        # A renewer's "lost" decision and an acquisition taking over the lost signal happen one
        # at a time: a decision about an earlier acquisition never lands on a newer one.
        self._lost_guard = threading.Lock()
        renew_locks_after_fork(self)
        self._renewer: threading.Thread | None = None
        self._stop_renew = threading.Event()
        self._reentry = track(SyncReentry()) if self._reentrant else None

    def acquire(self, blocking: bool = True, timeout: Seconds | None = None) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (``None``: forever) when ``blocking``.

        Reentrant (``reentrant=True``): the holding thread's nested ``acquire`` returns ``True``
        at once (one level deeper; ``LockLost`` if the outer hold's lease is lost); other threads
        sharing the handle wait for it like other processes.

        Raises:
            ConnectionUnavailable: Redis could not be reached (the lock is never reported held).
            LockError: this handle already holds the lock (not reentrant).
        """
        reentry = self._reentry
        if reentry is None:
            return self._acquire(blocking, timeout)
        if reentry.nested(self):
            return True
        taken, left = reentry.enter(self._core.check_timeout(blocking, timeout), blocking)
        if not taken:
            return False
        try:
            got = self._acquire(blocking, left)
        except BaseException:
            reentry.gate.release()
            raise
        if got:
            reentry.held()
        else:
            reentry.gate.release()
        return got

    def _acquire(self, blocking: bool, timeout: Seconds | None) -> bool:
        seconds_ = self._core.check_timeout(blocking, timeout)
        got = self._driver.run(self._core.acquire(blocking, seconds_, self._driver.max_block))
        if got:
            with self._lost_guard:
                if self._lost.is_set():
                    self._lost.clear()
                if self._auto_renew:
                    self._start_renewer()
        return got

    def release(self) -> None:
        """Release the lock (owner only); the next waiter, if any, gets it at once.

        Reentrant: only the holding thread may release; the lease goes with the outermost
        release.

        Raises:
            LockNotOwned: this handle (reentrant: this thread) does not hold it, or its lease
                expired.
        """
        reentry = self._reentry
        if reentry is not None:
            if not reentry.leave(self.name):
                return
            try:
                self._stop_renewer()
                self._driver.run(self._core.release())
            finally:
                reentry.gate.release()
            return
        self._stop_renewer()
        self._driver.run(self._core.release())

    def extend(self, ttl: Seconds | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the lock's ttl) from now.

        Raises:
            LockNotOwned: this handle does not hold it, or its lease expired.
        """
        self._driver.run(self._core.extend(ttl))

    def locked(self) -> bool:
        """Whether anyone holds the lock now (one round trip; Redlock: a quorum of masters).

        Raises:
            ConnectionUnavailable: Redis could not be reached (Redlock: too few masters
                answered to tell).
        """
        return self._driver.run(self._core.locked())

    def owned(self) -> bool:
        """Whether this handle holds the lock now, as the server sees it (one round trip).

        Raises:
            ConnectionUnavailable: Redis could not be reached (Redlock: too few masters
                answered to tell).
        """
        return self._driver.run(self._core.owned())

    def _start_renewer(self) -> None:
        # A renewer of an earlier acquisition may still be running (its extension in flight,
        # say, after an operator's force_release): stop it, so it can never judge this one.
        self._stop_renew.set()
        self._stop_renew = threading.Event()
        thread = threading.Thread(
            target=self._renew_loop,
            args=(self._core.owner, self._stop_renew),
            name=f"distlock-renew-{self.name}",
            daemon=True,
        )
        self._renewer = thread
        thread.start()

    def _stop_renewer(self) -> None:
        thread, self._renewer = self._renewer, None
        if thread is not None:
            self._stop_renew.set()
            if thread is not threading.current_thread():
                thread.join()

    def _bounded_extend(self, stop: threading.Event) -> bool:
        """One renewal, waited for only while the lease's local estimate lasts.

        ``True``: the extension finished (its error, if any, is raised here). ``False``: the
        estimate ran out first; the call may still land later (it runs on in a daemon thread,
        within the client's timeouts), which only lengthens a lease this handle no longer
        claims. A release that stops the renewer meanwhile waits for the call to finish, so the
        release lands after it (as it did when the renewer made the call itself).
        """
        if self._core.remaining_or_zero() <= 0:
            return False  # ran out already (a paused holder): send no extension it cannot claim
        outcome: list[BaseException | None] = []
        done = threading.Event()

        def call() -> None:
            try:
                self._driver.run(self._core.extend(None))
                outcome.append(None)
            except BaseException as exc:  # handed to the renewer thread
                outcome.append(exc)
            finally:
                done.set()

        threading.Thread(target=call, name=f"distlock-extend-{self.name}", daemon=True).start()
        while not done.is_set():
            left = self._core.remaining_or_zero()
            if left <= 0:
                return False
            if stop.is_set():
                done.wait()
                break
            done.wait(min(left, _RENEW_POLL))
        if outcome[0] is not None:
            raise outcome[0]
        return True

    def _renew_loop(self, owner: str | None, stop: threading.Event) -> None:
        interval = self._renew_interval
        while not stop.wait(interval):
            if self._core.owner != owner or owner is None:
                return
            try:
                if not self._bounded_extend(stop):
                    self._declare_lost(owner, stop, ran_out=True)
                    return
                interval = self._renew_interval
            except LockNotOwned:
                self._declare_lost(owner, stop, ran_out=False)
                return
            except DistkitError as exc:
                left = self._core.remaining_or_zero()
                if left <= 0:
                    self._declare_lost(owner, stop, ran_out=True)
                    return
                log.warning("renewing lock %r failed (%s); %.3fs left", self.name, exc, left)
                interval = min(self._renew_interval, max(0.01, left / 4))

    def _declare_lost(self, owner: str, stop: threading.Event, *, ran_out: bool) -> None:
        """The renewer of ``owner``'s acquisition lost it: signal it, unless that renewer was
        superseded or the handle no longer holds that acquisition (a newer one, or a release or
        refusal the holder saw itself): never the wrong acquisition's loss. ``ran_out``: lost by
        the local estimate while still held, the lease may still stand (``lose()``); otherwise
        the renewer's own extension was refused, which cleared the owner."""
        with self._lost_guard:
            if self._stop_renew is not stop:
                return
            if ran_out:
                if self._core.owner != owner:
                    return
                self._core.lose()
            elif self._core.owner is not None:
                return
            self._set_lost()
        self._call_on_lost()

    def __enter__(self) -> Self:
        if not self.acquire(timeout=self._blocking_timeout):
            raise self._not_acquired(self._blocking_timeout)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        was_lost = self._lost.is_set()
        try:
            self.release()
        except LockNotOwned as err:
            if exc_type is None:
                raise LockLost(
                    f"the lease of lock {self.name!r} lapsed inside the with block", name=self.name
                ) from err
            return
        if was_lost and exc_type is None:
            raise LockLost(f"lock {self.name!r} was lost inside the with block", name=self.name)


class _AsyncLock(_LockBase[asyncio.Event]):
    """The I/O half of the asyncio handles (``AsyncLock``, ``AsyncRedlock``)."""

    _is_async = True

    _driver: AsyncDriver

    def _setup_io(self, driver: AsyncDriver) -> None:
        self._driver = driver
        self._lost = asyncio.Event()
        self._renewer: asyncio.Task[None] | None = None
        self._reentry = track(AsyncReentry()) if self._reentrant else None

    async def acquire(self, blocking: bool = True, timeout: Seconds | None = None) -> bool:
        """Take the lock; wait up to ``timeout`` seconds (``None``: forever) when ``blocking``.

        Reentrant (``reentrant=True``): the holding task's nested ``acquire`` returns ``True``
        at once (one level deeper; ``LockLost`` if the outer hold's lease is lost); other tasks
        sharing the handle wait for it like other processes.

        Raises:
            ConnectionUnavailable: Redis could not be reached (the lock is never reported held).
            LockError: this handle already holds the lock (not reentrant).
        """
        reentry = self._reentry
        if reentry is None:
            return await self._acquire(blocking, timeout)
        if reentry.nested(self):
            return True
        seconds_ = self._core.check_timeout(blocking, timeout)
        taken, left = await reentry.enter(seconds_, blocking)
        if not taken:
            return False
        try:
            got = await self._acquire(blocking, left)
        except BaseException:
            reentry.gate.release()
            raise
        if got:
            reentry.held()
        else:
            reentry.gate.release()
        return got

    async def _acquire(self, blocking: bool, timeout: Seconds | None) -> bool:
        seconds_ = self._core.check_timeout(blocking, timeout)
        got = await self._driver.run(self._core.acquire(blocking, seconds_, self._driver.max_block))
        if got:
            if self._lost.is_set():
                self._lost.clear()
            if self._auto_renew:
                old = self._renewer
                self._renewer = asyncio.get_running_loop().create_task(
                    self._renew_loop(self._core.owner), name=f"distlock-renew-{self.name}"
                )
                # A renewer of an earlier acquisition (its extension in flight) is superseded:
                # it stops at its next step and never judges this acquisition.
                if old is not None and old.get_loop() is asyncio.get_running_loop():
                    old.cancel()
        return got

    async def release(self) -> None:
        """Release the lock (owner only); the next waiter, if any, gets it at once.

        Reentrant: only the holding task may release; the lease goes with the outermost release.

        Raises:
            LockNotOwned: this handle (reentrant: this task) does not hold it, or its lease
                expired.
        """
        reentry = self._reentry
        if reentry is not None:
            if not reentry.leave(self.name):
                return
            try:
                await settled(self._release())
            finally:
                reentry.gate.release()
            return
        # Once started, a release completes on the server even if the caller is cancelled
        # (stopping the renewer included: a cancellation there used to skip the release).
        await settled(self._release())

    async def _release(self) -> None:
        await self._stop_renewer()
        await self._driver.run(self._core.release())

    async def extend(self, ttl: Seconds | None = None) -> None:
        """Reset the lease to ``ttl`` (default: the lock's ttl) from now.

        Raises:
            LockNotOwned: this handle does not hold it, or its lease expired.
        """
        await self._driver.run(self._core.extend(ttl))

    async def locked(self) -> bool:
        """Whether anyone holds the lock now (one round trip; Redlock: a quorum of masters).

        Raises:
            ConnectionUnavailable: Redis could not be reached (Redlock: too few masters
                answered to tell).
        """
        return await self._driver.run(self._core.locked())

    async def owned(self) -> bool:
        """Whether this handle holds the lock now, as the server sees it (one round trip).

        Raises:
            ConnectionUnavailable: Redis could not be reached (Redlock: too few masters
                answered to tell).
        """
        return await self._driver.run(self._core.owned())

    async def _stop_renewer(self) -> None:
        task, self._renewer = self._renewer, None
        if task is None or task is asyncio.current_task():
            return
        loop = task.get_loop()
        if loop is asyncio.get_running_loop():
            # Cancelled again until done: before Python 3.12, asyncio.wait_for can swallow a
            # cancellation when the call it waits on completes at that moment (CPython
            # gh-86296); the loop also stops by itself once it is no longer the renewer.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.05)
        elif not loop.is_closed():  # renewing on a loop in another thread: never wait on it
            loop.call_soon_threadsafe(task.cancel)
        # else: that loop is closed, and its task can never run again

    async def _renew_loop(self, owner: str | None) -> None:
        interval = self._renew_interval
        me = asyncio.current_task()
        while True:
            await asyncio.sleep(interval)
            if self._core.owner != owner or owner is None or self._renewer is not me:
                return
            try:
                # bounded by the lease's local estimate: cut the call when it runs out
                left = self._core.remaining_or_zero()
                if left > 0:
                    await _within(left, self._driver.run(self._core.extend(None)))
                else:
                    raise asyncio.TimeoutError
                if self._renewer is not me:  # stopped while extending (cancellation swallowed)
                    return
                interval = self._renew_interval
            except asyncio.TimeoutError:  # the estimate ran out first (a redis-py one is mapped)
                self._declare_lost(owner, me, ran_out=True)
                return
            except LockNotOwned:
                self._declare_lost(owner, me, ran_out=False)
                return
            except DistkitError as exc:
                left = self._core.remaining_or_zero()
                if left <= 0:
                    self._declare_lost(owner, me, ran_out=True)
                    return
                log.warning("renewing lock %r failed (%s); %.3fs left", self.name, exc, left)
                interval = min(self._renew_interval, max(0.01, left / 4))

    def _declare_lost(self, owner: str, me: asyncio.Task[Any] | None, *, ran_out: bool) -> None:
        """The renewer of ``owner``'s acquisition lost it: signal it, unless that renewer was
        superseded or the handle no longer holds that acquisition (see the sync twin).
        ``ran_out``: lost by the local estimate while still held, the lease may still stand
        (``lose()``); otherwise the renewer's own extension was refused."""
        if self._renewer is not me:
            return
        if ran_out:
            if self._core.owner != owner:
                return
            self._core.lose()
        elif self._core.owner is not None:
            return
        self._fire_lost()

    async def __aenter__(self) -> Self:
        if not await self.acquire(timeout=self._blocking_timeout):
            raise self._not_acquired(self._blocking_timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        was_lost = self._lost.is_set()
        try:
            await self.release()
        except LockNotOwned as err:
            if exc_type is None:
                raise LockLost(
                    f"the lease of lock {self.name!r} lapsed inside the with block", name=self.name
                ) from err
            return
        if was_lost and exc_type is None:
            raise LockLost(f"lock {self.name!r} was lost inside the with block", name=self.name)


class Lock(_SyncLock):
    """A lock on one Redis (standalone, Sentinel master or Cluster) with fencing tokens.

    Args:
        client: a sync redis-py client (``redis.Redis``, ``RedisCluster``, a Sentinel master).
        name: the lock's name (non-empty str, no control characters or braces).
        ttl: lease length, seconds or ``timedelta``; a crashed holder's lock frees after it.
        blocking_timeout: default wait of ``with lock:`` (``None``: wait forever).
        auto_renew: extend the lease in a background thread every ``renew_interval``.
        renew_interval: default ``ttl / 3``.
        on_lost: called with the lock when renewal fails and the lease is lost.
        prefix: key prefix (``{prefix}:lock:{name}``).
        fence_retention: how long fencing state outlives the last holder (tokens stay monotonic
            after it expires, by the server clock; see docs/fencing.md).
        retry: retry policy for transient connection errors.
        clock: monotonic clock in seconds (injectable for tests).
        wait_for_replicas: after each grant and extension, ``WAIT`` until this many replicas
            acknowledged it (0: do not wait). A grant that is not acknowledged within
            ``replica_timeout`` is released and ``acquire`` raises ``LockNotAcquired``; an
            extension that is not raises ``LockError``. Guards against a Sentinel failover
            losing a just-granted lease (docs/topology.md). Standalone/Sentinel clients only.
        replica_timeout: how long one ``WAIT`` may block (seconds or ``timedelta``; keep it
            below the client's socket timeout).
        reentrant: the thread that holds the lock may acquire it again (``with`` blocks nest);
            the lease goes with the outermost release, the fencing token stays that of the
            outermost hold, and other threads sharing the handle wait like other processes.
            For ``AsyncLock``: the holding task. Default ``False``: a second acquire on a
            handle that holds raises ``LockError``.

    Raises:
        ConfigError: an argument is invalid.
    """

    def __init__(
        self,
        client: SyncClient,
        name: str,
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
        reentrant: bool = False,
    ) -> None:
        cls = type(self).__name__
        check_client(client, want_async=self._is_async, cls=cls)
        wait_timeout = check_replicas(client, wait_for_replicas, replica_timeout, cls=cls)
        core = LockCore(
            name,
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
            reentrant=reentrant,
        )
        if retry is None:  # connect()'s RetryConfig, when one was given
            self._retry = retry_policy(None, client)
        warn_own_retries(client, self._retry.attempts)
        self._setup_io(self._make_driver(client))

    def _make_driver(self, client: Any) -> Any:
        return SyncDriver(client, self._retry, f"lock {self.name!r}")

    @staticmethod
    def force_release(
        client: SyncClient,
        name: str,
        *,
        prefix: str = "distkit",
        fence_retention: Seconds = 3600.0,
    ) -> bool:
        """Free a stuck lock whoever holds it (an operator's repair); ``True`` if it was held.

        The next waiter, if any, gets it at once (as on a release); the fence is kept, so the next
        fencing token is still higher than every earlier one, and the former holder's later
        ``release()``/``extend()`` raise ``LockNotOwned``.
        """
        check_client(client, want_async=False, cls="Lock.force_release")
        driver = SyncDriver(client, retry_policy(None, client), f"lock {name!r}")
        reply = driver.run(force_release(name, prefix=prefix, fence_retention=fence_retention))
        return bool(reply[0])


class AsyncLock(_AsyncLock):
    """The asyncio twin of ``Lock`` (same arguments; takes a ``redis.asyncio`` client).

    Ownership belongs to the handle, never to a task or thread (with ``reentrant=True``: to the
    task that acquired it). ``acquire`` and ``release`` are
    cancellation-safe: a cancelled acquire leaves no lease or queue entry behind, and a cancelled
    release still completes on the server.
    """

    _is_async = True

    if TYPE_CHECKING:  # Lock's __init__ with an asyncio client (tests/test_typing.py: in step)

        def __init__(
            self,
            client: AsyncClient,
            name: str,
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
            reentrant: bool = False,
        ) -> None: ...

    else:
        __init__ = Lock.__init__

    def _make_driver(self, client: Any) -> Any:
        return AsyncDriver(client, self._retry, f"lock {self.name!r}")

    @staticmethod
    async def force_release(
        client: AsyncClient,
        name: str,
        *,
        prefix: str = "distkit",
        fence_retention: Seconds = 3600.0,
    ) -> bool:
        """The asyncio twin of ``Lock.force_release``; ``True`` if the lock was held."""
        check_client(client, want_async=True, cls="AsyncLock.force_release")
        driver = AsyncDriver(client, retry_policy(None, client), f"lock {name!r}")
        protocol = force_release(name, prefix=prefix, fence_retention=fence_retention)
        reply = await driver.run(protocol)
        return bool(reply[0])
