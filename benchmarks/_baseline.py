"""``--baseline REV``: our rows from an older tree and from the working tree, in one run.

Every trial runs each chosen scenario once per variant, in a seeded order, as a child
``python -m benchmarks`` run: one trial, our contenders (and the floor), on this run's servers. A
child's ``PYTHONPATH`` puts its variant's ``distkit/ distlock/ distcache/`` first and this working
tree second, and it starts in an empty directory, so it (and any worker process it spawns)
imports that variant's packages while ``benchmarks/`` always comes from the working tree::

    trial 1:  child(current)   child(baseline)      same servers, seconds apart
    trial 2:  child(baseline)  child(current)
    ...

Each child reports its rows' ratio to its own floor; the per-trial pairs of those ratios give
the change, so machine drift between trials cancels as it does for the floor ratio.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._model import Reporter, Scenario, Settings
from ._results import Comparison, VariantFigures
from ._servers import Servers

__all__ = ["PACKAGES", "ROOT", "BaselineError", "Variant", "check_tree", "compare", "materialise"]

ROOT = Path(__file__).resolve().parent.parent  # the working tree the harness comes from
PACKAGES = ("distkit", "distlock", "distcache")
_CHILD_TIMEOUT = 3600  # seconds for one scenario's one trial of one variant


class BaselineError(ValueError):
    """The baseline cannot be used: an unknown revision, or a tree without our packages."""


@dataclass(frozen=True)
class Variant:
    """A tree of our packages to import: ``baseline`` or ``current`` (the working tree)."""

    name: str
    path: Path


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60)


def check_tree(path: Path, what: str | None = None) -> None:
    """Raise ``BaselineError`` unless ``path`` holds our packages (``what``: its name)."""
    missing = [f"{p}/__init__.py" for p in PACKAGES if not (path / p / "__init__.py").is_file()]
    if missing:
        raise BaselineError(f"{what or path} lacks our packages: no {', '.join(missing)}")


def materialise(rev: str, into: Path) -> str:
    """Extract ``rev``'s packages (``git archive``) into ``into``; return the full commit id."""
    try:
        found = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except (OSError, subprocess.SubprocessError) as exc:
        raise BaselineError(f"--baseline needs git: {exc}") from exc
    if found.returncode != 0:
        raise BaselineError(f"--baseline {rev!r} is not a revision of the repository at {ROOT}")
    commit = found.stdout.decode().strip()
    archive = _git("archive", "--format=tar", commit, *PACKAGES)
    if archive.returncode != 0:
        reason = archive.stderr.decode(errors="replace").strip().splitlines()
        raise BaselineError(
            f"--baseline {rev!r} ({commit[:12]}) lacks our packages: {reason[-1] if reason else ''}"
        )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    check_tree(into, f"--baseline {rev!r} ({commit[:12]})")
    return commit


def _pythonpath(variant: Variant) -> str:
    entries = [str(variant.path), str(ROOT)]
    inherited = os.environ.get("PYTHONPATH", "")
    entries += [e for e in inherited.split(os.pathsep) if e and e not in entries]
    return os.pathsep.join(dict.fromkeys(entries))


def _child_args(
    scenario: Scenario,
    keys: Sequence[str],
    settings: Settings,
    urls: Sequence[str],
    pids: Sequence[int],
    seed: int,
    out: Path,
) -> list[str]:
    args = ["--scenario", scenario.name, "--contender", *keys, "--trials", "1"]
    args += ["--seed", str(seed), "--pin", settings.pin, "--workers", str(settings.workers)]
    args += ["--json", str(out)]
    if settings.quick:
        args.append("--quick")
    if settings.duration is not None:
        args += ["--duration", repr(settings.duration)]
    if settings.warmup is not None:
        args += ["--warmup", repr(settings.warmup)]
    for url in urls:
        args += ["--redis-url", url]
    for pid in pids:
        args += ["--server-pid", str(pid)]
    return args


def _run_child(variant: Variant, args: list[str], workdir: Path) -> dict[str, Any]:
    """One child run; its JSON, or ``{"error": ...}`` when it produced none."""
    out = Path(args[args.index("--json") + 1])
    out.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": _pythonpath(variant)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks", *args],
            cwd=workdir, env=env, capture_output=True, text=True, timeout=_CHILD_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"the child run took over {_CHILD_TIMEOUT} s and was stopped"}
    if out.is_file():
        data: dict[str, Any] = json.loads(out.read_text())
        return data
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"error": lines[-1] if lines else f"the child run exited {done.returncode}"}


def _short(error: str) -> str:
    lines = error.strip().splitlines()
    return lines[-1] if lines else error


def _record(
    comparison: Comparison, variant: str, data: dict[str, Any], keys: Sequence[str]
) -> None:
    """Add one child run's trial to ``comparison`` (a missing row gets ``None`` and a reason)."""
    scenario = (data.get("scenarios") or [None])[0]
    error = data.get("error") or (scenario or {}).get("error")
    rows = {} if scenario is None else {r["key"]: r for r in scenario["contenders"]}
    comparison.packages.setdefault(variant, data.get("settings", {}).get("packages", {}))
    for note in [] if scenario is None else scenario["notes"]:
        if note not in comparison.notes:  # e.g. the pinning, said once for both variants
            comparison.notes.append(note)
    for key in keys:
        row = rows.get(key)
        label = key if row is None else row["label"]
        side: VariantFigures = getattr(comparison.row(key, label), variant)
        ratio = None if row is None else row["ratio_to_floor"]
        side.ratios.append(ratio)
        side.throughput.append(None if row is None else row["throughput"])
        why = error or (row or {}).get("error")
        if why is None and row is None:
            why = "the row did not run"
        elif why is None and ratio is None:
            why = "no ratio to the floor (the floor did not run)"
        if why is not None and side.error is None:
            side.error = _short(why)
        if row is not None:
            side.problems.extend(p for p in row["problems"] if p not in side.problems)


def ours(scenario: Scenario, chosen: Sequence[str]) -> list[str]:
    """The keys of our contenders in ``scenario`` (restricted to ``--contender`` when given)."""
    keys = [c.key for c in scenario.contenders if c.role == "distkit"]
    return [k for k in keys if k in chosen] if chosen else keys


def compare(
    scenarios: Sequence[Scenario],
    servers: Servers,
    settings: Settings,
    variants: tuple[Variant, Variant],
    reporter: Reporter,
) -> list[Comparison]:
    """Run ``scenarios`` once per variant per trial, interleaved; one ``Comparison`` each."""
    comparisons = []
    with tempfile.TemporaryDirectory(prefix="distkit-bench-baseline-") as tmp:
        workdir = Path(tmp) / "cwd"  # empty: the children's sys.path[0] holds no packages
        workdir.mkdir()
        for scenario in scenarios:
            comparison = Comparison(scenario.name, scenario.summary, scenario.unit)
            comparisons.append(comparison)
            keys = ours(scenario, settings.contenders)
            if not keys:
                comparison.notes.append("no contender of our libraries here: nothing to compare")
                continue
            try:
                urls = servers.urls(scenario.servers)
            except Exception as exc:
                comparison.error = f"{type(exc).__name__}: {exc}"
                reporter.note(f"{scenario.name} did not run: {comparison.error}")
                continue
            trials = scenario.trials(settings)
            rng = random.Random(f"{settings.seed}:{scenario.name}:baseline")
            reporter.scenario(f"{scenario.name} (baseline vs current)", 2 * trials)
            for trial in range(trials):
                order = list(variants)
                rng.shuffle(order)
                comparison.order.append([v.name for v in order])
                for variant in order:
                    reporter.step(f"trial {trial + 1}/{trials}: {variant.name}")
                    args = _child_args(
                        scenario, keys, settings, urls, servers.pids(),
                        settings.seed * 1000 + trial, Path(tmp) / "child.json",
                    )  # fmt: skip
                    _record(comparison, variant.name, _run_child(variant, args, workdir), keys)
            if scenario.name.startswith("cluster_"):
                comparison.notes.append(
                    "each child run starts its own throwaway Redis Cluster (the standalone rows "
                    "share this run's server)"
                )
    return comparisons
