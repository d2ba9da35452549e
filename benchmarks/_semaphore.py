"""semaphore_contended: worker processes on one semaphore name, 1 ms sections, ``limit`` permits.

Full: 16 processes, limit 4; ``--quick``: 4 processes, limit 2 (a 2-core CI runner). Each worker
loops acquire -> 1 ms section -> release for a fixed time and reports ``(asked, acquired,
released)`` per section on the system-wide CLOCK_MONOTONIC. Handoff = a waiter's acquire
returned - the release that freed its permit (each release pairs with at most one waiter).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

import redis

from ._model import CLIENT_OPTIONS, Column, Contender, Plan, RunContext, Scenario, Target
from ._results import ContenderResult, ScenarioResult, complete
from ._stats import Distribution

__all__ = ["SCENARIO", "SemStats", "analyze"]

TTL = 10.0
SECTION_S = 0.001
QUICK = Plan(trials=1, duration=1.5, warmup=0.3)
FULL = Plan(trials=3, duration=8.0, warmup=1.0)
QUICK_SHAPE = (4, 2)  # processes, limit
FULL_SHAPE = (16, 4)
_POLL_S = 0.001
_TIMEOUT = 120.0

CONTENDERS = (
    Contender(
        key="floor-zset",
        label="raw redis-py ZSET semaphore (poll 1 ms)",
        role="floor",
        note="ZREMRANGEBYSCORE expired + ZADD + ZRANK in MULTI; over the limit: ZREM, sleep, retry",
    ),
    Contender(key="distlock", label="distlock.Semaphore", role="distkit"),
)

Section = tuple[int, int, int]


@dataclass
class SemStats:
    """What one segment shows (pure arithmetic over the sections of every worker)."""

    sections: int
    wall_ns: int
    cs_ns: int
    handoffs_ns: list[int]
    longest_wait_ns: int
    max_holders: int

    def utilisation(self, limit: int) -> float:
        """Share of the permits' time spent inside sections."""
        return self.cs_ns / (limit * self.wall_ns) if self.wall_ns else 0.0


def analyze(sections: list[Section], start_ns: int, end_ns: int) -> SemStats:
    """Handoffs, waits, the most simultaneous holders and the wall time of one segment."""
    ordered = sorted(sections, key=lambda s: s[1])
    releases = sorted(s[2] for s in ordered)
    handoffs: list[int] = []
    r = 0
    for asked, acquired, _released in ordered:
        # skip releases before this waiter asked: nobody was waiting for those
        while r < len(releases) and releases[r] < asked:
            r += 1
        if r < len(releases) and releases[r] <= acquired:
            handoffs.append(acquired - releases[r])
            r += 1
    events = sorted([(a, 1) for _, a, _ in ordered] + [(e, -1) for _, _, e in ordered])
    live = most = 0
    for _, delta in events:
        live += delta
        most = max(most, live)
    last = max((s[2] for s in ordered), default=end_ns)
    return SemStats(
        sections=len(ordered),
        wall_ns=max(end_ns, last) - start_ns,
        cs_ns=sum(e - a for _, a, e in ordered),
        handoffs_ns=handoffs,
        longest_wait_ns=max((a - q for q, a, _ in ordered), default=0),
        max_holders=most,
    )


def _floor_ops(client: redis.Redis, name: str, limit: int) -> tuple[Callable[[], None], ...]:
    owner = uuid.uuid4().hex

    def acquire() -> None:
        while True:
            now = time.time()
            pipe = client.pipeline(transaction=True)
            pipe.zremrangebyscore(name, "-inf", now - TTL)
            pipe.zadd(name, {owner: now})
            pipe.zrank(name, owner)
            rank = pipe.execute()[2]
            if rank is not None and rank < limit:
                return
            client.zrem(name, owner)
            time.sleep(_POLL_S)

    def release() -> None:
        client.zrem(name, owner)

    return acquire, release


def _distlock_ops(client: redis.Redis, name: str, limit: int) -> tuple[Callable[[], None], ...]:
    from distlock import Semaphore

    sem = Semaphore(client, name, limit, ttl=TTL)

    def acquire() -> None:
        if not sem.acquire():
            raise RuntimeError("acquire returned False")

    return acquire, sem.release


def _worker(conn: Connection, url: str) -> None:
    client = redis.Redis.from_url(url, **CLIENT_OPTIONS)
    conn.send(("hello", None))
    while True:
        message = conn.recv()
        if message[0] == "stop":
            break
        _, key, name, limit, start_ns, end_ns = message
        try:
            make = _floor_ops if key == "floor-zset" else _distlock_ops
            acquire, release = make(client, name, limit)
            while time.monotonic_ns() < start_ns:
                time.sleep(0.001)
            sections: list[Section] = []
            while time.monotonic_ns() < end_ns:
                asked = time.monotonic_ns()
                acquire()
                acquired = time.monotonic_ns()
                until = acquired + int(SECTION_S * 1e9)
                time.sleep(SECTION_S * 0.8)
                while time.monotonic_ns() < until:
                    pass
                released = time.monotonic_ns()
                release()
                sections.append((asked, acquired, released))
            conn.send(("done", sections))
        except Exception:
            conn.send(("done", traceback.format_exc()))
    client.close()


class _Pool:
    def __init__(self, url: str, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs = []
        for index in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker, args=(child, url), name=f"distkit-bench-sem-{index}", daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            if not conn.poll(_TIMEOUT):
                raise TimeoutError("a semaphore worker did not start")
            conn.recv()

    def segment(self, key: str, name: str, limit: int, duration: float) -> SemStats:
        start = time.monotonic_ns() + 50_000_000
        end = start + int(duration * 1e9)
        for conn in self.conns:
            conn.send(("run", key, name, limit, start, end))
        sections: list[Section] = []
        for index, conn in enumerate(self.conns):
            if not conn.poll(duration + 2 * TTL + 30):
                raise TimeoutError(f"semaphore worker {index} did not finish")
            _, payload = conn.recv()
            if isinstance(payload, str):
                raise RuntimeError(f"worker {index} failed: {payload.strip().splitlines()[-1]}")
            sections.extend(payload)
        return analyze(sections, start, end)

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def run(ctx: RunContext) -> ScenarioResult:
    """Every contender on the same worker pool, trials interleaved in a seeded order."""
    plan = ctx.settings.plan(quick=QUICK, full=FULL)
    workers, limit = QUICK_SHAPE if ctx.settings.quick else FULL_SHAPE
    result = ScenarioResult(
        name=SCENARIO.name,
        summary=f"{workers} worker processes, limit {limit}, 1 ms sections",
        unit=SCENARIO.unit,
        latency_label=SCENARIO.latency_label,
        method=SCENARIO.method,
        plan=plan,
        label=ctx.label,
    )
    rows: dict[str, tuple[ContenderResult, list[SemStats]]] = {}
    for contender in ctx.select(CONTENDERS, result.skipped):
        row = ContenderResult(
            key=contender.key, label=contender.label, role=contender.role, note=contender.note
        )
        result.contenders.append(row)
        rows[contender.key] = (row, [])
    result.notes.append(
        f"{workers} worker processes (spawn), limit {limit}, {SECTION_S * 1e3:g} ms section, "
        f"{plan.duration:g} s per contender per trial, ttl {TTL:g} s"
    )
    ctx.reporter.scenario(SCENARIO.name, 1 + len(rows) * (plan.trials + 1))
    ctx.reporter.step(f"spawning {workers} workers")
    pool: _Pool | None = None
    segment = 0
    try:
        pool = _Pool(ctx.urls[0], workers)
        for trial in range(-1, plan.trials):  # trial -1: warm-up, not recorded
            for key in ctx.order(list(rows)):
                row, stats = rows[key]
                if row.error is not None:
                    continue
                ctx.reporter.step(f"{'warm-up' if trial < 0 else f'trial {trial + 1}'}: {key}")
                segment += 1
                name = ctx.name("sem", key, str(segment))
                try:
                    seg = pool.segment(
                        key, name, limit, plan.warmup if trial < 0 else plan.duration
                    )
                except Exception as exc:
                    row.error = f"{type(exc).__name__}: {exc}"
                    continue
                if trial >= 0:
                    row.trial_throughput.append(seg.sections / seg.wall_ns * 1e9)
                    stats.append(seg)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if pool is not None:
            pool.close()
        ctx.delete_keys()
    for row, stats in rows.values():
        _summarise(row, stats, limit)
    return complete(result, SCENARIO)


def _summarise(row: ContenderResult, stats: list[SemStats], limit: int) -> None:
    if not stats:
        if row.error is None:
            row.error = "no segment measured"
        return
    row.latency = Distribution.of_ns(h for s in stats for h in s.handoffs_ns)
    most = max(s.max_holders for s in stats)
    sections = sum(s.sections for s in stats)
    row.metrics.update(
        sections=sections,
        longest_wait_ms=max(s.longest_wait_ns for s in stats) / 1e6,
        utilisation=sum(s.utilisation(limit) for s in stats) / len(stats),
        max_holders=most,
    )
    row.checks["sections completed"] = sections > 0
    if row.role == "distkit":  # the floor is the common recipe, races and all: reported only
        row.checks[f"at most {limit} holders"] = most <= limit
        if most > limit:
            row.problems.append(f"{most} holders at once (limit {limit})")


SCENARIO = Scenario(
    name="semaphore_contended",
    summary="16 worker processes, limit 4, 1 ms sections (quick: 4 processes, limit 2)",
    unit="sections/s",
    latency_label="handoff",
    method=(
        "A pool of spawned worker processes (reused across segments) loops acquire -> 1 ms "
        "section -> release on one semaphore name; trials interleave the contenders (seeded "
        "shuffle) after a warm-up. Handoff = a waiter's acquire returned - the release that "
        "freed its permit (system-wide CLOCK_MONOTONIC). Longest wait = the longest acquire. "
        "Utilisation = time inside sections / (limit x wall time). Max holders = the most "
        "overlapping sections; the floor (the common ZSET recipe with client timestamps) is not "
        "checked against the limit, only reported."
    ),
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    columns=(
        Column("longest wait", "longest_wait_ms", "ms"),
        Column("utilisation", "utilisation", "share"),
        Column("max holders", "max_holders", "count"),
    ),
    targets=(
        Target("distlock", "p99_us", "<=", 2000.0, "distlock semaphore handoff p99 <= 2 ms", "us"),
        Target("distlock", "utilisation", ">=", 0.7, "distlock permit utilisation >= 0.7", "share"),
    ),
)
