"""The one list of scenarios, and of those planned that land with their features.

To add a scenario: write its module (a ``run(ctx)`` and a ``SCENARIO``), list it here, and move
its name out of ``PLANNED``. To add a contender: add its adapter where its kind lives
(``_locks.py`` for locks) and name its key in the scenario.
"""

from __future__ import annotations

from . import (
    _cache_scenarios,
    _cluster_scenarios,
    _lock_contended,
    _lock_uncontended,
    _near_scenarios,
    _redlock,
    _semaphore,
    _stampede,
)
from ._model import Scenario

__all__ = ["PLANNED", "SCENARIOS"]

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        _lock_uncontended.SCENARIO,
        _lock_contended.SCENARIO,
        _semaphore.SCENARIO,
        _redlock.SCENARIO,
        _cache_scenarios.HIT_SCENARIO,
        _cache_scenarios.BATCH_SCENARIO,
        _stampede.SCENARIO,
        _near_scenarios.SCENARIO,
        _cluster_scenarios.LOCK_SCENARIO,
        _cluster_scenarios.CACHE_SCENARIO,
    )
}

# Named in issue 4; each lands with the feature it measures (nothing is faked before then).
PLANNED: dict[str, str] = {}
