"""Values distlock never writes, planted in a lock's or a semaphore's fence or stored limit: every
operation ends in ``ForeignDataError`` naming the key, with no grant left behind (fast path and
queued path) and the foreign value kept as it was for the operator (docs/locks.md,
docs/semaphore.md). Random plants of every key are fuzzed in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis

from distkit import ForeignDataError, ServerError
from distkit.testing import RedisServer
from distlock import AsyncLock, AsyncSemaphore, Lock, Semaphore
from distlock._scripts import ACQUIRE as LOCK_ACQUIRE

# not a number, nan, inf, negative, fractional, past 2^53 (where tokens stop being exact)
BAD_FENCES = [
    b"abc",
    b"nan",
    b"inf",
    b"-inf",
    b"1e400",
    b"-1",
    b"1.5",
    b"9" * 40,
    b"9007199254740993",
    b"",
]
BAD_LIMITS = [b"abc", b"nan", b"inf", b"-1", b"0", b"1.5", b"", b"02", b"9" * 20, b"2147483649"]


def _wait_queued(r: redis.Redis, queue: str) -> None:
    deadline = time.monotonic() + 5
    while r.zcard(queue) < 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.002)


def _wait_in_thread(handle: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(handle.acquire(timeout=10))
        except Exception as exc:  # the test inspects it
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- Lock ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_lock_fence_on_the_fast_path_is_foreign_data(r: redis.Redis, junk: bytes) -> None:
    fence = "distkit:lock:{ff}:fence"
    r.set(fence, junk)
    lock = Lock(r, "ff", ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:lock:\{ff\}:fence"):
        lock.acquire(blocking=False)
    assert lock.fencing_token is None
    assert r.exists("distkit:lock:{ff}") == 0  # no grant left behind
    assert r.get(fence) == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_lock_fence_on_the_queued_path_grants_nobody(r: redis.Redis, junk: bytes) -> None:
    """Planted while a waiter is queued: the release cannot hand over (no token to give), so it
    frees the lease and raises; the waiter then fails too and leaves the queue."""
    lease, fence, queue = "distkit:lock:{fq}", "distkit:lock:{fq}:fence", "distkit:lock:{fq}:queue"
    holder = Lock(r, "fq", ttl=1)
    assert holder.acquire()
    waiter = Lock(r, "fq", ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, queue)
    r.set(fence, junk)
    with pytest.raises(ForeignDataError, match=r"distkit:lock:\{fq\}:fence"):
        holder.release()
    assert r.exists(lease) == 0  # freed, handed to nobody
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert waiter.fencing_token is None
    assert r.exists(lease, queue, "distkit:lock:{fq}:qexp") == 0
    assert r.get(fence) == junk


def test_the_last_token_before_2_53_is_still_exhaustion_not_foreign(r: redis.Redis) -> None:
    r.set("distkit:lock:{full}:fence", str(2**53 - 1))
    with pytest.raises(ServerError, match="exhausted") as info:
        Lock(r, "full", ttl=10).acquire(blocking=False)
    assert not isinstance(info.value, ForeignDataError)


@pytest.mark.parametrize("junk", [b"nan", b"-1", b"1e400"], ids=repr)
def test_a_foreign_fence_async_lock(redis_server: RedisServer, junk: bytes) -> None:
    redis_server.client().flushall()

    async def main() -> None:
        client = redis_server.async_client()
        try:
            await client.set("distkit:lock:{fa}:fence", junk)
            lock = AsyncLock(client, "fa", ttl=10)
            with pytest.raises(ForeignDataError):
                await lock.acquire(blocking=False)
            assert await client.exists("distkit:lock:{fa}") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


# -- Semaphore ----------------------------------------------------------------------------------
def _sem_keys(r: redis.Redis, name: str) -> set[str]:
    return {k.decode() for k in r.keys(f"distkit:sem:{{{name}}}:*")}


@pytest.mark.parametrize("junk", BAD_LIMITS, ids=repr)
def test_a_foreign_stored_limit_is_foreign_data_and_writes_nothing(
    r: redis.Redis, junk: bytes
) -> None:
    limit = "distkit:sem:{sl}:limit"
    r.set(limit, junk)
    sem = Semaphore(r, "sl", 2, ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sl\}:limit"):
        sem.acquire(blocking=False)
    with pytest.raises(ForeignDataError):
        Semaphore(r, "sl", 2, ttl=10).acquire(timeout=0.2)  # the queued path too
    assert sem.fencing_token is None
    assert _sem_keys(r, "sl") == {limit}  # nothing granted, nothing queued, nothing written
    assert r.get(limit) == junk and r.pttl(limit) == -1  # kept as it was, TTL untouched


@pytest.mark.parametrize("junk", [b"abc", b"nan", b"0"], ids=repr)
def test_a_limit_planted_under_a_holder_frees_its_permit_and_grants_nobody(
    r: redis.Redis, junk: bytes
) -> None:
    holder = Semaphore(r, "sh", 1, ttl=1)
    assert holder.acquire()
    waiter = Semaphore(r, "sh", 1, ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:sem:{sh}:queue")
    r.set("distkit:sem:{sh}:limit", junk)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sh\}:limit"):
        holder.release()
    assert r.zcard("distkit:sem:{sh}:holders") == 0  # freed, handed to nobody
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.zcard("distkit:sem:{sh}:holders") == 0
    assert r.zcard("distkit:sem:{sh}:queue") == 0
    assert r.get("distkit:sem:{sh}:limit") == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_semaphore_fence_on_the_fast_path_writes_nothing(
    r: redis.Redis, junk: bytes
) -> None:
    fence = "distkit:sem:{sf}:fence"
    r.set(fence, junk)
    sem = Semaphore(r, "sf", 2, ttl=10)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sf\}:fence"):
        sem.acquire(blocking=False)
    assert sem.fencing_token is None
    assert _sem_keys(r, "sf") == {fence}
    assert r.get(fence) == junk


@pytest.mark.parametrize("junk", BAD_FENCES, ids=repr)
def test_a_foreign_semaphore_fence_on_the_queued_path_grants_nobody(
    r: redis.Redis, junk: bytes
) -> None:
    holder = Semaphore(r, "sq", 1, ttl=1)
    assert holder.acquire()
    waiter = Semaphore(r, "sq", 1, ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:sem:{sq}:queue")
    r.set("distkit:sem:{sq}:fence", junk)
    with pytest.raises(ForeignDataError, match=r"distkit:sem:\{sq\}:fence"):
        holder.release()
    assert r.zcard("distkit:sem:{sq}:holders") == 0
    thread.join(10)
    assert not thread.is_alive()
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.zcard("distkit:sem:{sq}:holders") == 0
    assert r.zcard("distkit:sem:{sq}:queue") == 0
    assert r.get("distkit:sem:{sq}:fence") == junk


def test_a_foreign_limit_async_semaphore(redis_server: RedisServer) -> None:
    redis_server.client().flushall()

    async def main() -> None:
        client = redis_server.async_client()
        try:
            await client.set("distkit:sem:{as}:limit", b"nan")
            with pytest.raises(ForeignDataError):
                await AsyncSemaphore(client, "as", 2, ttl=10).acquire(blocking=False)
            assert await client.exists("distkit:sem:{as}:holders") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


def test_force_release_with_a_foreign_fence_frees_the_lease_and_hands_it_to_nobody(
    r: redis.Redis,
) -> None:
    holder = Lock(r, "ffr", ttl=1)
    assert holder.acquire()
    waiter = Lock(r, "ffr", ttl=10)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, "distkit:lock:{ffr}:queue")
    r.set("distkit:lock:{ffr}:fence", b"nan")
    with pytest.raises(ForeignDataError, match="fencing state"):
        Lock.force_release(r, "ffr")
    assert r.exists("distkit:lock:{ffr}") == 0
    thread.join(10)
    assert len(out) == 1 and isinstance(out[0], ForeignDataError), out
    assert r.exists("distkit:lock:{ffr}", "distkit:lock:{ffr}:queue") == 0


# -- planted queue entries, holders and wrong-type keys (review items 6 and 7) ------------------
LQ, LQEXP = "distkit:lock:{{{}}}:queue", "distkit:lock:{{{}}}:qexp"
SQ, SQEXP = "distkit:sem:{{{}}}:queue", "distkit:sem:{{{}}}:qexp"
FAR = 10**13  # a keep-alive in the year 2286: distlock writes at most a minute ahead


def _plant_waiter(r: redis.Redis, queue: str, qexp: str, member: str, keep: Any) -> None:
    r.zadd(queue, {member: 1})
    r.hset(qexp, member, keep)


def _now_ms(r: redis.Redis) -> int:
    secs, micros = r.time()
    return int(secs) * 1000 + int(micros) // 1000


# members that are not "<ttl_ms>:<owner>" with a ttl distlock accepts, and keep-alives that are
# not numbers or lie further ahead than distlock writes (planted with a live keep-alive, or
# with one at FAR)
BAD_MEMBERS = ["nocolon", ":x", "0:x", "-5:x", "1.5:x", "abc:x", "5000:", "5000:x*",
               "315360000001:x", "9" * 40 + ":x"]  # fmt: skip
BAD_KEEPS = [FAR, "nan", "inf", "abc", "", "1e400"]


@pytest.mark.parametrize("keep", BAD_KEEPS, ids=repr)
def test_a_ghost_lock_waiter_with_a_foreign_keep_alive_is_dropped(
    r: redis.Redis, keep: Any
) -> None:
    """Found: a planted waiter "5000:ghost" kept alive until 2286 made acquire(blocking=False) on
    a free lock False, and every blocking acquire time out. Now it is dropped unused."""
    r.flushall()
    _plant_waiter(r, LQ.format("g"), LQEXP.format("g"), "5000:ghost", keep)
    lock = Lock(r, "g", ttl=5)
    assert lock.acquire(blocking=False)
    assert r.exists(LQ.format("g"), LQEXP.format("g")) == 0
    lock.release()


@pytest.mark.parametrize("member", BAD_MEMBERS, ids=repr)
def test_a_malformed_lock_queue_member_is_dropped_and_release_frees_the_lease(
    r: redis.Redis, member: str
) -> None:
    """Found: a queue member without ':' made release() fail with a raw Lua "arithmetic on nil
    'sep'" ServerError, leaving the lease held for its TTL. Now the member is dropped."""
    r.flushall()
    lock = Lock(r, "m", ttl=30)
    assert lock.acquire()
    r.set("distkit:lock:{m}", lock._core.owner + "*", keepttl=True)  # type: ignore[operator]
    _plant_waiter(r, LQ.format("m"), LQEXP.format("m"), member, _now_ms(r) + 30_000)
    lock.release()
    assert r.exists("distkit:lock:{m}", LQ.format("m"), LQEXP.format("m")) == 0


def test_a_ghost_lock_waiter_is_never_handed_a_decade_lease(r: redis.Redis) -> None:
    """Found: a planted waiter "315360000000:ghost" kept alive until 2286 was handed the lease for
    3650 days by the next release. Its keep-alive is foreign: it is dropped, the lease freed."""
    r.flushall()
    lock = Lock(r, "h", ttl=5)
    assert lock.acquire()
    r.set("distkit:lock:{h}", lock._core.owner + "*", keepttl=True)  # type: ignore[operator]
    _plant_waiter(r, LQ.format("h"), LQEXP.format("h"), "315360000000:ghost", FAR)
    lock.release()
    assert r.get("distkit:lock:{h}") is None
    assert Lock(r, "h", ttl=5).acquire(blocking=False)


def test_a_foreign_wake_list_drops_that_waiter_and_hands_nothing_half_way(r: redis.Redis) -> None:
    """Found: with a wrong-type wake list planted for a queued waiter, release() handed the lease
    over and advanced the fence, then raised ForeignDataError. Now the waiter is dropped before
    anything is written: the release succeeds, the lease is freed, the fence is untouched."""
    r.flushall()
    holder = Lock(r, "w", ttl=30)
    assert holder.acquire()
    fence = r.get("distkit:lock:{w}:fence")
    waiter = Lock(r, "w", ttl=30)
    thread, out = _wait_in_thread(waiter)
    _wait_queued(r, LQ.format("w"))
    member = r.zrange(LQ.format("w"), 0, -1)[0]
    owner = member.split(b":", 1)[1].decode()
    r.hset("distkit:lock:{w}:wake:" + owner, "planted", "1")
    holder.release()
    assert r.get("distkit:lock:{w}") != owner.encode()
    assert r.get("distkit:lock:{w}:fence") == fence
    thread.join(15)
    # the waiter re-queues or takes the free lease at its next call, or fails on its wake list
    assert len(out) == 1 and (out[0] is True or isinstance(out[0], ForeignDataError)), out
    # the foreign wake list is left for the operator
    assert r.hgetall("distkit:lock:{w}:wake:" + owner) == {b"planted": b"1"}


def test_force_release_drops_a_waiter_with_a_foreign_wake_list(r: redis.Redis) -> None:
    """Found (CLI `lock release w --force`): exit 2 "error" although the holder was changed."""
    r.flushall()
    r.set("distkit:lock:{fw}", "owner*", px=60_000)
    _plant_waiter(r, LQ.format("fw"), LQEXP.format("fw"), "5000:abc", _now_ms(r) + 30_000)
    r.set("distkit:lock:{fw}:wake:abc", "planted")
    assert Lock.force_release(r, "fw")
    assert r.exists("distkit:lock:{fw}", LQ.format("fw")) == 0
    assert r.get("distkit:lock:{fw}:wake:abc") == b"planted"


def test_a_lock_release_with_a_foreign_marker_list_frees_the_lease(r: redis.Redis) -> None:
    """A release whose marker list (`:rel`) holds another type frees the lease all the same and
    then raises ForeignDataError (it raised with the lease still held)."""
    for queued in (False, True):
        r.flushall()
        lock = Lock(r, "rl", ttl=30)
        assert lock.acquire()
        if queued:
            r.set("distkit:lock:{rl}", lock._core.owner + "*", keepttl=True)  # type: ignore[operator]
        r.set("distkit:lock:{rl}:rel", "planted")
        with pytest.raises(ForeignDataError):
            lock.release()
        assert r.exists("distkit:lock:{rl}") == 0
        assert r.get("distkit:lock:{rl}:rel") == b"planted"


def test_a_queueing_lock_acquire_writes_nothing_before_a_foreign_qexp(r: redis.Redis) -> None:
    """A waiter's ACQUIRE checks every key it writes first: a foreign qexp used to fail after the
    queue entry was added (and the lease marked), leaving a waiter nobody would remove."""
    r.flushall()
    holder = Lock(r, "qx", ttl=30)
    assert holder.acquire()
    r.set(LQEXP.format("qx"), "planted")
    keys = ("distkit:lock:{qx}", "distkit:lock:{qx}:fence", LQ.format("qx"), LQEXP.format("qx"),
            "distkit:lock:{qx}:wake:me")  # fmt: skip
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):  # the script alone: no clean-up
        LOCK_ACQUIRE(r, keys, ("me", 30_000, 30_000, 1500))
    assert r.exists(LQ.format("qx")) == 0
    with pytest.raises(ForeignDataError):
        Lock(r, "qx", ttl=30).acquire(timeout=0.5)
    assert r.exists(LQ.format("qx")) == 0
    assert r.get("distkit:lock:{qx}") == holder._core.owner.encode()  # type: ignore[union-attr]
    holder.release()


# -- Semaphore ----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", BAD_KEEPS, ids=repr)
def test_a_ghost_semaphore_waiter_with_a_foreign_keep_alive_is_dropped(
    r: redis.Redis, keep: Any
) -> None:
    r.flushall()
    _plant_waiter(r, SQ.format("g"), SQEXP.format("g"), "5000:ghost", keep)
    sem = Semaphore(r, "g", 1, ttl=5)
    assert sem.acquire(blocking=False)
    assert r.zrange("distkit:sem:{g}:holders", 0, -1) == [sem._core.owner.encode()]  # type: ignore[union-attr]
    sem.release()


@pytest.mark.parametrize("member", BAD_MEMBERS, ids=repr)
def test_a_malformed_semaphore_queue_member_is_dropped(r: redis.Redis, member: str) -> None:
    r.flushall()
    holder = Semaphore(r, "m", 1, ttl=30)
    assert holder.acquire()
    _plant_waiter(r, SQ.format("m"), SQEXP.format("m"), member, _now_ms(r) + 30_000)
    holder.release()
    assert r.zcard("distkit:sem:{m}:holders") == 0
    assert r.exists(SQ.format("m")) == 0
    assert Semaphore(r, "m", 1, ttl=5).acquire(blocking=False)


@pytest.mark.parametrize("score", [10**15, float("inf")], ids=repr)
def test_a_ghost_semaphore_holder_past_any_ttl_is_dropped(r: redis.Redis, score: float) -> None:
    """Found: a planted holder with expiry 1e15 ms held a permit forever. An expiry further
    ahead than the longest ttl distlock accepts (ten years) is foreign: pruned like a dead one."""
    r.flushall()
    r.zadd("distkit:sem:{s}:holders", {"ghost": score})
    r.set("distkit:sem:{s}:limit", "1", px=60_000)
    sem = Semaphore(r, "s", 1, ttl=5)
    assert sem.acquire(blocking=False)
    assert r.zrange("distkit:sem:{s}:holders", 0, -1) == [sem._core.owner.encode()]  # type: ignore[union-attr]
    assert sem.extend() is None
    sem.release()


def test_a_foreign_semaphore_wake_list_drops_that_waiter(r: redis.Redis) -> None:
    r.flushall()
    holder = Semaphore(r, "w", 1, ttl=30)
    assert holder.acquire()
    _plant_waiter(r, SQ.format("w"), SQEXP.format("w"), "30000:abc", _now_ms(r) + 30_000)
    r.set("distkit:sem:{w}:wake:abc", "planted")
    holder.release()
    assert r.zcard("distkit:sem:{w}:holders") == 0
    assert r.exists(SQ.format("w")) == 0
    assert r.get("distkit:sem:{w}:wake:abc") == b"planted"


@pytest.mark.parametrize("part", ["tokens", "queue", "qexp"])
def test_a_semaphore_acquire_writes_nothing_before_a_foreign_key(r: redis.Redis, part: str) -> None:
    """A foreign tokens hash used to fail after the permit was added to the holders (a permit
    nobody holds, until its TTL); every key is now checked before the first write."""
    r.flushall()
    r.set(f"distkit:sem:{{x}}:{part}", "planted")
    with pytest.raises(ForeignDataError):
        Semaphore(r, "x", 2, ttl=30).acquire(blocking=False)
    assert sorted(r.keys("distkit:sem:{x}:*")) == [f"distkit:sem:{{x}}:{part}".encode()]


@pytest.mark.parametrize("part", ["rel", "tokens", "queue", "qexp"])
def test_a_semaphore_release_with_a_foreign_key_frees_the_permit_then_raises(
    r: redis.Redis, part: str
) -> None:
    """Documented (docs/semaphore.md): a release frees the handle's own permit, grants nobody,
    touches no foreign key and then raises ForeignDataError."""
    r.flushall()
    sem = Semaphore(r, "rr", 1, ttl=30)
    assert sem.acquire()
    r.delete(f"distkit:sem:{{rr}}:{part}")
    r.set(f"distkit:sem:{{rr}}:{part}", "planted")
    with pytest.raises(ForeignDataError):
        sem.release()
    assert r.zcard("distkit:sem:{rr}:holders") == 0
    assert r.get(f"distkit:sem:{{rr}}:{part}") == b"planted"
