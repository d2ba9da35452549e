"""The lock's issue-13 safety fixes, held against Semaphore / AsyncSemaphore: late validity after a
handoff, a cleanup that overtakes a cancelled ACQUIRE, a connection reset while queued, more than
64 dead waiters, one handle shared by two threads, acquire(timeout) overruns, fork.

Each test named after a fix failed on the semaphore before it (checked by reverting the fix once);
the fork tests guard behaviour the shared LockCore already gave it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis

from distkit import ConnectionUnavailable, LockError, connect
from distkit.testing import FaultProxy, RedisServer
from distlock import AsyncSemaphore, Semaphore
from distlock._semaphore_scripts import ACQUIRE

from .test_lock_safety import _StallingClock


def key(name: str, part: str) -> str:
    return f"distkit:sem:{{{name}}}:{part}"


def _holders(r: Any, name: str) -> set[str]:
    return {m.decode() for m in r.zrange(key(name, "holders"), 0, -1)}


def _lease_left(r: redis.Redis, name: str, owner: str) -> float:
    """Seconds left on ``owner``'s permit by the server's clock."""
    score = r.zscore(key(name, "holders"), owner)
    assert score is not None
    secs, micros = r.time()
    return (score - (secs * 1000 + micros // 1000)) / 1000


def _is_acquire(args: tuple[Any, ...]) -> bool:
    return args[0] in ("EVALSHA", "EVAL") and args[1] in (ACQUIRE.sha, ACQUIRE.source)


def _wait_queued(r: redis.Redis, name: str, n: int = 1) -> None:
    deadline = time.monotonic() + 5
    while r.zcard(key(name, "queue")) < n:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.002)


# -- 1. validity after a handoff -------------------------------------------------------------------


def test_validity_after_a_handoff_is_never_late(redis_server: RedisServer) -> None:
    """Fix: a handed-off permit is timed from the send of the ACQUIRE before the wait (it was
    timed from a clock reading after it, so a stall there made the estimate late)."""
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "late", 1, ttl=3)
    assert holder.acquire()
    clock = _StallingClock(1.0, holder.release)  # the handoff happens inside the stall
    client = redis_server.client()
    original = client.execute_command

    def arm_after_the_queueing_reply(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if _is_acquire(args) and result[0] == 0:
            clock.armed = True
        return result

    client.execute_command = arm_after_the_queueing_reply  # type: ignore[method-assign]
    waiter = Semaphore(client, "late", 1, ttl=3, clock=clock)
    assert waiter.acquire(timeout=10)
    client.execute_command = original  # type: ignore[method-assign]
    owner = waiter._core.owner
    assert owner is not None
    left = _lease_left(r, "late", owner)
    validity = waiter.validity  # read after the server's: the server's remaining time only shrank
    assert 0 < validity <= left + 0.002, (validity, left)
    waiter.release()


# -- 2. a cancelled acquire's cleanup cannot overtake its ACQUIRE ----------------------------------


def test_cancelled_acquire_cleanup_cannot_overtake_the_acquire(redis_server: RedisServer) -> None:
    """Fix: the ACQUIRE is shielded. Its bytes are on the wire when the task is cancelled; the
    cleanup RELEASE used to run beside it on another connection and execute first, and the late
    ACQUIRE then granted a permit that nobody owns, for its whole TTL."""

    async def run() -> None:
        direct = redis_server.async_client()
        await direct.flushall()
        client = redis_server.async_client()
        original = client.execute_command
        sent = asyncio.Event()

        async def on_the_wire(*args: Any, **kwargs: Any) -> Any:
            if _is_acquire(args):

                async def later() -> Any:
                    await asyncio.sleep(0.3)  # delivered late, but delivered
                    return await original(*args, **kwargs)

                inner = asyncio.ensure_future(later())
                sent.set()
                return await asyncio.shield(inner)
            return await original(*args, **kwargs)

        client.execute_command = on_the_wire  # type: ignore[method-assign]
        sem = AsyncSemaphore(client, "overtake", 1, ttl=30)
        task = asyncio.ensure_future(sem.acquire())
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)
        assert await direct.zcard(key("overtake", "holders")) == 0
        assert await AsyncSemaphore(direct, "overtake", 1, ttl=30).acquire(blocking=False)
        await client.aclose()
        await direct.aclose()

    asyncio.run(run())


# -- 3. a connection reset while a waiter blocks ---------------------------------------------------


def test_reset_while_blocked_for_a_handoff_recovers_the_grant(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    """Fix: a failed wait re-runs ACQUIRE with the same owner, which answers with the grant (the
    permit used to stay with an owner id nobody had, for its TTL)."""
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "reset", 1, ttl=30)
    assert holder.acquire()
    client = connect(proxy.config())  # redis-py retries off
    waiter = Semaphore(client, "reset", 1, ttl=30)
    got: list[Any] = []

    def wait() -> None:
        try:
            got.append(waiter.acquire(timeout=10))
        except Exception as exc:
            got.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    _wait_queued(r, "reset")
    time.sleep(0.05)  # the waiter is inside its BLPOP
    proxy.blackhole()  # hold the token on its way to the waiter ...
    holder.release()  # ... the handoff: the permit now belongs to the waiter's owner id
    time.sleep(0.05)
    proxy.cut()  # ... and lose it with the connection
    proxy.blackhole(False)
    thread.join(15)
    assert got == [True], got
    assert waiter.owned()
    assert _holders(r, "reset") == {waiter._core.owner}
    waiter.release()
    assert r.zcard(key("reset", "holders")) == 0
    client.close()


def test_a_failed_waiter_leaves_no_queue_entry_to_hand_the_permit_to(
    redis_server: RedisServer,
) -> None:
    """Fix: the cleanup runs after a ConnectionUnavailable too (it used to be skipped), so a
    release right after a waiter gave up never hands the permit to its queue entry."""
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "gone", 1, ttl=30)
    assert holder.acquire()
    client = redis_server.client()
    original = client.execute_command

    def every_wait_is_reset(*args: Any, **kwargs: Any) -> Any:
        if args[0] == "BLPOP":
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        return original(*args, **kwargs)

    client.execute_command = every_wait_is_reset  # type: ignore[method-assign]
    waiter = Semaphore(client, "gone", 1, ttl=30)
    prefix = waiter._core._owner_prefix  # every owner id of this handle starts with it
    with pytest.raises(ConnectionUnavailable):
        waiter.acquire(timeout=10)
    assert r.zcard(key("gone", "queue")) == 0
    holder.release()  # nobody is queued: the permit is simply freed
    assert not any(owner.startswith(prefix) for owner in _holders(r, "gone"))
    assert Semaphore(r, "gone", 1, ttl=30).acquire(blocking=False)


# -- 4. more than 64 dead waiters ------------------------------------------------------------------


def _dead_waiters(r: redis.Redis, name: str, n: int) -> None:
    for i in range(n):
        member = f"30000:dead{i}"
        r.zadd(key(name, "queue"), {member: i})
        r.hset(key(name, "qexp"), member, 1)  # long expired: the waiter crashed


def test_more_than_64_dead_waiters_do_not_let_a_newcomer_barge(redis_server: RedisServer) -> None:
    """Fix: fill() answers "not known to be empty" after 64 dead waiters; the free permit used
    to go to a newcomer past a live waiter queued behind them."""
    r = redis_server.client()
    r.flushall()
    _dead_waiters(r, "dead", 70)
    live = Semaphore(r, "dead", 1, ttl=30)
    live_owner = live._core.new_owner()
    member = f"30000:{live_owner}"
    secs, _ = r.time()
    r.zadd(key("dead", "queue"), {member: 1000})
    r.hset(key("dead", "qexp"), member, secs * 1000 + 60_000)
    newcomer = Semaphore(r, "dead", 1, ttl=30)
    assert newcomer.acquire(blocking=False) is False  # 64 dead dropped, the rest not known dead
    assert newcomer.acquire(blocking=False) is False  # the live waiter is older: it got it
    assert _holders(r, "dead") == {live_owner}
    assert r.lrange(key("dead", "wake:" + live_owner), 0, -1) != []  # pushed to its wake list
    assert r.zcard(key("dead", "queue")) == 0


def test_a_waiter_behind_many_dead_ones_is_granted_once(redis_server: RedisServer) -> None:
    """Fix: a grant removes the grantee's own queue entry. Behind 140 dead waiters, the waiter's
    ACQUIRE was granted by the free-permit path while its queue entry stayed; its release then
    handed the permit to that entry again, an owner that had finished: orphaned for a TTL."""
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "dead2", 1, ttl=1)
    assert holder.acquire()
    _dead_waiters(r, "dead2", 140)
    waiter = Semaphore(redis_server.client(), "dead2", 1, ttl=30)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=20)))
    thread.start()
    _wait_queued(r, "dead2", 141)
    holder.release()
    thread.join(25)
    assert got == [True]
    owner = waiter._core.owner
    assert owner is not None and r.zscore(key("dead2", "queue"), f"30000:{owner}") is None
    waiter.release()
    assert r.zcard(key("dead2", "holders")) == 0
    assert Semaphore(r, "dead2", 1, ttl=30).acquire(blocking=False)


# -- 5. one handle, two threads --------------------------------------------------------------------


def test_two_threads_acquiring_through_one_handle_get_a_clear_error(
    redis_server: RedisServer,
) -> None:
    """Fix: one handle is one holder; a second concurrent acquire raises LockError (both used to
    be granted, the handle remembered one, the other permit was orphaned for its TTL)."""
    r = redis_server.client()
    r.flushall()
    other = Semaphore(r, "shared", 1, ttl=30)
    assert other.acquire()
    shared = Semaphore(redis_server.client(), "shared", 1, ttl=30)
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(shared.acquire(timeout=5)))
    thread.start()
    _wait_queued(r, "shared")
    with pytest.raises(LockError, match="another acquire is in progress"):
        shared.acquire(timeout=1)
    other.release()
    thread.join(10)
    assert got == [True]
    assert shared.owned()
    assert _holders(r, "shared") == {shared._core.owner}
    shared.release()


# -- 6. acquire(timeout) bound ---------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.3, 1.0])
def test_acquire_timeout_overruns_by_at_most_about_one_round_trip(
    redis_server: RedisServer, proxy: FaultProxy, timeout: float
) -> None:
    """Fix: the wait ends one measured round trip before the deadline; leaving is one call."""
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "slow", 1, ttl=30)
    assert holder.acquire()
    client = connect(proxy.config())
    warm = Semaphore(client, "warm", 1, ttl=5)  # connection and scripts loaded before the latency
    assert warm.acquire(timeout=1)
    warm.release()
    assert not Semaphore(client, "slow", 1, ttl=30).acquire(timeout=0.05)
    one_way = 0.1
    rtt = 2 * one_way
    proxy.set_latency(one_way)
    waiter = Semaphore(client, "slow", 1, ttl=30)
    start = time.monotonic()
    assert waiter.acquire(timeout=timeout) is False
    elapsed = time.monotonic() - start
    proxy.set_latency(0)
    assert elapsed <= timeout + 1.5 * rtt + 0.1, elapsed
    assert r.zcard(key("slow", "queue")) == 0  # left the queue
    holder.release()
    client.close()


# -- 7. fork ---------------------------------------------------------------------------------------


def _child_acquires(sem: Semaphore, go: Any, out: Any) -> None:
    go.wait(10)
    held_copy = sem.fencing_token is not None
    got = sem.acquire(blocking=False)
    out.put((held_copy, got, sem._core.owner))
    if got:
        sem.release()


@pytest.mark.parametrize("held_at_fork", [False, True], ids=["idle-at-fork", "held-at-fork"])
def test_forked_children_never_share_the_parents_owner_ids(
    redis_server: RedisServer, held_at_fork: bool
) -> None:
    """The shared LockCore re-seeds owner ids in a child and forgets the parent's permit."""
    r = redis_server.client()
    r.flushall()
    sem = Semaphore(redis_server.client(), "fork", 1, ttl=30)
    if held_at_fork:
        assert sem.acquire()
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_child_acquires, args=(sem, go, out)) for _ in range(4)]
    for child in children:
        child.start()
    if not held_at_fork:
        assert sem.acquire()  # the parent takes the permit after the fork, with its next owner id
    token = sem.fencing_token
    go.set()
    results = [out.get(timeout=20) for _ in children]
    for child in children:
        child.join(20)
        assert child.exitcode == 0
    # no child is granted "a retried call of the same owner", none believes it holds the permit
    assert results == [(False, False, None)] * len(children), results
    assert sem.owned() and sem.fencing_token == token
    sem.release()
    assert r.zcard(key("fork", "holders")) == 0


def _child_releases(sem: Semaphore, out: Any) -> None:
    try:
        sem.release()
        out.put("released")
    except Exception as exc:  # the expected LockNotOwned
        out.put(type(exc).__name__)


def test_a_forked_copy_of_a_held_handle_cannot_release_the_parents_permit(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    r.flushall()
    sem = Semaphore(redis_server.client(), "fork-rel", 1, ttl=30, auto_renew=True)
    assert sem.acquire()
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_releases, args=(sem, out))
    child.start()
    assert out.get(timeout=20) == "LockNotOwned"
    child.join(20)
    assert sem.owned()
    sem.release()
