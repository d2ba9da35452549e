"""redlock: acquire + release cycles over 3 and 5 independent masters, next to one server."""

from __future__ import annotations

from ._lock_uncontended import run_cycles
from ._locks import lock_contender
from ._model import LockContender, Plan, RunContext, Scenario, Target
from ._results import ScenarioResult

__all__ = ["SCENARIO"]

QUICK = Plan(trials=3, duration=0.25, warmup=0.1)
FULL = Plan(trials=7, duration=1.5, warmup=0.5)
CONTENDERS: tuple[LockContender, ...] = tuple(
    lock_contender(key)
    for key in (
        "floor",
        "distlock",
        "distlock-redlock-3",
        "distlock-redlock-3-per-call",
        "distlock-redlock-5",
        "distlock-redlock-5-quorum",
        "pottery-3",
        "pottery-5",
    )
)


def run(ctx: RunContext) -> ScenarioResult:
    """Cycles on 5 servers (each contender uses as many as it names), then a leftover check."""
    return run_cycles(ctx, SCENARIO, CONTENDERS, plans=(QUICK, FULL), leftovers=True)


SCENARIO = Scenario(
    name="redlock",
    summary="acquire + release cycles over independent masters, next to the single-server floor",
    unit="cycles/s",
    latency_label="cycle",
    servers=5,
    method=(
        "Five throwaway redis-servers; the floor and distlock.Lock use the first, the Redlocks "
        "the first 3 or 5. Trials interleave the contenders; throughput is the median over "
        "trials, latency percentiles pool every cycle. After the trials every server is "
        "checked for lock keys a contender left behind (a late grant landing after its release; "
        "distlock's fencing state — :fence / :rel keys with a TTL — is not a lock key)."
    ),
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    targets=(
        Target(
            "distlock-redlock-5",
            "ratio_to_floor",
            ">=",
            1 / 1.8,
            "distlock Redlock x5 cycle costs <= 1.8x the single-instance floor's latency",
        ),
    ),
)
