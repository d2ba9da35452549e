"""cluster_lock and cluster_cache_hit: the same operations on a 3-master Redis Cluster, next to
one standalone server (issue 8 point 4).

The Cluster is a throwaway one (``distkit.testing.RedisCluster``: three local masters, no
replicas), started by the scenario and stopped at its end, also when the run was given
``--redis-url`` (the standalone rows then use that server). Each Cluster row is paired with its
standalone twin trial by trial: ``vs standalone`` is the median of those per-trial throughput
ratios.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import redis

import distcache

from ._caches import HIT_CONTENDERS, KEYS, _cycle_reads, value_for
from ._lock_uncontended import run_cycles
from ._locks import lock_contender
from ._model import Column, LockContender, LockFactory, LockOps, Plan, RunContext, Scenario
from ._results import ScenarioResult, _paired
from ._stats import median

__all__ = ["CACHE_SCENARIO", "LOCK_SCENARIO"]

QUICK = Plan(trials=3, duration=0.25, warmup=0.1)
FULL = Plan(trials=7, duration=1.5, warmup=0.5)
CLUSTER_SUFFIX = "-cluster"


class _Cluster:
    """The scenario's throwaway Cluster: started on first need, stopped by ``close``."""

    def __init__(self) -> None:
        self._cluster: Any = None
        self._clients: list[Any] = []

    def client(self) -> Any:
        """A new sync ``RedisCluster`` client (closed by ``close``)."""
        if self._cluster is None:
            from distkit.testing import RedisCluster

            self._cluster = RedisCluster(masters=3).start()
        client = self._cluster.client()
        self._clients.append(client)
        return client

    def close(self) -> None:
        """Close the clients and stop the nodes."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._cluster is not None:
            self._cluster.stop()
            self._cluster = None


_CLUSTER = _Cluster()


def _on_cluster(factory: LockFactory) -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        return factory([_CLUSTER.client()], name, ttl)

    return make


def _cache_floor_cluster(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
    client = _CLUSTER.client()
    execute: Callable[..., Any] = client.execute_command
    keys = [f"{name}:{i}" for i in range(KEYS)]
    client.mset_nonatomic({k: json.dumps(value_for(i)) for i, k in enumerate(keys)})
    loads = json.loads
    return _cycle_reads(lambda i: loads(execute("GET", keys[i])))


def _distcache_cluster(shards: int | None) -> LockFactory:
    def make(clients: Sequence[redis.Redis], name: str, ttl: float) -> LockOps:
        cache = distcache.Cache(_CLUSTER.client(), namespace=name, ttl=300, shards=shards)
        cache.set_many({str(i): value_for(i) for i in range(KEYS)})
        keys = [str(i) for i in range(KEYS)]
        get = cache.get
        return _cycle_reads(lambda i: get(keys[i]))

    return make


def _twin(base: LockContender, factory: LockFactory, key: str, label: str) -> LockContender:
    return LockContender(
        key=key,
        label=label,
        role="floor" if base.role == "floor" else "distkit",
        factory=factory,
        note=f"{base.note} (3-master Cluster: RedisCluster client)",
        requires=base.requires,
    )


_HIT = {c.key: c for c in HIT_CONTENDERS}
_LOCK_ROWS = (lock_contender("floor"), lock_contender("distlock"))
LOCK_CONTENDERS: tuple[LockContender, ...] = (
    *_LOCK_ROWS,
    *(
        _twin(c, _on_cluster(c.factory), c.key + CLUSTER_SUFFIX, c.label + " (Cluster)")
        for c in _LOCK_ROWS
    ),
)
CACHE_CONTENDERS: tuple[LockContender, ...] = (
    _HIT["floor"],
    _HIT["distcache"],
    _twin(_HIT["floor"], _cache_floor_cluster, "floor-cluster",
          "floor: GET + json.loads (Cluster)"),
    _twin(_HIT["distcache"], _distcache_cluster(None), "distcache-cluster",
          "distcache Cache.get (Cluster, 16 shards)"),
    _twin(_HIT["distcache"], _distcache_cluster(1), "distcache-cluster-1",
          "distcache Cache.get (Cluster, shards=1)"),
)  # fmt: skip


def _vs_standalone(result: ScenarioResult) -> ScenarioResult:
    """Each Cluster row's per-trial throughput ratio to its standalone twin (median)."""
    rows = {c.key: c for c in result.contenders}
    for row in result.contenders:
        base_key = row.key.removesuffix("-1").removesuffix(CLUSTER_SUFFIX)
        if not row.key.startswith(base_key + CLUSTER_SUFFIX) or base_key not in rows:
            continue
        ratios = _paired(row, rows[base_key])
        row.metrics["vs_standalone"] = median(ratios) if ratios else None
    return result


def _run(
    scenario: Scenario, contenders: tuple[LockContender, ...]
) -> Callable[[RunContext], ScenarioResult]:
    def run(ctx: RunContext) -> ScenarioResult:
        try:
            return _vs_standalone(run_cycles(ctx, scenario, contenders, plans=(QUICK, FULL)))
        finally:
            _CLUSTER.close()

    return run


_METHOD = (
    "Standalone rows use the run's server; Cluster rows a throwaway 3-master Redis Cluster on "
    "loopback (no replicas), through redis-py's RedisCluster client, which routes each command "
    "to the slot's master itself (no proxy hop). Trials interleave all rows. 'vs standalone' "
    "is each Cluster row's throughput over its standalone twin's, paired per trial. With "
    "--pin auto only the standalone server shares this process's CPU; the Cluster nodes float."
)
_COLUMNS = (Column("vs standalone", "vs_standalone", "ratio"),)


def _lock_run(ctx: RunContext) -> ScenarioResult:
    return _run(LOCK_SCENARIO, LOCK_CONTENDERS)(ctx)


def _cache_run(ctx: RunContext) -> ScenarioResult:
    return _run(CACHE_SCENARIO, CACHE_CONTENDERS)(ctx)


LOCK_SCENARIO = Scenario(
    name="cluster_lock",
    summary="acquire + release cycles on one free key: Redis Cluster next to one server",
    unit="cycles/s",
    latency_label="cycle",
    method=_METHOD,
    run=_lock_run,
    plans=(QUICK, FULL),
    contenders=LOCK_CONTENDERS,
    columns=_COLUMNS,
)

CACHE_SCENARIO = Scenario(
    name="cluster_cache_hit",
    summary="hits on 1,000 hot keys: Redis Cluster (16 shards, 1 shard) next to one server",
    unit="hits/s",
    latency_label="hit",
    method=_METHOD,
    run=_cache_run,
    plans=(QUICK, FULL),
    contenders=CACHE_CONTENDERS,
    columns=_COLUMNS,
)
