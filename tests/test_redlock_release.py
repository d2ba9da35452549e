"""Redlock release, acquire timeout bound and shared connections (issue 13 leftovers, issue 15).

- a release always reaches every master: also one paused past ``node_timeout`` whose script
  cache is empty (SCRIPT FLUSH, a restart that kept the data); generated over fault x number of
  slow masters x sync/async;
- a release that merely answers late is a success, not ``LockNotOwned`` / ``LockLost``;
- ``acquire(timeout=t)`` returns within ``t + node_timeout`` when the lock is held elsewhere,
  over latency x fresh/reused handle x sync/async;
- handles over the same clients share their per-master connections (a handle per call opens
  none), ``close()`` is idempotent and a closed handle refuses to work.

Every test starts masters of its own (they are paused and restarted here).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from distkit import LockError, LockNotOwned, RedlockConfig, aconnect, connect
from distkit.testing import FaultProxy, IndependentMasters, RedisServer
from distlock import AsyncRedlock, Redlock, locked

from ._twins import SyncView

pytestmark = pytest.mark.slow

NODE_TIMEOUT = 0.05
STALL = 0.3  # longer than NODE_TIMEOUT: the release's reply comes late


def lease(name: str) -> str:
    return f"distkit:lock:{{{name}}}"


@pytest.fixture(scope="module")
def group(redis_binary: str) -> Iterator[IndependentMasters]:
    with IndependentMasters(3, binary=redis_binary) as masters:
        yield masters


@pytest.fixture
def servers(group: IndependentMasters) -> Iterator[list[RedisServer]]:
    for server in group.servers:
        if server.paused:
            server.resume()
        with server.client() as c:
            c.flushall()
            c.script_flush()
    yield group.servers
    for server in group.servers:
        if server.paused:
            server.resume()


class Kind:
    """Handles of one kind (sync, or async behind a SyncView) on clients this object closes."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self._clients: list[Any] = []

    def clients(self, urls: list[str]) -> list[Any]:
        make = connect if self.kind == "sync" else aconnect
        out = [make(u) for u in urls]
        self._clients.extend(out)
        return out

    def make(self, clients: Any, name: str, **kwargs: Any) -> Any:
        if self.kind == "sync":
            return Redlock(clients, name, **kwargs)
        assert self.loop is not None
        return SyncView(AsyncRedlock(clients, name, **kwargs), self.loop)

    def settle(self) -> None:
        if self.loop is not None:
            pending = asyncio.all_tasks(self.loop)
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))

    def close(self) -> None:
        self.settle()
        for c in self._clients:
            if self.loop is None:
                c.close()
            else:
                self.loop.run_until_complete(c.aclose())
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> Iterator[Kind]:
    k = Kind(request.param)
    yield k
    k.close()


def _urls(servers: list[RedisServer]) -> list[str]:
    return [f"redis://{s.address[0]}:{s.address[1]}/0" for s in servers]


def _leases(servers: list[RedisServer], name: str) -> list[bytes | None]:
    out = []
    for s in servers:
        with s.client() as c:
            out.append(c.get(lease(name)))
    return out


def _wait_released(kind: Kind, servers: list[RedisServer], name: str, within: float) -> None:
    give_up = time.monotonic() + within
    while True:
        kind.settle()
        left = _leases(servers, name)
        if left == [None] * len(servers) or time.monotonic() > give_up:
            break
        time.sleep(0.02)
    assert left == [None] * len(servers), f"leases left behind after release: {left}"


def _stall(victims: list[RedisServer], seconds: float) -> threading.Timer:
    for s in victims:
        s.pause()

    def resume() -> None:
        for s in victims:
            s.resume()

    timer = threading.Timer(seconds, resume)
    timer.start()
    return timer


# -- 1 + 2: a release reaches every master, and a late answer is not a loss -----------------------
@pytest.mark.parametrize("slow", [1, 2], ids=["1slow", "2slow"])
@pytest.mark.parametrize("fault", ["none", "script-flush", "restart-keeping-data"])
def test_release_reaches_slow_masters_with_an_empty_script_cache(
    servers: list[RedisServer], kind: Kind, fault: str, slow: int
) -> None:
    """The generator of the class: at release, ``slow`` masters stall past ``node_timeout`` after
    losing their script cache (or not). ``release()`` returns (late is not lost) and, once they
    resume, no lease is left anywhere."""
    name = f"rel-{fault}-{slow}"
    lock = kind.make(kind.clients(_urls(servers)), name, ttl=10, node_timeout=NODE_TIMEOUT)
    assert lock.acquire()
    victims = servers[-slow:]
    if fault == "script-flush":
        for s in servers:
            with s.client() as c:
                c.script_flush()
    elif fault == "restart-keeping-data":
        for s in victims:
            s.restart(keep_data=True)
    timer = _stall(victims, STALL)
    try:
        lock.release()  # must not raise: nobody answered "not ours"
    finally:
        timer.join()
    _wait_released(kind, servers, name, within=2.0)


def test_leaving_with_while_a_majority_answers_late_is_not_a_loss(
    servers: list[RedisServer], kind: Kind
) -> None:
    """attack_10: the release is confirmed late by 2 of 3 masters; ``with`` must not raise
    ``LockLost``."""
    name = "with-late"
    lock = kind.make(kind.clients(_urls(servers)), name, ttl=10, node_timeout=NODE_TIMEOUT)
    with lock:
        timer = _stall(servers[1:], STALL)
    timer.join()
    _wait_released(kind, servers, name, within=2.0)


def test_release_after_the_validity_ran_out_without_a_quorum_of_answers_is_a_loss(
    servers: list[RedisServer], kind: Kind
) -> None:
    """Late answers are not a loss only while the lease is known to stand: once the local
    validity ran out, fewer than a quorum of confirmations is reported (and it still releases)."""
    name = "late-and-lapsed"
    now = [time.monotonic()]

    def clock() -> float:
        return now[0]

    lock = kind.make(
        kind.clients(_urls(servers)), name, ttl=10, node_timeout=NODE_TIMEOUT, clock=clock
    )
    assert lock.acquire()
    now[0] += 11  # the local validity is over (the servers' leases are not: 10 s of real time)
    timer = _stall(servers[1:], STALL)
    try:
        with pytest.raises(LockNotOwned, match="validity had run out"):
            lock.release()
    finally:
        timer.join()
    _wait_released(kind, servers, name, within=2.0)


def test_release_refused_by_a_quorum_is_still_a_loss(
    servers: list[RedisServer], kind: Kind
) -> None:
    name = "refused"
    lock = kind.make(kind.clients(_urls(servers)), name, ttl=10, node_timeout=NODE_TIMEOUT)
    assert lock.acquire()
    for s in servers[1:]:
        with s.client() as c:
            c.set(lease(name), "someone-else", px=10_000)
    with pytest.raises(LockNotOwned, match="no longer held it"):
        lock.release()
    assert _leases(servers, name) == [None, b"someone-else", b"someone-else"]


# -- 3: acquire(timeout=t) returns within t + node_timeout ---------------------------------------
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "reused"])
@pytest.mark.parametrize("latency", [0.05, 0.1])
def test_acquire_timeout_is_bounded_by_one_node_timeout(
    servers: list[RedisServer], kind: Kind, latency: float, fresh: bool
) -> None:
    """The lock is held elsewhere; every master is ``latency`` away each way. A refused
    ``acquire(timeout=t)`` returns within ``t + node_timeout`` (plus scheduling slack), on a
    handle that never connected (new clients) and on one reused."""
    name = f"bound-{latency}-{fresh}"
    holder = Redlock([s.client() for s in servers], name, ttl=30)
    assert holder.acquire()
    proxies = [FaultProxy(s.address).start() for s in servers]
    node_timeout = 3 * latency  # a round trip is 2 x latency
    slack = 0.08
    if kind.kind == "async":
        # The asyncio twin opens connections through the client's own pool, whose handshake
        # (HELLO, maintenance notifications) costs two round trips: docs/redlock.md.
        slack += 4 * latency
    try:
        for p in proxies:
            p.set_latency(latency)
        urls = [p.url for p in proxies]
        reused = kind.make(kind.clients(urls), name, ttl=30, node_timeout=node_timeout)
        if not fresh:
            assert reused.acquire(blocking=False) is False  # connected once already
        for t in (0.3, 0.3, 0.7):
            lock = (
                kind.make(kind.clients(urls), name, ttl=30, node_timeout=node_timeout)
                if fresh
                else reused
            )
            started = time.monotonic()
            assert lock.acquire(timeout=t) is False
            took = time.monotonic() - started
            assert took <= t + node_timeout + slack, (t, took)
            assert took >= t - 0.01, (t, took)
    finally:
        kind.settle()
        for p in proxies:
            p.close()
        holder.release()


# -- 4: shared connections, close() --------------------------------------------------------------
def _connections_received(servers: list[RedisServer]) -> list[int]:
    out = []
    for s in servers:
        with s.client() as c:
            out.append(int(c.info("stats")["total_connections_received"]))
    return out


def _connected(servers: list[RedisServer]) -> list[int]:
    out = []
    for s in servers:
        with s.client() as c:
            out.append(len(c.client_list()) - 1)  # not this inspecting connection
    return out


@pytest.mark.parametrize("via", ["handle", "locked"])
def test_a_handle_per_call_opens_no_connection_of_its_own(
    servers: list[RedisServer], kind: Kind, via: str
) -> None:
    """50 acquire/release cycles, each on a new handle (or through ``@locked``, which builds one
    per call), over the same clients: the servers see no new connections after the first."""
    clients = kind.clients(_urls(servers))
    name = f"per-call-{via}"
    if via == "handle":

        def cycle() -> None:
            with kind.make(clients, name, ttl=5):
                pass

    elif kind.kind == "sync":
        cycle = locked(clients, name, ttl=5)(lambda: None)
    else:

        async def body() -> None:
            return None

        wrapped = locked(clients, name, ttl=5)(body)
        loop = kind.loop
        assert loop is not None

        def cycle() -> None:
            loop.run_until_complete(wrapped())

    cycle()  # the first opens what the rest reuse
    kind.settle()
    before_received, before_connected = _connections_received(servers), _connected(servers)
    for _ in range(50):
        cycle()
    kind.settle()
    received = [a - b for a, b in zip(_connections_received(servers), before_received, strict=True)]
    # One connection each for the inspection itself: nothing from the 50 handles.
    assert all(r <= 2 for r in received), received
    assert all(a <= b for a, b in zip(_connected(servers), before_connected, strict=True))


def test_threads_share_the_connections_safely(servers: list[RedisServer]) -> None:
    """Four threads, a handle per call through ``@locked``: mutual exclusion holds, no error,
    and the connections stay few (at most one per thread and master, plus the straggler's)."""
    clients = [connect(u) for u in _urls(servers)]
    inside = [0]
    seen: list[int] = []
    errors: list[BaseException] = []

    @locked(clients, "threads", ttl=5, blocking_timeout=10)
    def critical() -> None:
        inside[0] += 1
        seen.append(inside[0])
        time.sleep(0.001)
        inside[0] -= 1

    def worker() -> None:
        try:
            for _ in range(25):
                critical()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    before = _connections_received(servers)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    received = [a - b for a, b in zip(_connections_received(servers), before, strict=True)]
    assert not errors, errors
    assert len(seen) == 100 and set(seen) == {1}
    assert all(r <= 4 + 2 for r in received), received
    for c in clients:
        c.close()


def test_a_second_concurrent_acquire_on_one_handle_is_refused(
    servers: list[RedisServer],
) -> None:
    """Two threads, one handle, the lock held elsewhere: the second acquire raises LockError
    instead of both being told True (one handle is one holder, as with ``Lock``)."""
    clients = [connect(u) for u in _urls(servers)]
    shared = Redlock(clients, "one-handle", ttl=5, retry_delay=0.02)
    other = Redlock(clients, "one-handle", ttl=0.5)
    assert other.acquire()
    results: list[object] = []

    def worker() -> None:
        try:
            results.append(shared.acquire(timeout=3))
        except LockError as exc:
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if isinstance(r, LockError)]
    assert len(refused) == 1 and True in results, results
    assert "another acquire is in progress" in str(refused[0])
    shared.release()
    assert _leases(servers, "one-handle") == [None] * 3
    for c in clients:
        c.close()


def test_close_during_an_acquire_is_refused_and_leaves_no_unreleasable_lease(
    servers: list[RedisServer],
) -> None:
    """close() while another thread is inside acquire() on the handle raises LockError; the
    acquire ends normally, and a later close() releases what it took."""
    clients = [connect(u) for u in _urls(servers)]
    blocker = Redlock(clients, "closing-race", ttl=0.5)
    assert blocker.acquire()
    lock = Redlock(clients, "closing-race", ttl=10, retry_delay=0.02)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(lock.acquire(timeout=3)))
    waiter.start()
    time.sleep(0.1)  # the lock is held elsewhere: the acquire is still retrying
    with pytest.raises(LockError, match="acquire is in progress"):
        lock.close()
    waiter.join()
    assert results == [True]
    lock.close()
    assert _leases(servers, "closing-race") == [None] * 3
    for c in clients:
        c.close()


def test_async_timeouts_hold_while_an_earlier_release_still_waits_on_a_stalled_master(
    servers: list[RedisServer],
) -> None:
    """Masters stopped: a node's next request waits for the earlier one's late send only until
    its own deadline, so acquire(timeout) and release() keep the sync twin's bounds."""

    async def main() -> tuple[list[float], list[float]]:
        clients = [aconnect(u) for u in _urls(servers)]
        overruns: list[float] = []
        releases: list[float] = []
        try:
            servers[2].pause()  # release: one master stalled, no pooled connection to it
            lock = AsyncRedlock(clients, "late-send", ttl=30)
            for _ in range(3):
                assert await lock.acquire(blocking=False)
                started = time.monotonic()
                await lock.release()
                releases.append(time.monotonic() - started)
            servers[1].pause()  # acquire: no quorum, each failed attempt leaves a late release
            for timeout in (1.0, 2.0):
                other = AsyncRedlock(clients, "late-acquire", ttl=30)
                started = time.monotonic()
                assert await other.acquire(timeout=timeout) is False
                overruns.append(time.monotonic() - started - timeout)
        finally:
            servers[1].resume()
            servers[2].resume()
            for c in clients:
                await c.aclose()
        return overruns, releases

    overruns, releases = asyncio.run(main())
    assert all(r < 1.0 + 0.5 for r in releases), releases  # was 5.5 s after the first
    assert all(o < 0.5 + 0.5 for o in overruns), overruns  # node_timeout is 0.5 s here


def test_close_is_idempotent_releases_and_refuses_later_use(
    servers: list[RedisServer], kind: Kind
) -> None:
    name = "closing"
    lock = kind.make(kind.clients(_urls(servers)), name, ttl=10)
    assert lock.acquire()
    lock.close()  # releases what it holds
    kind.settle()
    assert _leases(servers, name) == [None] * 3
    lock.close()  # idempotent
    for call in (lambda: lock.acquire(blocking=False), lock.release, lock.extend, lock.locked):
        with pytest.raises(LockError, match="closed"):
            call()


def test_with_leaves_the_handle_holding_no_connection(servers: list[RedisServer]) -> None:
    clients = [connect(u) for u in _urls(servers)]
    lock = Redlock(clients, "held-conns", ttl=5)
    with lock:
        pass
    assert lock._driver._conns == [None] * 3  # all back in the shared idle lists
    lock.close()
    for c in clients:
        c.close()


def test_close_closes_the_clients_a_config_handle_built(
    servers: list[RedisServer], kind: Kind
) -> None:
    config = RedlockConfig(masters=_urls(servers))
    before = _connected(servers)
    lock = kind.make(config, "config-owned", ttl=5)
    for _ in range(3):
        with lock:
            pass
    lock.close()
    kind.settle()
    assert all(a <= b for a, b in zip(_connected(servers), before, strict=True))


def test_a_client_closed_by_redis_py_still_works_for_other_handles(
    servers: list[RedisServer],
) -> None:
    """A pooled connection whose server restarted is replaced, not reported as a failure of the
    release (the request is sent again on a new connection)."""
    clients = [connect(u) for u in _urls(servers)]
    with Redlock(clients, "restart", ttl=5):
        pass
    lock = Redlock(clients, "restart", ttl=5, node_timeout=0.2)
    assert lock.acquire()
    servers[0].restart(keep_data=True)
    lock.release()  # the pooled connection to servers[0] is dead: re-sent on a new one
    assert _leases(servers, "restart") == [None] * 3
    for c in clients:
        c.close()


# -- a release to a master that stays stalled past the late-send bound ----------------------------
@pytest.mark.parametrize("slow", [1, 2], ids=["1slow", "2slow"])
def test_a_release_to_a_master_stalled_past_the_late_send_bound_lands_on_resume(
    servers: list[RedisServer], kind: Kind, slow: int
) -> None:
    """Masters whose connections are gone and that stay stalled longer than
    ``max(1 s, 20 x node_timeout)`` at release: both twins report the release the same way (it
    returns: a quorum confirmed, or validity was left and nobody refused) and the stalled
    masters' leases are released when they resume within the lease's TTL (the async twin's
    late send gave up after that bound before: the lease stood until its TTL)."""
    name = f"rel-long-stall-{slow}"
    lock = kind.make(kind.clients(_urls(servers)), name, ttl=10, node_timeout=NODE_TIMEOUT)
    assert lock.acquire()
    victims = servers[-slow:]
    for victim in victims:
        with victim.client() as admin:
            admin.client_kill_filter(_type="normal", skipme=True)  # the handle must reconnect
    bound = max(1.0, 20 * NODE_TIMEOUT)
    timer = _stall(victims, bound + 0.6)

    def run_for(seconds: float) -> None:  # the async twin's late send runs while its loop does
        if kind.loop is not None:
            kind.loop.run_until_complete(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)

    try:
        started = time.monotonic()
        assert lock.release() is None  # the same report from both twins
        assert time.monotonic() - started < 1.0
        while timer.is_alive():
            run_for(0.05)
    finally:
        timer.join()
    assert _leases(servers, name)[: 3 - slow] == [None] * (3 - slow)
    deadline = time.monotonic() + 3.0
    while _leases(servers, name) != [None] * 3 and time.monotonic() < deadline:
        run_for(0.05)
    assert _leases(servers, name) == [None, None, None]
