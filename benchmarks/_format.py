"""How figures are written in tables and verdicts: durations, ratios, shares, counts."""

from __future__ import annotations

from typing import Literal

__all__ = ["Figure", "Unit", "show"]

Figure = float | int | str | None
Unit = Literal["us", "ms", "ratio", "share", "count", "text"]


def _duration_us(us: float) -> str:
    if us < 0:
        return f"-{_duration_us(-us)}"
    if us < 1:
        return f"{us * 1000:.0f} ns"
    if us < 100:
        return f"{us:.1f} µs"
    if us < 1000:
        return f"{us:.0f} µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f} ms"
    return f"{us / 1e6:.2f} s"


def show(value: Figure, unit: Unit) -> str:
    """``value`` written for a reader: ``"1.25 ms"``, ``"0.81x"``, ``"69%"``, ``"12,345"``."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if unit == "us":
        return _duration_us(float(value))
    if unit == "ms":
        return _duration_us(float(value) * 1000)
    if unit == "ratio":
        return f"{value:.2f}x"
    if unit == "share":
        return f"{value * 100:.0f}%"
    if unit == "count":
        return f"{value:,.0f}"
    return str(value)
