"""Locks that a forked child gets anew.

A lock another thread held at the moment of ``os.fork()`` stays held forever in the child (the
thread that would release it does not exist there): the child's first call that needs it hangs.
Objects whose lock is taken on a call path register here and get fresh locks in the child; the
hot path pays nothing (no pid check per call).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["forget_inherited_async_pool", "renew_locks_after_fork"]

_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_locks_after_fork(owner: Any) -> None:
    """Give ``owner`` new locks in a forked child: every attribute named in its class's
    ``_FORK_LOCKS`` is set to a new ``threading.Lock``."""
    _OWNERS.add(owner)


def _close_inherited_transport(transport: Any) -> None:
    """Close an inherited asyncio transport's socket in the child, never through its loop.

    The transport belongs to the child's copy of the parent's event loop, whose selector shares
    the parent's epoll instance: ``transport.close()`` (also from ``StreamWriter.__del__`` or
    redis-py's ``Connection.__del__``) would ``EPOLL_CTL_DEL`` the parent's socket from the
    parent's epoll, and the parent would never hear that socket's replies again. Closing the
    child's file descriptor alone leaves the parent's registration (its open file description)
    in place; the transport is marked closing so nothing later reaches the loop.
    """
    ssl = getattr(transport, "_ssl_protocol", None)
    if ssl is not None:  # an SSL wrapper: the socket is its inner transport's
        transport._closed = True
        _close_inherited_transport(getattr(ssl, "_transport", None))
        return
    if transport is None or not hasattr(transport, "_closing"):
        return
    transport._closing = True  # close() returns at once; StreamWriter.__del__ leaves it alone
    sock = getattr(transport, "_sock", None)
    if sock is not None:
        transport._sock = None  # the transport's __del__ then closes nothing either
        sock.close()


def forget_inherited_async_pool(pool: Any) -> None:
    """In a forked child: drop an asyncio connection pool's inherited connections without
    touching the parent's event loop or sockets (``pool.reset()`` alone lets the dropped
    connections close their transports through the parent's epoll; see
    ``_close_inherited_transport``). The pool then opens connections of the child's own."""
    conns = list(getattr(pool, "_available_connections", ()))
    conns += list(getattr(pool, "_in_use_connections", ()))
    for conn in conns:
        writer = getattr(conn, "_writer", None)
        try:
            conn._reader = conn._writer = None  # disconnect()/__del__ then have nothing to close
        except AttributeError:  # pragma: no cover - a connection class without these
            continue
        if writer is not None:
            _close_inherited_transport(getattr(writer, "transport", None))
    reset = getattr(pool, "reset", None)
    if reset is not None:
        reset()


def _after_fork() -> None:
    for owner in list(_OWNERS):
        for name in type(owner)._FORK_LOCKS:
            setattr(owner, name, threading.Lock())


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)
