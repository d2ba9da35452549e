"""What a lost lease leaves behind (review of distlock): a renewer of an earlier acquisition never
judges the next one, and a lease the renewer declared lost by its own estimate is still freed by
``release()`` (or leaving ``with``) instead of standing, ownerless, until its TTL.

The races are made deterministic by holding the renewer's extension after it read its owner id
(a driver spy), not by sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import pytest
import redis

from distkit import LockLost, LockNotOwned
from distkit._protocol import AsyncDriver, SyncDriver
from distlock import AsyncLock, Lock, Semaphore

LEASE = "distkit:lock:{{{}}}"


def primed(protocol: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    """``protocol`` advanced to its first request now (it has read the handle's owner id), then
    driven as usual."""
    first = next(protocol)

    def drive() -> Generator[Any, Any, Any]:
        step = first
        while True:
            try:
                reply = yield step
            except GeneratorExit:
                protocol.close()
                raise
            except BaseException as exc:
                try:
                    step = protocol.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                step = protocol.send(reply)
            except StopIteration as stop:
                return stop.value

    return drive()


class JumpClock:
    """A monotonic clock the test moves ahead: the holder "paused" past its estimate while the
    server's lease still stands (a GC pause, SIGSTOP)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


# -- 1. a stale renewer and the next acquisition ---------------------------------------------------


def test_stale_renewer_never_fires_lost_on_the_next_acquisition(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operator force_release while the renewer's extension is in flight; the holder notices
    (extend() -> LockNotOwned) and acquires again. The old renewer's extension then fails for
    the old owner id: it must not set lost / call on_lost for the new, healthy acquisition."""
    calls: list[Any] = []
    h = Lock(r, "stale", ttl=5, auto_renew=True, renew_interval=0.1, on_lost=calls.append)
    entered, gate = threading.Event(), threading.Event()
    run = SyncDriver.run

    def spy(self: SyncDriver, protocol: Any) -> Any:
        if self is h._driver and threading.current_thread().name.startswith("distlock-extend"):
            protocol = primed(protocol)
            entered.set()
            gate.wait(10)
        return run(self, protocol)

    monkeypatch.setattr(SyncDriver, "run", spy)
    assert h.acquire()
    assert entered.wait(5)  # the renewer's extension of the first owner id is in flight
    assert Lock.force_release(r, "stale") is True
    with pytest.raises(LockNotOwned):
        h.extend()
    old = h._renewer
    assert old is not None
    assert h.acquire(blocking=False)
    token = h.fencing_token
    gate.set()
    old.join(5)
    assert not old.is_alive()
    assert calls == [] and not h.lost.is_set()
    assert h.owned() and h.fencing_token == token
    h.release()  # no LockLost, no LockNotOwned: the second acquisition was never lost


def test_async_stale_renewer_never_fires_lost_on_the_next_acquisition(
    ar: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AsyncLock twin: the old renewer task's late LockNotOwned is not the new hold's loss."""

    async def main() -> None:
        client = ar()
        calls: list[Any] = []
        h = AsyncLock(client, "astale", ttl=5, auto_renew=True, renew_interval=0.1)
        h._on_lost = calls.append
        entered, gate = asyncio.Event(), asyncio.Event()
        run = AsyncDriver.run

        async def spy(self: AsyncDriver, protocol: Any) -> Any:
            task = asyncio.current_task()
            if self is h._driver and task is not None and task.get_name().startswith("distlock-"):
                protocol = primed(protocol)
                entered.set()
                await gate.wait()
            return await run(self, protocol)

        monkeypatch.setattr(AsyncDriver, "run", spy)
        assert await h.acquire()
        await asyncio.wait_for(entered.wait(), 5)
        assert await AsyncLock.force_release(client, "astale") is True
        with pytest.raises(LockNotOwned):
            await h.extend()
        old = h._renewer
        assert old is not None
        assert await h.acquire(blocking=False)
        gate.set()
        await asyncio.wait({old}, timeout=5)
        assert old.done()
        await asyncio.sleep(0)
        assert calls == [] and not h.lost.is_set()
        assert await h.owned()
        await h.release()
        await client.aclose()

    asyncio.run(main())


# -- 2. a lease declared lost by the local estimate ------------------------------------------------


def test_lost_by_estimate_sends_no_extension_and_release_frees_the_lease(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's estimate runs out (paused) while the server still holds its lease: the renewer
    declares it lost without first sending a fresh full-ttl extension, and release() still
    frees the standing lease (owner-only) before raising LockNotOwned, so the next holder need
    not wait for the TTL."""
    clock = JumpClock()
    lost: list[Any] = []
    h = Lock(r, "paused", ttl=30, auto_renew=True, renew_interval=1.0, clock=clock)
    h._on_lost = lost.append
    extensions: list[str] = []
    run = SyncDriver.run

    def spy(self: SyncDriver, protocol: Any) -> Any:
        if self is h._driver and threading.current_thread().name.startswith("distlock-extend"):
            extensions.append(threading.current_thread().name)
        return run(self, protocol)

    monkeypatch.setattr(SyncDriver, "run", spy)
    assert h.acquire()
    clock.offset = 31.0
    assert h.lost.wait(5)
    assert extensions == []  # nothing sent for a lease the handle had stopped claiming
    assert h.fencing_token is None
    assert r.exists(LEASE.format("paused"))  # the server's lease stands
    with pytest.raises(LockNotOwned):
        h.release()
    assert not r.exists(LEASE.format("paused"))
    with pytest.raises(LockNotOwned):
        h.release()  # sent once: nothing is owed any more
    other = Lock(r, "paused", ttl=5)
    assert other.acquire(blocking=False)
    other.release()


def test_leaving_with_after_a_lost_lease_frees_it_and_raises_lock_lost(r: redis.Redis) -> None:
    clock = JumpClock()
    h = Lock(r, "pwith", ttl=30, auto_renew=True, renew_interval=0.2, clock=clock)
    with pytest.raises(LockLost), h:
        clock.offset = 31.0
        assert h.lost.wait(5)
    assert not r.exists(LEASE.format("pwith"))


def test_reacquire_after_a_lost_lease_frees_the_leftover_first(r: redis.Redis) -> None:
    """A handle that lost its lease by its estimate and acquires again (no release) does not
    queue behind its own leftover lease for the TTL."""
    clock = JumpClock()
    h = Lock(r, "pagain", ttl=30, auto_renew=True, renew_interval=0.2, clock=clock)
    assert h.acquire()
    clock.offset = 31.0
    assert h.lost.wait(5)
    assert h.acquire(blocking=False)
    assert h.owned() and not h.lost.is_set()
    h.release()


def test_semaphore_release_after_a_lost_permit_frees_it(r: redis.Redis) -> None:
    clock = JumpClock()
    h = Semaphore(r, "psem", 1, ttl=30, auto_renew=True, renew_interval=0.2, clock=clock)
    assert h.acquire()
    clock.offset = 31.0
    assert h.lost.wait(5)
    with pytest.raises(LockNotOwned):
        h.release()
    other = Semaphore(r, "psem", 1, ttl=5)
    assert other.acquire(blocking=False)
    other.release()


def test_async_lost_by_estimate_release_frees_the_lease(ar: Callable[[], Any]) -> None:
    async def main() -> None:
        client = ar()
        clock = JumpClock()
        h = AsyncLock(client, "apaused", ttl=30, auto_renew=True, renew_interval=0.2, clock=clock)
        assert await h.acquire()
        clock.offset = 31.0
        await asyncio.wait_for(h.lost.wait(), 5)
        assert await client.exists(LEASE.format("apaused"))
        with pytest.raises(LockNotOwned):
            await h.release()
        assert not await client.exists(LEASE.format("apaused"))
        other = AsyncLock(client, "apaused", ttl=5)
        assert await other.acquire(blocking=False)
        await other.release()
        await client.aclose()

    asyncio.run(main())
