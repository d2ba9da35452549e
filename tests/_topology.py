"""Contract suites on several topologies: one standalone server, or the rig's 3-master Cluster.

``Topology`` hands out sync / asyncio clients of one topology and an *inspection* client for
assertions about what is stored in Redis. On a Cluster, the inspection client routes single-key
commands by slot like any ``RedisCluster``, and answers the whole-server questions the contract
tests ask (``KEYS``, ``DBSIZE``, ``INFO commandstats``, ``CONFIG RESETSTAT``, ``FLUSHALL``) over
every master, so one test body holds on both topologies.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import pytest
import redis

from distkit.testing import RedisCluster, RedisServer

TOPOLOGIES = ["standalone", "cluster"]


class ClusterInspector(redis.RedisCluster):
    """A sync cluster client whose server-wide commands cover every master, not one node."""

    def __init__(self, cluster: RedisCluster) -> None:
        make_node: Any = redis.cluster.ClusterNode  # unannotated in some redis-py releases
        nodes = [make_node(host, port) for host, port in cluster.startup_nodes]
        super().__init__(startup_nodes=nodes, socket_timeout=5, socket_connect_timeout=5)
        self._cluster = cluster

    def _each(self, fn: Callable[[redis.Redis], Any]) -> list[Any]:
        out = []
        for node in self._cluster.nodes:
            client = node.client()
            try:
                out.append(fn(client))
            finally:
                client.close()
        return out

    def keys(self, pattern: Any = "*", **kwargs: Any) -> Any:
        """``KEYS`` on every master, concatenated."""
        return [k for found in self._each(lambda c: c.keys(pattern)) for k in found]

    def dbsize(self, **kwargs: Any) -> Any:
        """The number of keys over every master."""
        return sum(self._each(lambda c: c.dbsize()))

    def config_resetstat(self, **kwargs: Any) -> Any:
        """``CONFIG RESETSTAT`` on every master."""
        self._each(lambda c: c.config_resetstat())
        return True

    def flushall(self, *args: Any, **kwargs: Any) -> Any:
        """``FLUSHALL`` on every master."""
        self._each(lambda c: c.flushall())
        return True

    def info(self, section: Any = None, *args: Any, **kwargs: Any) -> Any:
        """``INFO commandstats`` summed over every master (other sections: not needed)."""
        if section != "commandstats":
            raise NotImplementedError(f"INFO {section} over a Cluster")
        total: dict[str, dict[str, int]] = {}
        for stats in self._each(lambda c: c.info("commandstats")):
            for name, values in stats.items():
                entry = total.setdefault(name, {"calls": 0})
                entry["calls"] += int(values["calls"])
        return total


class Topology:
    """Clients of one topology (``standalone`` or ``cluster``) for a contract test."""

    def __init__(self, name: str, request: pytest.FixtureRequest) -> None:
        self.name = name
        self.server: RedisServer | None = None
        self.cluster: RedisCluster | None = None
        if name == "standalone":
            self.server = request.getfixturevalue("redis_server")
        else:
            self.cluster = request.getfixturevalue("cluster")
        self._inspectors: list[redis.Redis | ClusterInspector] = []

    def sync_client(self) -> Any:
        """A new sync client."""
        if self.server is not None:
            return self.server.client()
        assert self.cluster is not None
        return self.cluster.client()

    def async_client(self) -> Any:
        """A new asyncio client (create it inside the loop that uses it)."""
        if self.server is not None:
            return self.server.async_client()
        assert self.cluster is not None
        return self.cluster.async_client()

    def inspector(self) -> Any:
        """A sync client for assertions (server-wide commands cover every node)."""
        client: redis.Redis | ClusterInspector
        if self.server is not None:
            client = self.server.client()
        else:
            assert self.cluster is not None
            client = ClusterInspector(self.cluster)
        self._inspectors.append(client)
        return client

    def close(self) -> None:
        """Close the inspection clients."""
        for client in self._inspectors:
            client.close()


def shard_base(namespace: str, shards: int, key: str, prefix: str = "distkit") -> str:
    """The documented layout: the prefix of the records and entries on ``key``'s shard."""
    if shards == 1:
        return f"{prefix}:cache:{{{namespace}}}"
    if len(key) > 200:
        import hashlib

        key = hashlib.sha256(key.encode()).hexdigest()
    return f"{prefix}:cache.{shards}:{{{namespace}.{zlib.crc32(key.encode()) % shards}}}"
