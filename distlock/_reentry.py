"""Reentrancy for ``Lock(..., reentrant=True)`` and ``AsyncLock``: holder, depth and a local gate.

The lease in Redis is taken by the outermost ``acquire`` and freed by the matching ``release``;
nested calls by the holder (the thread, for ``Lock``; the task, for ``AsyncLock``) only count.
Other threads or tasks that share the handle wait on a local gate first (so one of them at a
time drives the handle's protocol), then queue in Redis like any other process. The fencing
token, the lease and its renewal belong to the outermost hold.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import weakref
from typing import Any, TypeVar

from distkit import ConfigError, LockNotOwned
from distkit._protocol import monotonic

__all__ = ["AsyncReentry", "SyncReentry"]


class _Reentry:
    """The holder (a thread or a task), its depth; the gate is the subclass's."""

    __slots__ = ("__weakref__", "depth", "holder")
    _who = "thread"

    def __init__(self) -> None:
        self.holder: Any = None
        self.depth = 0

    @staticmethod
    def _me() -> Any:
        return threading.get_ident()

    def nested(self, lock: Any) -> bool:
        """``True`` (one level deeper) when the caller holds ``lock`` already.

        Raises:
            LockLost: the outer hold's lease is lost or has run out: a nested section must not
                run as if it were protected.
        """
        me = self._me()
        if me is None or self.holder != me:
            return False
        lock.ensure_held()
        self.depth += 1
        return True

    def held(self) -> None:
        """The outermost acquire succeeded: the caller holds."""
        self.holder = self._me()
        self.depth = 1

    def leave(self, name: str) -> bool:
        """One level up; ``True`` when that was the outermost hold (the lease goes now).

        Raises:
            LockNotOwned: the caller does not hold the lock.
        """
        me = self._me()
        if self.holder is None or self.holder != me:
            raise LockNotOwned(
                f"lock {name!r} is not held by this {self._who} (a reentrant lock belongs to "
                f"the {self._who} that acquired it)",
                name=name,
            )
        self.depth -= 1
        if self.depth:
            return False
        self.holder = None
        return True


class SyncReentry(_Reentry):
    """The holder thread, its depth, and the gate other threads of this process wait on."""

    __slots__ = ("gate",)

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Lock()

    def after_fork(self) -> None:
        """In a forked child: nothing is held (the lease is the parent's), a fresh gate."""
        self.__init__()  # type: ignore[misc]

    def enter(self, timeout: float | None, blocking: bool) -> tuple[bool, float | None]:
        """Take the gate; ``(taken, what is left of timeout)``."""
        started = monotonic()
        if not blocking:
            return self.gate.acquire(False), None
        if not self.gate.acquire(True, -1 if timeout is None else timeout):
            return False, None
        left = None if timeout is None else max(0.0, timeout - (monotonic() - started))
        return True, left


class _AsyncGate:
    """A FIFO asyncio lock whose timed wait never drops a handover (``asyncio.wait_for`` on
    ``asyncio.Lock.acquire`` could, before Python 3.12: CPython gh-86296)."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, blocking: bool, timeout: float | None) -> bool:
        if not self.held and not self.waiters:
            self.held = True
            return True
        if not blocking or timeout == 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=timeout)  # never cancels the waiter itself
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over as the caller was cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self.waiters:
                self.waiters.remove(waiter)
        return not waiter.cancelled()

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # handed over: stays held
                return
        self.held = False


class AsyncReentry(_Reentry):
    """The holder task, its depth, and the gate other tasks sharing the handle wait on."""

    __slots__ = ("gate",)
    _who = "task"

    def __init__(self) -> None:
        super().__init__()
        self.gate = _AsyncGate()

    @staticmethod
    def _me() -> Any:
        return asyncio.current_task()

    def after_fork(self) -> None:
        """In a forked child: nothing is held, a fresh gate."""
        self.__init__()  # type: ignore[misc]

    async def enter(self, timeout: float | None, blocking: bool) -> tuple[bool, float | None]:
        """Take the gate; ``(taken, what is left of timeout)``."""
        started = monotonic()
        if not await self.gate.acquire(blocking, timeout):
            return False, None
        left = None if timeout is None else max(0.0, timeout - (monotonic() - started))
        return True, left


def check_reentrant(value: Any) -> bool:
    """``reentrant=`` must be a bool."""
    if not isinstance(value, bool):
        raise ConfigError(f"reentrant must be a bool, got {value!r}")
    return value


_LIVE: weakref.WeakSet[SyncReentry | AsyncReentry] = weakref.WeakSet()


_R = TypeVar("_R", SyncReentry, AsyncReentry)


def track(reentry: _R) -> _R:
    """Reset ``reentry`` in a forked child (its holder is a parent thread or task)."""
    _LIVE.add(reentry)
    return reentry


def _after_fork() -> None:
    for reentry in list(_LIVE):
        reentry.after_fork()


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)
