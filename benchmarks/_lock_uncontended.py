"""lock_uncontended: back-to-back acquire + release cycles on one free key, in one process."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import redis

from ._locks import lock_contender
from ._model import Column, LockContender, LockOps, Plan, RunContext, Scenario, Target
from ._results import ContenderResult, ScenarioResult, complete
from ._serverstats import ServerUsage
from ._stats import Distribution, median

__all__ = ["SCENARIO", "cycles", "run_cycles"]

TTL = 30.0
QUICK = Plan(trials=3, duration=0.25, warmup=0.1)
FULL = Plan(trials=7, duration=1.5, warmup=0.5)
CONTENDERS = tuple(
    lock_contender(key) for key in ("floor", "distlock", "redis-py", "python-redis-lock", "pottery")
)


def cycles(ops: LockOps, seconds: float) -> tuple[list[int], int, int]:
    """Run cycles for ``seconds``; return per-cycle ns, failed acquires and elapsed ns."""
    acquire, release = ops
    samples: list[int] = []
    append = samples.append
    failures = 0
    clock = time.perf_counter_ns
    start = now = clock()
    end = start + int(seconds * 1e9)
    while now < end:
        if not acquire():
            failures += 1
        release()
        stamp = clock()
        append(stamp - now)
        now = stamp
    return samples, failures, now - start


@dataclass
class _Entry:
    contender: LockContender
    clients: list[redis.Redis]
    ops: LockOps
    result: ContenderResult
    samples: list[int] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    script_us: list[float] = field(default_factory=list)
    cycles: int = 0
    failures: int = 0


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run(ctx: RunContext) -> ScenarioResult:
    """Measure every available contender, interleaved per trial."""
    return run_cycles(ctx, SCENARIO, CONTENDERS, plans=(QUICK, FULL))


def run_cycles(
    ctx: RunContext,
    scenario: Scenario,
    contenders: tuple[LockContender, ...],
    *,
    plans: tuple[Plan, Plan],
    leftovers: bool = False,
) -> ScenarioResult:
    """Acquire+release cycles for each contender, interleaved per trial, on ``ctx``'s servers.

    With ``leftovers``, every server is checked after the trials for keys a contender left
    behind (a Redlock whose late grants land after its release).
    """
    plan = ctx.settings.plan(quick=plans[0], full=plans[1])
    result = ScenarioResult(
        name=scenario.name,
        summary=scenario.summary,
        unit=scenario.unit,
        latency_label=scenario.latency_label,
        method=scenario.method,
        plan=plan,
        label=ctx.label,
    )
    entries: list[_Entry] = []
    names: dict[str, str] = {}
    for contender in ctx.select(contenders, result.skipped):
        row = ContenderResult(
            key=contender.key, label=contender.label, role=contender.role, note=contender.note
        )
        clients = ctx.clients()
        client = clients[0]
        name = ctx.name(scenario.name, contender.key)
        names[contender.key] = name
        try:
            if contender.prepare is not None:
                contender.prepare(client, name)
            ops = contender.factory(clients, name, TTL)
        except Exception as exc:
            row.error = _error(exc)
            ctx.reporter.note(f"{contender.label}: could not be built: {row.error}")
            ops = LockOps(lambda: False, lambda: None)
        result.contenders.append(row)
        entries.append(_Entry(contender, clients, ops, row))

    admin = ctx.client()
    ctx.reporter.scenario(scenario.name, len(entries) * (plan.trials + 1))
    try:
        with ctx.placement() as where:
            if where:
                result.notes.append(where)
            _trials(ctx, entries, plan, admin, result)
        if leftovers:
            _check_leftovers(ctx, entries, names)
    finally:
        for entry in entries:
            for client in entry.clients:
                client.close()
        ctx.delete_keys()
        admin.close()

    for entry in entries:
        row = entry.result
        row.latency = Distribution.of_ns(entry.samples)
        row.metrics["cycles"] = entry.cycles
        row.metrics["server_cpu_us_per_op"] = median(entry.cpu_us) if entry.cpu_us else None
        row.metrics["server_lua_us_per_op"] = median(entry.script_us) if entry.script_us else None
        if row.error is None:
            row.checks["every acquire succeeded"] = entry.failures == 0
            if entry.failures:
                row.problems.append(f"{entry.failures} of {entry.cycles} acquires failed")
    return complete(result, scenario)


def _state_key(key: object) -> bool:
    """distlock's fencing state (``:fence`` / ``:rel``, each with a TTL) is not a lock key."""
    text = key.decode() if isinstance(key, bytes) else str(key)
    return text.endswith((":fence", ":rel"))


def _check_leftovers(ctx: RunContext, entries: list[_Entry], names: dict[str, str]) -> None:
    """After the last release, no server may still hold a contender's lock key."""
    time.sleep(0.2)  # let late requests of any contender land first
    servers = ctx.clients()
    try:
        for entry in entries:
            if entry.result.error is not None:
                continue
            name = names[entry.contender.key]
            held = [
                i
                for i, server in enumerate(servers)
                if any(not _state_key(k) for k in server.keys(f"*{name}*"))
            ]
            entry.result.checks["no key left on any master after release"] = not held
            if held:
                entry.result.problems.append(f"lock keys left behind on servers {held}")
    finally:
        for server in servers:
            server.close()


def _trials(
    ctx: RunContext, entries: list[_Entry], plan: Plan, admin: redis.Redis, result: ScenarioResult
) -> None:
    for entry in entries:
        ctx.reporter.step(f"warm-up {entry.contender.label}")
        if entry.result.error is None:
            try:
                cycles(entry.ops, plan.warmup)
            except Exception as exc:
                entry.result.error = _error(exc)
                ctx.reporter.note(f"{entry.contender.label}: {entry.result.error}")
    for trial in range(plan.trials):
        order = ctx.order(entries)
        result.order.append([e.contender.key for e in order])
        for entry in order:
            ctx.reporter.step(f"trial {trial + 1}/{plan.trials}: {entry.contender.label}")
            _measure(ctx, entry, plan, admin)
        for entry in entries:  # keep trial i at index i for every contender
            while len(entry.result.trial_throughput) <= trial:
                entry.result.trial_throughput.append(None)


def _measure(ctx: RunContext, entry: _Entry, plan: Plan, admin: redis.Redis) -> None:
    row = entry.result
    if row.error is not None:
        row.trial_throughput.append(None)
        return
    gc.collect()
    before = ServerUsage.read(admin)
    try:
        samples, failures, elapsed_ns = cycles(entry.ops, plan.duration)
    except Exception as exc:
        row.error = _error(exc)
        row.trial_throughput.append(None)
        ctx.reporter.note(f"{entry.contender.label}: {row.error}")
        return
    after = ServerUsage.read(admin)
    row.trial_throughput.append(len(samples) / elapsed_ns * 1e9 if elapsed_ns else None)
    entry.samples.extend(samples)
    entry.cycles += len(samples)
    entry.failures += failures
    usage = None if before is None else before.per_op_us(after, len(samples))
    if usage is not None:
        entry.cpu_us.append(usage[0])
        entry.script_us.append(usage[1])


SCENARIO = Scenario(
    name="lock_uncontended",
    summary="acquire + release cycles on one free key, one process, one client per contender",
    unit="cycles/s",
    latency_label="cycle",
    method=(
        "Each contender gets its own fresh client and lock handle and runs back-to-back "
        "acquire+release cycles on its own key for a fixed time per trial, after a warm-up. "
        "Trials interleave the contenders (a seeded shuffle per trial). With servers it started, "
        "the run pins itself and redis-server to one CPU (--pin auto), so cross-CPU wake-ups do "
        "not flip the speed between trials and each contender's client+server cost adds up. "
        "Throughput is the "
        "median over trials; latency percentiles pool every cycle of every trial. Server Lua = "
        "time the redis-server spent in Lua scripts per cycle (INFO commandstats; a script's "
        "time includes the commands it calls); server CPU = its user+sys CPU per cycle (INFO "
        "cpu), mostly syscalls."
    ),
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    columns=(
        Column("server Lua/cycle", "server_lua_us_per_op", "us"),
        Column("server CPU/cycle", "server_cpu_us_per_op", "us"),
    ),
    targets=(
        Target(
            "distlock",
            "ratio_to_floor",
            ">=",
            0.95,
            "distlock uncontended cycle throughput >= 0.95x the floor (fencing on)",
        ),
    ),
)
