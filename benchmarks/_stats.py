"""Order statistics over timing samples: pure functions, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Distribution", "median", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (which must not be empty)."""
    return percentile(sorted(values), 50)


@dataclass(frozen=True)
class Distribution:
    """Summary of a pooled sample of durations, in microseconds."""

    count: int
    mean_us: float
    min_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @classmethod
    def of_ns(cls, samples_ns: Iterable[int]) -> Distribution | None:
        """Summarise durations given in nanoseconds; ``None`` for an empty sample."""
        values = sorted(s / 1000 for s in samples_ns)
        if not values:
            return None
        return cls(
            count=len(values),
            mean_us=sum(values) / len(values),
            min_us=values[0],
            p50_us=percentile(values, 50),
            p90_us=percentile(values, 90),
            p99_us=percentile(values, 99),
            p999_us=percentile(values, 99.9),
            max_us=values[-1],
        )

    def as_dict(self) -> dict[str, float | int]:
        """Every field, for JSON."""
        return asdict(self)
