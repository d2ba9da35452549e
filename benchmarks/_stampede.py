"""cache_stampede: 64 concurrent callers (4 processes x 16) on a just-expired key, 50 ms loader.

Each *round* is one stampede on a key nobody has loaded yet (an expired entry is gone from Redis,
so this is the miss every caller sees at expiry). The parent tells the 4 spawned workers (the
``lock_contended`` pool, with this module's worker) a start time; at that instant every worker
releases its 16 callers at once: threads for sync contenders, tasks on one event loop for async
ones. A caller's latency runs from the common start to the value in its hand. The parent reads
``INFO commandstats`` before and after the round: every command the server ran for it (commands
inside scripts included; INFO, HELLO, CLIENT, PING excluded).

Worker protocol (``_lock_contended._Pool.broadcast``)::

    parent -> ("segment", RoundSpec)     build (or reuse) the contender's cache in this worker
    worker -> ("ready", error | None)
    parent -> ("go", start_ns, 0)
    worker -> ("done", RoundReport)      latencies, loader calls, values right or not
    parent -> ("stop",)
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import redis
import redis.asyncio

import distcache

from ._lock_contended import WorkerFailed, _Pool
from ._model import CLIENT_OPTIONS, Column, Contender, Plan, RunContext, Scenario, Target
from ._results import ContenderResult, ScenarioResult, complete
from ._stats import Distribution, median

__all__ = ["SCENARIO", "RoundReport", "RoundSpec", "stampede_worker_main"]

PROCESSES = 4
CALLERS = 16  # per process: 64 in all
LOADER_S = 0.050
ROUNDS_PER_SECOND = 4  # a trial of --duration S runs S x 4 rounds
QUICK = Plan(trials=2, duration=0.5, warmup=0.25)
FULL = Plan(trials=5, duration=2.5, warmup=0.5)
_START_DELAY_NS = 100_000_000  # workers get the start time this far ahead
_ROUND_TIMEOUT = 60.0
_NOT_COUNTED = ("info", "hello", "client", "ping", "select", "auth", "command")
_SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


@dataclass(frozen=True)
class RoundSpec:
    """One stampede: which contender, its namespace in this run, the key, how many callers."""

    contender: str
    namespace: str
    key: str
    callers: int = CALLERS
    loader_s: float = LOADER_S


@dataclass
class RoundReport:
    """What one worker saw in one round."""

    index: int
    latencies_ns: list[int] = field(default_factory=list)
    loader_calls: int = 0
    wrong_values: int = 0
    error: str | None = None


def _expected(key: str) -> dict[str, Any]:
    return {"key": key, "loaded": True, "payload": "x" * 100}


# -- the contenders, as the workers build them -------------------------------------------------
class _Runner:
    """One contender in one worker: ``round`` runs the callers and reports."""

    is_async = False

    def __init__(self, url: str, spec: RoundSpec) -> None:
        self.url = url
        self.namespace = spec.namespace
        self.loader_s = spec.loader_s
        self.calls = 0
        self._guard = threading.Lock()

    def count(self) -> None:
        with self._guard:
            self.calls += 1

    def load(self, key: str) -> dict[str, Any]:
        """The sync loader: 50 ms of 'database', counted."""
        self.count()
        time.sleep(self.loader_s)
        return _expected(key)

    async def aload(self, key: str) -> dict[str, Any]:
        """The async loader."""
        self.count()
        await asyncio.sleep(self.loader_s)
        return _expected(key)

    def call(self, key: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    async def acall(self, key: str) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def round(self, spec: RoundSpec, start_ns: int, report: RoundReport) -> None:
        self.calls = 0
        expected = _expected(spec.key)
        if self.is_async:
            outcomes = self.loop.run_until_complete(self._tasks(spec, start_ns))
        else:
            outcomes = self._threads(spec, start_ns)
        for latency, value in outcomes:
            report.latencies_ns.append(latency)
            if value != expected:
                report.wrong_values += 1
        report.loader_calls = self.calls

    def _threads(self, spec: RoundSpec, start_ns: int) -> list[tuple[int, Any]]:
        go = threading.Event()
        out: list[tuple[int, Any]] = []
        errors: list[BaseException] = []

        def caller() -> None:
            go.wait()
            try:
                value = self.call(spec.key)
            except BaseException as exc:
                errors.append(exc)
                return
            out.append((time.monotonic_ns() - start_ns, value))

        threads = [threading.Thread(target=caller) for _ in range(spec.callers)]
        for t in threads:
            t.start()
        _sleep_until(start_ns)
        go.set()
        for t in threads:
            t.join(_ROUND_TIMEOUT)
        if errors:
            raise errors[0]
        return out

    async def _tasks(self, spec: RoundSpec, start_ns: int) -> list[tuple[int, Any]]:
        async def caller() -> tuple[int, Any]:
            value = await self.acall(spec.key)
            return time.monotonic_ns() - start_ns, value

        delay = start_ns - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        return list(await asyncio.gather(*(caller() for _ in range(spec.callers))))

    @functools.cached_property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()


def _sleep_until(start_ns: int) -> None:
    delay = start_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / 1e9)


class _Naive(_Runner):
    """GET; on a miss load and SET: what a cache without stampede control does."""

    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        self.client = redis.Redis.from_url(url, **CLIENT_OPTIONS)

    def call(self, key: str) -> Any:
        name = f"{self.namespace}:{key}"
        raw = self.client.get(name)
        if raw is None:
            value = self.load(key)
            self.client.set(name, json.dumps(value), ex=300)
            return value
        return json.loads(raw)


class _Distcache(_Runner):
    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        client = redis.Redis.from_url(url, **CLIENT_OPTIONS)
        self.cache = distcache.Cache(client, namespace=spec.namespace, ttl=300)

    def call(self, key: str) -> Any:
        return self.cache.get_or_set(key, functools.partial(self.load, key))


class _DistcacheAsync(_Runner):
    is_async = True

    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=CLIENT_OPTIONS["socket_timeout"],
            socket_connect_timeout=CLIENT_OPTIONS["socket_connect_timeout"],
        )
        self.cache = distcache.AsyncCache(client, namespace=spec.namespace, ttl=300)

    async def acall(self, key: str) -> Any:
        return await self.cache.get_or_set(key, functools.partial(self.aload, key))


class _Dogpile(_Runner):
    """dogpile.cache's redis backend with its distributed lock (redis-py ``Lock``)."""

    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        from dogpile.cache import make_region

        namespace = spec.namespace
        self.region = make_region(key_mangler=lambda k: f"{namespace}:{k}").configure(
            "dogpile.cache.redis",
            expiration_time=300,
            arguments={
                "url": url,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": 30,
                "redis_expiration_time": 600,
                "socket_timeout": CLIENT_OPTIONS["socket_timeout"],
            },
        )

    def call(self, key: str) -> Any:
        return self.region.get_or_create(key, functools.partial(self.load, key))


class _Cashews(_Runner):
    """cashews ``@cache(..., lock=True)``: a Redis lock around the miss."""

    is_async = True

    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        from cashews import Cache as CashewsCache

        cache = CashewsCache()
        cache.setup(url, client_side=False, socket_timeout=CLIENT_OPTIONS["socket_timeout"])
        self._cashews = cache
        self.cached = cache(ttl="300s", key=spec.namespace + ":{key}", lock=True)(self._load)

    async def _load(self, key: str) -> dict[str, Any]:
        return await self.aload(key)

    async def acall(self, key: str) -> Any:
        return await self.cached(key=key)


class _Aiocache(_Runner):
    """aiocache ``@cached_stampede``: its RedLock around the miss."""

    is_async = True

    def __init__(self, url: str, spec: RoundSpec) -> None:
        super().__init__(url, spec)
        from aiocache import RedisCache, cached_stampede
        from aiocache.serializers import JsonSerializer

        client = redis.Redis.from_url(url)
        kw = client.connection_pool.connection_kwargs
        client.close()
        self.cached = cached_stampede(
            lease=30,
            ttl=300,
            cache=RedisCache,
            endpoint=kw.get("host", "127.0.0.1"),
            port=kw.get("port", 6379),
            namespace=spec.namespace,
            serializer=JsonSerializer(),
            key_builder=lambda fn, *args, **kwargs: str(args[-1]),
        )(self._load)

    async def _load(self, key: str) -> dict[str, Any]:
        return await self.aload(key)

    async def acall(self, key: str) -> Any:
        return await self.cached(key)


_RUNNERS: dict[str, type[_Runner]] = {
    "naive": _Naive,
    "distcache": _Distcache,
    "distcache-async": _DistcacheAsync,
    "dogpile": _Dogpile,
    "cashews": _Cashews,
    "aiocache": _Aiocache,
}


# -- the worker ------------------------------------------------------------------------------
def stampede_worker_main(conn: Connection, index: int, urls: tuple[str, ...], seed: int) -> None:
    """Serve rounds until told to stop (the target of each spawned worker process)."""
    gc.collect()
    gc.freeze()
    runners: dict[tuple[str, str], _Runner] = {}
    spec: RoundSpec | None = None
    conn.send(("hello", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message[0] == "segment":
            spec = message[1]
            assert isinstance(spec, RoundSpec)
            try:
                if (spec.contender, spec.namespace) not in runners:
                    runner = _RUNNERS[spec.contender](urls[0], spec)
                    runners[spec.contender, spec.namespace] = runner
                conn.send(("ready", None))
            except Exception:
                conn.send(("ready", traceback.format_exc()))
        elif message[0] == "go":
            assert spec is not None
            report = RoundReport(index)
            try:
                runners[spec.contender, spec.namespace].round(spec, message[1], report)
            except Exception:
                report.error = traceback.format_exc()
            conn.send(("done", report))
        elif message[0] == "stop":
            return


# -- the parent ------------------------------------------------------------------------------
def _commandstats(admin: redis.Redis) -> tuple[int, int] | None:
    """(commands, scripts) the server has run so far, bookkeeping commands excluded."""
    try:
        stats = admin.info("commandstats")
    except redis.RedisError:
        return None
    commands = scripts = 0
    for line, data in stats.items():
        name = line.removeprefix("cmdstat_").split("|")[0]
        if name in _NOT_COUNTED or not isinstance(data, dict):
            continue
        commands += int(data.get("calls", 0))
        if name in _SCRIPTS:
            scripts += int(data.get("calls", 0))
    return commands, scripts


@dataclass
class _Totals:
    contender: Contender
    result: ContenderResult
    latencies_ns: list[int] = field(default_factory=list)
    loader_calls: list[int] = field(default_factory=list)
    commands: list[int] = field(default_factory=list)
    scripts: list[int] = field(default_factory=list)
    wrong: int = 0
    rounds: int = 0


def _round(
    ctx: RunContext, pool: _Pool, entry: _Totals, number: int
) -> tuple[list[RoundReport], int, tuple[int, int] | None]:
    spec = RoundSpec(entry.contender.key, ctx.name("stampede", entry.contender.key), f"k{number}")
    pool.broadcast(("segment", spec), "ready", _ROUND_TIMEOUT)
    admin = ctx.client()
    try:
        before = _commandstats(admin)
        start = time.monotonic_ns() + _START_DELAY_NS
        replies = pool.broadcast(("go", start, 0), "done", _ROUND_TIMEOUT)
        after = _commandstats(admin)
    finally:
        admin.close()
    reports = [r for r in replies if isinstance(r, RoundReport)]
    wall = max((n for r in reports for n in r.latencies_ns), default=0)
    usage = None
    if before is not None and after is not None:
        usage = (after[0] - before[0], after[1] - before[1])
    return reports, wall, usage


def run(ctx: RunContext) -> ScenarioResult:
    """Measure every available contender with one pool of 4 worker processes."""
    plan = ctx.settings.plan(quick=QUICK, full=FULL)
    rounds = max(1, round(plan.duration * ROUNDS_PER_SECOND))
    warmup = max(1, round(plan.warmup * ROUNDS_PER_SECOND))
    result = ScenarioResult(
        name=SCENARIO.name,
        summary=SCENARIO.summary,
        unit=SCENARIO.unit,
        latency_label=SCENARIO.latency_label,
        method=SCENARIO.method,
        plan=plan,
        label=ctx.label,
    )
    totals: list[_Totals] = []
    for contender in ctx.select(CONTENDERS, result.skipped):
        row = ContenderResult(
            key=contender.key, label=contender.label, role=contender.role, note=contender.note
        )
        result.contenders.append(row)
        totals.append(_Totals(contender, row))
    result.notes.append(
        f"{PROCESSES} worker processes (spawn) x {CALLERS} callers, loader {LOADER_S * 1000:g} ms, "
        f"{rounds} stampede(s) per contender per trial, {warmup} warm-up"
    )
    ctx.reporter.scenario(SCENARIO.name, 1 + len(totals) * (plan.trials + 1))
    ctx.reporter.step(f"spawning {PROCESSES} workers")
    pool = _Pool(ctx.urls, PROCESSES, ctx.settings.seed, target=stampede_worker_main)
    number = 0
    try:
        pool.start()
        for entry in totals:
            ctx.reporter.step(f"warm-up {entry.contender.label}")
            for _ in range(warmup):
                number += 1
                try:
                    _round(ctx, pool, entry, number)
                except Exception as exc:
                    pool = _failed(ctx, pool, entry, exc)
                    break
        for trial in range(plan.trials):
            order = ctx.order(totals)
            result.order.append([e.contender.key for e in order])
            for entry in order:
                ctx.reporter.step(f"trial {trial + 1}/{plan.trials}: {entry.contender.label}")
                if entry.result.error is not None:
                    entry.result.trial_throughput.append(None)
                    continue
                walls = []
                try:
                    for _ in range(rounds):
                        number += 1
                        reports, wall, usage = _round(ctx, pool, entry, number)
                        walls.append(wall)
                        _add(entry, reports, usage)
                except Exception as exc:
                    pool = _failed(ctx, pool, entry, exc)
                    entry.result.trial_throughput.append(None)
                    continue
                entry.result.trial_throughput.append(len(walls) / (sum(walls) / 1e9))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        ctx.reporter.note(f"{SCENARIO.name}: {result.error}")
    finally:
        pool.close()
        ctx.delete_keys()
    for entry in totals:
        _summarise(entry)
    return complete(result, SCENARIO)


def _failed(ctx: RunContext, pool: _Pool, entry: _Totals, exc: BaseException) -> _Pool:
    entry.result.error = f"{type(exc).__name__}: {exc}".strip()
    if isinstance(exc, WorkerFailed):
        entry.result.problems.append(exc.detail)
    ctx.reporter.note(f"{entry.contender.label}: {entry.result.error}")
    pool.close(force=True)
    fresh = _Pool(ctx.urls, PROCESSES, ctx.settings.seed, target=stampede_worker_main)
    fresh.start()
    return fresh


def _add(entry: _Totals, reports: list[RoundReport], usage: tuple[int, int] | None) -> None:
    entry.rounds += 1
    entry.loader_calls.append(sum(r.loader_calls for r in reports))
    entry.wrong += sum(r.wrong_values for r in reports)
    for report in reports:
        entry.latencies_ns.extend(report.latencies_ns)
    if usage is not None:
        entry.commands.append(usage[0])
        entry.scripts.append(usage[1])


def _summarise(entry: _Totals) -> None:
    row = entry.result
    row.latency = Distribution.of_ns(entry.latencies_ns)
    loader_us = LOADER_S * 1e6
    row.metrics.update(
        stampedes=entry.rounds,
        loader_calls_mean=(
            sum(entry.loader_calls) / len(entry.loader_calls) if entry.loader_calls else None
        ),
        loader_calls_max=max(entry.loader_calls, default=None),
        p50_ratio=None if row.latency is None else row.latency.p50_us / loader_us,
        p99_ratio=None if row.latency is None else row.latency.p99_us / loader_us,
        commands_per_stampede=median(entry.commands) if entry.commands else None,
        scripts_per_stampede=median(entry.scripts) if entry.scripts else None,
    )
    if row.error is not None or not entry.rounds:
        if row.error is None:
            row.error = "no stampede completed"
        return
    callers = entry.rounds * PROCESSES * CALLERS
    row.checks["every caller got the loaded value"] = (
        entry.wrong == 0 and len(entry.latencies_ns) == callers
    )
    if entry.wrong:
        row.problems.append(f"{entry.wrong} caller(s) got a wrong value")


def _contender(
    key: str, label: str, role: Any, note: str, requires: tuple[str, ...] = ()
) -> Contender:
    return Contender(key=key, label=label, role=role, note=note, requires=requires)


CONTENDERS: tuple[Contender, ...] = (
    _contender("naive", "floor: naive GET, load, SET", "floor",
               "no stampede control: every caller that misses calls the loader"),
    _contender("distcache", "distcache get_or_set (threads)", "distkit",
               "in-process single-flight + distlock fill lock (FIFO handoff, BLPOP wake-up)"),
    _contender("distcache-async", "distcache AsyncCache (tasks)", "distkit",
               "the same, asyncio: 16 tasks per process"),
    _contender("dogpile", "dogpile.cache redis, distributed_lock", "peer",
               "get_or_create with the redis backend's distributed lock (redis-py Lock, "
               "lock_sleep 0.1 s polling, its default)", ("dogpile.cache",)),
    _contender("cashews", "cashews @cache(lock=True)", "peer",
               "cashews decorator with its Redis lock, 16 tasks per process", ("cashews",)),
    _contender("aiocache", "aiocache @cached_stampede", "peer",
               "aiocache cached_stampede (its RedLock), 16 tasks per process", ("aiocache",)),
)  # fmt: skip

_TARGET_ROWS = ("distcache", "distcache-async")

SCENARIO = Scenario(
    name="cache_stampede",
    summary="64 concurrent callers (4 processes x 16) on a just-expired key, 50 ms loader",
    unit="stampedes/s",
    latency_label="caller",
    method=(
        "A pool of 4 spawned worker processes (16 callers each: threads for sync contenders, "
        "tasks on one loop for async ones) is released at one instant on a key no one has "
        "loaded (an expired entry is gone from Redis). Latency = the common start to the value "
        "in the caller's hand (system-wide CLOCK_MONOTONIC); the ratio columns divide it by the "
        "loader's 50 ms. Loader calls are counted in each worker and summed per stampede. "
        "Commands = INFO commandstats delta over the stampede (commands inside scripts count; "
        "INFO/HELLO/CLIENT/PING do not); scripts = EVAL/EVALSHA among them. Each contender keeps "
        "its cache objects across stampedes (warm connections, loaded scripts); a trial of "
        "--duration S runs S x 4 stampedes; throughput = stampedes per second of stampede time. "
        "Check: every caller got the loaded value."
    ),
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    columns=(
        Column("loader calls (max)", "loader_calls_max", "count"),
        Column("p50/loader", "p50_ratio", "ratio"),
        Column("p99/loader", "p99_ratio", "ratio"),
        Column("commands/stampede", "commands_per_stampede", "count"),
        Column("scripts/stampede", "scripts_per_stampede", "count"),
    ),
    targets=tuple(
        t
        for key in _TARGET_ROWS
        for t in (
            Target(
                key,
                "loader_calls_max",
                "<=",
                1.0,
                f"{key}: exactly 1 loader call per stampede across 4 processes",
                "count",
            ),
            Target(key, "p99_ratio", "<=", 1.3, f"{key}: caller p99 <= 1.3x the loader time"),
        )
    ),
)
