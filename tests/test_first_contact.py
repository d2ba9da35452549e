"""A new user's first hour (issue 15): URLs with options, and a wrong password that is loud."""

from __future__ import annotations

import asyncio
import time

import pytest

from distcache import AsyncCache, Cache
from distkit import (
    AuthenticationFailed,
    ConfigError,
    ConnectionUnavailable,
    RedisConfig,
    RetryConfig,
    aconnect,
    connect,
)
from distkit._connection import client_retry
from distkit.testing import RedisServer
from distlock import AsyncLock, Lock

SECRET = "s3cret-first-contact"


# -- RedisConfig from a URL -------------------------------------------------------------------
def test_a_url_may_be_passed_positionally() -> None:
    cfg = RedisConfig("redis://cache.example:6380/2")
    assert (cfg.host, cfg.port, cfg.db) == ("cache.example", 6380, 2)
    assert RedisConfig.from_url("redis://cache.example:6380/2") == cfg
    with pytest.raises(ConfigError, match="given twice"):
        RedisConfig("redis://a/0", url="redis://b/0")


def test_every_query_option_is_read_into_a_typed_field() -> None:
    cfg = RedisConfig.from_url(
        "rediss://h:6390/1?socket_timeout=1.5&socket_connect_timeout=0.5"
        "&health_check_interval=10&socket_keepalive=true&max_connections=7&client_name=app"
        "&ssl_cert_reqs=none&ssl_check_hostname=false&retry_on_timeout=false"
    )
    assert cfg.tls and cfg.tls_cert_reqs == "none" and cfg.tls_check_hostname is False
    assert (cfg.socket_timeout, cfg.connect_timeout) == (1.5, 0.5)
    assert cfg.health_check_interval == 10 and cfg.socket_keepalive is True
    assert cfg.max_connections == 7 and cfg.client_name == "app"
    assert cfg.retry.retry_on_timeout is False


def test_overrides_win_over_the_url() -> None:
    cfg = RedisConfig.from_url(
        "redis://h/0?socket_timeout=1&retry_on_timeout=false",
        socket_timeout=3,
        retry={"attempts": 5},
    )
    assert cfg.socket_timeout == 3
    assert cfg.retry.attempts == 5 and cfg.retry.retry_on_timeout is False


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://h/0?sockettimeout=1", "sockettimeout"),
        ("redis://h/0?retry_on_error=x", "retry_on_error"),
        ("redis://h/0?protocol=3", "protocol"),
        ("redis://h/0?socket_timeout=soon", "socket_timeout"),
        ("redis://h/0?ssl_cert_reqs=maybe", "tls_cert_reqs"),
    ],
)
def test_an_unknown_or_invalid_url_option_is_a_config_error_naming_it(url: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        RedisConfig.from_url(url)


def test_url_options_reach_the_client(redis_server: RedisServer) -> None:
    url = f"{redis_server.url}?socket_timeout=1.25&health_check_interval=7&client_name=first"
    client = connect(url)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 1.25 and kwargs["health_check_interval"] == 7
        assert client.client_getname() == "first"
    finally:
        client.close()


# -- the retry config of connect() reaches every lock and cache on its client ------------------
def test_connects_retry_config_is_remembered_for_its_client(redis_server: RedisServer) -> None:
    retry = RetryConfig(attempts=7, backoff_initial=0.001)
    client = connect(redis_server.config(retry=retry))
    try:
        assert client_retry(client) == retry
        assert client_retry(redis_server.client()) is None  # a user's own client: no default
    finally:
        client.close()


# -- a wrong password or an ACL denial is not an outage ----------------------------------------
@pytest.fixture
def acl_server(fresh_server: RedisServer) -> RedisServer:
    with fresh_server.client() as admin:
        admin.acl_setuser(
            "app", enabled=True, passwords=[f"+{SECRET}"], keys=["*"], commands=["+@all"]
        )
        admin.acl_setuser(  # may read and write, but not run scripts
            "noscript",
            enabled=True,
            passwords=[f"+{SECRET}"],
            keys=["*"],
            commands=["+@all", "-eval", "-evalsha", "-script"],
        )
    return fresh_server


def _config(server: RedisServer, user: str, password: str) -> RedisConfig:
    # many attempts with long backoff: a retried error would take seconds, an unretried one ms
    return server.config(
        username=user, password=password, retry={"attempts": 20, "backoff_initial": 0.2}
    )


@pytest.mark.parametrize(("user", "password"), [("app", "wrong"), ("noscript", SECRET)])
def test_locks_raise_authentication_failed_at_once(
    acl_server: RedisServer, user: str, password: str
) -> None:
    client = connect(_config(acl_server, user, password))
    try:
        lock = Lock(client, "auth", ttl=5, retry=RetryConfig(attempts=20, backoff_initial=0.2))
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed) as info:
            lock.acquire(blocking=False)
        assert time.monotonic() - started < 1.0  # no retries
        assert not isinstance(info.value, ConnectionUnavailable)
        assert SECRET not in str(info.value)
    finally:
        client.close()


@pytest.mark.parametrize(("user", "password"), [("app", "wrong"), ("noscript", SECRET)])
def test_cache_reads_raise_authentication_failed_instead_of_failing_open(
    acl_server: RedisServer, user: str, password: str
) -> None:
    client = connect(_config(acl_server, user, password))
    try:
        cache = Cache(client, namespace="auth", ttl=5)
        if user == "noscript":  # a plain read is allowed: a miss; the fill's script is not
            assert cache.get("k") is None
        else:
            with pytest.raises(AuthenticationFailed):
                cache.get("k")
        with pytest.raises(AuthenticationFailed):
            cache.get_or_set("k", lambda: 1)
        with pytest.raises(AuthenticationFailed):
            cache.set("k", 1)
    finally:
        client.close()


def test_async_twins_raise_authentication_failed(acl_server: RedisServer) -> None:
    async def main() -> None:
        client = aconnect(_config(acl_server, "app", "wrong"))
        try:
            with pytest.raises(AuthenticationFailed):
                await AsyncLock(client, "auth", ttl=5).acquire(blocking=False)
            with pytest.raises(AuthenticationFailed):
                await AsyncCache(client, namespace="auth", ttl=5).get("k")
        finally:
            await client.aclose()

    asyncio.run(main())


# -- a misspelt DISTKIT_* variable is an error, like a misspelt keyword -------------------------
@pytest.mark.parametrize(
    ("var", "suggestion"),
    [
        ("DISTKIT_SOCKET_TIMOUT", "DISTKIT_SOCKET_TIMEOUT"),
        ("DISTKIT_RETRY__ATEMPTS", "DISTKIT_RETRY__ATTEMPTS"),
        ("distkit_hots", "DISTKIT_HOST"),
    ],
)
def test_a_misspelt_environment_variable_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, var: str, suggestion: str
) -> None:
    monkeypatch.setenv(var, "1")
    with pytest.raises(ConfigError, match=var) as info:
        RedisConfig.from_env()
    assert suggestion in str(info.value)


def test_tooling_and_redlock_variables_are_not_misspellings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distkit import RedlockConfig

    monkeypatch.setenv("DISTKIT_REDLOCK_MASTERS", "redis://a:1,redis://b:2,redis://c:3")
    monkeypatch.setenv("DISTKIT_REDIS_SERVER", "/usr/bin/redis-server")
    monkeypatch.setenv("DISTKIT_URL", "redis://h:7/1")
    assert RedisConfig.from_env().port == 7
    assert len(RedlockConfig.from_env().masters) == 3
    monkeypatch.setenv("DISTKIT_REDLOCK_MASTER", "redis://a:1")
    with pytest.raises(ConfigError, match="DISTKIT_REDLOCK_MASTERS"):
        RedlockConfig.from_env()


def test_locks_and_caches_on_connects_client_use_its_retry_config(
    redis_server: RedisServer,
) -> None:
    retry = RetryConfig(attempts=6, backoff_initial=0.001)
    client = connect(redis_server.config(retry=retry))
    plain = connect(redis_server.config())  # no retry given: the library defaults stay
    try:
        assert Lock(client, "r", ttl=5)._retry.config == retry
        assert Cache(client, namespace="r")._retry.config == retry
        explicit = RetryConfig(attempts=2)
        assert Lock(client, "r", ttl=5, retry=explicit)._retry.config == explicit
        assert Lock(plain, "r", ttl=5)._retry.config == RetryConfig()
        assert Cache(plain, namespace="r")._retry.attempts == 1  # a cache fails open fast
    finally:
        client.close()
        plain.close()


def test_a_client_that_decodes_responses_is_refused_with_a_how_to(
    redis_server: RedisServer,
) -> None:
    import redis
    import redis.asyncio

    text = redis.Redis.from_url(redis_server.url, decode_responses=True)
    atext = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
    from distlock import FencedStore

    for make in (
        lambda: Lock(text, "d", ttl=5),
        lambda: Cache(text, namespace="d"),
        lambda: FencedStore(text, "d"),
        lambda: AsyncLock(atext, "d", ttl=5),
        lambda: AsyncCache(atext, namespace="d"),
    ):
        with pytest.raises(ConfigError, match="decode_responses=True"):
            make()
    text.close()


def test_importing_distlock_costs_little_more_than_importing_redis() -> None:
    import subprocess
    import sys

    def cost(module: str) -> float:
        code = (
            f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
        )
        runs = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True
                ).stdout
            )
            for _ in range(3)
        ]
        return min(runs)

    # generous: the budget is 0.05 s; pydantic alone costs ~0.15 s
    assert cost("distlock") - cost("redis") < 0.1
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, distlock; print('pydantic' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert loaded.stdout.strip() == "False"
