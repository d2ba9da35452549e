"""asyncio specifics: ownership per handle, cancellation safety of acquire and release."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from distkit import LockNotOwned
from distkit.testing import RedisServer
from distlock import AsyncLock

LEASE = "distkit:lock:{{{}}}"


def test_ownership_belongs_to_the_handle_not_the_task(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = redis_server.async_client()
        await client.flushall()
        shared = AsyncLock(client, "tasks", ttl=10)
        other = AsyncLock(client, "tasks", ttl=10)
        await asyncio.create_task(shared.acquire())
        # another task releases through the same handle: allowed, the handle is the owner
        with pytest.raises(LockNotOwned):
            await asyncio.create_task(other.release())
        await asyncio.create_task(shared.release())
        assert not await shared.locked()
        await client.aclose()

    asyncio.run(run())


def test_cancelled_acquire_leaves_no_lease_or_queue_entry(redis_server: RedisServer) -> None:
    """The script ran on the server but the task is cancelled before the reply arrives."""

    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        slow = redis_server.async_client()
        original = slow.execute_command

        async def slow_reply(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            if args[0] == "EVALSHA":
                await asyncio.sleep(0.5)  # the reply is "still on the wire"
            return result

        slow.execute_command = slow_reply  # type: ignore[method-assign]
        lock = AsyncLock(slow, "cancel-acq", ttl=30)
        task = asyncio.create_task(lock.acquire())
        for _ in range(100):
            if await direct.exists(LEASE.format("cancel-acq")):
                break
            await asyncio.sleep(0.01)
        assert await direct.exists(LEASE.format("cancel-acq")) == 1  # granted on the server
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await direct.exists(LEASE.format("cancel-acq")) == 0
        assert lock.fencing_token is None
        other = AsyncLock(direct, "cancel-acq", ttl=30)
        assert await other.acquire(blocking=False)
        await other.release()
        await slow.aclose()
        await direct.aclose()

    asyncio.run(run())


def test_cancelled_blocked_waiter_leaves_the_queue(redis_server: RedisServer) -> None:
    async def run() -> None:
        client = redis_server.async_client()
        await client.flushall()
        holder = AsyncLock(client, "cancel-wait", ttl=30)
        assert await holder.acquire()
        waiter = AsyncLock(redis_server.async_client(), "cancel-wait", ttl=30)
        task = asyncio.create_task(waiter.acquire(timeout=20))
        for _ in range(200):
            if await client.zcard("distkit:lock:{cancel-wait}:queue") == 1:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await client.zcard("distkit:lock:{cancel-wait}:queue") == 0
        await holder.release()
        # the lease was not handed to the departed waiter
        assert await client.exists(LEASE.format("cancel-wait")) == 0
        await client.aclose()

    asyncio.run(run())


def test_cancelled_release_still_releases(redis_server: RedisServer) -> None:
    """The release is cancelled before its request leaves (a slow pool, a busy loop)."""

    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        slow = redis_server.async_client()
        original = slow.execute_command
        delay = {"seconds": 0.0}

        async def slow_send(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(delay["seconds"])
            return await original(*args, **kwargs)

        slow.execute_command = slow_send  # type: ignore[method-assign]
        lock = AsyncLock(slow, "cancel-rel", ttl=30)
        assert await lock.acquire()
        delay["seconds"] = 0.3
        task = asyncio.create_task(lock.release())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lock.fencing_token is None
        for _ in range(100):  # the shielded release completes on its own
            if not await direct.exists(LEASE.format("cancel-rel")):
                break
            await asyncio.sleep(0.02)
        assert await direct.exists(LEASE.format("cancel-rel")) == 0
        await slow.aclose()
        await direct.aclose()

    asyncio.run(run())


def test_async_with_and_auto_renew_task_stops(redis_server: RedisServer) -> None:
    async def run() -> Any:
        client = redis_server.async_client()
        await client.flushall()
        lock = AsyncLock(client, "arenew", ttl=0.3, auto_renew=True)
        async with lock:
            await asyncio.sleep(0.8)
            assert await lock.owned()
            renewer = lock._renewer
            assert renewer is not None
        assert renewer.done()
        assert not await lock.locked()
        await client.aclose()

    asyncio.run(run())


def test_release_stops_a_renewer_whose_cancellation_met_a_finishing_extension(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos soak's stuck worker: release() cancelled the renewer in the loop iteration in
    which its extension finished. asyncio.wait_for (before Python 3.12) then returns the result
    and drops the cancellation: the renewer went on renewing and release() waited for it forever.
    """
    from distkit._protocol import AsyncDriver

    real_run = AsyncDriver.run
    gate: dict[str, Any] = {}

    def run(self: Any, protocol: Any) -> Any:
        if getattr(protocol, "gi_code", None) is not None and protocol.gi_code.co_name == "extend":
            protocol.close()

            async def held() -> None:  # the extension: answered when the test says so
                gate["entered"].set()
                await gate["answer"]

            return held()
        return real_run(self, protocol)

    monkeypatch.setattr(AsyncDriver, "run", run)

    async def scenario() -> None:
        gate["entered"] = asyncio.Event()
        gate["answer"] = asyncio.get_running_loop().create_future()
        lock = AsyncLock(redis_server.async_client(), "renew-race", ttl=0.6, auto_renew=True)
        assert await lock.acquire()
        await asyncio.wait_for(gate["entered"].wait(), 5)
        # The extension finishes in the next loop iteration and release() (its first step,
        # stopping the renewer) cancels the renewer in the one after, before it resumes.
        gate["answer"].set_result(None)
        stop = asyncio.ensure_future(lock._stop_renewer())
        done, _ = await asyncio.wait({stop}, timeout=3)
        assert stop in done, "the renewer swallowed its cancellation: release() waits forever"
        await lock.release()
        assert not await lock.locked()

    asyncio.run(scenario())
