"""The semaphore contract (issue 18 point 1) against Semaphore and AsyncSemaphore on a real
redis-server and on the rig's 3-master Cluster; cancellation at every await point of the async
twin; a restart that loses data; a hypothesis state machine against a model of holders/limit."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from distkit import ConfigError, LockError, LockLost, LockNotAcquired, LockNotOwned
from distkit.testing import RedisServer
from distlock import AsyncSemaphore, Semaphore
from distlock._semaphore_scripts import ACQUIRE, RELEASE

from ._adversarial import examples, fuzz_settings
from ._topology import TOPOLOGIES, Topology
from ._twins import Twin


@pytest.fixture(params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """One standalone server, or the 3-master Cluster (flushed)."""
    topo = Topology(request.param, request)
    topo.inspector().flushall()
    yield topo
    topo.close()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, topology: Topology) -> Iterator[Twin]:
    """Semaphore (sync) or AsyncSemaphore (async) handles on the topology."""
    t = Twin(request.param, Semaphore, AsyncSemaphore, topology.sync_client, topology.async_client)
    yield t
    t.close()


@pytest.fixture
def r(topology: Topology) -> Any:
    """Inspection client of the twin's topology."""
    return topology.inspector()


def key(name: str, part: str) -> str:
    return f"distkit:sem:{{{name}}}:{part}"


def _all_keys_expire(r: Any, name: str) -> None:
    found = [k for k in r.keys(f"distkit:sem:{{{name}}}*")]
    for k in found:
        assert r.pttl(k) > 0, f"{k!r} has no TTL"


# -- basics -----------------------------------------------------------------------------------
def test_at_most_limit_holders_each_with_a_rising_token(twin: Twin, r: Any) -> None:
    hs = [twin.make("jobs", 2, ttl=10) for _ in range(3)]
    assert hs[0].holders() == 0 and not hs[0].locked()
    assert hs[0].acquire(blocking=False)
    assert hs[1].acquire(blocking=False)
    assert not hs[2].acquire(blocking=False)
    assert hs[2].fencing_token is None
    t0, t1 = hs[0].fencing_token, hs[1].fencing_token
    assert t0 is not None and t1 is not None and t1 > t0
    assert hs[0].holders() == 2 and hs[2].locked()
    assert hs[0].owned() and hs[1].owned() and not hs[2].owned()
    assert 0 < hs[0].validity <= 10
    hs[0].release()
    assert hs[0].fencing_token is None and not hs[0].owned()
    assert hs[2].acquire(blocking=False)
    assert hs[2].fencing_token is not None and hs[2].fencing_token > t1
    _all_keys_expire(r, "jobs")
    hs[1].release()
    hs[2].release()
    assert hs[0].holders() == 0
    assert r.zcard(key("jobs", "holders")) == 0
    _all_keys_expire(r, "jobs")


def test_misuse_is_refused(twin: Twin) -> None:
    assert twin.make("misuse", 2**31, ttl=10).limit == 2**31
    a = twin.make("misuse", 1, ttl=10)
    with pytest.raises(LockNotOwned):
        a.release()
    with pytest.raises(LockNotOwned):
        a.extend()
    assert a.acquire(blocking=False)
    with pytest.raises(LockError, match="not reentrant"):
        a.acquire(blocking=False)
    a.release()
    for bad in (0, -1, 1.5, True, "2", 2**31 + 1, 10**20):  # limit: 1 .. 2**31
        with pytest.raises(ConfigError):
            twin.make("misuse", bad, ttl=10)
    with pytest.raises(ConfigError):
        twin.make("bad{name}", 1)


def test_a_client_of_the_wrong_kind_names_the_right_twin() -> None:
    with pytest.raises(ConfigError, match="use Semaphore"):
        AsyncSemaphore(redis.Redis(), "x", 1)
    with pytest.raises(ConfigError, match="use AsyncSemaphore"):
        Semaphore(redis.asyncio.Redis(), "x", 1)


def test_another_limit_for_the_same_name_is_a_config_error(twin: Twin, r: Any) -> None:
    a = twin.make("lim", 2, ttl=10)
    assert a.acquire(blocking=False)
    b = twin.make("lim", 3, ttl=10)
    with pytest.raises(ConfigError, match="limit 2"):
        b.acquire(blocking=False)
    assert b.fencing_token is None
    a.release()
    with pytest.raises(ConfigError):  # the limit outlives the holders (fence_retention)
        b.acquire(blocking=False)
    r.delete(key("lim", "limit"))  # retention over: the name is free for another limit
    assert b.acquire(blocking=False)
    b.release()


def test_the_stored_limit_outlives_fence_retention_while_renewed(twin: Twin) -> None:
    """A hold renewed past fence_retention keeps its limit: no second limit sneaks in."""
    a = twin.make("kept", 1, ttl=0.2, fence_retention=0.2)
    assert a.acquire()
    for _ in range(5):
        time.sleep(0.1)
        a.extend()
    with pytest.raises(ConfigError):
        twin.make("kept", 5, ttl=10).acquire(blocking=False)
    a.release()


def test_a_wrong_limit_handle_never_grants_past_the_limit(redis_server: RedisServer) -> None:
    """limit 1, h holds, w queued: a limit-5 handle's refused acquire must not grant w."""
    client = redis_server.client()
    h = Semaphore(client, "wl", 1, ttl=30)
    assert h.acquire(blocking=False)
    w = Semaphore(client, "wl", 1, ttl=30)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(w.acquire(timeout=3)))
    thread.start()
    while not redis_server.client().zcard(key("wl", "queue")):
        time.sleep(0.002)
    for blocking in (False, True):
        with pytest.raises(ConfigError):
            Semaphore(client, "wl", 5, ttl=30).acquire(blocking=blocking, timeout=0.1)
    thread.join(10)
    assert got == [False] and h.owned() and h.holders() == 1
    h.release()
    client.close()


def test_a_short_lived_handle_never_shortens_the_stored_limit(twin: Twin, r: Any) -> None:
    """A try by a handle with a short ttl / fence_retention keeps the limit as long as h holds."""
    h = twin.make("sl", 1, ttl=60)
    assert h.acquire(blocking=False)
    held = r.pttl(key("sl", "limit"))
    assert twin.make("sl", 1, ttl=0.5, fence_retention=0.5).acquire(blocking=False) is False
    assert r.pttl(key("sl", "limit")) > held - 5000
    w = twin.make("sl", 1, ttl=0.5, fence_retention=0.5)
    assert w.acquire(blocking=False) is False
    h.release()  # nobody waits: w is not granted; the limit still outlives the retention
    assert w.acquire(blocking=False)  # granted: the limit covers w's lease, never below it
    assert r.pttl(key("sl", "limit")) >= r.pttl(key("sl", "holders")) - 1000
    w.release()


def test_one_release_wakes_one_waiter(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.flushall()
    holder = Semaphore(r, "one", 1, ttl=30)
    assert holder.acquire()
    got: list[Semaphore] = []
    waiters = [Semaphore(redis_server.client(), "one", 1, ttl=30) for _ in range(3)]

    def run(w: Semaphore) -> None:
        if w.acquire(timeout=1.5):
            got.append(w)

    threads = [threading.Thread(target=run, args=(w,)) for w in waiters]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while r.zcard(key("one", "queue")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    holder.release()
    time.sleep(0.3)
    assert len(got) == 1 and r.zcard(key("one", "queue")) == 2
    for t in threads:
        t.join(5)
    assert len(got) == 1  # the permit was never released again: nobody else got in
    got[0].release()


def test_a_release_hands_the_permit_to_a_waiter_by_push(twin: Twin) -> None:
    """The waiter wakes within a round trip of the release, not at its next poll (1 s)."""
    a = twin.make("push", 1, ttl=30)
    b = twin.make("push", 1, ttl=30, client=twin.new_client())
    assert a.acquire()
    first = a.fencing_token
    woke: list[float] = []

    def wait() -> None:
        assert b.acquire(timeout=10)
        woke.append(time.monotonic())

    if twin.kind == "async":
        # the async twin's loop runs in this thread: start the waiter as a task, release later
        assert twin.loop is not None

        async def scenario() -> float:
            task = asyncio.ensure_future(b.handle.acquire(timeout=10))
            await asyncio.sleep(0.3)
            released = time.monotonic()
            await a.handle.release()
            assert await task
            return time.monotonic() - released

        elapsed = twin.loop.run_until_complete(scenario())
    else:
        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.3)
        released = time.monotonic()
        a.release()
        thread.join(10)
        elapsed = woke[0] - released
    assert elapsed < 0.25, elapsed
    assert b.fencing_token is not None and first is not None and b.fencing_token > first
    b.release()


def test_timeout_returns_false_and_leaves_no_queue_entry(twin: Twin, r: Any) -> None:
    a = twin.make("to", 1, ttl=30)
    b = twin.make("to", 1, ttl=30)
    assert a.acquire()
    started = time.monotonic()
    assert b.acquire(timeout=0.2) is False
    assert 0.15 < time.monotonic() - started < 2
    assert r.zcard(key("to", "queue")) == 0
    assert r.hlen(key("to", "qexp")) == 0
    a.release()
    assert r.zcard(key("to", "holders")) == 0  # nobody was handed the permit


def test_a_crashed_holders_permit_frees_within_its_ttl(twin: Twin) -> None:
    """The holder never releases; a blocked waiter's bounded BLPOP notices the expiry."""
    dead = twin.make("crash", 1, ttl=0.3)
    waiter = twin.make("crash", 1, ttl=10)
    assert dead.acquire()
    started = time.monotonic()
    assert waiter.acquire(timeout=5)
    assert time.monotonic() - started < 0.3 + 0.25
    with pytest.raises(LockNotOwned):
        dead.extend()
    assert dead.acquire(blocking=False) is False
    waiter.release()


def test_the_late_release_of_an_expired_holder_says_so(twin: Twin) -> None:
    a = twin.make("late", 1, ttl=0.1)
    assert a.acquire()
    time.sleep(0.2)
    with pytest.raises(LockNotOwned):
        a.release()


def test_with_block_and_blocking_timeout(twin: Twin) -> None:
    a = twin.make("with", 1, ttl=10)
    with a:
        assert a.owned()
        b = twin.make("with", 1, ttl=10, blocking_timeout=0.05)
        with pytest.raises(LockNotAcquired), b:
            pass
    assert not a.owned() and a.holders() == 0


def test_auto_renew_keeps_the_permit_and_lost_fires(twin: Twin, r: Any) -> None:
    lost: list[Any] = []
    a = twin.make("renew", 2, ttl=0.3, auto_renew=True, renew_interval=0.05, on_lost=lost.append)
    assert a.acquire()
    if twin.kind == "async":
        assert twin.loop is not None
        twin.loop.run_until_complete(asyncio.sleep(0.6))
    else:
        time.sleep(0.6)
    assert a.owned()
    r.zadd(key("renew", "holders"), {a._core.owner: 1}, xx=True)  # its lease ends (server view)
    deadline = time.monotonic() + 3
    while not a.lost.is_set() and time.monotonic() < deadline:
        if twin.kind == "async":
            assert twin.loop is not None
            twin.loop.run_until_complete(asyncio.sleep(0.02))
        else:
            time.sleep(0.02)
    assert a.lost.is_set() and len(lost) == 1
    with pytest.raises(LockLost):
        a.ensure_held()


def test_retried_scripts_after_a_lost_reply_are_idempotent(topology: Topology) -> None:
    """A reply lost on the wire makes the driver resend the same call with the same owner id."""
    client = topology.sync_client()
    sem = Semaphore(client, "idem", 1, ttl=10)
    core = sem._sem
    owner = core.new_owner()
    call = core._acquire_call(owner, 0)
    first = ACQUIRE(client, call.keys, call.args)
    again = ACQUIRE(client, call.keys, call.args)
    assert first[0] == 1 and again == first  # the same permit and token, not a second one
    release = core._release_call(owner, False)
    assert RELEASE(client, release.keys, release.args) == 1
    assert RELEASE(client, release.keys, release.args) == 2  # "already released by you"
    assert Semaphore(client, "idem", 1, ttl=10).acquire(blocking=False)
    client.close()


def test_fifo_order_of_waiters(redis_server: RedisServer) -> None:
    """Waiters get permits in arrival order, one per release."""
    r = redis_server.client()
    r.flushall()
    holders = [Semaphore(r, "fifo", 2, ttl=30) for _ in range(2)]
    for h in holders:
        assert h.acquire()
    order: list[int] = []
    threads = []
    for i in range(5):
        waiter = Semaphore(redis_server.client(), "fifo", 2, ttl=30)

        def run(i: int = i, w: Semaphore = waiter) -> None:
            assert w.acquire(timeout=20)
            order.append(i)
            w.release()

        # hold the next releases back until every waiter is queued, in this order
        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)
        deadline = time.monotonic() + 5
        while r.zcard(key("fifo", "queue")) < i + 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    holders[0].release()  # the chain of releases runs through the queue in order
    for t in threads:
        t.join(20)
    assert order == [0, 1, 2, 3, 4]
    holders[1].release()
    assert r.zcard(key("fifo", "holders")) == 0


def test_tokens_keep_rising_after_a_restart_that_lost_all_data(fresh_server: RedisServer) -> None:
    tokens: list[int] = []
    for _round in range(3):
        client = fresh_server.client()
        sems = [Semaphore(client, "restart", 2, ttl=30) for _ in range(2)]
        for s in sems:
            assert s.acquire()
            assert s.fencing_token is not None
            tokens.append(s.fencing_token)
        for s in sems:
            s.release()
        client.close()
        fresh_server.kill()
        fresh_server.restart(keep_data=False)
        assert fresh_server.client().dbsize() == 0
    client = fresh_server.client()
    s = Semaphore(client, "restart", 2, ttl=30)
    assert s.acquire() and s.fencing_token is not None
    tokens.append(s.fencing_token)
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    client.close()


# -- cancellation at every await point ---------------------------------------------------------
def _steps() -> Iterator[int]:
    """Every k up to 64, then doubling: a blocked wait spans many loop steps."""
    yield from range(64)
    k = 64
    while k < 1 << 22:
        yield k
        k *= 2


@pytest.mark.parametrize("contended", [False, True], ids=["free", "queued"])
@pytest.mark.parametrize("slow", ["", "reply", "send"], ids=["fast", "slow-reply", "slow-send"])
def test_cancelled_acquire_at_every_await_point_leaves_nothing(
    redis_server: RedisServer, contended: bool, slow: str
) -> None:
    """Cancel ``acquire`` after k event-loop steps for k = 0, 1, ... until it completes first.

    Queued: the holder's lease (50 ms) runs out while the waiter blocks, so the waiter's acquire
    completes through the expiry path after its BLPOP, its queue entry and its wake list.
    Slow reply: every script's reply is held back 20 ms after the server ran it (a reply still on
    the wire), so the cancellations land after the grant or the queueing took effect. Slow send:
    every ACQUIRE reaches the server 20 ms after it was sent (bytes still on the wire) while
    later traffic is fast, so a cleanup on another connection could overtake the call it undoes.
    """
    admin = redis_server.client()

    async def once(k: int) -> bool:
        admin.flushall()
        client = redis_server.async_client()
        if slow:
            original = client.execute_command

            async def delayed(*args: Any, **kwargs: Any) -> Any:
                if args[0] not in ("EVALSHA", "EVAL"):
                    return await original(*args, **kwargs)
                if slow == "reply":
                    result = await original(*args, **kwargs)
                    await asyncio.sleep(0.02)
                    return result

                if args[1] not in (ACQUIRE.sha, ACQUIRE.source):  # only the call itself is late
                    return await original(*args, **kwargs)

                async def later() -> Any:
                    await asyncio.sleep(0.02)
                    return await original(*args, **kwargs)

                return await asyncio.shield(asyncio.ensure_future(later()))  # sent: delivered

            client.execute_command = delayed  # type: ignore[method-assign]
        holder = AsyncSemaphore(client, "cxl", 1, ttl=0.05)
        if contended:
            assert await holder.acquire()
        sem = AsyncSemaphore(client, "cxl", 1, ttl=30)
        task = asyncio.ensure_future(sem.acquire(timeout=5))
        for _ in range(k):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            got = False
        if slow == "send":
            await asyncio.sleep(0.03)  # a late call that was not waited for lands meanwhile
        members = {m.decode() for m in admin.zrange(key("cxl", "holders"), 0, -1)}
        if got:
            assert sem._core.owner in members, k
        else:
            assert sem.fencing_token is None
            assert members <= ({holder._core.owner} if contended else set()), (k, members)
        assert admin.hlen(key("cxl", "tokens")) == len(members)
        assert admin.zcard(key("cxl", "queue")) == 0, k
        assert admin.hlen(key("cxl", "qexp")) == 0, k
        assert admin.keys("distkit:sem:{cxl}:wake:*") == [], k
        if got:
            await sem.release()
        await client.aclose()
        return finished

    for k in _steps():
        if asyncio.run(once(k)):
            break
    else:
        pytest.fail("acquire never completed")
    admin.close()


@pytest.mark.parametrize("auto_renew", [False, True], ids=["plain", "auto-renew"])
def test_cancelled_release_at_every_await_point_still_releases(
    redis_server: RedisServer, auto_renew: bool
) -> None:
    admin = redis_server.client()

    async def once(k: int) -> bool:
        admin.flushall()
        client = redis_server.async_client()
        sem = AsyncSemaphore(client, "cxr", 1, ttl=30, auto_renew=auto_renew, renew_interval=1)
        assert await sem.acquire()
        task = asyncio.ensure_future(sem.release())
        for _ in range(k):
            await asyncio.sleep(0)
        finished = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if k == 0:  # cancelled before its first line ran: release was never called
            assert sem.fencing_token is not None and admin.zcard(key("cxr", "holders")) == 1
            await sem.release()
        for _ in range(400):  # the shielded script completes on its own
            if not admin.zcard(key("cxr", "holders")):
                break
            await asyncio.sleep(0.005)
        assert admin.zcard(key("cxr", "holders")) == 0, k
        assert sem.fencing_token is None
        await client.aclose()
        return finished

    for k in _steps():
        if asyncio.run(once(k)):
            break
    else:
        pytest.fail("release never completed")
    admin.close()


# -- model ------------------------------------------------------------------------------------
LIMIT = 2
TTL = 3600.0  # the model expires leases itself; Redis never does on its own


class SemaphoreMachine(RuleBasedStateMachine):
    """Four handles of one semaphore (limit 2) against a model of holders, limit and expiry."""

    server: ClassVar[RedisServer]
    names: ClassVar[list[str]] = ["h0", "h1", "h2", "h3"]

    def __init__(self) -> None:
        super().__init__()
        self.admin = self.server.client()
        self.admin.flushall()
        self.client = self.server.client()
        self.sems = {n: Semaphore(self.client, "model", LIMIT, ttl=TTL) for n in self.names}
        self.holders: set[str] = set()  # who holds a live permit on the server
        self.believes: set[str] = set()  # handles that think they hold one (expired ones may)
        self.last_token = 0
        self.dead = 0
        self.holders_key = key("model", "holders")

    def teardown(self) -> None:
        self.admin.close()
        self.client.close()

    @initialize()
    def start_empty(self) -> None:
        assert not self.admin.exists(self.holders_key)

    def _grantable(self) -> bool:
        """Whether a newcomer's ACQUIRE gets a permit: one is free, and at most 64 dead waiters
        (all that is queued between steps) stand before it."""
        return len(self.holders) < LIMIT and self.admin.zcard(key("model", "queue")) <= 64

    @rule(name=st.sampled_from(names))
    def acquire_nonblocking(self, name: str) -> None:
        if name in self.believes:
            with pytest.raises(LockError, match="not reentrant"):
                self.sems[name].acquire(blocking=False)
            return
        expected = self._grantable()
        got = self.sems[name].acquire(blocking=False)
        assert got == expected, (name, got, self.holders)
        if got:
            token = self.sems[name].fencing_token
            assert token is not None and token > self.last_token
            self.last_token = token
            self.holders.add(name)
            self.believes.add(name)

    @precondition(lambda self: len(self.holders) >= LIMIT)
    @rule(name=st.sampled_from(names))
    def acquire_times_out_while_full(self, name: str) -> None:
        if name in self.believes:
            return
        before = self.admin.zcard(key("model", "queue"))
        assert self.sems[name].acquire(timeout=0.02) is False
        assert self.admin.zcard(key("model", "queue")) == before  # left; no dead one dropped

    @rule(n=st.sampled_from([3, 70]))
    def waiters_died(self, n: int) -> None:
        """``n`` waiters crashed: their queue entries stay, expired, ahead of everyone."""
        for _ in range(n):
            self.dead += 1
            member = f"1:dead{self.dead}"
            self.admin.zadd(key("model", "queue"), {member: -self.dead})
            self.admin.hset(key("model", "qexp"), member, 1)

    @rule(name=st.sampled_from(names))
    def forked_child_acquires(self, name: str) -> None:
        """A child forked with a copy of a handle holds nothing and is a new owner."""
        expected = self._grantable()
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_fork_try, args=(self.sems[name], out))
        child.start()
        held_copy, got = out.get(timeout=20)
        child.join(20)
        assert child.exitcode == 0
        assert held_copy is False
        assert got == expected, (name, got, self.holders)

    def _while_one_waits(self, data: st.DataObject, meanwhile: Callable[[Semaphore], None]) -> None:
        """A free handle queues in a thread, ``meanwhile(it)`` runs, a holder releases: the
        waiter gets the handoff with a rising token."""
        free = [n for n in self.names if n not in self.believes]
        if not free:
            return
        name = data.draw(st.sampled_from(free), label="waits")
        released = data.draw(st.sampled_from(sorted(self.holders)), label="releases")
        sem = self.sems[name]
        got: list[bool] = []
        thread = threading.Thread(target=lambda: got.append(sem.acquire(timeout=10)))
        before = self.admin.zcard(key("model", "queue"))
        thread.start()
        while self.admin.zcard(key("model", "queue")) <= before:
            time.sleep(0.002)
        meanwhile(sem)
        assert got == []
        self.sems[released].release()
        self.holders.discard(released)
        self.believes.discard(released)
        thread.join(15)
        assert got == [True]
        token = sem.fencing_token
        assert token is not None and token > self.last_token
        self.last_token = token
        self.holders.add(name)
        self.believes.add(name)

    @precondition(lambda self: len(self.holders) >= LIMIT)
    @rule(data=st.data())
    def second_acquire_on_a_waiting_handle_is_refused(self, data: st.DataObject) -> None:
        """Two threads, one handle: the second acquire raises; the first gets the handoff."""

        def second(sem: Semaphore) -> None:
            with pytest.raises(LockError, match="another acquire is in progress"):
                sem.acquire(blocking=False)

        self._while_one_waits(data, second)

    @precondition(lambda self: len(self.holders) >= LIMIT)
    @rule(data=st.data(), limit=st.sampled_from([1, 5]))
    def a_wrong_limit_try_beside_a_live_waiter_grants_nothing(
        self, data: st.DataObject, limit: int
    ) -> None:
        """A handle with another limit is refused, and its refusal hands no waiter a permit."""

        def wrong_limit(_: Semaphore) -> None:
            with pytest.raises(ConfigError):
                Semaphore(self.client, "model", limit, ttl=TTL).acquire(blocking=False)
            assert self.admin.zcard(self.holders_key) == len(self.holders)  # still full

        self._while_one_waits(data, wrong_limit)

    @rule(name=st.sampled_from(names))
    def release(self, name: str) -> None:
        if name in self.holders:
            self.sems[name].release()
            self.holders.discard(name)
        else:
            with pytest.raises(LockNotOwned):
                self.sems[name].release()
        self.believes.discard(name)

    @rule(name=st.sampled_from(names))
    def extend(self, name: str) -> None:
        if name in self.holders:
            self.sems[name].extend()
        else:
            with pytest.raises(LockNotOwned):
                self.sems[name].extend()
            self.believes.discard(name)

    @precondition(lambda self: bool(self.holders))
    @rule(data=st.data())
    def lease_expires(self, data: st.DataObject) -> None:
        """A holder's lease runs out (it paused or crashed): its score moves into the past."""
        name = data.draw(st.sampled_from(sorted(self.holders)), label="expires")
        owner = self.sems[name]._core.owner
        self.admin.zadd(self.holders_key, {owner: 1}, xx=True)
        self.holders.discard(name)

    @rule()
    def fencing_state_lost(self) -> None:
        self.admin.delete(key("model", "fence"))

    @rule(limit=st.sampled_from([1, 3]))
    def another_limit_is_refused(self, limit: int) -> None:
        other = Semaphore(self.client, "model", limit, ttl=TTL)
        if self.admin.exists(key("model", "limit")):
            with pytest.raises(ConfigError):
                other.acquire(blocking=False)

    @invariant()
    def only_dead_waiters_queued(self) -> None:
        queued = self.admin.zrange(key("model", "queue"), 0, -1)
        assert all(m.startswith(b"1:dead") for m in queued), queued
        assert self.admin.keys("distkit:sem:{model}:wake:*") == []

    @invariant()
    def server_agrees(self) -> None:
        for name, sem in self.sems.items():
            assert sem.owned() == (name in self.holders), name
        assert self.sems["h0"].holders() == len(self.holders)
        assert self.sems["h0"].locked() == (len(self.holders) >= LIMIT)


def _fork_try(sem: Semaphore, out: Any) -> None:
    held_copy = sem.fencing_token is not None
    got = sem.acquire(blocking=False)
    if got:
        sem.release()
    out.put((held_copy, got))


def test_state_machine(redis_server: RedisServer) -> None:
    SemaphoreMachine.server = redis_server
    run_state_machine_as_test(
        SemaphoreMachine, settings=fuzz_settings(25, stateful_step_count=examples(40))
    )


def test_owner_ids_are_reseeded_after_fork() -> None:
    """A forked child's next owner id must differ from the parent's next one (same counter)."""
    import os

    sem = Semaphore(redis.Redis(), "fork", 2)
    core = sem._sem
    core.new_owner()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and exits at once
        try:
            os.write(write, core.new_owner().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != core.new_owner()


# -- docs -------------------------------------------------------------------------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "semaphore.md"


def test_docs_examples_run(redis_server: RedisServer) -> None:
    redis_server.client().flushall()
    host, port = redis_server.address
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        code = block.replace("localhost:6379", f"{host}:{port}")
        exec(compile(code, str(DOC), "exec"), {"__name__": "docs_semaphore"})


def test_the_guarantees_table_names_real_tests() -> None:
    table = DOC.read_text().split("## Guarantees and their tests", 1)[1]
    named = set(re.findall(r"`(test_\w+)`", table))
    assert len(named) >= 10
    here = Path(__file__).resolve().parent
    defined = {
        m
        for f in (
            "test_semaphore.py",
            "test_semaphore_processes.py",
            "test_semaphore_safety.py",
            "test_foreign_state.py",
            "test_fuzz.py",
        )
        for m in re.findall(r"^def (test_\w+)", (here / f).read_text(), flags=re.M)
    }
    assert named <= defined, sorted(named - defined)


def test_twins_have_identical_public_surfaces() -> None:
    """Semaphore and AsyncSemaphore: the same names and parameters; I/O methods are coroutines."""
    import inspect

    def public(cls: type) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(inspect.getattr_static(cls, name), property):
                out[name] = "property"
            elif callable(member):
                out[name] = str(inspect.signature(member))
        return out

    s, a = public(Semaphore), public(AsyncSemaphore)
    # the one intended difference: the kind of client the constructor takes
    assert s == {k: v.replace("AsyncClient", "SyncClient") for k, v in a.items()}
    io = {"acquire", "release", "extend", "locked", "owned", "holders"}
    for name in s:
        if s[name] != "property" and name != "__init__":
            assert not inspect.iscoroutinefunction(getattr(Semaphore, name)), name
            assert inspect.iscoroutinefunction(getattr(AsyncSemaphore, name)) == (name in io), name


def test_an_unacknowledged_grant_is_released_not_reported(redis_server: RedisServer) -> None:
    """wait_for_replicas on a server without replicas: the WAIT times out, the permit goes back."""
    r = redis_server.client()
    r.flushall()
    sem = Semaphore(r, "rep", 2, ttl=10, wait_for_replicas=1, replica_timeout=0.05)
    with pytest.raises(LockNotAcquired, match="replica"):
        sem.acquire()
    assert sem.fencing_token is None
    assert r.zcard(key("rep", "holders")) == 0
    assert Semaphore(r, "rep", 2, ttl=10).acquire(blocking=False)
    r.close()


def test_an_unacknowledged_extension_says_so(redis_server: RedisServer) -> None:
    r = redis_server.client()
    r.flushall()
    sem = Semaphore(r, "rep-ext", 2, ttl=10)
    assert sem.acquire()
    sem._sem.replicas, sem._sem.replica_timeout = 1, 0.05  # as if configured with a replica
    before = sem.validity
    with pytest.raises(LockError, match="replica"):
        sem.extend(ttl=20)
    assert sem.owned() and sem.validity <= before  # the local estimate keeps the old expiry
    sem.release()
    r.close()
