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

__all__ = ["renew_locks_after_fork"]

_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_locks_after_fork(owner: Any) -> None:
    """Give ``owner`` new locks in a forked child: every attribute named in its class's
    ``_FORK_LOCKS`` is set to a new ``threading.Lock``."""
    _OWNERS.add(owner)


def _after_fork() -> None:
    for owner in list(_OWNERS):
        for name in type(owner)._FORK_LOCKS:
            setattr(owner, name, threading.Lock())


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork)
