"""Shared knobs of the adversarial suite (fuzzing, model-based tests, chaos soak).

Example counts are kept small so the suite stays fast in CI. For longer runs set
``DISTKIT_ADVERSARIAL_SCALE`` (a multiplier, e.g. ``20``): every hypothesis test then runs that many
times more examples (and the stateful tests take longer walks)::

    DISTKIT_ADVERSARIAL_SCALE=20 python -m pytest tests/test_fuzz.py tests/test_model.py -q
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, settings

SCALE = max(0.1, float(os.environ.get("DISTKIT_ADVERSARIAL_SCALE", "1") or 1))


def examples(n: int) -> int:
    """``n`` scaled by ``DISTKIT_ADVERSARIAL_SCALE`` (at least 1)."""
    return max(1, round(n * SCALE))


def fuzz_settings(n: int, **overrides: Any) -> settings:
    """Hypothesis settings for a test that talks to a real server: ``n`` scaled examples, no
    per-example deadline (a real server's latency varies), fixtures shared across examples."""
    options: dict[str, Any] = {
        "max_examples": examples(n),
        "deadline": None,
        "suppress_health_check": [
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
        "derandomize": SCALE <= 1,  # CI runs are reproducible; scaled-up runs explore
        "database": None,
    }
    options.update(overrides)
    return settings(**options)


class Hang(AssertionError):
    """An operation did not return within its time limit."""


@contextlib.contextmanager
def no_hang(seconds: float, what: str = "operation") -> Iterator[None]:
    """Fail with :class:`Hang` if the block runs longer than ``seconds`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} did not return within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
