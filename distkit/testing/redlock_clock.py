"""Test-only skewed master clocks for Redlock: each master's scripts read ``TIME + offset``.

Redlock's fencing tokens come from ``redis.call('TIME')`` inside the grant script (see
docs/fencing.md), so clock skew between masters is what can reorder ``fencing="clock"`` tokens.
This module skews exactly that clock, per master, without touching the servers: a
``SkewedRedlock`` / ``AsyncSkewedRedlock`` sends, to master ``i``, a copy of every lock script whose
``TIME`` calls add ``clocks.offset_us(i)`` microseconds. Key expiry (``PX``) still runs on the
server's own clock: only the time the scripts read is skewed, as with a master whose wall clock
is off (Redis expires keys on its monotonic clock since 7.0).

The production classes cannot be skewed by any argument: this lives only here, in the test
build. Offsets may change while handles run (the chaos soak drifts them); several handles, or
several processes (pass a ``multiprocessing.Array('d', n)`` as ``offsets``), share one
``MasterClocks``::

    clocks = MasterClocks(3)
    a = SkewedRedlock(clients, "name", clocks=clocks, fencing="clock")
    clocks.set(0, -0.05)  # master 0 reads its TIME 50 ms behind
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import Any

from distkit import Script
from distkit._protocol import Eval
from distlock._redlock import AsyncRedlock, Redlock
from distlock._redlock_core import RedlockCore

__all__ = ["AsyncSkewedRedlock", "MasterClocks", "SkewedRedlock", "skewed_script"]

_SKEWED: dict[tuple[str, int], Script] = {}

_PRELUDE = """
local function skewed_time()
  local t = redis.call('TIME')
  local us = tonumber(t[2]) + ({offset})
  return {{tonumber(t[1]) + math.floor(us / 1000000), us % 1000000}}
end
"""


def skewed_script(script: Script, offset_us: int) -> Script:
    """``script`` with every ``redis.call('TIME')`` replaced by ``TIME + offset_us``."""
    if offset_us == 0:
        return script
    key = (script.name, offset_us)
    found = _SKEWED.get(key)
    if found is None:
        source = _PRELUDE.format(offset=offset_us) + script.source.replace(
            "redis.call('TIME')", "skewed_time()"
        )
        found = _SKEWED[key] = Script(f"{script.name}@{offset_us:+d}us", source)
    return found


class MasterClocks:
    """Per-master offsets in seconds (positive: that master's scripts read a later time)."""

    def __init__(self, n: int, offsets: MutableSequence[float] | None = None) -> None:
        if offsets is None:
            offsets = [0.0] * n
        if len(offsets) != n:
            raise ValueError(f"{n} masters but {len(offsets)} offsets")
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def set(self, i: int, seconds: float) -> None:
        """Make master ``i``'s scripts read ``TIME + seconds`` from now on."""
        self.offsets[i] = seconds

    def set_all(self, seconds: Sequence[float]) -> None:
        """Set every master's offset at once."""
        for i, value in enumerate(seconds):
            self.offsets[i] = value

    def offset_us(self, i: int) -> int:
        """Master ``i``'s current offset in whole microseconds."""
        return round(self.offsets[i] * 1_000_000)


class _SkewedCore(RedlockCore):
    __slots__ = ("clocks",)

    clocks: MasterClocks

    def _each(self, call: Eval) -> list[Eval]:
        return [
            call._replace(script=skewed_script(call.script, self.clocks.offset_us(i)))
            for i in range(self.masters)
        ]


def _attach(lock: Any, clocks: MasterClocks) -> None:
    if len(clocks) != lock._core.masters:
        raise ValueError(f"{lock._core.masters} masters but {len(clocks)} clocks")
    lock._core.clocks = clocks


class SkewedRedlock(Redlock):
    """A ``Redlock`` whose master ``i`` reads ``TIME + clocks.offset_us(i)`` in every script."""

    _core_class = _SkewedCore

    def __init__(self, clients: Any, name: str, *, clocks: MasterClocks, **kwargs: Any) -> None:
        super().__init__(clients, name, **kwargs)
        _attach(self, clocks)


class AsyncSkewedRedlock(AsyncRedlock):
    """The asyncio twin of ``SkewedRedlock``."""

    _core_class = _SkewedCore

    def __init__(self, clients: Any, name: str, *, clocks: MasterClocks, **kwargs: Any) -> None:
        super().__init__(clients, name, **kwargs)
        _attach(self, clocks)
