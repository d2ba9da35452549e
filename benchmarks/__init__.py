"""distkit's benchmark harness: distkit beside its peers, as ratios to a raw redis-py floor.

Run ``python -m benchmarks`` from a checkout (the benchmarks are not part of the wheel); see
``benchmarks/README.md``.
"""

from ._cli import main

__all__ = ["main"]
