"""The connection factory against real servers: standalone, Cluster, independent masters, faults."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Generator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.exceptions as rex
import redis.sentinel

from distkit import (
    AuthenticationFailed,
    ConfigError,
    ConnectionUnavailable,
    RedisConfig,
    aconnect,
    connect,
)
from distkit._errors import translating
from distkit._protocol import AsyncDriver, Command, SyncDriver
from distkit._retry import NO_RETRY, RetryPolicy
from distkit.testing import FaultProxy, IndependentMasters, RedisCluster, RedisServer, free_port

SECRET = "pw-Xy7-never-shown"
TIMEOUT = 0.3


def retries(retry: Any) -> int:
    """How many times a redis-py ``Retry`` retries (``get_retries()`` came after redis-py 5.3)."""
    assert retry is not None
    getter = getattr(retry, "get_retries", None)
    return int(getter() if getter is not None else retry._retries)


def config_variants(server: RedisServer) -> dict[str, Any]:
    return {
        "config": server.config(),
        "url": server.url,
        "mapping": {"host": server.host, "port": server.port},
    }


@pytest.fixture(params=["config", "url", "mapping"])
def standalone(request: pytest.FixtureRequest, redis_server: RedisServer, r: redis.Redis) -> Any:
    """The shared server (flushed), described as a RedisConfig, a URL or a mapping."""
    return config_variants(redis_server)[request.param]


def ping_protocol() -> Generator[Command, Any, Any]:
    return (yield Command(("PING",)))


# -- standalone -------------------------------------------------------------------------------


def test_connect_standalone(standalone: Any, r: redis.Redis) -> None:
    client = connect(standalone)
    try:
        assert type(client) is redis.Redis
        assert client.ping() is True
        client.set("conn:k", "v")
        assert client.get("conn:k") == b"v"
        assert r.get("conn:k") == b"v"  # the same server as the fixture's
    finally:
        client.close()


def test_aconnect_standalone(standalone: Any, r: redis.Redis) -> None:
    async def main() -> bytes | None:
        client = aconnect(standalone)
        try:
            assert type(client) is redis.asyncio.Redis
            assert await client.ping() is True
            await client.set("conn:ak", "av")
            value: bytes | None = await client.get("conn:ak")
            return value
        finally:
            await client.aclose()

    assert asyncio.run(main()) == b"av"
    assert r.get("conn:ak") == b"av"


def test_connect_applies_db_timeouts_pool_and_name(redis_server: RedisServer) -> None:
    cfg = redis_server.config(
        db=3, socket_timeout=1.5, connect_timeout=0.7, max_connections=5, client_name="dk-test"
    )
    client = connect(cfg)
    try:
        client.set("conn:db3", "x")
        assert client.client_getname() == "dk-test"
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.5, 0.7)
        assert client.connection_pool.max_connections == 5
    finally:
        client.close()
    with redis_server.client(db=3) as db3, redis_server.client(db=0) as db0:
        assert db3.get("conn:db3") == b"x"
        assert db0.get("conn:db3") is None
        db3.flushdb()


def test_connect_with_username_and_password(fresh_server: RedisServer) -> None:
    with fresh_server.client() as admin:
        admin.acl_setuser(
            "distkit-user", enabled=True, passwords=[f"+{SECRET}"], keys=["*"], commands=["+@all"]
        )
    url = f"redis://distkit-user:{SECRET}@{fresh_server.host}:{fresh_server.port}/0"
    client = connect(url)
    try:
        assert client.acl_whoami() == "distkit-user"
        assert SECRET not in repr(client)
    finally:
        client.close()
    wrong = connect(fresh_server.config(username="distkit-user", password="wrong-password"))
    try:
        with pytest.raises(AuthenticationFailed) as info, translating("auth"):
            wrong.ping()
        assert not isinstance(info.value, ConnectionUnavailable)  # not an outage: never retried
    finally:
        wrong.close()


def test_redis_py_retries_are_off(redis_server: RedisServer, cluster: RedisCluster) -> None:
    sync_client = connect(redis_server.config())
    cluster_client = connect(cluster.config())
    try:
        assert sync_client.get_retry() is not None
        assert retries(sync_client.get_retry()) == 0
        assert cluster_client.retry is not None
        assert retries(cluster_client.retry) == 0
    finally:
        sync_client.close()
        cluster_client.close()

    async def main() -> tuple[int, int]:
        aclient = aconnect(redis_server.config())
        acluster = aconnect(cluster.config())
        try:
            assert isinstance(acluster, redis.asyncio.RedisCluster)
            retry = aclient.get_retry()
            assert retry is not None
            return retries(retry), retries(acluster.retry)
        finally:
            await aclient.aclose()
            await acluster.aclose()

    assert asyncio.run(main()) == (0, 0)


@pytest.mark.parametrize("bad", [42, None, 3.5, ["redis://h"], b"redis://h"])
def test_connect_rejects_other_types(bad: Any) -> None:
    with pytest.raises(ConfigError, match="RedisConfig"):
        connect(bad)
    with pytest.raises(ConfigError, match="RedisConfig"):
        aconnect(bad)


@pytest.mark.parametrize(
    "bad", ["http://h:1/0", {"port": 0}, {"host": "h", "bogus": 1}, "redis://h:99999"]
)
def test_connect_rejects_invalid_config(bad: Any) -> None:
    with pytest.raises(ConfigError):
        connect(bad)
    with pytest.raises(ConfigError):
        aconnect(bad)


# -- Cluster ----------------------------------------------------------------------------------


def test_connect_cluster(cluster: RedisCluster) -> None:
    client = connect(cluster.config())
    tag = uuid.uuid4().hex
    keys = [f"conn:{tag}:{i}" for i in range(60)]
    try:
        assert type(client) is redis.RedisCluster
        assert client.ping() is True
        for key in keys:
            client.set(key, key)
        assert [client.get(key) for key in keys] == [key.encode() for key in keys]
    finally:
        client.close()
    owners = set()
    for key in keys:
        node = cluster.node_for_key(key)
        with node.client() as conn:
            assert conn.get(key) == key.encode()  # stored on the node that owns the slot
        owners.add(node.port)
    assert len(owners) == len(cluster.nodes)  # the keys spread over every master


def test_connect_cluster_from_a_single_startup_node_url(cluster: RedisCluster) -> None:
    host, port = cluster.startup_nodes[1]
    client = connect({"mode": "cluster", "url": f"redis://{host}:{port}"})
    try:
        assert type(client) is redis.RedisCluster
        assert len(client.get_primaries()) == len(cluster.nodes)  # discovered the others
    finally:
        client.close()


def test_aconnect_cluster(cluster: RedisCluster) -> None:
    tag = uuid.uuid4().hex
    keys = [f"aconn:{tag}:{i}" for i in range(30)]

    async def main() -> list[bytes | None]:
        client = aconnect(cluster.config())
        try:
            assert type(client) is redis.asyncio.RedisCluster
            for key in keys:
                await client.set(key, "1")
            return [await client.get(key) for key in keys]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [b"1"] * len(keys)
    assert len({cluster.node_for_key(key).port for key in keys}) == len(cluster.nodes)


def test_connect_cluster_with_no_reachable_node_is_connection_unavailable() -> None:
    cfg = RedisConfig(
        mode="cluster",
        cluster_nodes=f"127.0.0.1:{free_port()}",
        connect_timeout=TIMEOUT,
        socket_timeout=TIMEOUT,
    )
    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable) as info:
        connect(cfg)
    assert time.monotonic() - started < 5
    assert info.value.__cause__ is not None

    async def main() -> None:
        client = aconnect(cfg)
        try:
            with translating("ping"):
                await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(ConnectionUnavailable):
        asyncio.run(main())


# -- independent masters ----------------------------------------------------------------------


def test_connect_each_master(masters: IndependentMasters) -> None:
    tag = uuid.uuid4().hex
    clients = [connect(url) for url in masters.urls]
    try:
        assert len(clients) == 5
        for i, client in enumerate(clients):
            assert type(client) is redis.Redis
            assert client.ping() is True
            client.set(f"master:{tag}", i)
        # independent: each holds its own value, none sees another's
        assert [client.get(f"master:{tag}") for client in clients] == [
            str(i).encode() for i in range(5)
        ]
        ports = {client.connection_pool.connection_kwargs["port"] for client in clients}
        assert ports == {server.port for server in masters}
    finally:
        for client in clients:
            client.delete(f"master:{tag}")
            client.close()


def test_aconnect_each_master(masters: IndependentMasters) -> None:
    async def main() -> list[bool]:
        clients = [aconnect(cfg) for cfg in masters.redlock_config().masters]
        try:
            return list(await asyncio.gather(*(client.ping() for client in clients)))
        finally:
            for client in clients:
                await client.aclose()

    assert asyncio.run(main()) == [True] * 5


# -- Sentinel (construction only: no sentinel runs in these tests) -----------------------------


def sentinel_config() -> RedisConfig:
    return RedisConfig(
        mode="sentinel",
        sentinels=f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}",
        sentinel_service="mymaster",
        password=SECRET,
        sentinel_password=SECRET + "-s",
        username="app",
        db=2,
    )


def test_sentinel_client_is_built_without_io() -> None:
    client = connect(sentinel_config())  # nothing listens on those ports: no I/O happened
    try:
        assert type(client) is redis.Redis
        pool = client.connection_pool
        assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
        assert pool.service_name == "mymaster"
        assert pool.connection_kwargs["db"] == 2
        assert client.get_retry() is not None
        assert retries(client.get_retry()) == 0
        sentinel_nodes = pool.sentinel_manager.sentinels
        assert len(sentinel_nodes) == 2
        for node in sentinel_nodes:  # the queries to the sentinels are not retried either
            assert retries(node.get_retry()) == 0
            assert node.connection_pool.connection_kwargs["password"] == SECRET + "-s"
        for text in (repr(client), str(client), repr(pool), repr(sentinel_nodes)):
            assert SECRET not in text
    finally:
        client.close()


def test_async_sentinel_client_is_built_without_io() -> None:
    async def main() -> None:
        client = aconnect(sentinel_config())
        try:
            assert type(client) is redis.asyncio.Redis
            pool = client.connection_pool
            assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool)
            assert pool.service_name == "mymaster"
            for text in (repr(client), str(client), repr(pool)):
                assert SECRET not in text
        finally:
            await client.aclose()

    asyncio.run(main())


def test_sentinel_with_nobody_listening_is_connection_unavailable() -> None:
    cfg = sentinel_config().model_copy(update={"connect_timeout": TIMEOUT})
    client = connect(cfg)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionUnavailable) as info, translating("ping"):
            client.ping()
    finally:
        client.close()
    assert time.monotonic() - started < 5
    assert SECRET not in str(info.value)


# -- dead and black-holed servers --------------------------------------------------------------


def dead_config(**overrides: Any) -> RedisConfig:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "connect_timeout": TIMEOUT,
        "socket_timeout": TIMEOUT,
    }
    return RedisConfig(**{**fields, **overrides})


def test_dead_server_is_connection_unavailable() -> None:
    client = connect(dead_config())
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionUnavailable) as info, translating("ping"):
            client.ping()
    finally:
        client.close()
    assert time.monotonic() - started < 5
    assert isinstance(info.value.__cause__, rex.ConnectionError)
    assert "ping" in str(info.value)


def test_dead_server_through_the_protocol_driver() -> None:
    client = connect(dead_config())
    started = time.monotonic()
    try:
        driver = SyncDriver(client, RetryPolicy(dead_config().retry), "ping test")
        with pytest.raises(ConnectionUnavailable) as info:
            driver.run(ping_protocol())
    finally:
        client.close()
    assert time.monotonic() - started < 5
    assert "ping test" in str(info.value)
    assert isinstance(info.value.__cause__, rex.ConnectionError)


def test_dead_server_async() -> None:
    async def main() -> None:
        client = aconnect(dead_config())
        try:
            await AsyncDriver(client, NO_RETRY, "async ping").run(ping_protocol())
        finally:
            await client.aclose()

    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable, match="async ping"):
        asyncio.run(main())
    assert time.monotonic() - started < 5


def test_driver_runs_against_the_live_server(redis_server: RedisServer) -> None:
    client = connect(redis_server.config())
    try:
        assert SyncDriver(client, NO_RETRY, "ping").run(ping_protocol()) is True
    finally:
        client.close()


def test_blackholed_new_connection_times_out(proxy: FaultProxy) -> None:
    proxy.blackhole()
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionUnavailable) as info, translating("ping"):
            client.ping()
    finally:
        proxy.reset()
        client.close()
    elapsed = time.monotonic() - started
    assert elapsed < 5  # no hang
    assert elapsed < 3 * TIMEOUT  # one timeout, not redis-py's retries on top
    assert isinstance(info.value.__cause__, (rex.TimeoutError, rex.ConnectionError))


def test_blackholed_established_connection_times_out_once(proxy: FaultProxy) -> None:
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    try:
        assert client.ping() is True  # the connection is open and pooled
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(ConnectionUnavailable) as info, translating("ping"):
            client.ping()
        elapsed = time.monotonic() - started
    finally:
        proxy.reset()
        client.close()
    assert TIMEOUT * 0.8 <= elapsed < 3 * TIMEOUT
    assert isinstance(info.value.__cause__, rex.TimeoutError)


def test_blackholed_async_times_out_once(proxy: FaultProxy) -> None:
    async def main() -> float:
        client = aconnect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
        try:
            assert await client.ping() is True
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(ConnectionUnavailable), translating("ping"):
                await client.ping()
            return time.monotonic() - started
        finally:
            proxy.reset()
            await client.aclose()

    elapsed = asyncio.run(main())
    assert elapsed < 3 * TIMEOUT


def test_blackholed_with_distkit_retries_costs_attempts_times_timeout(proxy: FaultProxy) -> None:
    cfg = proxy.config(
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        retry={"attempts": 2, "backoff_initial": 0.01, "backoff_max": 0.01, "jitter": 0},
    )
    client = connect(cfg)
    try:
        assert client.ping() is True
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(ConnectionUnavailable):
            SyncDriver(client, RetryPolicy(cfg.retry), "ping").run(ping_protocol())
        elapsed = time.monotonic() - started
    finally:
        proxy.reset()
        client.close()
    assert 2 * TIMEOUT * 0.8 <= elapsed < 5  # both attempts timed out; no hang


def test_recovers_after_the_fault_is_removed(proxy: FaultProxy) -> None:
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    try:
        proxy.refuse(True)
        proxy.cut()
        with pytest.raises(ConnectionUnavailable), translating("ping"):
            client.ping()
        proxy.reset()
        assert client.ping() is True
    finally:
        proxy.reset()
        client.close()
