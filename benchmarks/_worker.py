"""A worker process of ``lock_contended``: take the lock in a loop, record when, report back.

Timestamps are ``time.monotonic_ns()``: CLOCK_MONOTONIC is one system-wide clock on Linux (and
macOS), so stamps taken by different processes on one machine are comparable.

Parent and worker talk over a ``Pipe``::

    worker -> ("hello", pid)                      once, after imports
    parent -> ("segment", SegmentSpec)            build a client and a lock handle
    worker -> ("ready", error | None)
    parent -> ("go", start_ns, deadline_ns)
    worker -> ("done", WorkerReport)
    parent -> ("stop",)

After a worker reports an error the parent terminates the whole pool (a failed worker may hold
the lock) and spawns a fresh one for the next contender.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import redis

from ._locks import lock_contender
from ._model import CLIENT_OPTIONS, LockOps

__all__ = ["SegmentSpec", "WorkerReport", "worker_main"]

# The last stretch of a critical section is spun rather than slept, so each lasts its length.
_SPIN_NS = 150_000


@dataclass(frozen=True)
class SegmentSpec:
    """What one segment runs: which contender, on which names, how long a section lasts."""

    contender: str
    lock_name: str
    counter_key: str
    ttl: float
    section_ns: int


@dataclass
class WorkerReport:
    """What one worker saw in one segment: its sections and its last (uncounted) wait."""

    index: int
    sections: list[tuple[int, int, int]] = field(default_factory=list)  # asked, acquired, released
    final_wait_ns: int | None = None
    failed_acquires: int = 0
    error: str | None = None


def worker_main(conn: Connection, index: int, urls: tuple[str, ...], seed: int) -> None:
    """Serve segments until told to stop (the target of each spawned worker process)."""
    random.seed(seed * 1000 + index)  # pottery's retry jitter draws from the global RNG
    # Move the import-time heap out of the collector's reach: otherwise each process runs one
    # ~20 ms full collection of it at some point, stalling whichever contender happens to run.
    gc.collect()
    gc.freeze()
    conn.send(("hello", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message[0] == "segment":
            gc.collect()
            _segment(conn, index, urls, message[1])
        elif message[0] == "stop":
            return


def _segment(conn: Connection, index: int, urls: tuple[str, ...], spec: SegmentSpec) -> None:
    clients: list[redis.Redis] = []
    report = WorkerReport(index)
    try:
        clients = [redis.Redis.from_url(url, **CLIENT_OPTIONS) for url in urls]
        data = redis.Redis.from_url(urls[0], **CLIENT_OPTIONS)
        clients.append(data)
        ops = lock_contender(spec.contender).factory(clients[:-1], spec.lock_name, spec.ttl)
        for client in clients:
            client.ping()
    except Exception:
        _close(clients)
        conn.send(("ready", traceback.format_exc()))  # the parent then replaces the pool
        return
    conn.send(("ready", None))
    go = conn.recv()
    if go[0] == "go":
        try:
            _loop(ops, data, spec, go[1], go[2], report)
        except Exception:
            report.error = traceback.format_exc()
    conn.send(("done", report))
    _close(clients)


def _loop(
    ops: LockOps,
    data: redis.Redis,
    spec: SegmentSpec,
    start_ns: int,
    deadline_ns: int,
    report: WorkerReport,
) -> None:
    acquire, release = ops
    get, put, counter = data.get, data.set, spec.counter_key
    clock = time.monotonic_ns
    sections = report.sections
    delay = start_ns - clock()
    if delay > 0:
        time.sleep(delay / 1e9)
    while True:
        asked = clock()
        if asked >= deadline_ns:
            return
        if not acquire():
            report.failed_acquires += 1
            continue
        acquired = clock()
        if acquired >= deadline_ns:  # draining: hand it on, count nothing
            report.final_wait_ns = acquired - asked
            release()
            return
        # The section: a deliberately non-atomic read-modify-write that only a lock makes exact.
        value = get(counter)
        put(counter, int(value or 0) + 1)
        end = acquired + spec.section_ns
        left = end - clock()
        if left > _SPIN_NS:
            time.sleep((left - _SPIN_NS) / 1e9)
        while clock() < end:
            pass
        released = clock()
        release()
        sections.append((asked, acquired, released))


def _close(clients: list[redis.Redis]) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()
