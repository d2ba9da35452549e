"""The chaos soak in CI (issue 9 point 3): a short, seeded run of ``distkit.testing.chaos``.

Four worker processes, forked by one parent from lock handles it built (and used) before the
fork, mix Redlock and single-instance Lock sections (fenced writes; now and then a holder stalls
past its lease and writes anyway; async workers cancel acquire/extend/release at successive await
points) and cache traffic while the nemesis kills, pauses, restarts without data and partitions
servers, cuts the single lock's connections under queued FIFO waiters, stalls workers, and the
Redlock masters run with skewed clocks; the soak then requires 0 mutual exclusion violations, 0
stale fenced writes accepted, 0 orphaned leases, 0 late validities, 0 stale cache reads, no
leaked lock, no stuck process and bounded memory. Length
and seed: ``DISTKIT_CHAOS_SECONDS`` (default 25) and ``DISTKIT_CHAOS_SEED`` (default 1); a long
soak runs from the command line::

    python -m distkit.testing.chaos --minutes 10 --seed 7
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distkit.testing import check_cache, check_fencing, check_mutex, read_history
from distkit.testing.chaos import SoakConfig, SoakReport, main, run_soak

SECONDS = float(os.environ.get("DISTKIT_CHAOS_SECONDS", "25"))
SEED = int(os.environ.get("DISTKIT_CHAOS_SEED", "1"))


@pytest.fixture(scope="module")
def soak(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> SoakReport:
    directory = tmp_path_factory.mktemp("chaos")
    cfg = SoakConfig(seconds=SECONDS, seed=SEED, workers=4, directory=directory)
    report = run_soak(cfg, binary=redis_binary)
    print(report.summary())
    return report


@pytest.mark.slow
def test_soak_finds_no_violation(soak: SoakReport) -> None:
    assert soak.ok, soak.summary()
    assert soak.violations == 0  # mutex, fencing, orphans, validity, cache
    assert not soak.leaked_locks and not soak.stuck_workers and not soak.memory_problems


@pytest.mark.slow
def test_soak_did_real_work_under_real_faults(soak: SoakReport) -> None:
    ops = soak.operations
    assert ops["acquire:ok"] >= 20 and ops["write:ok"] >= 20, soak.summary()
    assert ops["read:ok"] >= 50 and ops["invalidate:ok"] + ops["delete:ok"] >= 5, soak.summary()
    assert ops["stall:info"] >= 1, soak.summary()  # holders stalled past their lease
    assert sum(soak.faults.values()) >= 5, soak.summary()
    assert len(soak.faults) >= 3, soak.summary()  # several kinds of fault, not one
    stats = {c.checker: c.stats for c in soak.checks}
    assert stats["mutex"]["holds"] == ops["acquire:ok"]
    assert stats["cache"]["hits"] > 0 and stats["cache"]["invalidations"] > 0
    assert len(soak.rss_mb) == soak.config.workers
    # the lock faults of issue 13, each exercised at least once
    assert ops["forked:info"] == soak.config.workers, soak.summary()  # all share pre-fork handles
    for target in ("acquire", "extend", "release"):  # cancelled at successive await points
        assert ops[f"cancel {target}:info"] >= 1, soak.summary()
    assert ops["stall before BLPOP:info"] >= 1, soak.summary()
    assert soak.faults["cut lock connections under queued waiters"] >= 1, soak.summary()
    assert soak.faults["latency lock"] >= 1 and soak.faults["stall worker (SIGSTOP)"] >= 1
    assert soak.skew and any(soak.skew), soak.summary()  # Redlock masters' clocks really skewed
    assert stats["orphans"]["samples"] > 0 and stats["validity"]["samples"] > 0, soak.summary()
    text = soak.summary()
    assert len(text.splitlines()) <= 25  # one screen
    assert "faults injected" in text and "mutex: 0 violation" in text


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_the_checkers_would_catch_a_violation_in_this_history(soak: SoakReport) -> None:
    """Forge one bad event of each kind into the soak's real history: each is caught."""
    assert soak.config.directory is not None
    history_dir = soak.config.directory / "history"
    events = [e for f in sorted(history_dir.glob("*.jsonl")) for e in _lines(f)]
    last = max(int(str(e["time"])) for e in events)
    forged = history_dir.parent / "forged"
    forged.mkdir(exist_ok=True)
    # a stale read: the value of the first cache write, read after a later clear completed
    first_write = next(
        e for e in events if e["op"] == "write" and e.get("key") and e["type"] == "ok"
    )
    base = {"process": "forger", "seq": 0}
    stale = [
        {**base, "op": "invalidate", "type": "invoke", "time": last + 1},
        {**base, "op": "invalidate", "type": "ok", "time": last + 2},
        {**base, "op": "read", "type": "invoke", "time": last + 3, "key": first_write["key"]},
        {**base, "op": "read", "type": "ok", "time": last + 4, "key": first_write["key"],
         "value": first_write["value"]},
    ]  # fmt: skip
    # a fenced write accepted with a token below one accepted before
    lowest = min(int(str(e["token"])) for e in events if e["op"] == "write" and "token" in e)
    stale_write = [
        {**base, "op": "write", "type": "invoke", "time": last + 5, "token": lowest - 1,
         "resource": "chaos-a"},
        {**base, "op": "write", "type": "ok", "time": last + 6, "token": lowest - 1,
         "resource": "chaos-a"},
    ]  # fmt: skip
    # a second holder granted while a real holder's window was open
    grant = next(e for e in events if e["op"] == "acquire" and e["type"] == "ok")
    overlap = [
        {**base, "op": "acquire", "type": "ok", "time": int(str(grant["time"])) + 1,
         "token": 1, "lock": grant["lock"]},
    ]  # fmt: skip
    path = forged / "forger.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in stale + stale_write + overlap) + "\n")
    merged = read_history(history_dir, path)
    assert (
        check_cache(merged).count("stale-read")
        + check_cache(merged).count("overwritten-read")
        + check_cache(merged).count("expired-read")
        >= 1
    )
    assert check_fencing(merged).count("stale-write-accepted") >= 1
    assert check_mutex(merged).count("overlap") >= 1
    clean = read_history(history_dir)
    assert check_cache(clean).ok and check_fencing(clean).ok and check_mutex(clean).ok


def test_command_line_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--seconds", "1", "--minutes", "1"])
    assert "not allowed with" in capsys.readouterr().err
