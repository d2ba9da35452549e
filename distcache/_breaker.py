"""A circuit breaker: after repeated connection failures (or slow calls), stop calling Redis for
a while.

::

    closed ──(failure_threshold consecutive failures)──► open ──(reset_timeout)──► half-open
      ▲                                                   ▲                            │
      └───────────────(the probe succeeds)────────────────┴────(the probe fails)───────┘

In the half-open state one caller at a time is let through as a probe; the others are refused
as in the open state. A read-through's Redis call slower than ``slow_call`` counts as a failure,
and so does a read-through that runs out of its ``miss_deadline``: a slow Redis opens the circuit
as a dead one does. Time comes from an injectable clock, so tests tick instead of sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Literal

from distkit import ConfigError
from distkit._config import seconds
from distkit._fork import renew_locks_after_fork
from distkit._protocol import monotonic

__all__ = ["CircuitBreaker"]

_CLOSED, _OPEN, _HALF_OPEN = "closed", "open", "half-open"
BreakerState = Literal["closed", "open", "half-open"]


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; probes again after ``reset_timeout``.

    Args:
        failure_threshold: consecutive failures that open the circuit.
        reset_timeout: seconds (or ``timedelta``) the circuit stays open before a probe.
        slow_call: a read-through's Redis call (one round trip, or the few of one step) that
            takes longer than this (seconds or ``timedelta``) counts as a failure; ``None``: a
            quarter of the cache's ``miss_deadline`` (half the socket timeout by default).
        clock: monotonic clock in seconds (injectable for tests).

    Raises:
        ConfigError: an argument is invalid.
    """

    _FORK_LOCKS = ("_lock",)
    __slots__ = (
        "__weakref__",
        "_clock",
        "_failures",
        "_lock",
        "_opened_at",
        "_state",
        "healthy",
        "reset_timeout",
        "slow_call",
        "threshold",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset_timeout: float | timedelta = 5.0,
        slow_call: float | timedelta | None = None,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        if (
            not isinstance(failure_threshold, int)
            or isinstance(failure_threshold, bool)
            or failure_threshold < 1
        ):
            raise ConfigError(f"failure_threshold must be an int >= 1, got {failure_threshold!r}")
        if not callable(clock):
            raise ConfigError(f"clock must be a callable returning seconds, got {clock!r}")
        self.threshold = failure_threshold
        self.reset_timeout = seconds(reset_timeout, field="reset_timeout")
        self.slow_call = None if slow_call is None else seconds(slow_call, field="slow_call")
        self._clock = clock
        self._lock = threading.Lock()
        renew_locks_after_fork(self)
        self._state: str = _CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self.healthy = True  # closed with no failure counted: the hot path needs no bookkeeping

    @property
    def state(self) -> BreakerState:
        """``"closed"`` (calls go through), ``"open"`` (refused) or ``"half-open"`` (probing)."""
        if self._state == _OPEN and self._clock() - self._opened_at >= self.reset_timeout:
            return "half-open"
        return self._state  # type: ignore[return-value]

    def allow(self) -> bool:
        """Whether a call may go to Redis now (in half-open state: only the one probe)."""
        if self._state is _CLOSED:
            return True
        with self._lock:
            now = self._clock()
            if self._state is _CLOSED:
                return True
            # open, or half-open with a probe out: a probe is due once reset_timeout has passed
            # (also if an earlier probe never reported back)
            if now - self._opened_at >= self.reset_timeout:
                self._state = _HALF_OPEN
                self._opened_at = now
                return True
            return False

    def record_success(self) -> None:
        """A call reached Redis: close the circuit."""
        if self._state is _CLOSED and self._failures == 0:
            return
        with self._lock:
            self._state = _CLOSED
            self._failures = 0
            self.healthy = True

    def record_failure(self) -> None:
        """A call could not reach Redis: count it, and open the circuit at the threshold."""
        with self._lock:
            self.healthy = False
            self._failures += 1
            if self._state is _HALF_OPEN or self._failures >= self.threshold:
                self._state = _OPEN
                self._opened_at = self._clock()

    def reset(self) -> None:
        """Close the circuit and forget past failures."""
        with self._lock:
            self._state = _CLOSED
            self._failures = 0
            self.healthy = True

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.state} failures={self._failures}/{self.threshold} "
            f"reset_timeout={self.reset_timeout}s>"
        )
