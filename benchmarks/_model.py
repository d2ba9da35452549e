"""The harness's vocabulary: contenders, scenarios, run settings and the context a scenario runs in.

A *contender* is a small adapter (a name, a role, the modules it needs, a factory); a *scenario*
is a function from a ``RunContext`` to a ``ScenarioResult`` plus the columns and targets it
reports. ``_catalog.py`` is the one place that lists them.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, TypeVar

import redis

from ._format import Unit

if TYPE_CHECKING:
    from ._results import ScenarioResult

__all__ = [
    "CLIENT_OPTIONS",
    "Pin",
    "Column",
    "Contender",
    "LockContender",
    "LockFactory",
    "LockOps",
    "Plan",
    "Reporter",
    "Role",
    "RunContext",
    "Scenario",
    "Settings",
    "Target",
]

_T = TypeVar("_T")
_C = TypeVar("_C", bound="Contender")

# "ceiling": a bound from above that is not a competitor (an in-process dict for cache hits).
Role = Literal["floor", "distkit", "peer", "ceiling"]

# Where a single-process measurement runs: "same" pins the measuring process and the
# redis-server(s) it started to one CPU; "auto" does so when the run started its servers.
Pin = Literal["auto", "same", "off"]

# Every client of every contender is built with these, so connection settings never differ.
# The socket timeout is long enough for any peer's longest blocking call (python-redis-lock
# BLPOPs for up to its expiry); distlock caps its own blocking calls below it.
CLIENT_OPTIONS: dict[str, float] = {"socket_timeout": 30.0, "socket_connect_timeout": 5.0}


@dataclass(frozen=True, kw_only=True)
class Contender:
    """One competitor: a table label, its role and the importable modules it needs."""

    key: str
    label: str
    role: Role
    requires: tuple[str, ...] = ()
    note: str = ""

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (a missing module), or ``None`` when it can."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return (
                    f"{self.label} skipped: {module!r} is not importable ({exc}); "
                    "install the bench extra: pip install 'redis-distkit[bench]'"
                )
        return None


class LockOps(NamedTuple):
    """A lock handle reduced to its two bound operations (blocking acquire, release)."""

    acquire: Callable[[], object]
    release: Callable[[], object]


# (one client per master, lock name, ttl seconds) -> a fresh handle.
LockFactory = Callable[[Sequence[redis.Redis], str, float], LockOps]


@dataclass(frozen=True, kw_only=True)
class LockContender(Contender):
    """A lock contender: ``factory`` builds a handle; ``prepare`` seeds Redis state once."""

    factory: LockFactory
    prepare: Callable[[redis.Redis, str], None] | None = None


@dataclass(frozen=True)
class Column:
    """An extra table column: a figure name and how to show it."""

    header: str
    figure: str
    unit: Unit


@dataclass(frozen=True)
class Target:
    """A goal from the issue for one contender's figure, e.g. ``ratio_to_floor >= 0.95``."""

    contender: str
    figure: str
    op: Literal["<=", ">="]
    value: float
    text: str
    unit: Unit = "ratio"


@dataclass(frozen=True)
class Plan:
    """How long one scenario measures: trials, seconds per contender per trial, warm-up."""

    trials: int
    duration: float
    warmup: float


@dataclass(frozen=True)
class Settings:
    """What the command line chose for the whole run."""

    quick: bool = False
    trials: int | None = None
    duration: float | None = None
    warmup: float | None = None
    seed: int = 0
    workers: int = 8
    pin: Pin = "auto"
    contenders: tuple[str, ...] = ()  # only these (plus the floors); empty: all

    def plan(self, *, quick: Plan, full: Plan) -> Plan:
        """The scenario's default plan for this mode, with command-line overrides applied."""
        base = quick if self.quick else full
        duration = base.duration if self.duration is None else self.duration
        warmup = min(base.warmup, duration) if self.warmup is None else self.warmup
        return Plan(
            trials=base.trials if self.trials is None else self.trials,
            duration=duration,
            warmup=warmup,
        )


class Reporter(Protocol):
    """Progress display: one bar per scenario, one step per measured segment."""

    def scenario(self, name: str, steps: int) -> None:
        """Start showing ``name`` with ``steps`` steps."""

    def step(self, text: str) -> None:
        """Describe the segment about to run, and count the previous one as done."""

    def note(self, text: str) -> None:
        """Show a line that stays (a skipped peer, an error)."""

    def close(self) -> None:
        """Stop the display."""


@dataclass
class RunContext:
    """What a scenario gets: settings, its servers' URLs, a client factory and the reporter."""

    settings: Settings
    urls: tuple[str, ...]
    reporter: Reporter
    run_id: str
    label: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    placement: Callable[[], AbstractContextManager[str | None]] = lambda: nullcontext(None)

    def client(self, index: int = 0) -> redis.Redis:
        """A fresh sync client for server ``index`` (the same options for every contender)."""
        return redis.Redis.from_url(self.urls[index], **CLIENT_OPTIONS)

    def clients(self) -> list[redis.Redis]:
        """One fresh client per server."""
        return [self.client(i) for i in range(len(self.urls))]

    def name(self, *parts: str) -> str:
        """A Redis name that belongs to this run only (cleanup finds it by ``run_id``)."""
        return "-".join(("distkit-bench", self.run_id, *parts))

    def select(self, contenders: Sequence[_C], skipped: list[str]) -> list[_C]:
        """The contenders to run: installed, and chosen by ``--contender`` (floors always run).

        Uninstalled ones are appended to ``skipped`` with the reason, and shown as a note.
        """
        chosen = set(self.settings.contenders)
        selected = []
        for contender in contenders:
            if chosen and contender.role != "floor" and contender.key not in chosen:
                continue
            reason = contender.unavailable()
            if reason is not None:
                skipped.append(reason)
                self.reporter.note(reason)
                continue
            selected.append(contender)
        return selected

    def delete_keys(self) -> int:
        """Delete every key of this run on every server (best effort); return how many."""
        deleted = 0
        for index in range(len(self.urls)):
            client = self.client(index)
            try:
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"*distkit-bench-{self.run_id}*", count=1000):
                    batch.append(key)
                    if len(batch) >= 500:
                        deleted += int(client.delete(*batch))
                        batch.clear()
                if batch:
                    deleted += int(client.delete(*batch))
            except redis.RedisError:
                pass
            finally:
                client.close()
        return deleted

    def order(self, items: Sequence[_T]) -> list[_T]:
        """``items`` in a seeded random order: a new shuffle for every trial."""
        shuffled = list(items)
        self.rng.shuffle(shuffled)
        return shuffled


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A registered scenario: what it measures, how many servers, how to run and report it."""

    name: str
    summary: str
    unit: str
    latency_label: str
    run: Callable[[RunContext], ScenarioResult]
    contenders: tuple[Contender, ...]
    servers: int = 1
    columns: tuple[Column, ...] = ()
    targets: tuple[Target, ...] = ()
    method: str = ""
    plans: tuple[Plan, Plan] | None = None  # (quick, full): how many trials --baseline runs

    def trials(self, settings: Settings) -> int:
        """How many trials this scenario runs with ``settings`` (3 when it names no plans)."""
        if settings.trials is not None or self.plans is None:
            return settings.trials or 3
        return settings.plan(quick=self.plans[0], full=self.plans[1]).trials
