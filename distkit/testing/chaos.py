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
import contextlib
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distkit.testing._history import (
    CheckResult,
    HistoryRecorder,
    check_cache,
    check_fencing,
    check_mutex,
    read_history,
)
from distkit.testing._proxy import FaultProxy
from distkit.testing._server import RedisServer

__all__ = ["SoakConfig", "SoakReport", "main", "run_soak"]

_MASTERS = 3
_LOCK_NAMES = ("chaos-a", "chaos-b")
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
        ]
        for check in self.checks:
            lines.append(check.summary(limit=5))
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


def _worker(spec: _WorkerSpec) -> None:
    """One worker process: lock sections and cache operations until ``stop_at_ns``."""
    import logging

    logging.basicConfig(  # the fail-open warnings go to the run's directory, not the screen
        filename=spec.log, level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    import threading

    from distcache import Cache, CacheEvent, CounterMetrics
    from distkit import DistkitError, RedisConfig, connect
    from distlock import FencedStore, LockNotOwned, Redlock, StaleFencingToken

    rng = random.Random(spec.seed)

    def config(port: int) -> RedisConfig:
        return RedisConfig(host="127.0.0.1", port=port, connect_timeout=0.25, socket_timeout=0.25)

    masters = [connect(config(port)) for port in spec.masters]
    locks = {
        name: Redlock(masters, name, ttl=spec.lock_ttl, node_timeout=0.15, retry_delay=0.05)
        for name in _LOCK_NAMES
    }
    stores = {name: FencedStore(connect(config(spec.resource)), name) for name in _LOCK_NAMES}
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

        def lock_section() -> None:
            nonlocal seq
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
                ttl=spec.lock_ttl, lock=name,
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


# -- the nemesis ----------------------------------------------------------------------------------


class _Rig:
    """The servers and proxies of one soak."""

    def __init__(self, directory: Path, binary: str | None) -> None:
        self._stack = contextlib.ExitStack()
        self.masters = [
            self._stack.enter_context(RedisServer(directory=directory / f"m{i}", binary=binary))
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

    def heal(self) -> None:
        """Undo every fault: servers running and resumed, proxies clean."""
        for server in [*self.masters, self.resource, self.cache]:
            if not server.running:
                server.restart(keep_data=False)
            elif server.paused:
                server.resume()
        for proxy in [*self.master_proxies, self.cache_proxy]:
            proxy.reset()

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

    def latency(proxy: FaultProxy, rng: random.Random) -> None:
        proxy.set_latency(rng.uniform(0.01, 0.1))
        time.sleep(rng.uniform(0.3, 1.0))
        proxy.set_latency(0.0)

    def restart_cache(rng: random.Random) -> None:
        rig.cache.restart(keep_data=False)

    return [
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


def _nemesis(rig: _Rig, cfg: SoakConfig, until_ns: int, report: SoakReport) -> None:
    rng = random.Random(cfg.seed)
    faults = _faults(rig, cfg)
    time.sleep(min(1.0, cfg.seconds / 10))  # let the workers warm up
    while time.monotonic_ns() < until_ns:
        name, inject = rng.choice(faults)
        report.faults[name] += 1
        try:
            inject(rng)
        finally:
            rig.heal()
        time.sleep(rng.uniform(0.1, cfg.fault_gap))


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
        leaked = [f"{m.port}/{key}" for m in rig.masters for key in _leases(m)]
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
        rig = _Rig(directory, binary)
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
                )
                for i in range(cfg.workers)
            ]
            procs = [ctx.Process(target=_worker, args=(s,), name=s.name) for s in specs]
            for proc in procs:
                proc.start()
            try:
                _nemesis(rig, cfg, stop_at, report)
            finally:
                rig.heal()
                join_by = time.monotonic() + 20.0
                for spec, proc in zip(specs, procs, strict=True):
                    proc.join(max(0.1, join_by - time.monotonic()))
                    if proc.is_alive():
                        report.stuck_workers.append(spec.name)
                        proc.kill()
                        proc.join(5)
                    elif proc.exitcode != 0:
                        report.worker_errors.append(f"{spec.name} exited with {proc.exitcode}")
            report.leaked_locks = _leaked_locks(rig, cfg)
        finally:
            rig.close()
        history = read_history(histories)
        for event in history:
            if event.op != "rss" and event.type != "invoke":
                report.operations[f"{event.op}:{event.type}"] += 1
        report.checks = [
            check_mutex(history),
            check_fencing(history),
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
