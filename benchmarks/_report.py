"""Showing a run: a terminal table per scenario (rich or plain), a JSON file, a PNG chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from ._format import show
from ._results import ComparedRow, Comparison, ContenderResult, RunResult, ScenarioResult

__all__ = [
    "PlotUnavailable",
    "comparison_rows",
    "markdown",
    "print_report",
    "table_rows",
    "write_json",
    "write_markdown",
    "write_plot",
]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _check(row: ContenderResult) -> str:
    if row.error is not None:
        return "ERROR: " + row.error.strip().splitlines()[-1][:70]
    if not row.checks:
        return "—"
    if row.ok:
        return "ok"
    failed = [name for name, passed in row.checks.items() if not passed]
    return "FAIL: " + "; ".join(row.problems or failed)


def table_rows(scenario: ScenarioResult) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of one scenario's table."""
    lat = scenario.latency_label
    headers = [
        "contender",
        scenario.unit,
        "x floor",
        "x best peer",
        f"{lat} p50",
        f"{lat} p99",
        *(c.header for c in scenario.columns),
        "check",
    ]
    rows = []
    for row in scenario.contenders:
        p50 = row.latency.p50_us if row.latency else None
        p99 = row.latency.p99_us if row.latency else None
        rows.append(
            [
                row.label,
                show(row.throughput, "count"),
                show(row.ratio_to_floor, "ratio"),
                show(row.ratio_to_best_peer, "ratio"),
                show(p50, "us"),
                show(p99, "us"),
                *(show(row.figure(c.figure), c.unit) for c in scenario.columns),
                _check(row),
            ]
        )
    return headers, rows


def _spread(mid: float | None, low: float | None, high: float | None, percent: bool) -> str:
    def one(value: float) -> str:
        return f"{value * 100:+.1f}%" if percent else f"{value:.2f}x"

    if mid is None or low is None or high is None:
        return "—"
    if low == high:  # one trial: no range to show
        return one(mid)
    return f"{one(mid)} ({one(low)} .. {one(high)})"


def _variant_cell(row: ComparedRow, variant: str) -> str:
    side = row.baseline if variant == "baseline" else row.current
    if side.error is not None and all(r is None for r in side.ratios):
        return f"n/a ({variant}: {side.error[:90]})"
    return _spread(*side.ratio(), percent=False)


def comparison_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of one ``--baseline`` comparison: ratios (median, trial range), change."""
    headers = ["contender", "baseline x floor", "current x floor", "change", "trials", "check"]
    rows = []
    for row in comparison.rows:
        paired = len(row.changes())
        if row.current.error is not None:
            check = "ERROR: " + row.current.error[:70]
        elif row.current.problems:
            check = "FAIL: " + "; ".join(row.current.problems)
        else:
            check = "ok"
        if row.baseline.problems:
            check += "; baseline FAIL: " + "; ".join(row.baseline.problems)
        rows.append(
            [
                row.label,
                _variant_cell(row, "baseline"),
                _variant_cell(row, "current"),
                _spread(*row.change(), percent=True),
                f"{paired}/{len(row.current.ratios)}",
                check,
            ]
        )
    return headers, rows


def _comparison_footer(comparison: Comparison) -> list[str]:
    lines = list(comparison.notes)
    for variant in ("baseline", "current"):
        places = sorted(
            {str(Path(d).parent) for d in comparison.packages.get(variant, {}).values()}
        )
        if places:
            lines.append(f"{variant} imported from {', '.join(places)}")
    if comparison.error:
        lines.append(f"SCENARIO ERROR: {comparison.error}")
    return lines


def _comparison_title(comparison: Comparison) -> str:
    status = "" if comparison.ok else "  [FAILED]"
    return f"{comparison.name}: baseline vs current, ratio to the floor ({comparison.unit}){status}"


def _baseline_heading(run: RunResult) -> str | None:
    if run.baseline is None:
        return None
    rev, commit = run.baseline.get("revision"), run.baseline.get("commit")
    what = f"{rev} ({str(commit)[:12]})" if rev else f"the tree in {run.baseline.get('path')}"
    return (
        f"baseline = {what}; current = the working tree {run.baseline.get('current')}; "
        "change = current/baseline - 1, per trial (median, range over trials)"
    )


def _tables(
    run: RunResult,
) -> list[tuple[str, str | None, list[str], list[list[str]], list[str], list[str]]]:
    """Every table of the run: title, label, headers, rows, each row's role, footer lines."""
    tables = []
    for scenario in run.scenarios:
        headers, rows = table_rows(scenario)
        roles = [c.role if c.ok else "failed" for c in scenario.contenders]
        tables.append((_title(scenario), scenario.label, headers, rows, roles, _footer(scenario)))
    for comparison in run.comparisons:
        headers, rows = comparison_rows(comparison)
        roles = ["distkit" if r.ok else "failed" for r in comparison.rows]
        footer = _comparison_footer(comparison)
        tables.append((_comparison_title(comparison), run.label, headers, rows, roles, footer))
    return tables


def _footer(scenario: ScenarioResult) -> list[str]:
    lines = []
    floor = next((c for c in scenario.contenders if c.role == "floor"), None)
    if floor is not None and floor.note:
        lines.append(f"floor = {floor.note}")
    best = scenario.contender(scenario.best_peer) if scenario.best_peer else None
    if best is not None:
        lines.append(f"best peer = {best.label}")
    lines.extend(scenario.notes)
    lines.extend(scenario.skipped)
    if scenario.error:
        lines.append(f"SCENARIO ERROR: {scenario.error}")
    for target in scenario.targets:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[target.met]
        detail = "" if target.met else f" — {target.verdict}"
        lines.append(f"target [{mark}] {target.text}{detail}")
    return lines


def _title(scenario: ScenarioResult) -> str:
    status = "" if scenario.ok else "  [FAILED]"
    return f"{scenario.name}: {scenario.summary}{status}"


def print_report(run: RunResult, out: IO[str] | None = None) -> None:
    """Print every scenario's table (rich when installed and writing to stdout)."""
    stream = sys.stdout if out is None else out
    try:
        from rich.console import Console
    except ImportError:
        _print_plain(run, stream)
        return
    # A pipe or file gets a width that fits the table rather than rich's 80-column default.
    width = None if stream.isatty() else 200
    _print_rich(run, Console(file=stream, width=width))


def _print_rich(run: RunResult, console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    if run.label:
        console.print(Text(f"!!! {run.label} !!!", style="bold red"))
    heading = _baseline_heading(run)
    if heading:
        console.print(Text(heading, style="bold"))
    for title, label, headers, rows, roles, footer in _tables(run):
        table = Table(title=title, caption=label, title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i < 6)
        for role, cells in zip(roles, rows, strict=True):
            table.add_row(
                *cells, style={"floor": "dim", "distkit": "bold", "failed": "red"}.get(role, "")
            )
        console.print(table)
        for line in footer:
            console.print(Text(f"  {line}"))
        console.print()


def _print_plain(run: RunResult, stream: IO[str]) -> None:
    if run.label:
        print(f"!!! {run.label} !!!", file=stream)
    heading = _baseline_heading(run)
    if heading:
        print(heading, file=stream)
    for title, label, headers, rows, _roles, footer in _tables(run):
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        print(title, file=stream)
        if label:
            print(f"[{label}]", file=stream)
        for cells in [headers, ["-" * w for w in widths], *rows]:
            line = "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            print(line.rstrip(), file=stream)
        for line in footer:
            print(f"  {line}", file=stream)
        print(file=stream)


def markdown(run: RunResult) -> str:
    """The run as Markdown: machine facts, then each scenario's table, notes and targets."""
    out = []
    if run.label:
        out += [f"> **{run.label}**", ""]
    out += ["| machine | |", "| --- | --- |"]
    for key, value in run.machine.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        shown = value
        out.append(f"| {key} | {shown} |")
    heading = _baseline_heading(run)
    if heading:
        out += ["", heading]
    for title, label, headers, rows, _roles, footer in _tables(run):
        out += ["", f"### {title}", ""]
        if label:
            out += [f"*{label}*", ""]
        out.append("| " + " | ".join(headers) + " |")
        out.append("| --- " + "| ---: " * (len(headers) - 1) + "|")
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in rows]
        out.append("")
        out += [f"- {line}" for line in footer]
    return "\n".join(out) + "\n"


def write_markdown(run: RunResult, path: str | Path) -> None:
    """Write ``markdown(run)`` to ``path``."""
    Path(path).write_text(markdown(run))


def write_json(run: RunResult, path: str | Path) -> None:
    """Write every figure of the run to ``path``."""
    Path(path).write_text(json.dumps(run.as_dict(), indent=2, ensure_ascii=False) + "\n")


_COLOURS = {"floor": "#9e9e9e", "distkit": "#1f77b4", "peer": "#ff7f0e", "ceiling": "#2ca02c"}


def write_plot(run: RunResult, path: str | Path) -> None:
    """One row of charts per scenario: throughput ratio to the floor, and p50-p99 latency.

    Raises:
        PlotUnavailable: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            f"--plot needs matplotlib ({exc}); install it with: pip install 'redis-distkit[bench]'"
        ) from exc

    shown = [s for s in run.scenarios if any(c.throughput for c in s.contenders)]
    if not shown:
        shown = run.scenarios[:1]
    fig, axes = plt.subplots(
        len(shown), 2, figsize=(13, 0.5 + 0.55 * max(4, _most_rows(shown)) * len(shown)),
        squeeze=False, gridspec_kw={"width_ratios": [3, 2]},
    )  # fmt: skip
    for (left, right), scenario in zip(axes, shown, strict=True):
        _plot_scenario(left, right, scenario)
    title = "distkit benchmarks"
    date = run.machine.get("date", "")
    if date:
        title += f" — {date}, {run.machine.get('cpu_count')} CPUs, {run.machine.get('python')}"
    if run.label:
        title += f"\n{run.label.upper()}"
    fig.suptitle(title, color="red" if run.label else "black")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def _most_rows(scenarios: list[ScenarioResult]) -> int:
    return max((len(s.contenders) for s in scenarios), default=1)


def _plot_scenario(left: Any, right: Any, scenario: ScenarioResult) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [c for c in scenario.contenders if c.throughput is not None][::-1]
    labels = [c.label + ("" if c.ok else " (FAILED)") for c in rows]
    ys = list(range(len(rows)))
    ratios = [c.ratio_to_floor or 0.0 for c in rows]
    low = [max(0.0, r - (c.ratio_to_floor_min or r)) for r, c in zip(ratios, rows, strict=True)]
    high = [max(0.0, (c.ratio_to_floor_max or r) - r) for r, c in zip(ratios, rows, strict=True)]
    colours = [_COLOURS.get(c.role, "#333333") for c in rows]
    left.barh(ys, ratios, xerr=[low, high], color=colours, capsize=3)
    left.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.set_yticks(ys, labels)
    left.set_xlabel(f"throughput / floor ({scenario.unit}; bars: median, whiskers: trial range)")
    for y, ratio, c in zip(ys, ratios, rows, strict=True):
        x = 0.0 if c.role == "ceiling" else max(ratio, c.ratio_to_floor_max or ratio)
        left.annotate(f"  {ratio:.2f}x  ({c.throughput:,.0f})", (x, y), va="center", fontsize=8)
    # A ceiling (an in-process dict: ~200x) would flatten every other bar: its bar runs off the
    # chart, its figure stays in the annotation and the table.
    scale = [r for r, c in zip(ratios, rows, strict=True) if c.role != "ceiling"]
    spread = [c.ratio_to_floor_max or 0.0 for c in rows if c.role != "ceiling"]
    left.set_xlim(0, max([1.0, *spread, *scale]) * 1.35)
    heading = scenario.name + ("" if scenario.ok else " — CHECK FAILED")
    if scenario.label:
        heading += f"  [{scenario.label}]"
    left.set_title(heading, loc="left", fontsize=10, color="red" if scenario.label else "black")

    p50 = [c.latency.p50_us if c.latency else float("nan") for c in rows]
    p99 = [c.latency.p99_us if c.latency else float("nan") for c in rows]
    right.hlines(ys, p50, p99, colors=colours, linewidth=4)
    right.plot(p50, ys, "o", color="black", markersize=4)
    right.plot(p99, ys, "|", color="black", markersize=12)
    for y, hi in zip(ys, p99, strict=True):
        if hi == hi:  # not NaN
            right.annotate(f"  {show(hi, 'us')}", (hi, y), va="center", fontsize=7)
    right.set_xscale("log")
    right.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: show(v, "us")))
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_yticks(ys, [""] * len(ys))
    right.set_ylim(-0.6, len(ys) - 0.4)
    right.set_xlabel(f"{scenario.latency_label} latency (dot: p50, tick: p99; log scale)")
    right.grid(axis="x", which="both", alpha=0.3)
    if ys:
        lo = min(v for v in p50 if v == v) if any(v == v for v in p50) else 1.0
        hi_all = max(v for v in p99 if v == v) if any(v == v for v in p99) else 10.0
        right.set_xlim(lo / 1.5, hi_all * 3)
