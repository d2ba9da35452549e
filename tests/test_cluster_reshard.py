"""Resharding under load (issue 8 point 1): the slot that holds a lock, its fenced resource and a
cache namespace moves between masters (``SETSLOT IMPORTING / MIGRATING``, ``MIGRATE``,
``SETSLOT NODE``) while lock workers in several processes and cache readers, writers and
invalidators keep going. No two holders overlap, fencing tokens never go backwards, no read
returns a value older than an invalidation that had returned, and the clients see no error:
redis-py follows ``MOVED`` / ``ASK`` and retries ``TRYAGAIN`` (a script whose keys are half
migrated); distkit's retry policy covers what is left.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from distcache import Cache, CacheEvent, CounterMetrics
from distkit import DistkitError, RedisConfig, RetryConfig, StaleFencingToken, connect
from distkit.testing import (
    HistoryRecorder,
    RedisCluster,
    check_fencing,
    check_mutex,
    read_history,
)
from distlock import FencedStore, Lock

NAME = "hot"  # lock "hot", fenced resource "hot" and cache namespace "hot": one slot, {hot}
SLOT = key_slot(b"{hot}")
LOCK_PROCESSES = 3
TTL = 5.0


@pytest.fixture
def own_cluster(redis_binary: str) -> Iterator[RedisCluster]:
    """A Cluster of this test's own: its slot table is rewritten."""
    with RedisCluster(masters=3, binary=redis_binary) as clu:
        yield clu


def _lock_worker(config: RedisConfig, path: str, proc: str, stop: Any, errors: Any) -> None:
    client = connect(config)
    lock = Lock(client, NAME, ttl=TTL)
    store = FencedStore(client, NAME)
    history = HistoryRecorder(path, process=proc)
    n = 0
    while not stop.is_set():
        history.invoke("acquire", lock=NAME, ttl=TTL)
        try:
            got = lock.acquire(timeout=10)
        except DistkitError as exc:
            history.info("acquire", lock=NAME)
            errors.put(f"{proc} acquire: {exc!r}")
            continue
        if not got:
            history.fail("acquire", lock=NAME)
            continue
        now = time.monotonic_ns()
        token = lock.fencing_token
        history.record("acquire", "ok", token=token, lock=NAME, ttl=TTL, validity=lock.validity,
                       time_ns=now)  # fmt: skip
        assert token is not None
        n += 1
        history.invoke("write", token=token, resource=NAME, value=f"{proc}-{n}")
        try:
            store.write(token, f"{proc}-{n}")
            history.ok("write", token=token, resource=NAME)
        except StaleFencingToken:
            history.fail("write", token=token, resource=NAME)
        except DistkitError as exc:
            history.info("write", token=token, resource=NAME)
            errors.put(f"{proc} write: {exc!r}")
        time.sleep(0.002)
        history.invoke("release", lock=NAME)
        try:
            lock.release()
            history.ok("release", lock=NAME)
        except DistkitError as exc:
            history.info("release", lock=NAME)
            errors.put(f"{proc} release: {exc!r}")
    history.close()
    client.close()


class _CacheLoad:
    """Threads on one cache: a writer that updates the truth then invalidates, and readers that
    check every read against the last invalidation that had returned before the read began."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.truth = 0  # the "database"
        self.committed = 0  # the last version whose invalidation returned
        self.stale: list[str] = []
        self.invalidation_errors: list[str] = []
        self.reads = 0
        self.invalidations = 0
        self.stop = threading.Event()

    def writer(self) -> None:
        version = 0
        while not self.stop.is_set():
            version += 1
            self.truth = version
            how = version % 3
            while True:  # an invalidation that raised may not have reached every shard: redo
                try:
                    if how == 0:
                        self.cache.invalidate_tags("row")
                    elif how == 1:
                        self.cache.delete("row")
                    else:
                        self.cache.clear()
                    break
                except DistkitError as exc:
                    self.invalidation_errors.append(repr(exc))
            self.committed = version
            self.invalidations += 1
            time.sleep(0.003)

    def reader(self) -> None:
        while not self.stop.is_set():
            floor = self.committed
            value = self.cache.get_or_set("row", lambda: self.truth, tags=["row"])
            self.reads += 1
            if value < floor:
                self.stale.append(f"read {value} after invalidation {floor} returned")
            other = self.cache.get_many(["row", "other"])
            if other.get("row", floor) < floor:
                self.stale.append(f"get_many read {other['row']} after {floor}")


@pytest.mark.slow
def test_resharding_a_slot_under_locks_and_cache_traffic(
    own_cluster: RedisCluster, tmp_path: Path
) -> None:
    config = own_cluster.config(retry=RetryConfig(attempts=8))
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    errors = ctx.Queue()
    paths = [tmp_path / f"p{i}.jsonl" for i in range(LOCK_PROCESSES)]
    procs = [
        ctx.Process(target=_lock_worker, args=(config, str(p), f"p{i}", stop, errors))
        for i, p in enumerate(paths)
    ]
    for p in procs:
        p.start()
    client = connect(config)
    metrics = CounterMetrics()
    # A namespace on the lock's slot (shards=1), and one spread over 8 slots; default stampede
    # control (the fill locks move with their own slots).
    retry = RetryConfig(attempts=8)
    caches = [
        Cache(client, namespace=NAME, shards=1, metrics=metrics, retry=retry),
        Cache(client, namespace="spread", shards=8, metrics=metrics, retry=retry),
    ]
    loads = [_CacheLoad(cache) for cache in caches]
    threads = [threading.Thread(target=load.writer) for load in loads]
    threads += [threading.Thread(target=load.reader) for load in loads for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while not all(p.stat().st_size > 2000 for p in paths if p.exists()) or not all(
            p.exists() for p in paths
        ):
            assert time.monotonic() < deadline, "lock workers did not start"
            time.sleep(0.05)
        # the slot of {hot} and one shard of "spread" go round every master, twice
        spread_slot = key_slot(caches[1].key_prefixes[3].encode())
        moved = 0
        for _ in range(2):
            for slot in (SLOT, spread_slot):
                owner = own_cluster.node_for_slot(slot)
                for target in [n for n in own_cluster.nodes if n is not owner]:
                    moved += own_cluster.migrate_slot(
                        slot, target, batch=2, between=lambda: time.sleep(0.02)
                    )
                    time.sleep(0.2)
        assert moved > 20  # the slots held keys when they moved
    finally:
        stop.set()
        for load in loads:
            load.stop.set()
        for thread in threads:
            thread.join(30)
        for p in procs:
            p.join(60)
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    history = read_history(*paths)
    assert [p.exitcode for p in procs] == [0] * LOCK_PROCESSES
    mutex = check_mutex(history)
    assert mutex.ok, mutex.summary()
    fencing = check_fencing(history)
    assert fencing.ok, fencing.summary()
    grants = [e for e in history if e.op == "acquire" and e.type == "ok"]
    assert len(grants) > 30
    assert reported == []  # the lock clients never saw an error
    for load in loads:
        assert load.stale == []
        assert load.reads > 50 and load.invalidations > 20
        assert load.invalidation_errors == []
    assert metrics.count(CacheEvent.ERROR) == 0  # no read or fill failed open either
    # the slot table the test kept is the cluster's
    for slot in (SLOT, spread_slot):
        owner = own_cluster.node_for_slot(slot)
        with owner.client() as conn:
            assert conn.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) > 0
    client.close()


def test_a_slot_left_half_migrated_is_retried_not_failed(own_cluster: RedisCluster) -> None:
    """Keys of one namespace split between two masters for ~1.5 s: every multi-key script and
    MGET gets TRYAGAIN, redis-py gives up after its 16 tries (``ClusterError: TTL exhausted``),
    and distkit's retry policy treats that as a transient unavailability: with a budget longer
    than the migration, the calls succeed; none fails with a server error."""
    client = connect(own_cluster.config())
    cache = Cache(client, namespace="half", shards=1, stampede=None,
                  retry=RetryConfig(attempts=10, backoff_initial=0.1, backoff_max=0.5))  # fmt: skip
    lock = Lock(client, "half", ttl=10,
                retry=RetryConfig(attempts=10, backoff_initial=0.1, backoff_max=0.5))  # fmt: skip
    assert lock.acquire()
    lock.release()  # the lock's fencing state stays: its keys are on the slot too
    cache.set_many({f"k{i}": i for i in range(4)}, tags=["t"])
    slot = key_slot(b"{half}")
    target = next(n for n in own_cluster.nodes if n is not own_cluster.node_for_slot(slot))
    migrating = threading.Event()

    def slowly() -> None:
        migrating.set()
        time.sleep(0.3)

    mover = threading.Thread(
        target=lambda: own_cluster.migrate_slot(slot, target, batch=1, between=slowly)
    )
    mover.start()
    assert migrating.wait(10)
    started = time.monotonic()
    cache.invalidate_tags("t")  # BUMP of epoch + tag record: TRYAGAIN while they are split
    assert cache.get_many([f"k{i}" for i in range(4)]) == {}
    assert lock.acquire(timeout=10)
    lock.release()
    mover.join(30)
    assert time.monotonic() - started > 0.2  # the calls did wait for the migration
    assert own_cluster.node_for_slot(slot) is target
    client.close()
