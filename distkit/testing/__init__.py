"""Real Redis processes and network faults for tests and benchmarks.

``RedisServer`` (one local ``redis-server``), ``RedisCluster`` (a local Cluster),
``IndependentMasters`` (for Redlock) and ``FaultProxy`` (latency, blackhole, cut, refuse).
"""

from distkit.testing._cluster import IndependentMasters, RedisCluster, start_masters
from distkit.testing._proxy import FaultProxy
from distkit.testing._server import (
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
    free_port,
    redis_server_version,
)

__all__ = [
    "FaultProxy",
    "IndependentMasters",
    "RedisCluster",
    "RedisServer",
    "RedisServerNotFound",
    "find_redis_server",
    "free_port",
    "redis_server_version",
    "start_masters",
]
