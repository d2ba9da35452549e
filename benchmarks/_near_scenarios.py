"""near_cache_zipf: a Zipf read/write workload with invalidations across processes.

Two reader processes call ``get_or_set`` on keys drawn from a Zipf distribution (s = 1.1 over
1,000 keys) with a loader that reads the "database" (a shared array of versions); one writer
process updates the database and then, after each update, sets the key, deletes it, or (every
50th update) invalidates the tag of a tenth of the keys. After an invalidation *returns*, the
writer publishes (when, version) for its keys. A read that starts more than ``BOUND`` after a
publication and returns an older version is a stale read: the figure that must be 0.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import multiprocessing
import random
import time
from array import array
from multiprocessing.sharedctypes import RawArray
from typing import Any

import redis

import distcache

from ._model import CLIENT_OPTIONS, Column, Contender, Plan, RunContext, Scenario, Target
from ._results import ContenderResult, ScenarioResult, complete
from ._stats import Distribution

__all__ = ["SCENARIO"]

KEYS = 1000
ZIPF_S = 1.1
READERS = 2
BOUND = 0.010  # seconds: the stated coherence bound (a stale read is one older than this)
WRITES_PER_S = 200
TAG_EVERY = 50
QUICK = Plan(trials=1, duration=1.0, warmup=0.2)
FULL = Plan(trials=3, duration=5.0, warmup=0.5)


def _zipf_cdf() -> list[float]:
    weights = [1 / (i + 1) ** ZIPF_S for i in range(KEYS)]
    total = sum(weights)
    return list(itertools.accumulate(w / total for w in weights))


def _cache(url: str, namespace: str, near: bool) -> distcache.Cache:
    client = redis.Redis.from_url(url, **CLIENT_OPTIONS)
    return distcache.Cache(
        client,
        namespace=namespace,
        ttl=300,
        near_cache=distcache.NearCache(max_entries=2 * KEYS) if near else None,
        metrics=distcache.CounterMetrics(),
    )


def _load(db: Any, k: int) -> dict[str, int]:
    return {"k": k, "v": int(db[k])}


def _reader(url: str, ns: str, near: bool, seed: int, shared: Any, go: Any, stop: Any,
            out: Any) -> None:  # fmt: skip
    db, done_v, done_t = shared
    cache = _cache(url, ns, near)
    if cache._near is not None:
        cache._near.wait_live(10)
    cdf = _zipf_cdf()
    rng = random.Random(seed)
    reads = stale = 0
    worst = 0.0
    durations = array("q")
    out.put("ready")
    go.wait()
    clock = time.monotonic
    while not stop.is_set():
        k = bisect.bisect_left(cdf, rng.random())
        if k >= KEYS:
            k = KEYS - 1
        published_v, published_t = done_v[k], done_t[k]  # version first (see the writer)
        started = clock()
        began = time.perf_counter_ns()
        value = cache.get_or_set(str(k), functools.partial(_load, db, k), tags=[f"g{k % 10}"])
        if len(durations) < 200_000:
            durations.append(time.perf_counter_ns() - began)
        reads += 1
        if value["v"] < published_v and started - published_t > 0:
            lag = started - published_t
            worst = max(worst, lag)
            stale += lag > BOUND
    metrics = cache.metrics
    assert isinstance(metrics, distcache.CounterMetrics)
    if cache._near is not None:
        cache.close()
    out.put((reads, stale, worst, metrics.snapshot(), durations.tobytes()))


def _writer(url: str, ns: str, seed: int, shared: Any, go: Any, stop: Any, out: Any) -> None:
    db, done_v, done_t = shared
    cache = _cache(url, ns, False)
    rng = random.Random(seed)
    cdf = _zipf_cdf()
    writes = 0
    out.put("ready")
    go.wait()
    pause = 1 / WRITES_PER_S
    while not stop.is_set():
        writes += 1
        if writes % TAG_EVERY == 0:
            group = rng.randrange(10)
            keys = range(group, KEYS, 10)
            for k in keys:
                db[k] += 1
            cache.invalidate_tags(f"g{group}")
        else:
            k = min(bisect.bisect_left(cdf, rng.random()), KEYS - 1)
            db[k] += 1
            keys = range(k, k + 1)
            if writes % 2:
                cache.set(str(k), {"k": k, "v": db[k]}, tags=[f"g{k % 10}"])
            else:
                cache.delete(str(k))
        now = time.monotonic()
        for k in keys:  # time first, then version: a reader never pairs a new version
            done_t[k] = now  # with an older time (it reads the version first)
            done_v[k] = db[k]
        time.sleep(pause)
    out.put(writes)


def _one(ctx: RunContext, contender: Contender, seconds: float, trial: int) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    shared = (RawArray("q", KEYS), RawArray("q", KEYS), RawArray("d", KEYS))
    go, stop, out, wout = spawn.Event(), spawn.Event(), spawn.Queue(), spawn.Queue()
    ns = ctx.name("near_zipf", contender.key, str(trial))
    near = contender.key == "distcache-near"
    seed = ctx.settings.seed or 0
    procs = [
        spawn.Process(target=_reader, args=(ctx.urls[0], ns, near, seed + i, shared, go, stop, out))
        for i in range(READERS)
    ]
    procs.append(spawn.Process(target=_writer, args=(ctx.urls[0], ns, seed, shared, go, stop,
                                                     wout)))  # fmt: skip
    for p in procs:
        p.start()
    try:
        for queue, n in ((out, READERS), (wout, 1)):  # connected (and subscribed)
            for _ in range(n):
                assert queue.get(timeout=60) == "ready"
        go.set()
        time.sleep(seconds)
        stop.set()
        reports = [out.get(timeout=60) for _ in range(READERS)]
        writes = wout.get(timeout=60)
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    reads = sum(r[0] for r in reports)
    snap: dict[str, int] = {}
    for r in reports:
        for name, n in r[3].items():
            snap[name] = snap.get(name, 0) + n
    return {
        "reads": reads,
        "writes": writes,
        "stale": sum(r[1] for r in reports),
        "worst": max(r[2] for r in reports),
        "near_hits": snap.get("near_hit", 0),
        "hits": snap.get("hit", 0),  # any tier: the read-through counts L1 hits as hits too
        "seconds": seconds,
        "durations": [d for r in reports for d in _ns(r[4])],
    }


def _ns(data: bytes) -> array[int]:
    out = array("q")
    out.frombytes(data)
    return out


def run(ctx: RunContext) -> ScenarioResult:
    """Run the workload once per trial for each contender."""
    plan = ctx.settings.plan(quick=QUICK, full=FULL)
    result = ScenarioResult(
        name=SCENARIO.name,
        summary=SCENARIO.summary,
        unit=SCENARIO.unit,
        latency_label=SCENARIO.latency_label,
        method=SCENARIO.method,
        plan=plan,
        label=ctx.label,
    )
    selected = ctx.select(CONTENDERS, result.skipped)
    ctx.reporter.scenario(SCENARIO.name, len(selected) * plan.trials)
    for contender in selected:
        row = ContenderResult(
            key=contender.key, label=contender.label, role=contender.role, note=contender.note
        )
        result.contenders.append(row)
        durations: list[int] = []
        totals: dict[str, float] = {"reads": 0, "stale": 0, "worst": 0.0, "near_hits": 0,
                                    "hits": 0, "writes": 0}  # fmt: skip
        try:
            for trial in range(plan.trials):
                ctx.reporter.step(f"trial {trial + 1}/{plan.trials}: {contender.label}")
                one = _one(ctx, contender, plan.duration, trial)
                row.trial_throughput.append(one["reads"] / one["seconds"])
                for name in ("reads", "stale", "near_hits", "hits", "writes"):
                    totals[name] += one[name]
                totals["worst"] = max(totals["worst"], one["worst"])
                durations += one["durations"]
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            ctx.reporter.note(f"{contender.label}: {row.error}")
            continue
        reads = max(1.0, totals["reads"])
        row.latency = Distribution.of_ns(durations)
        row.metrics.update(
            stale_reads=int(totals["stale"]),
            max_stale_ms=totals["worst"] * 1000,
            l1_hit_ratio=totals["near_hits"] / reads,
            hit_ratio=totals["hits"] / reads,
            writes=int(totals["writes"]),
        )
        row.checks["no stale read beyond the bound"] = totals["stale"] == 0
    ctx.delete_keys()
    result.notes.append(
        f"{READERS} reader processes + 1 writer ({WRITES_PER_S} updates/s, a tag invalidation "
        f"every {TAG_EVERY}), Zipf s={ZIPF_S} over {KEYS} keys; stale = older than {BOUND * 1000:g}"
        " ms after the invalidation returned"
    )
    return complete(result, SCENARIO)


CONTENDERS: tuple[Contender, ...] = (
    Contender(key="distcache", label="distcache (Redis only)", role="floor",
              note="Cache.get_or_set without near cache: every read is one MGET"),
    Contender(key="distcache-near", label="distcache + near cache", role="distkit",
              note="Cache.get_or_set with NearCache(): hits from process memory"),
)  # fmt: skip

SCENARIO = Scenario(
    name="near_cache_zipf",
    summary="Zipf reads in 2 processes while a third writes and invalidates: hits and staleness",
    unit="reads/s",
    latency_label="read",
    method=__doc__ or "",
    run=run,
    plans=(QUICK, FULL),
    contenders=CONTENDERS,
    columns=(
        Column("L1 hits", "l1_hit_ratio", "share"),
        Column("hits (any tier)", "hit_ratio", "share"),
        Column("stale reads", "stale_reads", "count"),
        Column("max stale lag", "max_stale_ms", "ms"),
    ),
    targets=(
        Target(
            "distcache-near",
            "stale_reads",
            "<=",
            0.0,
            f"no read older than {BOUND * 1000:g} ms after an invalidation returned",
            "count",
        ),
    ),
)
