"""distkit's shared layer: configuration, connections, retries, errors, keys and Lua scripts.

The user-facing packages are ``distlock`` (locks with fencing tokens) and ``distcache`` (caches);
both are built on the names exported here.
"""

import typing as _typing

from ._errors import (
    AuthenticationFailed,
    CacheError,
    ConfigError,
    ConnectionUnavailable,
    DistkitError,
    EventLoopMismatch,
    ForeignDataError,
    LoaderError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    SerializationError,
    ServerError,
    StaleFencingToken,
)
from ._keys import KeySpace, validate_name
from ._retry import RetryPolicy
from ._scripts import Script

if _typing.TYPE_CHECKING:
    from ._config import Address, RedisConfig, RedlockConfig, RetryConfig
    from ._connection import AsyncClient, SyncClient, aconnect, connect

__version__ = "0.1.0"

# Configuration pulls in pydantic (~0.15 s): loaded on first use, so that importing distlock
# costs little more than importing redis.
_LAZY = {
    "Address": "._config",
    "RedisConfig": "._config",
    "RedlockConfig": "._config",
    "RetryConfig": "._config",
    "AsyncClient": "._connection",
    "SyncClient": "._connection",
    "aconnect": "._connection",
    "connect": "._connection",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'distkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Address",
    "AsyncClient",
    "AuthenticationFailed",
    "CacheError",
    "ConfigError",
    "ConnectionUnavailable",
    "DistkitError",
    "EventLoopMismatch",
    "ForeignDataError",
    "KeySpace",
    "LoaderError",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "RedisConfig",
    "RedlockConfig",
    "RetryConfig",
    "RetryPolicy",
    "Script",
    "SerializationError",
    "ServerError",
    "StaleFencingToken",
    "SyncClient",
    "aconnect",
    "connect",
    "validate_name",
]
