"""The lock contract (L1-L5 of DESIGN.md), run against Lock and AsyncLock on a real redis-server
and on the rig's 3-master Cluster (issue 8 point 1: one name's keys share one slot)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from distkit import ForeignDataError, LockError, LockLost, LockNotAcquired, LockNotOwned, connect
from distkit.testing import RedisServer
from distlock import AsyncLock, Lock

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
    """Lock (sync) or AsyncLock (async) handles on the topology."""
    t = Twin(request.param, Lock, AsyncLock, topology.sync_client, topology.async_client)
    yield t
    t.close()


@pytest.fixture
def r(topology: Topology) -> Any:
    """Inspection client of the twin's topology (a ``RedisCluster`` on the Cluster)."""
    return topology.inspector()


def lease(name: str) -> str:
    return f"distkit:lock:{{{name}}}"


# -- L1 / basics ------------------------------------------------------------------------------
def test_acquire_release_and_state(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("orders", ttl=10)
    b = twin.make("orders", ttl=10)
    assert not a.locked()
    assert a.acquire(blocking=False)
    assert a.fencing_token is not None and a.fencing_token > 0
    assert a.locked() and b.locked()
    assert a.owned() and not b.owned()
    assert not b.acquire(blocking=False)
    assert b.fencing_token is None
    assert 0 < r.pttl(lease("orders")) <= 10_000
    a.release()
    assert a.fencing_token is None and not a.locked()
    assert b.acquire(blocking=False)
    b.release()


def test_blocking_acquire_times_out(twin: Twin) -> None:
    a = twin.make("t", ttl=10)
    b = twin.make("t", ttl=10)
    assert a.acquire()
    started = time.monotonic()
    assert b.acquire(timeout=0.2) is False
    assert time.monotonic() - started >= 0.2
    assert b.fencing_token is None
    a.release()
    assert b.acquire(timeout=1)
    b.release()


def test_context_manager_raises_lock_not_acquired(twin: Twin) -> None:
    a = twin.make("cm", ttl=10)
    b = twin.make("cm", ttl=10, blocking_timeout=0.1)
    with a:
        assert a.owned()
        with pytest.raises(LockNotAcquired) as info, b:
            pass
        assert info.value.name == "cm"
    assert not a.locked()


def test_handle_is_not_reentrant(twin: Twin) -> None:
    a = twin.make("re", ttl=10)
    assert a.acquire()
    with pytest.raises(LockError, match="already held by this handle"):
        a.acquire()
    a.release()


# -- L2 owner-only -----------------------------------------------------------------------------
def test_non_owner_release_and_extend_raise_and_touch_nothing(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("own", ttl=10)
    b = twin.make("own", ttl=10)
    assert a.acquire()
    before = r.get(lease("own"))
    with pytest.raises(LockNotOwned) as info:
        b.release()
    assert info.value.name == "own"
    with pytest.raises(LockNotOwned):
        b.extend()
    assert r.get(lease("own")) == before
    assert a.owned()
    a.release()


def test_expired_owner_cannot_release_the_next_holders_lock(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("exp", ttl=0.1)
    b = twin.make("exp", ttl=10)
    assert a.acquire()
    time.sleep(0.25)
    assert b.acquire(blocking=False)
    held_by_b = r.get(lease("exp"))
    with pytest.raises(LockNotOwned):
        a.release()
    with pytest.raises(LockNotOwned):
        a.extend()
    assert r.get(lease("exp")) == held_by_b
    assert b.owned()
    b.release()


def test_extend_resets_the_lease(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("ext", ttl=0.3)
    assert a.acquire()
    a.extend(5)
    assert r.pttl(lease("ext")) > 1000
    assert a.validity > 4
    time.sleep(0.4)
    assert a.owned()
    a.release()


def _lossy_client(twin: Twin, state: dict[str, Any], nkeys: int) -> Any:
    """A client whose next EVALSHA with ``nkeys`` keys runs on the server but loses its reply."""
    client = twin.new_client()
    original = client.execute_command

    def hit(args: tuple[Any, ...]) -> bool:
        if state.get("armed") and args[0] in ("EVALSHA", "EVAL") and args[2] == nkeys:
            state["armed"] = False
            return True
        return False

    def lossy(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if hit(args):
            raise redis.exceptions.ConnectionError("reply lost")
        return result

    async def alossy(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if hit(args):
            raise redis.exceptions.ConnectionError("reply lost")
        return result

    client.execute_command = lossy if twin.kind == "sync" else alossy
    return client


def test_retried_acquire_after_a_lost_reply_gets_its_own_grant(twin: Twin, r: redis.Redis) -> None:
    state: dict[str, Any] = {"armed": True}
    a = twin.make("lost-acq", ttl=10, client=_lossy_client(twin, state, 5))
    assert a.acquire(blocking=False)  # the retry finds the lease it was granted
    assert state["armed"] is False
    fence = r.get("distkit:lock:{lost-acq}:fence")
    assert fence is not None
    assert a.fencing_token == int(fence)
    a.release()
    assert r.exists(lease("lost-acq")) == 0


def test_retried_release_after_a_handoff_with_a_lost_reply(twin: Twin, r: redis.Redis) -> None:
    state: dict[str, Any] = {}
    a = twin.make("lost-handoff", ttl=10, client=_lossy_client(twin, state, 7))
    assert a.acquire()
    waiter = Lock(r, "lost-handoff", ttl=10)
    got: list[bool] = []
    thread = threading.Thread(target=lambda: got.append(waiter.acquire(timeout=10)))
    thread.start()
    while r.zcard("distkit:lock:{lost-handoff}:queue") < 1:
        time.sleep(0.002)
    state["armed"] = True
    a.release()  # handed to the waiter; the reply is lost; the retry must not raise
    thread.join(10)
    assert got == [True]
    assert waiter.owned()
    fence = r.get("distkit:lock:{lost-handoff}:fence")
    assert fence is not None
    assert re.fullmatch(rb"\d+", fence), fence  # exact digits, never 1.79e+15
    assert int(fence) == waiter.fencing_token
    assert r.lrange("distkit:lock:{lost-handoff}:rel", 0, -1)  # the releasers' markers
    waiter.release()


def test_retried_release_after_a_lost_reply_succeeds(twin: Twin, r: redis.Redis) -> None:
    """The first release runs on the server but its reply is lost: the retry must not fail."""
    state: dict[str, Any] = {}
    a = twin.make("lost-reply", ttl=10, client=_lossy_client(twin, state, 7))
    assert a.acquire()
    state["armed"] = True
    a.release()  # no LockNotOwned
    assert state["armed"] is False
    assert r.exists(lease("lost-reply")) == 0


# -- L3 fencing --------------------------------------------------------------------------------
def test_tokens_strictly_increase_across_holders(twin: Twin) -> None:
    handles = [twin.make("fence", ttl=10) for _ in range(3)]
    tokens = []
    for i in range(60):
        h = handles[i % 3]
        assert h.acquire()
        tokens.append(h.fencing_token)
        h.release()
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == len(tokens)


def test_token_issue_costs_no_extra_round_trip(twin: Twin) -> None:
    client = twin.new_client()
    calls: list[tuple[Any, ...]] = []
    original = client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    async def acounting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await original(*args, **kwargs)

    a = twin.make("rt", ttl=10, client=client)
    assert a.acquire()  # loads the scripts if a test flushed them
    a.release()
    client.execute_command = counting if twin.kind == "sync" else acounting
    a = twin.make("rt", ttl=10, client=client)
    assert a.acquire()
    assert a.fencing_token is not None
    assert [c[0] for c in calls] == ["EVALSHA"]
    calls.clear()
    a.release()
    assert [c[0] for c in calls] == ["EVALSHA"]


# -- L4 liveness and push wake-ups --------------------------------------------------------------
def test_crashed_holder_frees_within_ttl(twin: Twin) -> None:
    a = twin.make("crash", ttl=0.3)
    b = twin.make("crash", ttl=10)
    assert a.acquire()  # and never released: the holder "crashed"
    started = time.monotonic()
    assert b.acquire(timeout=5)
    waited = time.monotonic() - started
    assert waited >= 0.2
    b.release()


def test_waiter_is_woken_by_a_push_not_a_poll(redis_server: RedisServer) -> None:
    """The waiter sends one acquire and one BLPOP; the release hands the lease over directly."""
    holder = Lock(redis_server.client(), "push", ttl=30)
    waiter_client = redis_server.client()
    commands: list[str] = []
    original = waiter_client.execute_command

    def recording(*args: Any, **kwargs: Any) -> Any:
        commands.append(str(args[0]))
        return original(*args, **kwargs)

    assert holder.acquire()  # loads the scripts if a test flushed them
    holder.release()
    waiter_client.execute_command = recording  # type: ignore[method-assign]
    waiter = Lock(waiter_client, "push", ttl=30)
    assert holder.acquire()
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(waiter.acquire(timeout=20)))
    thread.start()
    while commands.count("BLPOP") < 1:
        time.sleep(0.005)
    time.sleep(0.05)
    holder.release()
    thread.join(10)
    assert result == [True]
    assert commands == ["EVALSHA", "BLPOP"]
    assert waiter.fencing_token is not None
    assert holder.fencing_token is None
    waiter.release()


def test_release_between_failed_try_and_wait_is_not_lost(redis_server: RedisServer) -> None:
    holder = Lock(redis_server.client(), "race", ttl=30)
    waiter_client = redis_server.client()
    original = waiter_client.execute_command
    released = []

    def racing(*args: Any, **kwargs: Any) -> Any:
        if args[0] == "BLPOP" and not released:
            holder.release()  # the release lands after the failed try, before the wait
            released.append(True)
        return original(*args, **kwargs)

    waiter_client.execute_command = racing  # type: ignore[method-assign]
    waiter = Lock(waiter_client, "race", ttl=30)
    assert holder.acquire()
    started = time.monotonic()
    assert waiter.acquire(timeout=20)
    assert released == [True]
    assert time.monotonic() - started < 0.9  # well before the 1 s re-check of the queue
    waiter.release()


def test_waiters_are_served_one_at_a_time_in_fifo_order(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    holder = Lock(client, "fifo", ttl=30)
    assert holder.acquire()
    order: list[int] = []
    tokens: list[int] = []
    inside = threading.Lock()

    def wait(i: int) -> None:
        lock = Lock(redis_server.client(), "fifo", ttl=30)
        assert lock.acquire(timeout=30)
        assert inside.acquire(blocking=False), "two holders at once"
        order.append(i)
        assert lock.fencing_token is not None
        tokens.append(lock.fencing_token)
        time.sleep(0.01)
        inside.release()
        lock.release()

    threads = []
    for i in range(5):
        t = threading.Thread(target=wait, args=(i,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while client.zcard("distkit:lock:{fifo}:queue") < i + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    assert client.zcard("distkit:lock:{fifo}:queue") == 5
    holder.release()
    for t in threads:
        t.join(20)
    assert order == [0, 1, 2, 3, 4]
    assert tokens == sorted(tokens)
    assert client.exists("distkit:lock:{fifo}") == 0
    assert client.zcard("distkit:lock:{fifo}:queue") == 0


def test_timed_out_waiter_leaves_the_queue(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("leave", ttl=10)
    b = twin.make("leave", ttl=10)
    assert a.acquire()
    assert not b.acquire(timeout=0.1)
    assert r.zcard("distkit:lock:{leave}:queue") == 0
    a.release()
    assert r.exists(lease("leave")) == 0  # not handed to the departed waiter


def test_blocking_timeout_follows_the_injected_clock(redis_server: RedisServer) -> None:
    ticks = iter(range(0, 10_000, 100))  # each reading is 100 s later than the last

    def clock() -> float:
        return float(next(ticks))

    a = Lock(redis_server.client(), "clock", ttl=10)
    b = Lock(redis_server.client(), "clock", ttl=10, clock=clock)
    assert a.acquire()
    started = time.monotonic()
    assert not b.acquire(timeout=50)
    assert time.monotonic() - started < 5  # decided by the fake clock, not by waiting 50 s
    a.release()


# -- L5 renewal and loud loss ------------------------------------------------------------------
def test_auto_renew_keeps_the_lease(twin: Twin) -> None:
    # a TTL that a loaded 2-core CI machine's scheduling stalls cannot eat (0.3 s lost a Cluster
    # lease in a full run: a renewal that arrives late is rightly declared lost)
    a = twin.make("renew", ttl=0.8, auto_renew=True)
    b = twin.make("renew", ttl=0.8)
    assert a.acquire()
    if twin.kind == "async":
        assert twin.loop is not None
        twin.loop.run_until_complete(__import__("asyncio").sleep(2.0))
    else:
        time.sleep(2.0)
    assert a.owned()
    assert not b.acquire(blocking=False)
    assert not a.lost.is_set()
    a.ensure_held()
    a.release()


def test_lost_lease_sets_signal_calls_back_and_raises_on_exit(twin: Twin, r: redis.Redis) -> None:
    seen: list[Any] = []
    a = twin.make("lose", ttl=0.3, auto_renew=True, on_lost=seen.append)
    with pytest.raises(LockLost) as info, a:
        r.delete(lease("lose"))  # someone broke the lock
        r.set(lease("lose"), "intruder", px=5000)
        deadline = time.monotonic() + 3
        while not a.lost.is_set() and time.monotonic() < deadline:
            if twin.kind == "async":
                assert twin.loop is not None
                twin.loop.run_until_complete(__import__("asyncio").sleep(0.02))
            else:
                time.sleep(0.02)
        assert a.lost.is_set()
        with pytest.raises(LockLost):
            a.ensure_held()
    assert info.value.name == "lose"
    assert len(seen) == 1
    assert r.get(lease("lose")) == b"intruder"  # the intruder's key was not touched


def test_lapsed_lease_without_renewal_raises_lock_lost_on_exit(twin: Twin) -> None:
    a = twin.make("lapse", ttl=0.1)
    with pytest.raises(LockLost), a:
        time.sleep(0.25)
    assert not a.locked()


def test_body_exception_is_not_masked_by_a_lost_lease(twin: Twin) -> None:
    a = twin.make("mask", ttl=0.1)
    with pytest.raises(KeyError), a:
        time.sleep(0.25)
        raise KeyError("body")


def test_renewal_against_an_unreachable_server_marks_the_lock_lost(
    redis_server: RedisServer, proxy: Any
) -> None:
    client = connect(proxy.config(socket_timeout=0.2, connect_timeout=0.2))
    a = Lock(client, "unreach", ttl=0.6, auto_renew=True, renew_interval=0.1)
    assert a.acquire()
    proxy.blackhole()
    deadline = time.monotonic() + 5
    while not a.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.lost.is_set()
    with pytest.raises(LockLost):
        a.ensure_held()
    proxy.reset()


# -- bad data in Redis -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "plant",
    [
        lambda r: r.hset(lease("foreign"), "a", "b"),
        lambda r: r.set(lease("foreign"), "no-ttl"),
        lambda r: r.rpush("distkit:lock:{foreign}:fence", "x"),
    ],
    ids=["hash-at-lease", "string-without-ttl", "list-at-fence"],
)
def test_foreign_data_under_lock_keys_is_a_typed_error(
    twin: Twin, r: redis.Redis, plant: Any
) -> None:
    plant(r)
    a = twin.make("foreign", ttl=1)
    with pytest.raises(ForeignDataError):
        a.acquire(blocking=False)
    assert a.fencing_token is None


def test_zero_timeout_is_a_single_try_that_never_queues(twin: Twin, r: redis.Redis) -> None:
    a = twin.make("zero", ttl=10)
    b = twin.make("zero", ttl=10)
    assert a.acquire()
    assert b.acquire(timeout=0) is False
    assert r.exists("distkit:lock:{zero}:queue") == 0
    a.release()
    assert b.acquire(timeout=0) is True
    b.release()
