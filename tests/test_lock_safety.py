"""Issue 13, single-instance lock: fork, late validity after a handoff, cancellation at every
await point, connection resets while queued, timeout overruns, and the suspected items (64 dead
waiters, one handle shared by two threads, a retried release after another holder released).

Each test here failed on the code before the fix it names (checked by reverting the fix once).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from distkit import (
    ConnectionUnavailable,
    ForeignDataError,
    LockError,
    ServerError,
    aconnect,
    connect,
)
from distkit.testing import FaultProxy, RedisServer
from distlock import AsyncLock, AsyncSemaphore, Lock, Semaphore
from distlock._scripts import ACQUIRE

LEASE = "distkit:lock:{{{}}}"
QUEUE = "distkit:lock:{{{}}}:queue"
QEXP = "distkit:lock:{{{}}}:qexp"


def _lease_owner(r: redis.Redis, name: str) -> str | None:
    value = r.get(LEASE.format(name))
    return None if value is None else value.decode().rstrip("*")


# -- 1. fork ---------------------------------------------------------------------------------------


def _child_acquires(lock: Lock, go: Any, out: Any) -> None:
    go.wait(10)
    held_copy = lock.fencing_token is not None
    got = lock.acquire(blocking=False)
    out.put((held_copy, got, lock.fencing_token))
    if got:
        lock.release()


@pytest.mark.parametrize("held_at_fork", [False, True], ids=["idle-at-fork", "held-at-fork"])
def test_forked_children_never_share_the_parents_owner_ids(
    redis_server: RedisServer, held_at_fork: bool
) -> None:
    """Fix: LockCore re-seeds its owner ids in a forked child (os.register_at_fork)."""
    r = redis_server.client()
    r.flushall()
    client = redis_server.client()
    lock = Lock(client, "fork", ttl=30)
    if held_at_fork:
        assert lock.acquire()
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_child_acquires, args=(lock, go, out)) for _ in range(4)]
    for child in children:
        child.start()
    if not held_at_fork:
        assert lock.acquire()  # the parent takes the lease after the fork, with its next owner id
    token = lock.fencing_token
    go.set()
    results = [out.get(timeout=20) for _ in children]
    for child in children:
        child.join(20)
        assert child.exitcode == 0
    # no child is granted "a retried call of the same owner", and no child believes it holds
    # the parent's lease
    assert results == [(False, False, None)] * len(children), results
    assert lock.owned() and lock.fencing_token == token
    lock.release()
    assert not r.exists(LEASE.format("fork"))


def _child_releases(lock: Lock, out: Any) -> None:
    try:
        lock.release()
        out.put("released")
    except Exception as exc:  # the expected LockNotOwned
        out.put(type(exc).__name__)


def test_a_forked_copy_of_a_held_handle_cannot_release_the_parents_lease(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.flushall()
    lock = Lock(redis_server.client(), "fork-rel", ttl=30, auto_renew=True, renew_interval=0.1)
    assert lock.acquire()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_releases, args=(lock, out))
    child.start()
    assert out.get(timeout=20) == "LockNotOwned"
    child.join(20)
    assert lock.owned()
    lock.release()


def test_async_handle_reseeds_in_a_forked_child() -> None:
    """AsyncLock shares LockCore: its owner ids differ in a child too (no server needed)."""
    import fakeredis

    lock = AsyncLock(fakeredis.FakeAsyncRedis(), "fork-async", ttl=5)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=lambda: out.put(lock._core.new_owner()))
    child.start()
    theirs = out.get(timeout=20)
    child.join(20)
    assert lock._core.new_owner() != theirs


# -- 2. validity after a handoff -------------------------------------------------------------------


class _StallingClock:
    """A monotonic clock that stalls once (a GC pause, a preemption) at its first reading after
    ``armed`` is set, running ``during`` meanwhile."""

    def __init__(self, stall: float, during: Callable[[], None]) -> None:
        self.stall = stall
        self.during = during
        self.armed = False

    def __call__(self) -> float:
        if self.armed:
            self.armed = False
            timer = threading.Timer(self.stall / 4, self.during)
            timer.start()
            time.sleep(self.stall)
            timer.join()
        return time.monotonic()


def test_validity_after_a_handoff_is_never_late(redis_server: RedisServer) -> None:
    """Fix: a handed-off lease is timed from the send of the ACQUIRE before the wait."""
    r = redis_server.client()
    r.flushall()
    holder = Lock(r, "late", ttl=3)
    assert holder.acquire()
    clock = _StallingClock(1.0, holder.release)  # the handoff happens inside the stall
    client = redis_server.client()
    original = client.execute_command

    def arm_after_the_queueing_reply(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if args[0] in ("EVALSHA", "EVAL") and isinstance(result, list) and result[0] == 0:
            clock.armed = True
        return result

    client.execute_command = arm_after_the_queueing_reply  # type: ignore[method-assign]
    waiter = Lock(client, "late", ttl=3, clock=clock)
    assert waiter.acquire(timeout=10)
    client.execute_command = original  # type: ignore[method-assign]
    pttl = r.pttl(LEASE.format("late")) / 1000
    validity = waiter.validity  # read after the PTTL: the server's remaining time only shrank
    assert 0 < validity <= pttl + 0.002, (validity, pttl)
    waiter.release()


# -- 3. cancellation at every await point ----------------------------------------------------------


async def _cancel_after(coro: Any, steps: int) -> bool:
    """Run ``coro`` as a task, cancel it after ``steps`` scheduler steps; True if it finished."""
    task = asyncio.ensure_future(coro)
    for _ in range(steps):
        if task.done():
            break
        await asyncio.sleep(0)
    if task.done():
        task.result()
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True  # finished before the cancellation took effect


async def _no_orphan(direct: Any, name: str, lock: AsyncLock) -> None:
    """Either the handle holds the lease and knows it, or no lease of this handle remains."""
    owner = await direct.get(LEASE.format(name))
    if lock.fencing_token is not None:
        assert owner is not None and owner.decode().rstrip("*") == lock._core.owner
        return
    if owner is not None:  # a cleanup in flight gets one round trip
        await asyncio.sleep(0.05)
        owner = await direct.get(LEASE.format(name))
    assert owner is None, f"orphaned lease {owner!r}"
    assert await direct.zcard(QUEUE.format(name)) == 0


@pytest.mark.parametrize("auto_renew", [False, True])
def test_cancelled_release_at_every_await_point_still_releases(
    redis_server: RedisServer, auto_renew: bool
) -> None:
    """Fix: AsyncLock.release runs (renewer stop + RELEASE) to its end via ``settled``."""

    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        client = redis_server.async_client()
        lock = AsyncLock(client, "cxl-rel", ttl=30, auto_renew=auto_renew, renew_interval=1)
        k = 0
        while True:
            assert await lock.acquire()
            done = await _cancel_after(lock.release(), k)
            await _no_orphan(direct, "cxl-rel", lock)
            if k >= 1:  # the release had started: it completed on the server and in the handle
                assert lock.fencing_token is None, k
                assert not await direct.exists(LEASE.format("cxl-rel")), k
            elif lock.fencing_token is not None:  # cancelled before it started: still held
                await lock.release()
            if done:
                break
            k += 1
        assert k >= 1  # at least one point really was cancelled
        await client.aclose()
        await direct.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("contended", [False, True], ids=["free", "handoff"])
def test_cancelled_acquire_at_every_await_point_orphans_nothing(
    redis_server: RedisServer, contended: bool
) -> None:
    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        client = redis_server.async_client()
        name = f"cxl-acq-{contended}"
        holder = AsyncLock(direct, name, ttl=30)
        lock = AsyncLock(client, name, ttl=30)
        for k in range(0, 80):
            if contended:
                assert await holder.acquire()
                asyncio.get_running_loop().call_later(
                    0.002 * (k % 5), lambda: asyncio.ensure_future(holder.release())
                )
            done = await _cancel_after(lock.acquire(timeout=5), k)
            await asyncio.sleep(0.02)  # the holder's release (a handoff) lands
            await _no_orphan(direct, name, lock)
            if lock.fencing_token is not None:
                await lock.release()
            if holder.fencing_token is not None:
                await holder.release()
            if done and not contended:
                break
        await client.aclose()
        await direct.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("auto_renew", [False, True])
def test_cancelled_extend_at_every_await_point_keeps_the_handle_consistent(
    redis_server: RedisServer, auto_renew: bool
) -> None:
    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        client = redis_server.async_client()
        lock = AsyncLock(client, "cxl-ext", ttl=30, auto_renew=auto_renew, renew_interval=0.01)
        assert await lock.acquire()
        for k in range(0, 40):
            if await _cancel_after(lock.extend(), k):
                break
            await _no_orphan(direct, "cxl-ext", lock)
            assert lock.fencing_token is not None  # an extension never loses the lease
        await lock.release()
        assert not await direct.exists(LEASE.format("cxl-ext"))
        await client.aclose()
        await direct.aclose()

    asyncio.run(run())


def test_cancelled_acquire_cleanup_cannot_overtake_the_acquire(redis_server: RedisServer) -> None:
    """Suspected item, fixed: the ACQUIRE's bytes are already on the wire when the task is
    cancelled; the cleanup RELEASE used to run beside it on another connection and execute
    first, and the late ACQUIRE then granted an orphan lease. Now the cleanup waits for it."""

    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        client = redis_server.async_client()
        original = client.execute_command
        sent = asyncio.Event()

        async def on_the_wire(*args: Any, **kwargs: Any) -> Any:
            if args[0] in ("EVALSHA", "EVAL") and args[2] == 5:  # an ACQUIRE

                async def later() -> Any:
                    await asyncio.sleep(0.3)  # delivered late, but delivered
                    return await original(*args, **kwargs)

                inner = asyncio.ensure_future(later())
                sent.set()
                return await asyncio.shield(inner)
            return await original(*args, **kwargs)

        client.execute_command = on_the_wire  # type: ignore[method-assign]
        lock = AsyncLock(client, "overtake", ttl=30)
        task = asyncio.ensure_future(lock.acquire())
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        assert not await direct.exists(LEASE.format("overtake"))
        await direct.aclose()

    asyncio.run(run())


# -- 4. a connection reset while a waiter blocks ---------------------------------------------------


def test_reset_while_blocked_for_a_handoff_recovers_the_grant(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    """Fix: a failed wait re-runs ACQUIRE with the same owner, which answers with the grant."""
    r = redis_server.client()
    r.flushall()
    holder = Lock(r, "reset", ttl=30)
    assert holder.acquire()
    client = connect(proxy.config())  # redis-py retries off
    waiter = Lock(client, "reset", ttl=30)
    got: list[Any] = []

    def wait() -> None:
        try:
            got.append(waiter.acquire(timeout=10))
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    deadline = time.monotonic() + 5
    while not r.zcard(QUEUE.format("reset")):
        assert time.monotonic() < deadline
        time.sleep(0.002)
    time.sleep(0.05)  # the waiter is inside its BLPOP
    proxy.blackhole()  # hold the token on its way to the waiter ...
    holder.release()  # ... the handoff: the lease now belongs to the waiter's owner id
    time.sleep(0.05)
    proxy.cut()  # ... and lose it with the connection
    proxy.blackhole(False)
    thread.join(15)
    assert got == [True], got
    assert waiter.owned()
    assert _lease_owner(r, "reset") == waiter._core.owner
    waiter.release()
    assert not r.exists(LEASE.format("reset"))
    client.close()


def test_a_failed_waiter_leaves_no_queue_entry_to_hand_the_lease_to(
    redis_server: RedisServer,
) -> None:
    """Fix: the cleanup runs after a ConnectionUnavailable too (it used to be skipped), so a
    release right after a waiter gave up never hands the lease to its queue entry."""
    r = redis_server.client()
    r.flushall()
    holder = Lock(r, "gone", ttl=30)
    assert holder.acquire()
    client = redis_server.client()
    original = client.execute_command

    def every_wait_is_reset(*args: Any, **kwargs: Any) -> Any:
        if args[0] == "BLPOP":
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return original(*args, **kwargs)

    client.execute_command = every_wait_is_reset  # type: ignore[method-assign]
    waiter = Lock(client, "gone", ttl=30)
    owner = waiter._core._owner_prefix  # every owner id of this handle starts with it
    with pytest.raises(ConnectionUnavailable):
        waiter.acquire(timeout=10)
    assert r.zcard(QUEUE.format("gone")) == 0
    holder.release()  # nobody is queued: the lease is simply freed
    assert _lease_owner(r, "gone") is None or not _lease_owner(r, "gone").startswith(owner)


# -- 7. acquire(timeout) bound ---------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.3, 1.0])
def test_acquire_timeout_overruns_by_at_most_about_one_round_trip(
    redis_server: RedisServer, proxy: FaultProxy, timeout: float
) -> None:
    """Fix: the wait ends one measured round trip before the deadline; leaving is one call."""
    r = redis_server.client()
    r.flushall()
    holder = Lock(r, "slow", ttl=30)
    assert holder.acquire()
    client = connect(proxy.config())
    warm = Lock(client, "warm", ttl=5)  # connection and scripts loaded before the latency
    assert warm.acquire(timeout=1)
    warm.release()
    assert not Lock(client, "slow", ttl=30).acquire(timeout=0.05)
    one_way = 0.1
    rtt = 2 * one_way
    proxy.set_latency(one_way)
    waiter = Lock(client, "slow", ttl=30)
    start = time.monotonic()
    assert waiter.acquire(timeout=timeout) is False
    elapsed = time.monotonic() - start
    proxy.set_latency(0)
    assert elapsed <= timeout + 1.5 * rtt + 0.1, elapsed
    assert r.zcard(QUEUE.format("slow")) == 0  # left the queue
    holder.release()
    client.close()


@pytest.mark.parametrize("kind", ["lock", "semaphore"])
@pytest.mark.parametrize("timeout", [0.0, 0.05, 0.15, 0.3])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_timeout_shorter_than_a_wait_costs_one_round_trip_and_never_queues(
    redis_server: RedisServer, proxy: FaultProxy, timeout: float, kind: str, flavour: str
) -> None:
    """Fix (review item 10): with less time than a reply, a wait and a call to leave the queue,
    the first call is a try that does not queue, so no second call is needed: the acquire ends by
    about timeout + one round trip (it took 2 round trips), and the queue key is never written."""
    r = redis_server.client()
    r.flushall()
    holder: Any = Lock(r, "short", ttl=30) if kind == "lock" else Semaphore(r, "short", 1, ttl=30)
    assert holder.acquire()
    queue = f"distkit:{'lock' if kind == 'lock' else 'sem'}:{{short}}:queue"
    one_way = 0.1
    rtt = 2 * one_way

    def handle(client: Any) -> Any:
        if kind == "lock":
            return (AsyncLock if flavour == "async" else Lock)(client, "short", ttl=30)
        return (AsyncSemaphore if flavour == "async" else Semaphore)(client, "short", 1, ttl=30)

    def check(elapsed: float, got: bool) -> None:
        assert got is False
        assert elapsed <= timeout + rtt + 0.08, elapsed
        # every timeout here is under two round trips: one call, not a queueing one plus a leave
        assert elapsed <= rtt + 0.1, elapsed
        assert r.exists(queue) == 0  # never queued

    if flavour == "sync":
        client = connect(proxy.config())
        client.ping()  # connected (and the handshake done) before the latency
        proxy.set_latency(one_way)
        start = time.monotonic()
        got = handle(client).acquire(timeout=timeout)
        elapsed = time.monotonic() - start
        proxy.set_latency(0)
        client.close()
        check(elapsed, got)
    else:

        async def main() -> None:
            client = aconnect(proxy.config())
            try:
                await client.ping()
                proxy.set_latency(one_way)
                start = time.monotonic()
                got = await handle(client).acquire(timeout=timeout)
                elapsed = time.monotonic() - start
                proxy.set_latency(0)
                check(elapsed, got)
            finally:
                proxy.set_latency(0)
                await client.aclose()

        asyncio.run(main())
    holder.release()


# -- suspected items -------------------------------------------------------------------------------


def test_more_than_64_dead_waiters_do_not_let_a_newcomer_barge(redis_server: RedisServer) -> None:
    """Fix: first_live answers "not known to be empty" (false) after 64 dead waiters."""
    r = redis_server.client()
    r.flushall()
    queue, qexp = QUEUE.format("dead"), QEXP.format("dead")
    now_ms = int(time.time() * 1000)
    for i in range(70):
        r.zadd(queue, {f"30000:dead{i}": i})
        r.hset(qexp, f"30000:dead{i}", 1)  # long expired
    live = Lock(r, "dead", ttl=30)
    live_member = f"30000:{live._core.new_owner()}"
    r.zadd(queue, {live_member: 1000})
    r.hset(qexp, live_member, now_ms + 60_000)
    newcomer = Lock(r, "dead", ttl=30)
    assert newcomer.acquire(blocking=False) is False  # the live waiter is older
    assert newcomer.acquire(blocking=False) is False
    assert r.zrange(queue, 0, -1) == [live_member.encode()]


def test_two_threads_acquiring_through_one_handle_get_a_clear_error(
    redis_server: RedisServer,
) -> None:
    """Decision: one handle is one holder; a second concurrent acquire raises LockError."""
    r = redis_server.client()
    r.flushall()
    other = Lock(r, "shared", ttl=30)
    assert other.acquire()
    shared = Lock(redis_server.client(), "shared", ttl=30)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(shared.acquire(timeout=5)))
    thread.start()
    while not r.zcard(QUEUE.format("shared")):
        time.sleep(0.002)
    with pytest.raises(LockError, match="another acquire is in progress"):
        shared.acquire(timeout=1)
    other.release()
    thread.join(10)
    assert got == [True]
    assert shared.owned()
    shared.release()


def test_a_retried_release_is_recognised_after_another_holder_released(
    redis_server: RedisServer,
) -> None:
    """Fix: per-owner release markers (the shared one kept only the last releaser)."""
    r = redis_server.client()
    r.flushall()
    client = redis_server.client()
    original = client.execute_command
    state = {"armed": False}
    other = Lock(r, "relmark", ttl=30)

    def lossy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if state["armed"] and args[0] in ("EVALSHA", "EVAL") and args[2] == 7:
            state["armed"] = False
            assert other.acquire(blocking=False)  # someone else holds and releases in between
            other.release()
            raise redis.exceptions.ConnectionError("reply lost")
        return result

    client.execute_command = lossy  # type: ignore[method-assign]
    lock = Lock(client, "relmark", ttl=30)
    assert lock.acquire()
    state["armed"] = True
    lock.release()  # the retry answers "already released by this owner"
    assert lock.fencing_token is None


def test_a_retried_release_is_recognised_after_64_other_releases(
    redis_server: RedisServer,
) -> None:
    """The marker list is trimmed lazily (only past 128 entries) but always keeps the last 64."""
    r = redis_server.client()
    r.flushall()
    rel = "distkit:lock:{relmany}:rel"
    mine = Lock(r, "relmany", ttl=30)
    assert mine.acquire()
    owner = mine._core.owner
    mine.release()
    others = [Lock(r, "relmany", ttl=30) for _ in range(4)]
    lengths = []
    for i in range(300):
        other = others[i % 4]
        assert other.acquire(blocking=False)
        other.release()
        lengths.append(r.llen(rel))
        if i < 63:  # the first release is still among the last 64: a retry is recognised
            assert r.lpos(rel, owner) is not None
    assert min(lengths[63:]) >= 64 and max(lengths) <= 129
    assert 0 < r.pttl(rel) <= 60_000


@pytest.mark.parametrize(
    ("plant", "error"),
    [
        (lambda r, k: r.set(k, "not-a-number"), ServerError),
        (lambda r, k: r.set(k, str(2**53 - 1)), ServerError),
        (lambda r, k: r.rpush(k, "x"), ForeignDataError),
        (lambda r, k: r.hset(k, "a", "b"), ForeignDataError),
    ],
    ids=["corrupt", "exhausted", "list", "hash"],
)
def test_a_bad_fence_on_the_fast_path_undoes_the_grant(
    redis_server: RedisServer, plant: Any, error: type[Exception]
) -> None:
    """The uncontended grant writes the lease first (SET NX, then SET ... GET on the fence):
    a fence that cannot give a token must leave neither a lease nor a changed fence."""
    r = redis_server.client()
    r.flushall()
    fence = "distkit:lock:{badfence}:fence"
    plant(r, fence)
    kind = r.type(fence)
    before = r.dump(fence)
    lease = "distkit:lock:{badfence}"
    keys = (lease, fence, f"{lease}:queue", f"{lease}:qexp", f"{lease}:wake:me")
    with pytest.raises(redis.exceptions.ResponseError):  # the script alone: no client cleanup
        ACQUIRE(r, keys, ("me", 10_000, 10_000, 0))
    assert r.exists(lease) == 0
    assert r.dump(fence) == before
    lock = Lock(r, "badfence", ttl=10)
    with pytest.raises(error):
        lock.acquire(blocking=False)
    assert lock.fencing_token is None
    assert r.exists("distkit:lock:{badfence}") == 0
    assert r.type(fence) == kind
    assert r.dump(fence) == before  # the foreign value is kept as it was, for the operator


def _reset_first_abandon(client: Any, *, is_async: bool) -> dict[str, int]:
    """Make the first cleanup (RELEASE with abandon=1) of ``client`` fail with a reset, as a
    connection cut in flight does; count the cleanups tried."""
    original = client.execute_command
    seen = {"abandons": 0}

    def is_abandon(args: tuple[Any, ...]) -> bool:
        # EVALSHA sha 7 <7 keys> owner retention abandon marker_ms
        return args[:1] == ("EVALSHA",) and args[2] == 7 and str(args[12]) == "1"

    if is_async:

        async def aexecute(*args: Any, **kwargs: Any) -> Any:
            if is_abandon(args):
                seen["abandons"] += 1
                if seen["abandons"] == 1:
                    raise redis.exceptions.ConnectionError("Connection reset by peer")
            return await original(*args, **kwargs)

        client.execute_command = aexecute
    else:

        def execute(*args: Any, **kwargs: Any) -> Any:
            if is_abandon(args):
                seen["abandons"] += 1
                if seen["abandons"] == 1:
                    raise redis.exceptions.ConnectionError("Connection reset by peer")
            if args[:1] == ("BLPOP",):  # the waiter fails while queued: cleanup follows
                raise redis.exceptions.ResponseError("ERR injected")
            return original(*args, **kwargs)

        client.execute_command = execute
    return seen


def test_a_failed_acquire_cleanup_survives_one_connection_reset(redis_server: RedisServer) -> None:
    """Fix: the cleanup of a failed acquire tries again after a dropped connection (it used to
    try once: its queue entry stayed, and the next release handed the lease to nobody)."""
    r = redis_server.client()
    r.flushall()
    holder = Lock(r, "cleanup-reset", ttl=30)
    assert holder.acquire()
    client = redis_server.client()
    seen = _reset_first_abandon(client, is_async=False)
    waiter = Lock(client, "cleanup-reset", ttl=30)
    with pytest.raises(ServerError):
        waiter.acquire(timeout=5)
    assert seen["abandons"] == 2  # the reset one, then one that reached the server
    assert r.zcard("distkit:lock:{cleanup-reset}:queue") == 0
    holder.release()
    assert r.exists("distkit:lock:{cleanup-reset}") == 0  # not handed to the failed waiter


def test_a_cancelled_acquire_cleanup_survives_one_connection_reset(
    redis_server: RedisServer,
) -> None:
    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        holder = AsyncLock(direct, "cleanup-areset", ttl=30)
        assert await holder.acquire()
        client = redis_server.async_client()
        seen = _reset_first_abandon(client, is_async=True)
        waiter = AsyncLock(client, "cleanup-areset", ttl=30)
        task = asyncio.ensure_future(waiter.acquire(timeout=5))
        for _ in range(2500):  # until the waiter is queued (at most ~5 s)
            if await direct.zcard("distkit:lock:{cleanup-areset}:queue"):
                break
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen["abandons"] == 2
        assert await direct.zcard("distkit:lock:{cleanup-areset}:queue") == 0
        await holder.release()
        assert await direct.exists("distkit:lock:{cleanup-areset}") == 0
        await client.aclose()
        await direct.aclose()

    asyncio.run(run())
