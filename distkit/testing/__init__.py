"""Real Redis processes and network faults for tests and benchmarks.

``RedisServer`` (one local ``redis-server``), ``RedisCluster`` (a local Cluster),
``IndependentMasters`` (for Redlock), ``RedisSentinelGroup`` (master, replica, sentinels) and
``FaultProxy`` (latency, blackhole, cut, refuse).
"""

from distkit.testing._cluster import IndependentMasters, RedisCluster, start_masters
from distkit.testing._history import (
    CheckResult,
    Event,
    HistoryRecorder,
    Violation,
    check_cache,
    check_fencing,
    check_mutex,
    check_orphans,
    check_validity,
    drain_queue,
    read_history,
    sort_events,
)
from distkit.testing._proxy import FaultProxy
from distkit.testing._sentinel import RedisSentinelGroup, SentinelServer
from distkit.testing._server import (
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
    free_port,
    redis_server_version,
)

__all__ = [
    "CheckResult",
    "Event",
    "FaultProxy",
    "HistoryRecorder",
    "IndependentMasters",
    "RedisCluster",
    "RedisServer",
    "RedisSentinelGroup",
    "RedisServerNotFound",
    "SentinelServer",
    "Violation",
    "check_cache",
    "check_fencing",
    "check_mutex",
    "check_orphans",
    "check_validity",
    "drain_queue",
    "find_redis_server",
    "free_port",
    "read_history",
    "redis_server_version",
    "sort_events",
    "start_masters",
]
