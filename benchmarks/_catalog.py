"""The one list of scenarios, and of those planned that land with their features.

To add a scenario: write its module (a ``run(ctx)`` and a ``SCENARIO``), list it here, and move
its name out of ``PLANNED``. To add a contender: add its adapter where its kind lives
(``_locks.py`` for locks) and name its key in the scenario.
"""

from __future__ import annotations

from . import _lock_contended, _lock_uncontended, _redlock
from ._model import Scenario

__all__ = ["PLANNED", "SCENARIOS"]

SCENARIOS: dict[str, Scenario] = {
    s.name: s for s in (_lock_uncontended.SCENARIO, _lock_contended.SCENARIO, _redlock.SCENARIO)
}

# Named in issue 4; each lands with the feature it measures (nothing is faked before then).
PLANNED: dict[str, str] = {
    "cache_hit": "read-through hits on 1,000 hot keys: floor GET + json.loads, distcache with "
    "and without near cache, dogpile.cache, cashews, aiocache, dict ceiling (lands with distcache)",
    "cache_stampede": "64 concurrent callers on a just-expired key with a 50 ms loader: loader "
    "calls and caller latency (lands with distcache stampede control)",
    "cache_batch": "get_many of 100 keys vs 100 GETs vs MGET (lands with distcache)",
}
