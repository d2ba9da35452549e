"""A seeded chaos soak: locks and caches under process-killing, pausing and partitioning faults.

Several worker processes mix Redlock critical sections (each holder writes to a ``FencedStore``
with its token) and cache traffic (reads, read-throughs, writes, deletes, tag and namespace
invalidations), recording every operation in a history (:mod:`distkit.testing._history`). A
nemesis in the coordinating process injects one fault at a time, from a seeded schedule:

- on one of three Redlock masters (a minority): SIGKILL then a *delayed* restart without data
  (down longer than the lock TTL, as Redlock requires), SIGSTOP / SIGCONT, a network partition
  (the master's ``FaultProxy`` black-holes) or cut connections;
- on the cache server: restart without data, pause, partition, latency;
- on the protected resource (the fenced store's server): pause.

The lock side also generates what broke distlock in issue 13: the workers are forked by one parent
from lock handles it built before the fork; a single-instance ``Lock`` is contended by every
worker (FIFO waiters blocked in BLPOP) while the nemesis cuts its connections under queued waiters,
adds latency and stops whole workers; workers stall before BLPOP; asyncio workers cancel acquire,
extend and release at their k-th await point, k counting up; the Redlock masters' clocks are
skewed. ``check_orphans`` and ``check_validity`` judge the single lock's leases, sampled by the
coordinator.

Now and then a worker also stalls inside its critical section for longer than its lease and then
writes anyway, as a paused process would: the fenced store must refuse the write when a newer
holder has written since.

Afterwards the checkers must report no mutual-exclusion violation (``check_mutex``), no stale
fenced write accepted (``check_fencing``) and no stale cache read (``check_cache``); every lease
must be gone within its TTL (no leaked lock), every worker must have stopped by its deadline (no
stuck process) and every worker's resident memory must stay bounded. A one-screen summary
reports operations, faults and violations.

Run it::

    python -m distkit.testing.chaos --seconds 60 --seed 7          # --minutes 10 for a long soak

The exit status is 0 when every check passed. ``tests/test_chaos.py`` runs a short soak in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio

from distkit.testing._history import (
    CheckResult,
    HistoryRecorder,
    check_cache,
    check_fencing,
    check_mutex,
    check_orphans,
    check_validity,
    read_history,
)
from distkit.testing._proxy import FaultProxy
from distkit.testing._server import RedisServer

__all__ = ["SoakConfig", "SoakReport", "main", "run_soak"]

_MASTERS = 3
_LOCK_NAMES = ("chaos-a", "chaos-b")
_SINGLE = "chaos-s"  # one single-instance Lock that every worker contends for (FIFO handoffs)
_CANCEL_TARGETS = ("acquire", "extend", "release")
_NEW_FAULTS = 3  # the first entries of _faults(): the lock faults, injected every other turn
_CACHE_KEYS = tuple(f"key{i}" for i in range(8))
_MISS = "<miss>"
_FILL_LOCK_TTL = 30.0  # distcache's default fill-lock lease (StampedePolicy.lock_ttl)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class SoakConfig:
    """What a soak runs.

    Attributes:
        seconds: how long the workers and the nemesis run.
        seed: seeds the fault schedule and every worker's choice of operations.
        workers: worker processes (each mixes lock sections and cache traffic).
        lock_ttl: Redlock lease, seconds (a killed master stays down longer than this).
        cache_ttl: time to live of cache entries, seconds (short, so expiry happens too).
        fault_gap: pause between two faults, seconds (drawn up to this).
        rss_limit_mb: no worker may exceed this resident size.
        rss_growth_mb: no worker may grow more than this after its warm-up.
        directory: where histories and server files go (default: a temporary directory).
        cache_options: extra keyword arguments for every worker's ``Cache`` (picklable), e.g.
            a near cache's settings; they override the variant each worker draws from its seed
            (stale windows, early refresh, a near cache: see ``_cache_variant``).
        stale_bound: staleness the cache check allows every read, in seconds (``0``: none).
        near_bound: staleness allowed to reads served by a worker's near cache: its coherence
            bound, two ``health_check_interval`` of the soak's near caches when a partition
            silences the listener (docs/cache.md, "Near cache"), plus the largest latency fault.
        master_skew: wall-clock offset of each Redlock master, seconds (a preload library
            shifts the clock the server reads, so the ``TIME`` its scripts read is skewed;
            needs a C compiler, else ignored and reported).
        orphan_bound: how long a lease may outlive every operation that could own it, seconds
            (``check_orphans``).
        validity_tolerance: how much later than the server's lease end a holder's reported
            validity may end, seconds (``check_validity``).
    """

    seconds: float = 30.0
    seed: int = 1
    workers: int = 4
    lock_ttl: float = 2.0
    cache_ttl: float = 5.0
    fault_gap: float = 1.0
    rss_limit_mb: float = 512.0
    rss_growth_mb: float = 64.0
    directory: Path | None = None
    cache_options: Mapping[str, Any] = field(default_factory=dict)
    stale_bound: float = 0.0
    master_skew: tuple[float, ...] = (0.0, 0.1, -0.1)
    orphan_bound: float = 0.5
    validity_tolerance: float = 0.005
    near_bound: float = 2 * 0.25 + 0.1


@dataclass
class SoakReport:
    """What a soak observed; ``ok`` when every check passed."""

    config: SoakConfig
    operations: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    checks: list[CheckResult] = field(default_factory=list)
    leaked_locks: list[str] = field(default_factory=list)
    stuck_workers: list[str] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    rss_mb: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker: (first, max)
    memory_problems: list[str] = field(default_factory=list)
    skew: tuple[float, ...] = ()  # the masters' clock offsets really applied (empty: none)
    elapsed: float = 0.0

    @property
    def violations(self) -> int:
        """How many violations the history checkers found."""
        return sum(len(c.violations) for c in self.checks)

    @property
    def ok(self) -> bool:
        """True when every check passed and the soak did some work."""
        return (
            self.violations == 0
            and not self.leaked_locks
            and not self.stuck_workers
            and not self.worker_errors
            and not self.memory_problems
            and self.operations["acquire:ok"] > 0
            and self.operations["read:ok"] > 0
        )

    def summary(self) -> str:
        """A one-screen report: operations, faults injected, violations, leaks, memory."""
        cfg = self.config
        ops = ", ".join(f"{k}={v}" for k, v in sorted(self.operations.items()))
        faults = ", ".join(f"{k}={v}" for k, v in sorted(self.faults.items())) or "none"
        lines = [
            f"chaos soak: seed={cfg.seed} workers={cfg.workers} {self.elapsed:.1f}s "
            f"-> {'PASS' if self.ok else 'FAIL'}",
            f"operations: {ops}",
            f"faults injected ({sum(self.faults.values())}): {faults}",
            "master clock skew: "
            + (", ".join(f"{x * 1000:+.0f}ms" for x in self.skew) or "none (no C compiler)"),
        ]
        for check in self.checks:
            lines.append(check.summary(limit=1))  # one screen; report.checks has them all
        lines.append(f"leaked locks: {len(self.leaked_locks)} {self.leaked_locks[:5]}")
        lines.append(f"stuck workers: {len(self.stuck_workers)} {self.stuck_workers}")
        if self.worker_errors:
            lines.append(f"worker errors: {self.worker_errors[:5]}")
        rss = ", ".join(f"{w}={a:.0f}->{b:.0f}MB" for w, (a, b) in sorted(self.rss_mb.items()))
        lines.append(f"memory (first->max RSS): {rss or 'no samples'}")
        lines.extend(f"memory problem: {p}" for p in self.memory_problems)
        return "\n".join(lines)


@dataclass(frozen=True)
class _WorkerSpec:
    name: str
    seed: int
    stop_at_ns: int
    history: str
    log: str
    masters: tuple[int, ...]  # proxy ports
    resource: int
    cache: int  # proxy port
    lock_ttl: float
    cache_ttl: float
    cache_options: Mapping[str, Any]
    single: int = 0  # proxy port of the single-instance Lock's server
    mode: str = "sync"  # "async": single-lock sections through AsyncLock / AsyncRedlock


class _StallingRedis(redis.Redis):
    """A client that may stall (as a GC pause or preemption would) right before each BLPOP:
    between the reply that queued a waiter and its blocking wait for the handoff."""

    stall: Callable[[], None] | None = None

    def execute_command(self, *args: Any, **options: Any) -> Any:
        """Stall first when the command is a BLPOP, then send it."""
        if self.stall is not None and args and args[0] == "BLPOP":
            self.stall()
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class _AsyncStallingRedis(redis.asyncio.Redis):
    """The asyncio twin of ``_StallingRedis``."""

    stall: Callable[[], Awaitable[None]] | None = None

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Stall first when the command is a BLPOP, then send it."""
        if self.stall is not None and args and args[0] == "BLPOP":
            await self.stall()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class _Handles:
    """The lock handles of every worker, built once by the parent *before* it forks the workers
    (a module-level lock in a pre-fork server): the workers share these very objects."""

    def __init__(self, spec: _WorkerSpec) -> None:
        from distkit import RedisConfig, aconnect, connect
        from distlock import Lock, Redlock

        def config(port: int) -> RedisConfig:
            return RedisConfig(
                host="127.0.0.1", port=port, connect_timeout=0.25, socket_timeout=0.25
            )

        self.spec = spec
        masters = [connect(config(port)) for port in spec.masters]
        self.redlocks = {
            name: Redlock(masters, name, ttl=spec.lock_ttl, node_timeout=0.15, retry_delay=0.05)
            for name in _LOCK_NAMES
        }
        self.client = _StallingRedis(
            connection_pool=cast(redis.Redis, connect(config(spec.single))).connection_pool
        )
        self.single = Lock(self.client, _SINGLE, ttl=spec.lock_ttl)
        self.aclient = _AsyncStallingRedis(
            connection_pool=cast(redis.asyncio.Redis, aconnect(config(spec.single))).connection_pool
        )
        self._amasters = [aconnect(config(port)) for port in spec.masters]
        self.asingle = self.new_async_single()
        self.aredlock = self.new_async_redlock()

    def new_async_single(self) -> Any:
        """An ``AsyncLock`` on the single lock, renewing itself (a replacement after abandon)."""
        from distlock import AsyncLock

        ttl = self.spec.lock_ttl
        return AsyncLock(self.aclient, _SINGLE, ttl=ttl, auto_renew=True, renew_interval=ttl / 4)

    def new_async_redlock(self) -> Any:
        """An ``AsyncRedlock`` on the first Redlock name, renewing itself."""
        from distlock import AsyncRedlock

        ttl = self.spec.lock_ttl
        return AsyncRedlock(
            self._amasters, _LOCK_NAMES[0], ttl=ttl, node_timeout=0.15, retry_delay=0.05,
            auto_renew=True, renew_interval=ttl / 4,
        )  # fmt: skip

    def warm_up(self, rec: HistoryRecorder) -> None:
        """Use the sync handles once, as a pre-fork parent may (opens their connections); the
        parent's sections go into the history like any worker's (the sampler sees them)."""
        for name, lock in [*self.redlocks.items(), (_SINGLE, self.single)]:
            rec.invoke("acquire", lock=name, owner_prefix=_owner_prefix(lock))
            try:
                got = lock.acquire(timeout=0.5)
            except Exception as exc:
                rec.info("acquire", lock=name, error=type(exc).__name__)
                continue
            if not got:
                rec.fail("acquire", lock=name)
                continue
            owner = _owner(lock)
            rec.ok("acquire", lock=name, owner=owner, token=lock.fencing_token)
            rec.invoke("release", lock=name, owner=owner)
            try:
                lock.release()
            except Exception as exc:
                rec.info("release", lock=name, owner=owner, error=type(exc).__name__)
            else:
                rec.ok("release", lock=name, owner=owner)


def _owner(lock: Any) -> str | None:
    """The owner id of the handle's current acquisition (test tooling reads the core)."""
    owner = getattr(getattr(lock, "_core", None), "owner", None)
    return owner if isinstance(owner, str) else None


def _owner_prefix(lock: Any) -> str | None:
    """The handle's owner-id prefix: the owner of an attempt that never reported its id."""
    prefix = getattr(getattr(lock, "_core", None), "_owner_prefix", None)
    return prefix if isinstance(prefix, str) else None


class _CancelAt:
    """Await ``coro``, cancelling the awaiting task at its ``k``-th suspension (1-based): every
    await point of an operation is reached by cycling ``k`` upwards until ``fired`` stays false."""

    def __init__(self, coro: Awaitable[Any], k: int) -> None:
        self._coro = coro
        self._k = k
        self.fired = False

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self._coro.__await__()
        steps = 0
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = inner.send(send) if error is None else inner.throw(error)
            except StopIteration as stop:
                if self.fired:  # the operation swallowed the cancellation: absorb a pending one
                    with contextlib.suppress(asyncio.CancelledError):
                        yield None
                return stop.value
            steps += 1
            if steps == self._k:
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # lands on the future just yielded: this very await point
                self.fired = True
            try:
                send, error = (yield yielded), None
            except BaseException as exc:  # thrown into the operation, as asyncio would
                send, error = None, exc


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _tag_of(key: str) -> str:
    return f"g{int(key[3:]) % 3}"


def _cache_variant(seed: int) -> dict[str, Any]:
    """A worker's cache options, drawn from its seed: stale windows, early refresh, a near cache.

    A stream of its own, so the worker's choice of operations does not change with it. Early
    refresh needs a loader that takes time (XFetch scales with it): ``load_s`` is the chaos
    loader's own option, not the cache's.
    """
    from distcache import NearCache

    rng = random.Random(f"cache-variant-{seed}")
    options: dict[str, Any] = {}
    if rng.random() < 0.5:
        options["stale_while_revalidate"] = 1.0
    if rng.random() < 0.5:
        options["stale_if_error"] = 3.0
    beta = rng.choice([0.0, 1.0, 30.0])
    options["early_refresh"] = beta
    options["load_s"] = 0.01 if beta else 0.0
    if rng.random() < 0.5:
        options["near_cache"] = NearCache(health_check_interval=0.25)
    return options


def _worker(spec: _WorkerSpec, handles: _Handles | None = None) -> None:
    """One worker process: lock sections and cache operations until ``stop_at_ns``.

    ``handles``: the lock handles built by the parent before it forked this worker.
    """
    import logging

    logging.basicConfig(  # the fail-open warnings go to the run's directory, not the screen
        filename=spec.log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    import threading

    from distcache import Cache, CacheEvent, CounterMetrics
    from distkit import DistkitError, RedisConfig, connect
    from distlock import FencedStore, LockNotOwned, StaleFencingToken

    rng = random.Random(spec.seed)

    def config(port: int) -> RedisConfig:
        return RedisConfig(host="127.0.0.1", port=port, connect_timeout=0.25, socket_timeout=0.25)

    handles = handles if handles is not None else _Handles(spec)
    locks = handles.redlocks
    stores = {
        name: FencedStore(connect(config(spec.resource)), name) for name in (*_LOCK_NAMES, _SINGLE)
    }
    options = {**_cache_variant(spec.seed), **spec.cache_options}
    load_s = float(options.pop("load_s", 0.0))
    metrics = options.setdefault("metrics", CounterMetrics())
    cache = Cache(connect(config(spec.cache)), namespace="chaos", ttl=spec.cache_ttl, **options)
    # An entry lives ttl + the larger stale window in Redis (its hard bound), and any worker's
    # read may return it until then (a read-through within its window, a cache without one as
    # a hit): that is the expiry the checker holds this worker's writes to.
    grace = max(float(options.get(w, 0.0)) for w in ("stale_while_revalidate", "stale_if_error"))
    write_ttl = spec.cache_ttl + grace
    seq = 0
    foreground = threading.get_ident()
    background = threading.Lock()  # a background fill's two events stay adjacent
    seen: dict[tuple[str, str], int] = {}  # (key, value): when this worker first got it
    local: list[tuple[int, int, str, str]] = []  # its completed invalidations: start, end, scope

    def counts() -> tuple[int, int, int]:
        if not isinstance(metrics, CounterMetrics):
            return 0, 0, 0
        return (
            metrics.count(CacheEvent.STALE_SERVED),
            metrics.count(CacheEvent.ERROR) + metrics.count(CacheEvent.SHORT_CIRCUIT),
            metrics.count(CacheEvent.NEAR_HIT),
        )

    def locally_invalidated(key: str, value: Any, start: int) -> bool:
        """Whether this worker invalidated ``key`` after it first got ``value`` and before
        ``start``: its stale-if-error copy must not survive that (C8)."""
        first = seen.get((key, str(value)))
        if first is None:
            return False
        return any(
            s > first and e < start and target in (key, _tag_of(key), "")
            for s, e, _, target in local
        )

    with (
        HistoryRecorder(spec.history, spec.name) as rec,
        HistoryRecorder(spec.history.replace(".jsonl", "-bg.jsonl"), f"{spec.name}-bg") as bg,
    ):
        rec.info("cache-options", value=repr(sorted(options.items())))
        rec.info("forked", value=os.getpid(), parent=os.getppid())

        def stall() -> None:
            if rng.random() < 0.3:
                pause = rng.uniform(0.01, 0.15)
                rec.info("stall before BLPOP", value=pause)
                time.sleep(pause)

        async def astall() -> None:
            if rng.random() < 0.3:
                pause = rng.uniform(0.01, 0.15)
                rec.info("stall before BLPOP", value=pause)
                time.sleep(pause)  # noqa: ASYNC251 - the whole process stalls, as a GC pause does

        handles.client.stall = stall
        handles.aclient.stall = astall

        def write_fenced(name: str, token: int) -> None:
            nonlocal seq
            seq += 1
            value = f"{spec.name}-{seq}"
            rec.invoke("write", token=token, resource=name, value=value)
            try:
                stores[name].write(token, value)
            except StaleFencingToken as exc:
                rec.fail("write", token=token, resource=name, highest=exc.highest)
            except DistkitError as exc:
                rec.info("write", token=token, resource=name, error=type(exc).__name__)
            else:
                rec.ok("write", token=token, resource=name, value=value)

        def single_section() -> None:
            # The single-instance Lock, contended by every worker: waiters queue for FIFO
            # handoffs (blocked in BLPOP) while the nemesis cuts connections and adds latency.
            lock = handles.single
            rec.invoke("acquire", lock=_SINGLE, owner_prefix=_owner_prefix(lock))
            try:
                got = lock.acquire(timeout=rng.uniform(0.2, 1.0))
            except DistkitError as exc:
                rec.info("acquire", lock=_SINGLE, error=type(exc).__name__)
                return
            if not got:
                rec.fail("acquire", lock=_SINGLE)
                return
            now = time.monotonic_ns()
            validity = lock.validity
            token, owner = lock.fencing_token, _owner(lock)
            rec.record(
                "acquire", "ok", token=token, time_ns=now, validity=validity,
                ttl=spec.lock_ttl, lock=_SINGLE, owner=owner,
            )  # fmt: skip
            time.sleep(rng.uniform(0, 0.05))
            now = time.monotonic_ns()
            with contextlib.suppress(DistkitError):
                lock.ensure_held()
                rec.record(
                    "held", "ok", time_ns=now, validity=lock.validity, lock=_SINGLE, owner=owner
                )
                if token is not None:
                    write_fenced(_SINGLE, token)
            rec.invoke("release", lock=_SINGLE, owner=owner)
            try:
                lock.release()
            except LockNotOwned:
                rec.fail("release", lock=_SINGLE, owner=owner)
            except DistkitError as exc:
                rec.info("release", lock=_SINGLE, owner=owner, error=type(exc).__name__)
            else:
                rec.ok("release", lock=_SINGLE, owner=owner)

        loop = asyncio.new_event_loop() if spec.mode == "async" else None
        _dump_on_signal(loop, spec.log)
        cancel_k = dict.fromkeys(_CANCEL_TARGETS, 1)
        cancel_turn = 0

        async def cancellable(op: str, target: str, coro: Awaitable[Any], **fields: Any) -> Any:
            """Await one lock operation; when it is this section's target, cancel it at the
            k-th suspension (k cycles 1, 2, ... until the operation completes first)."""
            if op != target:
                return await coro
            k = cancel_k[op]
            wrapped = _CancelAt(coro, k)
            try:
                return await wrapped
            finally:
                cancel_k[op] = k + 1 if wrapped.fired else 1
                if wrapped.fired:
                    rec.info(f"cancel {op}", k=k, **fields)

        async def async_section() -> None:
            # AsyncLock / AsyncRedlock with auto-renew, cancelled systematically at every await
            # point of acquire, extend and release (renewal runs, and is stopped, underneath).
            nonlocal cancel_turn
            redlock = rng.random() < 0.3
            lock = handles.aredlock if redlock else handles.asingle
            name = _LOCK_NAMES[0] if redlock else _SINGLE
            target = _CANCEL_TARGETS[cancel_turn % len(_CANCEL_TARGETS)]
            cancel_turn += 1
            rec.invoke("acquire", lock=name, owner_prefix=_owner_prefix(lock))
            try:
                got = await cancellable(
                    "acquire", target, lock.acquire(timeout=rng.uniform(0.2, 1.0)), lock=name
                )
            except asyncio.CancelledError:
                rec.info("acquire", lock=name, error="CancelledError", owner=_owner(lock))
                if lock.fencing_token is not None:  # the call raised, yet the handle holds
                    rec.info("abandon", lock=name, owner=_owner(lock))
                    replace(redlock)
                return
            except DistkitError as exc:
                rec.info("acquire", lock=name, error=type(exc).__name__)
                return
            if not got:
                rec.fail("acquire", lock=name)
                return
            now = time.monotonic_ns()
            validity = lock.validity
            token, owner = lock.fencing_token, _owner(lock)
            rec.record(
                "acquire", "ok", token=token, time_ns=now, validity=validity,
                ttl=spec.lock_ttl, lock=name, owner=owner,
            )  # fmt: skip
            if token is not None and validity > 0.1:
                write_fenced(name, token)
            await asyncio.sleep(rng.uniform(0, 0.03))
            if target == "extend" or rng.random() < 0.3:
                rec.invoke("extend", lock=name, owner=owner)
                try:
                    await cancellable("extend", target, lock.extend(), lock=name)
                except asyncio.CancelledError:
                    rec.info("extend", lock=name, owner=owner, error="CancelledError")
                except DistkitError as exc:
                    rec.info("extend", lock=name, owner=owner, error=type(exc).__name__)
                else:
                    now = time.monotonic_ns()
                    rec.record(
                        "extend", "ok", time_ns=now, validity=lock.validity, lock=name,
                        owner=owner,
                    )  # fmt: skip
            rec.invoke("release", lock=name, owner=owner)
            try:
                await cancellable("release", target, lock.release(), lock=name)
            except asyncio.CancelledError:
                rec.info("release", lock=name, owner=owner, error="CancelledError")
            except LockNotOwned:
                rec.fail("release", lock=name, owner=owner)
            except DistkitError as exc:
                rec.info("release", lock=name, owner=owner, error=type(exc).__name__)
            else:
                rec.ok("release", lock=name, owner=owner)
            if lock.fencing_token is not None:
                # The handle still believes it holds after its release finished: give it up
                # (a fresh handle takes over); whatever it left on the server stays there.
                rec.info("abandon", lock=name, owner=owner)
                replace(redlock)

        def replace(redlock: bool) -> None:
            if redlock:
                handles.aredlock = handles.new_async_redlock()
            else:
                handles.asingle = handles.new_async_single()

        def lock_section() -> None:
            nonlocal seq
            roll = rng.random()
            if loop is not None and roll < 0.5:
                loop.run_until_complete(async_section())
                return
            if roll < 0.5:
                single_section()
                return
            name = rng.choice(_LOCK_NAMES)
            lock = locks[name]
            rec.invoke("acquire", lock=name)
            try:
                got = lock.acquire(timeout=rng.uniform(0.05, 0.4))
            except DistkitError as exc:
                rec.info("acquire", lock=name, error=type(exc).__name__)
                return
            if not got:
                rec.fail("acquire", lock=name)
                return
            now = time.monotonic_ns()
            validity = lock.validity  # read after `now`: the record stays conservative
            token = lock.fencing_token
            rec.record(
                "acquire", "ok", token=token, time_ns=now, validity=validity,
                ttl=spec.lock_ttl, lock=name, owner=_owner(lock),
            )  # fmt: skip
            if rng.random() < 0.02:
                # A holder that stalls (a GC pause, a swapped-out process) past its lease, then
                # writes anyway: the fenced store must refuse it if a newer holder wrote since.
                rec.info("stall", lock=name, token=token)
                time.sleep(spec.lock_ttl * 1.25)
                validity = 1.0
            if token is not None and validity > 0.1:
                seq += 1
                value = f"{spec.name}-{seq}"
                rec.invoke("write", token=token, resource=name, value=value)
                try:
                    stores[name].write(token, value)
                except StaleFencingToken as exc:
                    rec.fail("write", token=token, resource=name, highest=exc.highest)
                except DistkitError as exc:
                    rec.info("write", token=token, resource=name, error=type(exc).__name__)
                else:
                    rec.ok("write", token=token, resource=name, value=value)
            time.sleep(rng.uniform(0, 0.02))
            rec.invoke("release", lock=name)
            try:
                lock.release()
            except LockNotOwned:
                rec.fail("release", lock=name)
            except DistkitError as exc:
                rec.info("release", lock=name, error=type(exc).__name__)
            else:
                rec.ok("release", lock=name)

        def cache_op() -> None:
            nonlocal seq
            key = rng.choice(_CACHE_KEYS)
            tag = _tag_of(key)
            roll = rng.random()
            seq += 1
            value = f"{spec.name}-{seq}"
            if roll < 0.40:
                before = counts()
                rec.invoke("read", key=key)
                got = cache.get(key, _MISS)
                if got == _MISS:
                    rec.ok("read", key=key, hit=False)
                else:
                    seen.setdefault((key, str(got)), time.monotonic_ns())
                    near = {"tier": "near"} if counts()[2] > before[2] else {}
                    rec.ok("read", key=key, value=got, **near)
            elif roll < 0.75:
                born: list[int] = []

                def loader() -> str:
                    now = time.monotonic_ns()
                    if load_s:
                        time.sleep(load_s)
                    if threading.get_ident() == foreground:
                        born.append(now)
                        return value
                    # a background refresh (early refresh, stale-while-revalidate): its fill
                    with background:
                        bg.record(
                            "fill", "invoke", key=key, value=value, tags=[tag],
                            ttl=write_ttl, born=now, time_ns=now,
                        )  # fmt: skip
                        bg.info("fill", key=key, value=value, tags=[tag], born=now)
                    return value

                before = counts()
                start = time.monotonic_ns()
                rec.record("read", "invoke", key=key, time_ns=start)
                got = cache.get_or_set(key, loader, tags=[tag])
                after = counts()
                if born:  # a miss: the loader ran, and its result may have been stored
                    rec.fail("read", key=key)
                    rec.record(
                        "fill", "invoke", key=key, value=value, tags=[tag],
                        ttl=write_ttl, born=born[0], time_ns=born[0],
                    )  # fmt: skip
                    rec.info("fill", key=key, value=value, tags=[tag], born=born[0])
                elif after[0] > before[0] and after[1] > before[1]:
                    # stale_if_error with Redis failing: this process's last copy, which may
                    # predate another process's invalidation (documented), never its own (C8):
                    # a read the checker sees only if this worker invalidated it since
                    flagged = locally_invalidated(key, got, start)
                    (rec.ok if flagged else rec.info)("read", key=key, value=got, stale=True)
                else:
                    near = {"tier": "near"} if after[2] > before[2] else {}
                    rec.ok("read", key=key, value=got, **near)
                seen.setdefault((key, str(got)), time.monotonic_ns())
            elif roll < 0.85:
                rec.invoke("write", key=key, value=value, tags=[tag], ttl=write_ttl)
                stored = cache.set(key, value, tags=[tag])
                outcome = rec.ok if stored else rec.info
                outcome("write", key=key, value=value, tags=[tag], ttl=write_ttl)
            else:
                fields: dict[str, Any]
                if roll < 0.93:
                    op, fields = "delete", {"key": key}
                elif roll < 0.99:
                    op, fields = "invalidate", {"tag": tag}
                else:
                    op, fields = "invalidate", {}
                begun = rec.invoke(op, **fields).time
                try:
                    if op == "delete":
                        cache.delete(key)
                    elif fields:
                        cache.invalidate_tags(tag)
                    else:
                        cache.clear()
                except DistkitError as exc:
                    rec.info(op, error=type(exc).__name__, **fields)
                else:
                    done = rec.ok(op, **fields).time
                    local.append((begun, done, op, str(next(iter(fields.values()), ""))))

        ops = 0
        while time.monotonic_ns() < spec.stop_at_ns:
            if rng.random() < 0.35:
                lock_section()
            else:
                cache_op()
            ops += 1
            if ops % 25 == 1:
                rec.info("rss", value=_rss_bytes())
        rec.info("rss", value=_rss_bytes())
        cache.drain(5.0)  # background refreshes record into ``bg``: let them finish first
        cache.close()


def _dump_on_signal(loop: asyncio.AbstractEventLoop | None, log: str) -> None:
    """On SIGUSR1, append every thread's stack and every task of ``loop`` to the worker's
    ``log``: what a stuck worker was waiting for, before the parent kills it."""

    def dump(signum: int, frame: Any) -> None:
        import faulthandler

        with open(log, "a", encoding="utf-8") as out:
            out.write("== stuck: thread stacks\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            if loop is not None:
                out.write("== stuck: asyncio tasks\n")
                for task in asyncio.all_tasks(loop):
                    task.print_stack(file=out)

    signal.signal(signal.SIGUSR1, dump)


def _forker(specs: Sequence[_WorkerSpec], status: str) -> None:
    """The workers' parent: build the lock handles, use them once, then fork every worker with
    them (``os.fork``), wait for the workers and write their fate to ``status`` (JSON)."""
    handles = _Handles(specs[0])
    with HistoryRecorder(Path(specs[0].history).with_name("parent.jsonl"), "parent") as rec:
        handles.warm_up(rec)
    children: dict[int, str] = {}
    for spec in specs:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends in os._exit
            code = 1
            try:
                _worker(spec, handles)
                code = 0
            except BaseException:  # reported through the exit status
                traceback.print_exc()
            finally:
                os._exit(code)
        children[pid] = spec.name
    with open(Path(status).with_suffix(".pids"), "w", encoding="ascii") as handle:
        handle.write(json.dumps(children))
    deadline = time.monotonic() + max(0.0, (specs[0].stop_at_ns - time.monotonic_ns()) / 1e9)
    deadline += 15.0
    errors: list[str] = []
    while children and time.monotonic() < deadline:
        pid, wait_status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        name = children.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if code != 0:
            errors.append(f"{name} exited with {code}")
    stuck = sorted(children.values())
    for pid in children:  # their stacks first (see _dump_on_signal), then the end
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGUSR1)
    if children:
        time.sleep(1.0)
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    with open(status, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"stuck": stuck, "errors": errors}))


# A preload library that offsets the wall clock redis-server reads (TIME, and its expiry clock
# with it): libfaketime cannot be used, as it deadlocks with the jemalloc of Debian's redis-server
# (wolfcw/libfaketime#130). It calls the kernel directly: no dlsym, no malloc, no recursion.
_SKEW_SOURCE = r"""
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long offset_ns;

__attribute__((constructor)) static void skew_init(void) {
    const char *value = getenv("DISTKIT_CLOCK_OFFSET_NS");
    offset_ns = value ? atoll(value) : 0;
}

static void shift(struct timespec *ts) {
    long long ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ns;
    ts->tv_sec = ns / 1000000000LL;
    ts->tv_nsec = ns % 1000000000LL;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    int rc = (int)syscall(SYS_clock_gettime, id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shift(ts);
    return rc;
}

int gettimeofday(struct timeval *tv, void *tz) {
    struct timespec ts;
    (void)tz;
    if (tv == NULL) return 0;
    clock_gettime(CLOCK_REALTIME, &ts);
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
    return 0;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out) *out = ts.tv_sec;
    return ts.tv_sec;
}
"""


def _skew_library(directory: Path) -> Path | None:
    """Build the clock-offset preload library (needs a C compiler); None when it cannot."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source, library = directory / "skew.c", directory / "libdistkitskew.so"
    source.write_text(_SKEW_SOURCE, encoding="ascii")
    import subprocess

    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(source)],
        capture_output=True,
        check=False,
    )
    return library if built.returncode == 0 else None


def _skewed_binary(directory: Path, binary: str | None, offset: float) -> str | None:
    """A wrapper that runs ``redis-server`` with its wall clock offset by ``offset`` seconds;
    None when the preload library cannot be built."""
    library = directory / "libdistkitskew.so"
    if not library.exists() and _skew_library(directory) is None:
        return None
    from distkit.testing._server import find_redis_server

    real = binary or find_redis_server()
    script = directory / f"redis-server-skew{offset:+.3f}"
    script.write_text(
        "#!/bin/sh\n"
        f"LD_PRELOAD={library} DISTKIT_CLOCK_OFFSET_NS={round(offset * 1e9)} "
        f'exec {real} "$@"\n',
        encoding="ascii",
    )
    script.chmod(0o755)
    return str(script)


def _sample_leases(rig: _Rig, path: Path, stop: threading.Event) -> None:
    """Record the single lock's lease (owner, PTTL) every few ms as ``lease`` events."""
    import redis

    from distkit._keys import KeySpace

    key = KeySpace("distkit").key("lock", _SINGLE)
    script = "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}"
    client = redis.Redis(
        host="127.0.0.1", port=rig.lock.port, socket_timeout=0.5, socket_connect_timeout=0.5
    )
    with HistoryRecorder(path, "sampler") as rec:
        while not stop.wait(0.01):
            sent = time.monotonic_ns()
            try:
                owner, pttl = client.eval(script, 1, key)
            except redis.RedisError:
                continue
            rec.info(
                "lease", lock=_SINGLE, owner=owner.decode() if owner else None, pttl=int(pttl),
                sent=sent,
            )  # fmt: skip
    client.close()


# -- the nemesis ----------------------------------------------------------------------------------


class _Rig:
    """The servers and proxies of one soak."""

    def __init__(self, directory: Path, binary: str | None, skew: Sequence[float] = ()) -> None:
        self._stack = contextlib.ExitStack()
        offsets = [skew[i] if i < len(skew) else 0.0 for i in range(_MASTERS)]
        wrappers = [_skewed_binary(directory, binary, x) if x else binary for x in offsets]
        skewed = all(w is not None for w, x in zip(wrappers, offsets, strict=True) if x)
        self.skew = tuple(offsets) if any(offsets) and skewed else ()
        self.masters = [
            self._stack.enter_context(
                RedisServer(
                    directory=directory / f"m{i}",
                    binary=(wrappers[i] or binary) if self.skew else binary,
                )
            )
            for i in range(_MASTERS)
        ]
        self.master_proxies = [
            self._stack.enter_context(FaultProxy(m.address)) for m in self.masters
        ]
        self.resource = self._stack.enter_context(
            RedisServer(directory=directory / "resource", binary=binary, persistence=True)
        )
        self.cache = self._stack.enter_context(
            RedisServer(directory=directory / "cache", binary=binary)
        )
        self.cache_proxy = self._stack.enter_context(FaultProxy(self.cache.address))
        self.lock = self._stack.enter_context(
            RedisServer(directory=directory / "lock", binary=binary)
        )
        self.lock_proxy = self._stack.enter_context(FaultProxy(self.lock.address))
        self.worker_pids: list[int] = []
        self.pids_file = directory / "workers.pids"
        self.directory = directory

    def heal(self) -> None:
        """Undo every fault: servers running and resumed, proxies clean, workers running."""
        for server in [*self.masters, self.resource, self.cache, self.lock]:
            if not server.running:
                server.restart(keep_data=False)
            elif server.paused:
                server.resume()
        for proxy in [*self.master_proxies, self.cache_proxy, self.lock_proxy]:
            proxy.reset()
        for pid in self.worker_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop every server and proxy."""
        self._stack.close()


def _faults(rig: _Rig, cfg: SoakConfig) -> list[tuple[str, Callable[[random.Random], None]]]:
    def on_master(action: Callable[[int, random.Random], None]) -> Callable[[random.Random], None]:
        return lambda rng: action(rng.randrange(_MASTERS), rng)

    def kill_master(i: int, rng: random.Random) -> None:
        rig.masters[i].kill()
        time.sleep(cfg.lock_ttl * 1.2 + rng.uniform(0, 0.5))  # delayed restart (Redlock's rule)
        rig.masters[i].restart(keep_data=False)

    def pause(server: RedisServer, rng: random.Random) -> None:
        server.pause()
        time.sleep(rng.uniform(0.1, 1.0))
        server.resume()

    def partition(proxy: FaultProxy, rng: random.Random) -> None:
        proxy.blackhole(True)
        time.sleep(rng.uniform(0.2, 1.2))
        proxy.blackhole(False)

    def latency(proxy: FaultProxy, rng: random.Random, most: float = 0.1) -> None:
        proxy.set_latency(rng.uniform(0.01, most))
        time.sleep(rng.uniform(0.3, 1.0))
        proxy.set_latency(0.0)

    def restart_cache(rng: random.Random) -> None:
        rig.cache.restart(keep_data=False)

    def cut_under_waiters(rng: random.Random) -> None:
        # Reset the single lock's connections while waiters are blocked in BLPOP for a handoff
        # (the releaser's handoff pops the token into a reply that the reset loses).
        from distkit._keys import KeySpace

        queue = KeySpace("distkit").key("lock", _SINGLE, "queue")
        cuts = 0
        rig.lock_proxy.set_latency(rng.uniform(0.02, 0.05))  # handoff replies spend time in flight
        with rig.lock.client(socket_timeout=0.5) as client:
            deadline = time.monotonic() + 3.0
            while cuts < 3 and time.monotonic() < deadline:
                if int(client.zcard(queue)) > 0:
                    time.sleep(rng.uniform(0, 0.06))
                    rig.lock_proxy.cut()
                    cuts += 1
                    # Apart by more than one retried call (a few round trips and backoffs): each
                    # cut hits one try of a call and its retry reconnects; cuts that follow each
                    # other faster than the retry policy are an unreachable server, whose
                    # documented outcome (a lease left to its TTL) this fault is not about.
                    time.sleep(rng.uniform(0.3, 0.6))
                else:
                    time.sleep(0.002)
        if not cuts:
            rig.lock_proxy.cut()
            raise _NoWaiter

    def stall_worker(rng: random.Random) -> None:
        # A whole worker process stops (GC, preemption, swapping) wherever it happens to be:
        # between a queueing reply and its BLPOP, inside a section, in a renewal...
        pids = rig.worker_pids or _read_pids(rig)
        if not pids:
            return
        pid = rng.choice(pids)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(pid, signal.SIGCONT)

    return [
        ("cut lock connections under queued waiters", cut_under_waiters),
        ("latency lock", lambda rng: latency(rig.lock_proxy, rng, 0.06)),
        ("stall worker (SIGSTOP)", stall_worker),
        ("kill+restart-empty master", on_master(kill_master)),
        ("pause master", on_master(lambda i, rng: pause(rig.masters[i], rng))),
        ("partition master", on_master(lambda i, rng: partition(rig.master_proxies[i], rng))),
        ("cut master connections", on_master(lambda i, rng: rig.master_proxies[i].cut())),
        ("restart-empty cache", restart_cache),
        ("pause cache", lambda rng: pause(rig.cache, rng)),
        ("partition cache", lambda rng: partition(rig.cache_proxy, rng)),
        ("latency cache", lambda rng: latency(rig.cache_proxy, rng)),
        ("pause resource", lambda rng: pause(rig.resource, rng)),
    ]


class _NoWaiter(Exception):
    """The lock cut found no queued waiter to cut under."""


def _read_pids(rig: _Rig) -> list[int]:
    try:
        rig.worker_pids = [int(pid) for pid in json.loads(rig.pids_file.read_text())]
    except (OSError, ValueError):
        return []
    return rig.worker_pids


def _nemesis(rig: _Rig, cfg: SoakConfig, until_ns: int, report: SoakReport) -> None:
    rng = random.Random(cfg.seed)
    faults = _faults(rig, cfg)
    new, old = faults[:_NEW_FAULTS], faults[_NEW_FAULTS:]
    time.sleep(min(1.0, cfg.seconds / 10))  # let the workers warm up
    turn = 0
    with HistoryRecorder(rig.directory / "history" / "nemesis.jsonl", "nemesis") as rec:
        while time.monotonic_ns() < until_ns:
            turn = _inject(rig, rng, new, old, turn, report, rec)
            time.sleep(rng.uniform(0.1, cfg.fault_gap))


def _inject(
    rig: _Rig,
    rng: random.Random,
    new: Sequence[tuple[str, Callable[[random.Random], None]]],
    old: Sequence[tuple[str, Callable[[random.Random], None]]],
    turn: int,
    report: SoakReport,
    rec: HistoryRecorder,
) -> int:
    """Inject one fault, record it in the history (``fault`` events) and in the report."""
    # Every other fault is one of the lock faults, in turn, so a short soak injects each.
    name, inject = new[(turn // 2) % len(new)] if turn % 2 == 0 else rng.choice(old)
    rec.invoke("fault", value=name)
    try:
        inject(rng)
    except _NoWaiter:
        name += " (no waiter queued)"
    finally:
        rig.heal()
    rec.ok("fault", value=name)
    report.faults[name] += 1
    return turn + 1


def _leases(server: RedisServer) -> dict[str, int]:
    """Every lock lease on ``server`` and its remaining time to live in ms (-1: none)."""
    out: dict[str, int] = {}
    with server.client() as client:
        for raw in client.scan_iter(match="distkit:lock:*"):
            key = raw.decode()
            if key.endswith("}"):  # a lease (its companions end in :fence, :rel...)
                out[key] = int(client.pttl(key))
    return out


def _leaked_locks(rig: _Rig, cfg: SoakConfig) -> list[str]:
    """Leases that outlive their TTL: Redlock leases still present a TTL (plus slack) after the
    workers stopped, and cache fill locks (lease ``_FILL_LOCK_TTL``) that would outlive theirs."""
    deadline = time.monotonic() + cfg.lock_ttl * 1.5 + 1.0
    while True:
        leaked = [f"{m.port}/{key}" for m in [*rig.masters, rig.lock] for key in _leases(m)]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for key, pttl in _leases(rig.cache).items():
        if pttl < 0 or pttl > _FILL_LOCK_TTL * 1000:
            leaked.append(f"{rig.cache.port}/{key} (pttl {pttl} ms)")
    return leaked


def _memory(report: SoakReport, history: Sequence[Any], cfg: SoakConfig) -> None:
    samples: dict[str, list[int]] = {}
    for event in history:
        if event.op == "rss" and isinstance(event.value, int):
            samples.setdefault(event.process, []).append(event.value)
    mb = 1024 * 1024
    for worker, values in samples.items():
        warm = values[min(len(values) - 1, max(1, len(values) // 4))]
        peak = max(values)
        report.rss_mb[worker] = (warm / mb, peak / mb)
        if peak > cfg.rss_limit_mb * mb:
            report.memory_problems.append(f"{worker} reached {peak / mb:.0f} MB")
        if peak - warm > cfg.rss_growth_mb * mb:
            report.memory_problems.append(
                f"{worker} grew {(peak - warm) / mb:.0f} MB after warm-up (limit "
                f"{cfg.rss_growth_mb:g})"
            )
    for i in range(cfg.workers):
        if f"w{i}" not in samples:
            report.memory_problems.append(f"w{i} reported no memory sample")


@contextlib.contextmanager
def _directory(cfg: SoakConfig) -> Iterator[Path]:
    if cfg.directory is not None:
        cfg.directory.mkdir(parents=True, exist_ok=True)
        yield cfg.directory
        return
    path = Path(tempfile.mkdtemp(prefix="distkit-chaos-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_soak(cfg: SoakConfig, *, binary: str | None = None) -> SoakReport:
    """Run one soak (servers, workers, nemesis, checkers) and return its report."""
    report = SoakReport(cfg)
    started = time.monotonic()
    with _directory(cfg) as directory:
        histories = directory / "history"
        histories.mkdir(exist_ok=True)
        rig = _Rig(directory, binary, cfg.master_skew)
        report.skew = rig.skew
        try:
            stop_at = time.monotonic_ns() + round(cfg.seconds * 1e9)
            ctx = mp.get_context("spawn")
            specs = [
                _WorkerSpec(
                    name=f"w{i}",
                    seed=cfg.seed * 1000 + i,
                    stop_at_ns=stop_at,
                    history=str(histories / f"w{i}.jsonl"),
                    log=str(directory / f"w{i}.log"),
                    masters=tuple(p.port for p in rig.master_proxies),
                    resource=rig.resource.port,
                    cache=rig.cache_proxy.port,
                    lock_ttl=cfg.lock_ttl,
                    cache_ttl=cfg.cache_ttl,
                    cache_options=dict(cfg.cache_options),
                    single=rig.lock_proxy.port,
                    mode="async" if i % 2 else "sync",
                )
                for i in range(cfg.workers)
            ]
            # One parent builds the lock handles and forks every worker with them.
            status = directory / "workers.json"
            forker = ctx.Process(target=_forker, args=(specs, str(status)), name="forker")
            forker.start()
            stop_sampling = threading.Event()
            sampler = threading.Thread(
                target=_sample_leases, args=(rig, histories / "sampler.jsonl", stop_sampling)
            )
            sampler.start()
            try:
                _nemesis(rig, cfg, stop_at, report)
            finally:
                rig.heal()
                forker.join(max(0.1, (stop_at - time.monotonic_ns()) / 1e9) + 20.0)
                if forker.is_alive():
                    report.stuck_workers.append("forker")
                    forker.kill()
                    forker.join(5)
                try:
                    fate = json.loads(status.read_text())
                except (OSError, ValueError):
                    report.worker_errors.append(f"the forker exited with {forker.exitcode}")
                else:
                    report.stuck_workers.extend(fate["stuck"])
                    report.worker_errors.extend(fate["errors"])
                time.sleep(cfg.orphan_bound + cfg.lock_ttl)  # samples past the last holder
                stop_sampling.set()
                sampler.join(5)
            report.leaked_locks = _leaked_locks(rig, cfg)
        finally:
            rig.close()
        history = read_history(histories)
        for event in history:
            if event.op not in ("rss", "lease", "fault") and event.type != "invoke":
                report.operations[f"{event.op}:{event.type}"] += 1
        report.checks = [
            check_mutex(history),
            check_fencing(history),
            check_orphans(history, bound=cfg.orphan_bound),
            check_validity(history, tolerance=cfg.validity_tolerance),
            check_cache(history, bound=cfg.stale_bound, near_bound=cfg.near_bound),
        ]
        _memory(report, history, cfg)
    report.elapsed = time.monotonic() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run a soak, print its summary, exit 0 if every check passed."""
    parser = argparse.ArgumentParser(
        prog="python -m distkit.testing.chaos", description=__doc__.split("\n\n")[0]
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--seconds", type=float, default=None, help="soak length (default 60)")
    length.add_argument("--minutes", type=float, default=None, help="soak length in minutes")
    parser.add_argument("--seed", type=int, default=1, help="seeds faults and workers")
    parser.add_argument("--workers", type=int, default=4, help="worker processes")
    parser.add_argument("--keep", type=Path, default=None, help="keep histories in this dir")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60 if args.minutes is not None else (args.seconds or 60.0)
    cfg = SoakConfig(seconds=seconds, seed=args.seed, workers=args.workers, directory=args.keep)
    report = run_soak(cfg)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
