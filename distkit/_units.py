"""Durations: seconds or ``timedelta`` in, float seconds out (no pydantic: cheap to import)."""

from __future__ import annotations

import math
from datetime import timedelta

from ._errors import ConfigError

__all__ = ["MAX_SECONDS", "seconds"]

# The longest duration accepted anywhere (TTLs, retention, timeouts): ten years. Redis rejects
# expiry times past a 64-bit millisecond clock, and Lua prints numbers from 1e14 on in exponent
# form, which PX / PEXPIRE refuse; far below both, so a valid duration never fails at the server.
MAX_SECONDS = 10 * 365 * 24 * 3600.0


def seconds(value: float | timedelta, *, field: str, allow_zero: bool = False) -> float:
    """Return ``value`` (seconds or ``timedelta``) as float seconds, at most ten years
    (``MAX_SECONDS``); else ``ConfigError``.

    Args:
        value: a number of seconds or a ``timedelta``.
        field: the argument's name, for the error message.
        allow_zero: accept ``0`` as well as positive values.
    """
    if isinstance(value, timedelta):
        out = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            out = float(value)
        except OverflowError:  # an int beyond any float (10**400): far past the bound anyway
            out = math.inf
    else:
        raise ConfigError(f"{field} must be seconds (int/float) or a timedelta, got {value!r}")
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{field} must be finite and {bound}, got {value!r}")
    if out > MAX_SECONDS:
        raise ConfigError(f"{field} must be at most ten years ({MAX_SECONDS:.0f} s), got {value!r}")
    return out
