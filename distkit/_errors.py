"""The one error tree of distkit, and the boundary that translates redis-py's errors into it.

::

    DistkitError
     ├── ConfigError (also ValueError)       bad configuration or argument
     ├── ConnectionUnavailable               server unreachable, refused, or too slow
     ├── AuthenticationFailed                wrong password or ACL denial: never retried
     ├── EventLoopMismatch                   an asyncio client used outside its event loop
     ├── ServerError                         Redis answered with an error we did not expect
     │    └── ForeignDataError               a key holds data that distkit did not write
     ├── LockError                           (carries .name)
     │    ├── LockNotAcquired                blocking acquire ran out of time
     │    ├── LockNotOwned                   release / extend by a handle that does not hold it
     │    ├── LockLost                       the lease lapsed while the holder was inside
     │    └── StaleFencingToken              a guarded write carried an older token
     └── CacheError                          (carries .key)
          ├── SerializationError             a value could not be encoded or decoded
          └── LoaderError                    the loader failed in another process we waited for

Every redis-py exception that crosses distkit's boundary is translated with ``raise ... from``,
so the original stays available as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import redis.exceptions as rex

__all__ = [
    "AuthenticationFailed",
    "CacheError",
    "ConfigError",
    "ConnectionUnavailable",
    "DistkitError",
    "EventLoopMismatch",
    "ForeignDataError",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LoaderError",
    "LockNotOwned",
    "SerializationError",
    "ServerError",
    "StaleFencingToken",
    "redact",
    "translate",
    "translating",
]

_URL_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*):(?P<pw>[^/\s'\"]*)@", re.I
)  # greedy password: an unescaped "@" inside it (as urllib accepts) is hidden too


def redact(text: str) -> str:
    """Hide the password part of any ``scheme://user:password@`` URL in ``text``."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


class DistkitError(Exception):
    """Root of every error that distkit raises."""


class ConfigError(DistkitError, ValueError):
    """A configuration value or an argument is invalid; the message names the field and value."""


class ConnectionUnavailable(DistkitError):
    """Redis could not be reached, refused the connection, or did not answer within the timeout."""


class AuthenticationFailed(DistkitError):
    """Redis refused the credentials, or the ACL user may not run a command distkit needs.

    A misconfiguration, not an outage: raised at once by every operation (cache reads included),
    never retried and never failed open.
    """


class EventLoopMismatch(DistkitError):
    """An asyncio client opened on one event loop was used on another (never retried).

    redis-py's asyncio connections belong to the loop that opened them. Clients built by
    ``distkit.aconnect()`` get a twin per loop instead; a client of your own raises this.
    """


class ServerError(DistkitError):
    """Redis answered a command with an error that distkit did not expect."""


class ForeignDataError(ServerError):
    """A key under distkit's prefix holds a type or value that distkit did not write."""


class LockError(DistkitError):
    """Base of the lock errors; ``name`` is the lock's name."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class LockNotAcquired(LockError):
    """A blocking acquire (for example, entering ``with lock:``) ran out of time."""


class LockNotOwned(LockError):
    """Release or extend by a handle that does not hold the lock (or whose lease expired)."""


class LockLost(LockError):
    """The lease lapsed (expired, taken over or unreachable) while its holder was still working."""


class StaleFencingToken(LockError):
    """A fenced write carried a token lower than one the resource has already accepted."""

    def __init__(self, message: str, *, name: str | None = None, token: int, highest: int) -> None:
        super().__init__(message, name=name)
        self.token = token
        self.highest = highest


class CacheError(DistkitError):
    """Base of the cache errors; ``key`` is the cache key, when there is one."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class SerializationError(CacheError):
    """A value could not be encoded for, or decoded from, Redis."""


class LoaderError(CacheError):
    """A read-through waited for another process's load of ``key``, and that loader raised.

    The original exception stays in the process that raised it; ``str()`` names its type and
    message (an exception object does not cross processes: distkit never unpickles).
    """


_WRONGTYPE = re.compile(r"(?:^|: )WRONGTYPE ")
# distlock's scripts refuse a value they never write (the message names the key)
_FOREIGN_VALUE = re.compile(r"\bDISTLOCK (?:corrupt|fencing state lost)\b")
# NOPERM: an ACL denial (also inside a script); WRONGPASS / NOAUTH: credentials.
_AUTH_ERRORS = (
    rex.AuthenticationError,
    rex.AuthenticationWrongNumberOfArgsError,
    rex.NoPermissionError,
)
_DENIED = re.compile(r"(?:^|: )(?:NOPERM|WRONGPASS|NOAUTH)\b")


def translate(exc: BaseException, *, what: str = "") -> DistkitError | None:
    """Map a redis-py (or socket) exception onto distkit's tree; ``None`` if it is not one.

    Args:
        exc: the exception raised by redis-py.
        what: a short description of the operation, used in the message (never a secret).
    """
    if isinstance(exc, DistkitError):
        return exc
    prefix = f"{what}: " if what else ""
    detail = redact(str(exc)) or type(exc).__name__
    # Before the connection errors: redis-py's AuthenticationError subclasses ConnectionError.
    if isinstance(exc, _AUTH_ERRORS) or (
        isinstance(exc, rex.ResponseError) and _DENIED.search(detail)
    ):
        return AuthenticationFailed(
            f"{prefix}Redis refused the credentials or the ACL denied a command "
            f"({type(exc).__name__}: {detail}); check username, password and ACL rules"
        )
    if isinstance(
        exc,
        (
            rex.ConnectionError,
            rex.TimeoutError,
            rex.BusyLoadingError,
            rex.ClusterDownError,
            rex.TryAgainError,
            rex.MasterDownError,
            rex.ReadOnlyError,
            rex.MaxConnectionsError,
            ConnectionError,
            TimeoutError,
            asyncio.TimeoutError,
        ),
    ):
        return ConnectionUnavailable(f"{prefix}Redis unavailable ({type(exc).__name__}: {detail})")
    if isinstance(exc, rex.RedisClusterException):  # not a RedisError: no node reachable, slots
        if isinstance(exc, rex.SlotNotCoveredError) or any(  # uncovered, or a client-side misuse
            marker in detail for marker in ("cannot be connected", "slots are not covered")
        ):
            return ConnectionUnavailable(
                f"{prefix}Redis unavailable ({type(exc).__name__}: {detail})"
            )
        return ServerError(f"{prefix}{type(exc).__name__}: {detail}")
    if isinstance(exc, rex.ClusterError) and "TTL exhausted" in detail:
        # redis-py gave up following MOVED / ASK / TRYAGAIN (a slot in mid-migration): the
        # command did not run, and the slot settles once the migration ends, so: transient.
        return ConnectionUnavailable(f"{prefix}Redis unavailable ({type(exc).__name__}: {detail})")
    # Redis 7 replies "WRONGTYPE ..." from inside a script; 6.2 wraps it in
    # "Error running script (call to f_...): @user_script:42: WRONGTYPE ...".
    if isinstance(exc, rex.ResponseError) and (
        _WRONGTYPE.search(detail) or _FOREIGN_VALUE.search(detail)
    ):
        return ForeignDataError(f"{prefix}a key holds data distkit did not write ({detail})")
    if isinstance(exc, rex.RedisError):
        return ServerError(f"{prefix}{type(exc).__name__}: {detail}")
    return None


@contextlib.contextmanager
def translating(what: str = "") -> Iterator[None]:
    """Re-raise redis-py exceptions from the block as distkit errors (``raise ... from``)."""
    try:
        yield
    except (rex.RedisError, rex.RedisClusterException, OSError, asyncio.TimeoutError) as exc:
        mapped = translate(exc, what=what)
        if mapped is None:  # pragma: no cover - every RedisError/OSError maps
            raise
        raise mapped from exc
