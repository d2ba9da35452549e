"""``python -m benchmarks`` and the ``distkit-bench`` console script."""

from __future__ import annotations

from benchmarks._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
