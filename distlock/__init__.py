"""distlock: Redis locks that issue fencing tokens, with sync and asyncio twins.

``Lock`` / ``AsyncLock`` hold a lease on one Redis (standalone, Sentinel master or a Cluster
shard); ``Redlock`` / ``AsyncRedlock`` on a quorum of N independent masters. Every acquisition
returns a fencing token that strictly increases for successive holders, also across a server
restart that lost its data; ``FencedStore`` applies it where the data lives. ``Semaphore`` /
``AsyncSemaphore`` admit up to ``limit`` holders of one name, each with its own token.
"""

from distkit import (
    ConnectionUnavailable,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    StaleFencingToken,
)

from ._decorator import locked
from ._fencing import AsyncFencedStore, FencedStore
from ._lock import AsyncLock, Lock
from ._redlock import AsyncRedlock, Redlock
from ._semaphore import AsyncSemaphore, Semaphore

__all__ = [
    "AsyncFencedStore",
    "AsyncLock",
    "AsyncRedlock",
    "AsyncSemaphore",
    "ConnectionUnavailable",
    "FencedStore",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "Redlock",
    "Semaphore",
    "StaleFencingToken",
    "locked",
]
