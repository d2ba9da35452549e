"""Metrics hooks: a one-method protocol the cache reports events to, and an in-memory counter."""

from __future__ import annotations

import threading
from collections import Counter
from enum import Enum
from typing import Protocol, runtime_checkable

from distkit._fork import renew_locks_after_fork

__all__ = ["CacheEvent", "CacheMetrics", "CounterMetrics"]


class CacheEvent(str, Enum):
    """What a cache reports; the values are stable names for exporters (Prometheus, OTel...)."""

    HIT = "hit"
    MISS = "miss"
    FILL = "fill"
    STALE_FILL_REJECTED = "stale_fill_rejected"
    DECODE_ERROR = "decode_error"
    ERROR = "error"
    SHORT_CIRCUIT = "short_circuit"
    NEAR_HIT = "near_hit"  # served from the in-process near cache (no Redis call)
    NEAR_MISS = "near_miss"  # the near cache did not have it: Redis was asked
    NEAR_FLUSH = "near_flush"  # the near cache was emptied (clear, lost invalidation link)
    EARLY_REFRESH = "early_refresh"  # XFetch started a refresh before expiry
    STALE_SERVED = "stale_served"  # an expired value was served (within its bounded window)
    COALESCED = "coalesced"  # a miss got another caller's load instead of calling the loader
    WAIT_TIMEOUT = "wait_timeout"  # waiting for another caller's load hit the bound
    REFRESH_ERROR = "refresh_error"  # a background refresh failed (logged)


@runtime_checkable
class CacheMetrics(Protocol):
    """Receives cache events; ``record`` is called inline, so it must be cheap and never raise."""

    def record(self, event: CacheEvent, namespace: str, count: int = 1) -> None:
        """Count ``count`` occurrences of ``event`` in ``namespace``."""


class CounterMetrics:
    """Thread-safe in-memory counters of cache events, per (event, namespace)."""

    _FORK_LOCKS = ("_lock",)
    __slots__ = ("__weakref__", "_counts", "_lock")

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        renew_locks_after_fork(self)

    def record(self, event: CacheEvent, namespace: str, count: int = 1) -> None:
        """Add ``count`` to the counter of ``event`` in ``namespace``."""
        with self._lock:
            self._counts[event.value, namespace] += count

    def count(self, event: CacheEvent | str, namespace: str | None = None) -> int:
        """The count of ``event`` in ``namespace`` (``None``: summed over all namespaces)."""
        name = event.value if isinstance(event, CacheEvent) else CacheEvent(event).value
        with self._lock:
            if namespace is not None:
                return self._counts[name, namespace]
            return sum(n for (ev, _), n in self._counts.items() if ev == name)

    def snapshot(self) -> dict[str, int]:
        """Every non-zero counter summed over namespaces, by event name."""
        out: Counter[str] = Counter()
        with self._lock:
            for (event, _), n in self._counts.items():
                out[event] += n
        return dict(out)

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self._counts.clear()

    def __repr__(self) -> str:
        return f"CounterMetrics({self.snapshot()})"
