"""cache_hit and cache_batch: read-through hits and batch reads, each contender on its own keys."""

from __future__ import annotations

from ._caches import BATCH_CONTENDERS, HIT_CONTENDERS
from ._lock_uncontended import run_cycles
from ._model import Plan, RunContext, Scenario, Target
from ._results import ScenarioResult

__all__ = ["BATCH_SCENARIO", "HIT_SCENARIO"]

QUICK = Plan(trials=3, duration=0.25, warmup=0.1)
FULL = Plan(trials=7, duration=1.5, warmup=0.5)


def _run_hit(ctx: RunContext) -> ScenarioResult:
    return run_cycles(ctx, HIT_SCENARIO, HIT_CONTENDERS, plans=(QUICK, FULL))


def _run_batch(ctx: RunContext) -> ScenarioResult:
    return run_cycles(ctx, BATCH_SCENARIO, BATCH_CONTENDERS, plans=(QUICK, FULL))


HIT_SCENARIO = Scenario(
    name="cache_hit",
    summary="hits on 1,000 hot keys (~200-byte JSON values), one process",
    unit="hits/s",
    latency_label="hit",
    method=(
        "Each contender seeds its own 1,000 keys in its own format, then reads them round-robin "
        "for a fixed time per trial; a read that misses fails the row's check. Trials interleave "
        "the contenders. The first floor (sync GET + json.loads) is the ratio's reference; async "
        "contenders pay one run_until_complete per read, as the async floor does, so compare "
        "them to that row. The dict row is a ceiling, not a competitor."
    ),
    run=_run_hit,
    plans=(QUICK, FULL),
    contenders=HIT_CONTENDERS,
    targets=(
        Target(
            "distcache",
            "ratio_to_floor",
            ">=",
            0.95,
            "distcache Redis hit >= 0.95x the GET + json.loads floor",
        ),
        Target(
            "distcache-near",
            "p50_us",
            "<=",
            3.0,
            "distcache near-cache hit p50 <= 3 us",
            "us",
        ),
    ),
)

BATCH_SCENARIO = Scenario(
    name="cache_batch",
    summary="reads of 100 keys at once: get_many vs one MGET vs 100 GETs",
    unit="batches/s",
    latency_label="batch",
    method=(
        "Each contender seeds 1,000 keys and reads them in batches of 100, round-robin; a batch "
        "with a miss fails the row's check. The floor is one raw MGET; 100 sequential GETs show "
        "what a loop of single reads costs."
    ),
    run=_run_batch,
    plans=(QUICK, FULL),
    contenders=BATCH_CONTENDERS,
)
