"""distkit's shared layer: configuration, connections, retries, errors, keys and Lua scripts.

The user-facing packages are ``distlock`` (locks with fencing tokens) and ``distcache`` (caches);
both are built on the names exported here.
"""

from ._config import Address, RedisConfig, RedlockConfig, RetryConfig
from ._connection import AsyncClient, SyncClient, aconnect, connect
from ._errors import (
    AuthenticationFailed,
    CacheError,
    ConfigError,
    ConnectionUnavailable,
    DistkitError,
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

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncClient",
    "AuthenticationFailed",
    "CacheError",
    "ConfigError",
    "ConnectionUnavailable",
    "DistkitError",
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
