"""lock_contended: worker processes (8 by default) on one lock name with a 1 ms critical section.

Each section does a non-atomic ``GET`` + ``SET`` of a shared counter, then waits out the rest of
1 ms. A segment runs one contender for a fixed time; afterwards the counter must equal the
number of sections and no two sections' ``[acquired, released]`` intervals may overlap.

Handoff = next holder's acquire returned - previous holder's ``release()`` was called::

    holder A: ..acquired |== section ==| release() called
    holder B:                   (waiting)             |<- handoff ->| acquire returned |== ...
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from ._locks import lock_contender
from ._model import Column, LockContender, Plan, RunContext, Scenario, Target
from ._results import ContenderResult, ScenarioResult, complete
from ._serverstats import ServerUsage
from ._stats import Distribution, median
from ._worker import SegmentSpec, WorkerReport, worker_main

__all__ = ["SCENARIO", "SegmentStats", "WorkerFailed", "analyze"]

TTL = 10.0
SECTION_NS = 1_000_000
QUICK = Plan(trials=1, duration=2.0, warmup=0.3)
FULL = Plan(trials=3, duration=8.0, warmup=1.0)
CONTENDERS = tuple(
    lock_contender(key)
    for key in (
        "floor-handoff",
        "distlock",
        "redis-py",
        "redis-py-1ms",
        "python-redis-lock",
        "pottery",
    )
)
_START_DELAY_NS = 50_000_000
_SPAWN_TIMEOUT = 120.0
_READY_TIMEOUT = 30.0


@dataclass
class SegmentStats:
    """What one segment of one contender shows, from every worker's report (pure arithmetic)."""

    sections: int
    wall_ns: int
    cs_ns: int
    handoffs_ns: list[int]
    overlaps: int
    longest_wait_ns: int
    per_worker: list[int]
    failed_acquires: int

    @property
    def throughput(self) -> float:
        """Critical sections per second."""
        return self.sections / self.wall_ns * 1e9 if self.wall_ns > 0 else 0.0


def analyze(reports: list[WorkerReport], start_ns: int, deadline_ns: int) -> SegmentStats:
    """Order every section by acquisition; measure handoffs, overlaps, waits and coverage."""
    sections = sorted((s for r in reports for s in r.sections), key=lambda s: s[1])
    handoffs: list[int] = []
    overlaps = 0
    latest_release = None
    for _asked, acquired, released in sections:
        if latest_release is not None:
            handoffs.append(acquired - latest_release)
            if acquired < latest_release:
                overlaps += 1
        latest_release = released if latest_release is None else max(latest_release, released)
    waits = [acquired - asked for asked, acquired, _ in sections]
    waits += [r.final_wait_ns for r in reports if r.final_wait_ns is not None]
    end = max(deadline_ns, latest_release or deadline_ns)
    return SegmentStats(
        sections=len(sections),
        wall_ns=end - start_ns,
        cs_ns=sum(released - acquired for _, acquired, released in sections),
        handoffs_ns=handoffs,
        overlaps=overlaps,
        longest_wait_ns=max(waits, default=0),
        per_worker=[len(r.sections) for r in sorted(reports, key=lambda r: r.index)],
        failed_acquires=sum(r.failed_acquires for r in reports),
    )


class _Pool:
    """Spawned worker processes, reused for every segment of the scenario."""

    def __init__(
        self,
        urls: tuple[str, ...],
        workers: int,
        seed: int,
        target: Callable[[Connection, int, tuple[str, ...], int], None] = worker_main,
    ) -> None:
        self._urls = urls
        self._workers = workers
        self._seed = seed
        self._target = target  # another scenario's worker speaking the same protocol
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for index in range(self._workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=self._target,
                args=(child, index, self._urls, self._seed),
                name=f"distkit-bench-worker-{index}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        self._gather("hello", _SPAWN_TIMEOUT)

    def _gather(self, kind: str, timeout: float) -> list[object]:
        replies: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        pending = {id(c): i for i, c in enumerate(self._conns)}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} worker(s) sent no {kind!r} in {timeout:g} s")
            ready = wait([self._conns[i] for i in pending.values()], timeout=left)
            for conn in ready:
                assert isinstance(conn, Connection)
                index = pending.pop(id(conn))
                try:
                    message = conn.recv()
                except EOFError:
                    raise RuntimeError(
                        f"worker {index} died (exit code {self._procs[index].exitcode})"
                    ) from None
                if message[0] != kind:
                    raise RuntimeError(f"worker {index} sent {message[0]!r}, expected {kind!r}")
                reply = message[1]
                # One failed worker can leave the lock held (a release that raised): the others
                # would wait out its ttl, again and again. Stop the segment at the first failure.
                detail = reply if isinstance(reply, str) else getattr(reply, "error", None)
                if detail:
                    raise WorkerFailed(index, detail)
                replies[index] = reply
        return [replies[i] for i in range(len(self._conns))]

    def broadcast(self, message: tuple[object, ...], reply: str, timeout: float) -> list[object]:
        """Send ``message`` to every worker; return their ``reply`` payloads, in worker order.

        Raises:
            WorkerFailed: a worker's payload is (or carries) an error.
        """
        for conn in self._conns:
            conn.send(message)
        return self._gather(reply, timeout)

    def segment(self, spec: SegmentSpec, duration: float) -> tuple[list[WorkerReport], int, int]:
        """Run one segment on every worker; return their reports and the start and deadline.

        Raises:
            WorkerFailed: a worker raised; the pool must then be replaced (``close(force=True)``).
        """
        for conn in self._conns:
            conn.send(("segment", spec))
        self._gather("ready", _READY_TIMEOUT)
        start = time.monotonic_ns() + _START_DELAY_NS
        deadline = start + int(duration * 1e9)
        for conn in self._conns:
            conn.send(("go", start, deadline))
        reports = self._gather("done", duration + 2 * spec.ttl + 30)
        typed = [r for r in reports if isinstance(r, WorkerReport)]
        return typed, start, deadline

    def close(self, *, force: bool = False) -> None:
        """Stop every worker: politely, or (``force``) terminate each by its own pid at once."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            if not force:
                proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()


class WorkerFailed(RuntimeError):
    """A worker raised during a segment (``detail`` holds its traceback)."""

    def __init__(self, index: int, detail: str) -> None:
        last = detail.strip().splitlines()[-1] if detail.strip() else "?"
        super().__init__(f"worker {index} failed: {last}")
        self.detail = detail


@dataclass
class _Totals:
    contender: LockContender
    result: ContenderResult
    handoffs: list[int] = field(default_factory=list)
    sections: int = 0
    wall_ns: int = 0
    cs_ns: int = 0
    overlaps: int = 0
    counter_mismatches: list[str] = field(default_factory=list)
    longest_wait_ns: int = 0
    per_worker: list[int] = field(default_factory=list)
    failed_acquires: int = 0
    lua_us: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def add(self, stats: SegmentStats, counter: int, usage: tuple[float, float] | None) -> None:
        self.result.trial_throughput.append(stats.throughput)
        if usage is not None:
            self.cpu_us.append(usage[0])
            self.lua_us.append(usage[1])
        self.handoffs.extend(stats.handoffs_ns)
        self.sections += stats.sections
        self.wall_ns += stats.wall_ns
        self.cs_ns += stats.cs_ns
        self.overlaps += stats.overlaps
        self.longest_wait_ns = max(self.longest_wait_ns, stats.longest_wait_ns)
        self.failed_acquires += stats.failed_acquires
        if counter != stats.sections:
            self.counter_mismatches.append(f"counter {counter} != {stats.sections} sections")
        if not self.per_worker:
            self.per_worker = [0] * len(stats.per_worker)
        for i, n in enumerate(stats.per_worker):
            self.per_worker[i] += n


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def run(ctx: RunContext) -> ScenarioResult:
    """Measure every available contender with the worker pool, interleaved per trial."""
    plan = ctx.settings.plan(quick=QUICK, full=FULL)
    workers = ctx.settings.workers
    result = ScenarioResult(
        name=SCENARIO.name,
        summary=SCENARIO.summary.replace("8 worker", f"{workers} worker"),
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
        f"{workers} worker processes (spawn), {SECTION_NS / 1e6:g} ms critical section, "
        f"{plan.duration:g} s per contender per trial, lock ttl {TTL:g} s"
    )

    ctx.reporter.scenario(SCENARIO.name, 1 + len(totals) * (plan.trials + 1))
    ctx.reporter.step(f"spawning {workers} workers")
    pool = _Pool(ctx.urls, workers, ctx.settings.seed)
    segment_no = 0
    try:
        pool.start()
        for entry in totals:
            ctx.reporter.step(f"warm-up {entry.contender.label}")
            segment_no += 1
            try:
                _segment(ctx, pool, entry, plan.warmup, segment_no)
            except Exception as exc:
                _fail(ctx, entry, exc)
                pool = _restart(pool, ctx)
        for trial in range(plan.trials):
            order = ctx.order(totals)
            result.order.append([e.contender.key for e in order])
            for entry in order:
                ctx.reporter.step(f"trial {trial + 1}/{plan.trials}: {entry.contender.label}")
                if entry.result.error is not None:
                    entry.result.trial_throughput.append(None)
                    continue
                segment_no += 1
                try:
                    stats, counter, usage = _segment(ctx, pool, entry, plan.duration, segment_no)
                except Exception as exc:
                    _fail(ctx, entry, exc)
                    entry.result.trial_throughput.append(None)
                    pool = _restart(pool, ctx)
                    continue
                entry.add(stats, counter, usage)
    except Exception as exc:
        result.error = _error(exc)
        ctx.reporter.note(f"{SCENARIO.name}: {result.error}")
    finally:
        pool.close()
        ctx.delete_keys()
    for entry in totals:
        _summarise(entry, scenario_failed=result.error is not None)
    return complete(result, SCENARIO)


def _restart(pool: _Pool, ctx: RunContext) -> _Pool:
    pool.close(force=True)
    fresh = _Pool(ctx.urls, ctx.settings.workers, ctx.settings.seed)
    fresh.start()
    return fresh


def _fail(ctx: RunContext, entry: _Totals, exc: BaseException) -> None:
    entry.result.error = _error(exc)
    if isinstance(exc, WorkerFailed):
        entry.result.problems.append(exc.detail)
    ctx.reporter.note(f"{entry.contender.label}: {entry.result.error}")


def _segment(
    ctx: RunContext,
    pool: _Pool,
    entry: _Totals,
    duration: float,
    number: int,
) -> tuple[SegmentStats, int, tuple[float, float] | None]:
    contender = entry.contender
    client = ctx.client()
    admin = ctx.client()  # its own connection: a server without INFO may drop it
    try:
        lock_name = ctx.name("contended", contender.key, str(number))
        counter_key = ctx.name("contended", "counter", str(number))
        client.delete(counter_key)
        if contender.prepare is not None:
            contender.prepare(client, lock_name)
        spec = SegmentSpec(contender.key, lock_name, counter_key, TTL, SECTION_NS)
        before = ServerUsage.read(admin)
        reports, start, deadline = pool.segment(spec, duration)
        after = ServerUsage.read(admin)
        counter = int(client.get(counter_key) or 0)
    finally:
        client.close()
        admin.close()
    stats = analyze(reports, start, deadline)
    usage = None if before is None else before.per_op_us(after, stats.sections)
    return stats, counter, usage


def _summarise(entry: _Totals, *, scenario_failed: bool) -> None:
    row = entry.result
    row.latency = Distribution.of_ns(entry.handoffs)
    row.metrics.update(
        sections=entry.sections,
        longest_wait_ms=entry.longest_wait_ns / 1e6 if entry.sections else None,
        cs_share=entry.cs_ns / entry.wall_ns if entry.wall_ns else None,
        min_worker_sections=min(entry.per_worker, default=0),
        max_worker_sections=max(entry.per_worker, default=0),
        worker_sections=" / ".join(str(n) for n in entry.per_worker) or None,
        fairness=(f"{min(entry.per_worker)}-{max(entry.per_worker)}" if entry.per_worker else None),
        overlaps=entry.overlaps,
        failed_acquires=entry.failed_acquires,
        server_lua_us_per_op=median(entry.lua_us) if entry.lua_us else None,
        server_cpu_us_per_op=median(entry.cpu_us) if entry.cpu_us else None,
    )
    if row.error is not None or not entry.sections:
        if row.error is None:
            row.error = (
                "not measured (the scenario failed)"
                if scenario_failed
                else ("no critical section completed")
            )
        return
    row.checks["counter == sections"] = not entry.counter_mismatches
    row.checks["no overlapping sections"] = entry.overlaps == 0
    row.problems.extend(entry.counter_mismatches)
    if entry.overlaps:
        row.problems.append(f"{entry.overlaps} sections began before the previous one ended")


SCENARIO = Scenario(
    name="lock_contended",
    summary="8 worker processes on one lock name, 1 ms critical sections",
    unit="sections/s",
    latency_label="handoff",
    method=(
        "A pool of spawned worker processes (reused across segments) contends for one lock "
        "name; each contender runs one fixed-length segment per trial, trials interleave the "
        "contenders (seeded shuffle), warm-up first. A section is a non-atomic GET+SET of a "
        "shared counter, then the rest of 1 ms (sleep, then spin). Workers collect garbage and "
        "gc.freeze() their import-time heap at start, so no one-off full collection lands on "
        "one contender's segment. Handoff = next holder's "
        "acquire returned - previous holder called release() (system-wide CLOCK_MONOTONIC). "
        "Longest wait = the longest any worker spent inside acquire(). In-CS share = time "
        "inside sections / segment wall time. Server CPU = redis-server user+sys CPU per section "
        "(polling shows here); server Lua = its time in scripts per section (JSON). Checks: "
        "counter == sections, no overlaps."
    ),
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    columns=(
        Column("longest wait", "longest_wait_ms", "ms"),
        Column("in CS", "cs_share", "share"),
        Column("per worker", "fairness", "text"),
        Column("server CPU/section", "server_cpu_us_per_op", "us"),
    ),
    targets=(
        Target("distlock", "p99_us", "<=", 1000.0, "distlock contended handoff p99 <= 1 ms", "us"),
        Target("distlock", "longest_wait_ms", "<=", 100.0, "distlock longest wait <= 100 ms", "ms"),
        Target(
            "distlock",
            "cs_share",
            ">=",
            0.8,
            "distlock share of wall time inside critical sections >= 0.8",
            "share",
        ),
    ),
)
