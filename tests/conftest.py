"""Fixtures that start real Redis processes on loopback (and stop them by pid).

- ``redis_server``: one standalone server for the session; ``r`` / ``ar``: a flushed sync /
  asyncio client on it for one test.
- ``fresh_server``: a server of the test's own, free to kill, pause or restart.
- ``masters``: five independent standalone masters (Redlock); ``cluster``: a 3-master Cluster.
- ``sentinel``: a Sentinel group of the test's own (master, replica, 3 sentinels) to fail over.
- ``proxy``: a ``FaultProxy`` in front of ``redis_server`` (latency, blackhole, cut, refuse).
- ``fake``: a fakeredis client, for fast unit tests only.

Without ``redis-server`` the real-server fixtures skip with install instructions, except under
``CI=true`` or ``DISTKIT_REQUIRE_REDIS=1``, where they fail.

A run stopped by SIGTERM (``timeout``, a CI runner's cancel) unwinds like Ctrl-C, so every
fixture's teardown stops the servers it started instead of leaving them orphaned.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from distkit.testing import (
    FaultProxy,
    IndependentMasters,
    RedisCluster,
    RedisSentinelGroup,
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}: stopping (fixtures stop their servers)")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM unwinds like Ctrl-C: fixture teardowns run and stop every server by pid."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)


def _require_redis() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "DISTKIT_REQUIRE_REDIS", ""
    ) not in ("", "0")


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server binary the rig uses (skip, or fail under CI, when there is none)."""
    try:
        return find_redis_server()
    except RedisServerNotFound as exc:
        if _require_redis():
            pytest.fail(f"{exc} (CI=true / DISTKIT_REQUIRE_REDIS=1: not skipping)")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[RedisServer]:
    """One standalone redis-server shared by the session."""
    with RedisServer(binary=redis_binary) as server:
        yield server


@pytest.fixture
def r(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client on the shared server, flushed before the test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def ar(redis_server: RedisServer) -> Callable[[], redis.asyncio.Redis]:
    """A factory of asyncio clients on the shared server (flushed first); call it inside a loop."""
    redis_server.client().flushall()
    return redis_server.async_client


@pytest.fixture
def fresh_server(redis_binary: str) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill, pause or restart at will."""
    with RedisServer(binary=redis_binary) as server:
        yield server


@pytest.fixture(scope="session")
def masters(redis_binary: str) -> Iterator[IndependentMasters]:
    """Five independent standalone masters (Redlock)."""
    with IndependentMasters(5, binary=redis_binary) as group:
        yield group


@pytest.fixture(scope="session")
def cluster(redis_binary: str) -> Iterator[RedisCluster]:
    """A real 3-master Redis Cluster on loopback."""
    with RedisCluster(masters=3, binary=redis_binary) as clu:
        yield clu


@pytest.fixture
def sentinel(redis_binary: str) -> Iterator[RedisSentinelGroup]:
    """A Sentinel deployment of this test's own: 1 master, 1 replica, 3 sentinels, quorum 2."""
    with RedisSentinelGroup(replicas=1, sentinels=3, quorum=2, binary=redis_binary) as group:
        yield group


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    """A fault-injection proxy in front of the shared server."""
    with FaultProxy(redis_server.address) as prx:
        yield prx


@pytest.fixture
def fake() -> Iterator[Any]:
    """A fakeredis client: fast unit tests only, never the only evidence."""
    import fakeredis

    client = fakeredis.FakeRedis()
    yield client
    client.close()
