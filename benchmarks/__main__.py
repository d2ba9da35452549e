"""``python -m benchmarks``: the benchmark harness, run from a checkout."""

from __future__ import annotations

from benchmarks._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
