"""The connection factory: one ``RedisConfig`` in, the right redis-py client out (sync or asyncio).

redis-py's own retry is switched off on the clients built here: distkit retries at the operation
level with the policy from ``RedisConfig.retry``, where it knows which operations are safe to
repeat, so one dead server costs ``attempts x timeout`` and never more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias, TypeVar

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._clients import _RETRY, client_retry, decodes_responses, remember_recipe
from ._config import RedisConfig, validate_config
from ._errors import ConfigError, translating

__all__ = [
    "AsyncClient",
    "ConfigLike",
    "SyncClient",
    "aconnect",
    "client_retry",
    "connect",
    "decodes_responses",
]

# Real unions, not strings: usable at run time too (isinstance, get_type_hints, pydantic).
SyncClient: TypeAlias = redis.Redis | redis.RedisCluster
AsyncClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.RedisCluster
ConfigLike: TypeAlias = RedisConfig | str | Mapping[str, Any]


def _common_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "username": cfg.username,
        "password": cfg.password.get_secret_value() if cfg.password else None,
        "socket_connect_timeout": cfg.connect_timeout,
        "socket_timeout": cfg.socket_timeout,
        "client_name": cfg.client_name,
    }
    if cfg.socket_keepalive:
        kw["socket_keepalive"] = True
    if cfg.health_check_interval:
        kw["health_check_interval"] = cfg.health_check_interval
    if cfg.tls:
        kw.update(
            ssl=True,
            ssl_ca_certs=str(cfg.tls_ca_file) if cfg.tls_ca_file else None,
            ssl_certfile=str(cfg.tls_cert_file) if cfg.tls_cert_file else None,
            ssl_keyfile=str(cfg.tls_key_file) if cfg.tls_key_file else None,
            ssl_check_hostname=cfg.tls_check_hostname and cfg.tls_cert_reqs != "none",
            ssl_cert_reqs=cfg.tls_cert_reqs,
        )
    return kw


def _standalone_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    kw = _common_kwargs(cfg)
    kw.update(db=cfg.db, max_connections=cfg.max_connections)
    if cfg.unix_socket is not None:
        kw["unix_socket_path"] = str(cfg.unix_socket)
        for key in (
            "ssl",
            "ssl_ca_certs",
            "ssl_certfile",
            "ssl_keyfile",
            "ssl_check_hostname",
            "ssl_cert_reqs",
        ):
            kw.pop(key, None)
    else:
        kw.update(host=cfg.host, port=cfg.port)
    return kw


def _sentinel_kwargs(cfg: RedisConfig, no_retry: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "socket_connect_timeout": cfg.connect_timeout,
        "socket_timeout": cfg.socket_timeout,
        "retry": no_retry,  # else each sentinel query retries (10 times in redis-py 8)
    }
    if cfg.sentinel_password is not None:
        kw["password"] = cfg.sentinel_password.get_secret_value()
    return kw


_C = TypeVar("_C")


def _remember(client: _C, cfg: RedisConfig) -> _C:
    if "retry" in cfg.model_fields_set:  # given (keyword, URL or DISTKIT_RETRY__*): the default
        _RETRY[client] = cfg.retry
    return client


def _config(config: ConfigLike) -> RedisConfig:
    if isinstance(config, RedisConfig):
        return config
    if isinstance(config, (str, Mapping)):
        return validate_config(RedisConfig, config)
    raise ConfigError(f"expected a RedisConfig, a URL or a mapping, got {type(config).__name__}")


def connect(config: ConfigLike) -> SyncClient:
    """Build a sync client for ``config``: ``Redis``, a Sentinel master, or ``RedisCluster``.

    Raises:
        ConfigError: ``config`` is not valid.
        ConnectionUnavailable: Cluster mode only, no startup node could be reached.
    """
    cfg = _config(config)
    no_retry = Retry(NoBackoff(), 0)
    if cfg.mode == "cluster":
        nodes = [redis.cluster.ClusterNode(a.host, a.port) for a in cfg.cluster_nodes]  # type: ignore[no-untyped-call,unused-ignore]
        with translating(f"connect to {cfg.describe()}"):  # RedisCluster reads the slots now
            cluster = redis.RedisCluster(
                startup_nodes=nodes,
                max_connections=cfg.max_connections,
                retry=no_retry,
                **_common_kwargs(cfg),
            )
        return _remember(cluster, cfg)
    if cfg.mode == "sentinel":
        assert cfg.sentinel_service is not None  # checked by RedisConfig
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            [(a.host, a.port) for a in cfg.sentinels],
            sentinel_kwargs=_sentinel_kwargs(cfg, no_retry),
            **_common_kwargs(cfg),
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
            cfg.sentinel_service, db=cfg.db, retry=no_retry, max_connections=cfg.max_connections
        )
        return _remember(client, cfg)
    return _remember(redis.Redis(retry=no_retry, **_standalone_kwargs(cfg)), cfg)


def aconnect(config: ConfigLike) -> AsyncClient:
    """Build the asyncio twin of ``connect(config)`` (no I/O happens until the first command).

    distkit's async classes use the client on the event loop they first run on, and a twin of it
    (same config, own connections) on any other loop: ``asyncio.run()`` twice, per-test loops.

    Raises:
        ConfigError: ``config`` is not valid.
    """
    cfg = _config(config)
    client = _aconnect(cfg)
    remember_recipe(client, lambda: _aconnect(cfg))
    return client


def _aconnect(cfg: RedisConfig) -> AsyncClient:
    no_retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    if cfg.mode == "cluster":
        acluster = redis.asyncio.RedisCluster(
            startup_nodes=[
                redis.asyncio.cluster.ClusterNode(a.host, a.port) for a in cfg.cluster_nodes
            ],
            max_connections=cfg.max_connections,
            retry=no_retry,
            **_common_kwargs(cfg),
        )
        return _remember(acluster, cfg)
    if cfg.mode == "sentinel":
        assert cfg.sentinel_service is not None
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
            [(a.host, a.port) for a in cfg.sentinels],
            sentinel_kwargs=_sentinel_kwargs(cfg, no_retry),
            **_common_kwargs(cfg),
        )
        aclient: redis.asyncio.Redis = sentinel.master_for(
            cfg.sentinel_service, db=cfg.db, retry=no_retry, max_connections=cfg.max_connections
        )
        return _remember(aclient, cfg)
    return _remember(redis.asyncio.Redis(retry=no_retry, **_standalone_kwargs(cfg)), cfg)
