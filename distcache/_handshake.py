"""A sync read-through's deadline, applied to the handshake of a connection made for it.

redis-py connects inside ``ConnectionPool.get_connection``: a step that finds no idle connection
pays the TCP connect, ``HELLO`` and the handshake's tail (``CLIENT SETINFO``, ``SELECT``: one
more round trip) before its command is sent, none of which the read-through's checks between
steps can see. While a step of a bounded call runs (``until(...)``), a connection made in this
thread therefore:

- does not start its handshake once the deadline has passed;
- reads each of the handshake's replies with the socket timeout lowered to what is left of the
  deadline, and reads none once it has passed (a timeout then is the deadline's, not a Redis
  failure: the breaker does not count it);
- once connected, does not send the step's command if the deadline passed meanwhile (the
  connection is kept by the pool for the next call).

Each of these raises ``OutOfTime``, which the read-through handles as its deadline passing.

So a miss on a fresh connection costs at most the deadline plus one round trip (and the TCP
connect, bounded by the connect timeout), as on a pooled one. Installed on clients with one
connection pool (standalone, Sentinel: the pool's ``redis_connect_func``, wrapping any given);
a Cluster client's node connections are not covered. Inert outside a bounded step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis.exceptions

__all__ = ["Deadline", "OutOfTime", "enter", "install", "leave", "until"]


class OutOfTime(Exception):
    """A sync read-through's deadline passed before the next round trip of a step was sent."""


class Deadline:
    """``expired()`` and ``left()`` of one call's deadline on the cache's clock."""

    __slots__ = ("_clock", "_until")

    def __init__(self, clock: Callable[[], float], until: float) -> None:
        self._clock = clock
        self._until = until

    def __call__(self) -> bool:
        return self._clock() >= self._until

    def left(self) -> float:
        """Seconds left before the deadline (negative once past)."""
        return self._until - self._clock()


_local = threading.local()


def enter(clock: Callable[[], float], until: float) -> Any:
    """Connections made in this thread from now on obey the deadline ``until`` on ``clock``;
    returns the outer deadline, for ``leave``. The hit path's form of ``until()``: it builds
    no object (the ``Deadline`` is made only if a connection is)."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = (clock, until)
    return outer


def leave(outer: Any) -> None:
    """Undo ``enter`` (``outer``: what it returned)."""
    _local.deadline = outer


def _current() -> Deadline | None:
    found = getattr(_local, "deadline", None)
    if found is None or found.__class__ is Deadline:
        return found
    return Deadline(*found)


@contextlib.contextmanager
def until(deadline: Deadline) -> Iterator[None]:
    """Connections made in this thread within the block obey ``deadline`` (a ``Deadline``)."""
    outer = getattr(_local, "deadline", None)
    _local.deadline = deadline
    try:
        yield
    finally:
        _local.deadline = outer


class _Guard:
    """The connect hook (a bound method: redis-py keeps connect callbacks as weak methods)."""

    def after(self, conn: Any) -> None:
        """Connected: the step's command is not sent if the deadline passed meanwhile."""
        deadline = _current()
        if deadline is not None and deadline():
            raise OutOfTime


_GUARD = _Guard()


def _bounded_connect(inner: Callable[[Any], Any] | None) -> Callable[[Any], None]:
    def connect(conn: Any) -> None:
        try:
            bounded(conn)
        except OutOfTime:
            # redis-py before 8 disconnects only on a RedisError: a handshake cut short would go
            # back to the pool half set up, its replies still owed to the next command.
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise

    def bounded(conn: Any) -> None:
        deadline = _current()
        if callable(getattr(conn, "register_connect_callback", None)):
            conn.register_connect_callback(_GUARD.after)  # once: redis-py skips a duplicate
        if deadline is None:
            _handshake(conn, inner)
            return
        sock = conn._sock
        default = conn.socket_timeout
        read = conn.read_response
        own = vars(conn).get("read_response")  # an instance's own wrapper, put back after

        def bounded_read(*args: Any, **kwargs: Any) -> Any:
            # each reply of the handshake (HELLO, then its tail) within what is left
            remaining = deadline.left()
            if remaining <= 0:
                raise OutOfTime
            sock.settimeout(remaining if default is None else min(remaining, default))
            return read(*args, **kwargs)

        if deadline():
            raise OutOfTime  # before the handshake (``connect`` closes the bare socket)
        conn.read_response = bounded_read  # the instance's, for this handshake only
        try:
            _handshake(conn, inner)
        except redis.exceptions.TimeoutError as exc:
            if deadline():  # the lowered timeout: the deadline's doing, not a Redis failure
                raise OutOfTime from exc
            raise
        finally:
            if own is None:
                del conn.read_response
            else:
                conn.read_response = own
            with contextlib.suppress(OSError):
                sock.settimeout(default)

    connect._distcache_bounded = True  # type: ignore[attr-defined]
    return connect


def _handshake(conn: Any, inner: Callable[[Any], Any] | None) -> None:
    if inner is None:
        conn.on_connect()
    else:
        inner(conn)


def install(client: Any) -> None:
    """Bound the handshakes of ``client``'s new connections by the running step's deadline."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return  # a Cluster client (its nodes' pools are made later): not covered
    inner = kwargs.get("redis_connect_func")
    if getattr(inner, "_distcache_bounded", False):
        return
    kwargs["redis_connect_func"] = _bounded_connect(inner)
