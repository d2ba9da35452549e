"""Results: every figure of a run, the ratio math and the target verdicts (no I/O).

The headline ratio pairs trials: in trial *i* every contender ran once, back to back, so
``ratio_to_floor`` is the median over trials of ``throughput_i(contender) / throughput_i(floor)``
and machine drift between trials cancels out of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._format import Figure, show
from ._model import Column, Plan, Role, Scenario, Target
from ._stats import Distribution, median

__all__ = [
    "Comparison",
    "ComparedRow",
    "ContenderResult",
    "RunResult",
    "ScenarioResult",
    "TargetResult",
    "VariantFigures",
    "complete",
]


@dataclass
class ContenderResult:
    """Every figure of one contender in one scenario."""

    key: str
    label: str
    role: Role
    note: str = ""
    trial_throughput: list[float | None] = field(default_factory=list)
    latency: Distribution | None = None
    metrics: dict[str, Figure] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    throughput: float | None = None
    ratio_to_floor: float | None = None
    ratio_to_floor_min: float | None = None
    ratio_to_floor_max: float | None = None
    ratio_to_best_peer: float | None = None

    @property
    def ok(self) -> bool:
        """No error, and every correctness check passed."""
        return self.error is None and all(self.checks.values())

    def figure(self, name: str) -> Figure:
        """A figure by name: a headline field, a latency percentile (``p99_us``) or a metric."""
        if name in ("throughput", "ratio_to_floor", "ratio_to_best_peer"):
            value: Figure = getattr(self, name)
            return value
        if name in self.metrics:
            return self.metrics[name]
        if self.latency is not None and hasattr(self.latency, name):
            latency: Figure = getattr(self.latency, name)
            return latency
        return None

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        data = asdict(self)
        data["latency"] = None if self.latency is None else self.latency.as_dict()
        data["ok"] = self.ok
        return data


@dataclass(frozen=True)
class TargetResult:
    """A target from the issue, checked against what was measured."""

    text: str
    contender: str
    figure: str
    op: str
    target: float
    value: float | None
    met: bool | None
    verdict: str

    @classmethod
    def evaluate(cls, target: Target, result: ContenderResult | None) -> TargetResult:
        """Compare one measured figure with its target and say by how much it is missed."""
        raw = None if result is None else result.figure(target.figure)
        value = float(raw) if isinstance(raw, (int, float)) else None
        limit = show(target.value, target.unit)
        if value is None:
            met, verdict = None, "not measured"
        elif target.op == ">=":
            met = value >= target.value
            short = (1 - value / target.value) * 100 if target.value else 0.0
            verdict = f"missed: {show(value, target.unit)} vs >= {limit} ({short:.1f}% short)"
        else:
            met = value <= target.value
            over = value / target.value if target.value else float("inf")
            verdict = f"missed: {show(value, target.unit)} vs <= {limit} ({over:.2f}x the limit)"
        if met:
            verdict = "met"
        return cls(
            text=target.text,
            contender=target.contender,
            figure=target.figure,
            op=target.op,
            target=target.value,
            value=value,
            met=met,
            verdict=verdict,
        )


@dataclass
class ScenarioResult:
    """One scenario's contenders, skipped peers, notes, trial order and target verdicts."""

    name: str
    summary: str
    unit: str
    latency_label: str
    method: str = ""
    contenders: list[ContenderResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plan: Plan | None = None
    order: list[list[str]] = field(default_factory=list)
    targets: list[TargetResult] = field(default_factory=list)
    columns: tuple[Column, ...] = ()
    best_peer: str | None = None
    label: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The scenario ran, and the floor and distkit's contenders ran and passed their checks.

        A peer that fails a check (pottery leaving lock keys behind) is a finding, shown in its
        row and in the JSON, not a failure of the run.
        """
        return self.error is None and all(c.ok for c in self.contenders if c.role != "peer")

    def contender(self, key: str) -> ContenderResult | None:
        """The result of contender ``key``, if it ran."""
        return next((c for c in self.contenders if c.key == key), None)

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        return {
            "name": self.name,
            "summary": self.summary,
            "method": self.method,
            "label": self.label,
            "ok": self.ok,
            "error": self.error,
            "unit": self.unit,
            "latency": self.latency_label,
            "plan": None if self.plan is None else asdict(self.plan),
            "trial_order": self.order,
            "best_peer": self.best_peer,
            "contenders": [c.as_dict() for c in self.contenders],
            "skipped": self.skipped,
            "notes": self.notes,
            "targets": [asdict(t) for t in self.targets],
        }


def _spread(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return median(values), min(values), max(values)


@dataclass
class VariantFigures:
    """One row's figures from one variant (baseline or current) of a ``--baseline`` run.

    ``ratios[i]`` is the row's throughput over the floor's in trial *i* (``None``: not
    measured); ``error`` is why the row could not run in this variant.
    """

    ratios: list[float | None] = field(default_factory=list)
    throughput: list[float | None] = field(default_factory=list)
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    def ratio(self) -> tuple[float | None, float | None, float | None]:
        """Median, least and greatest ratio to the floor over the trials."""
        return _spread([r for r in self.ratios if r is not None])

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        mid, low, high = self.ratio()
        data = asdict(self)
        data.update(ratio_to_floor=mid, ratio_to_floor_min=low, ratio_to_floor_max=high)
        return data


@dataclass
class ComparedRow:
    """One of our contenders measured from the baseline tree and from the working tree."""

    key: str
    label: str
    baseline: VariantFigures = field(default_factory=VariantFigures)
    current: VariantFigures = field(default_factory=VariantFigures)

    def changes(self) -> list[float]:
        """Per trial: current ratio / baseline ratio - 1 (both ran in that trial, seconds apart)."""
        return [
            c / b - 1
            for b, c in zip(self.baseline.ratios, self.current.ratios, strict=False)
            if b is not None and c is not None and b > 0
        ]

    def change(self) -> tuple[float | None, float | None, float | None]:
        """Median, least and greatest per-trial change."""
        return _spread(self.changes())

    @property
    def ok(self) -> bool:
        """The working tree's row ran and passed its checks (the baseline's may not)."""
        return self.current.error is None and not self.current.problems

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        mid, low, high = self.change()
        return {
            "key": self.key,
            "label": self.label,
            "ok": self.ok,
            "baseline": self.baseline.as_dict(),
            "current": self.current.as_dict(),
            "change": mid,
            "change_min": low,
            "change_max": high,
            "trial_changes": self.changes(),
        }


@dataclass
class Comparison:
    """One scenario's rows of our libraries, baseline vs working tree, interleaved per trial."""

    name: str
    summary: str
    unit: str
    rows: list[ComparedRow] = field(default_factory=list)
    order: list[list[str]] = field(default_factory=list)  # per trial: which variant ran first
    packages: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> imported from
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """The working tree's side ran and passed its checks."""
        return self.error is None and all(r.ok for r in self.rows)

    def row(self, key: str, label: str) -> ComparedRow:
        """The row of contender ``key``, added on first use."""
        found = next((r for r in self.rows if r.key == key), None)
        if found is None:
            found = ComparedRow(key, label)
            self.rows.append(found)
        return found

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        data = asdict(self)
        data.update(
            ok=self.ok, trial_order=data.pop("order"), rows=[r.as_dict() for r in self.rows]
        )
        return data


@dataclass
class RunResult:
    """A whole run: machine facts, settings and every scenario (or, with ``--baseline``, every
    comparison of the baseline tree with the working tree)."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    scenarios: list[ScenarioResult]
    label: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)
    baseline: dict[str, Any] | None = None  # what the baseline is: revision, commit, path

    @property
    def ok(self) -> bool:
        """Every scenario (and the working tree's side of every comparison) ran and passed."""
        return all(s.ok for s in self.scenarios) and all(c.ok for c in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        """Every figure, for JSON."""
        data = {
            "schema": 1,
            "label": self.label,
            "ok": self.ok,
            "machine": self.machine,
            "settings": self.settings,
            "scenarios": [s.as_dict() for s in self.scenarios],
        }
        if self.baseline is not None:
            data["baseline"] = {
                **self.baseline,
                "comparisons": [c.as_dict() for c in self.comparisons],
            }
        return data


def _paired(a: ContenderResult, b: ContenderResult) -> list[float]:
    return [
        x / y
        for x, y in zip(a.trial_throughput, b.trial_throughput, strict=False)
        if x is not None and y is not None and y > 0
    ]


def complete(result: ScenarioResult, scenario: Scenario) -> ScenarioResult:
    """Fill in medians, paired ratios (to the floor, to the best peer) and target verdicts."""
    for c in result.contenders:
        measured = [t for t in c.trial_throughput if t is not None]
        c.throughput = median(measured) if measured else None
    measured_rows = [c for c in result.contenders if c.throughput is not None]
    floor = next((c for c in measured_rows if c.role == "floor"), None)
    peers = [c for c in measured_rows if c.role == "peer"]
    best = max(peers, key=lambda c: c.throughput or 0.0, default=None)
    result.best_peer = None if best is None else best.key
    for c in measured_rows:
        if floor is not None and (ratios := _paired(c, floor)):
            c.ratio_to_floor = median(ratios)
            c.ratio_to_floor_min, c.ratio_to_floor_max = min(ratios), max(ratios)
        if best is not None and (ratios := _paired(c, best)):
            c.ratio_to_best_peer = median(ratios)
    result.targets = [
        TargetResult.evaluate(t, result.contender(t.contender)) for t in scenario.targets
    ]
    result.columns = scenario.columns
    return result
