"""The history checker itself: it must catch each hand-made violation and pass clean histories.

Times in these hand-made histories are in milliseconds (``ev(..., ms)``) for readability; events
store nanoseconds, as ``time.monotonic_ns()`` would.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from distkit.testing import (
    CheckResult,
    Event,
    HistoryRecorder,
    check_fencing,
    check_mutex,
    check_orphans,
    check_validity,
    drain_queue,
    read_history,
    sort_events,
)

MS = 1_000_000


def ev(process: str, op: str, type_: str, ms: float, **fields: Any) -> dict[str, Any]:
    """One event as a history line; ``ms`` is converted to nanoseconds."""
    return {"process": process, "op": op, "type": type_, "time": round(ms * MS), **fields}


def hold(process: str, start: float, end: float, token: int, **fields: Any) -> list[dict[str, Any]]:
    """acquire invoke/ok at ``start``, release invoke at ``end`` and ok just after."""
    lock = {k: v for k, v in fields.items() if k == "lock"}
    return [
        ev(process, "acquire", "invoke", start - 0.5, **lock),
        ev(process, "acquire", "ok", start, token=token, **fields),
        ev(process, "release", "invoke", end, **lock),
        ev(process, "release", "ok", end + 0.5, **lock),
    ]


def write(
    process: str, start: float, end: float, token: int, outcome: str = "ok", **fields: Any
) -> list[dict[str, Any]]:
    """A fenced write: invoke at ``start``, ``outcome`` (ok/fail/info) at ``end``."""
    return [
        ev(process, "write", "invoke", start, token=token, **fields),
        ev(process, "write", outcome, end, token=token, **fields),
    ]


def kinds(result: CheckResult) -> list[str]:
    return [v.kind for v in result.violations]


# -- mutual exclusion ---------------------------------------------------------------------------
def test_mutex_passes_sequential_holders() -> None:
    history = hold("p1", 0, 10, 1) + hold("p2", 11, 20, 2) + hold("p1", 21, 30, 3)
    result = check_mutex(history)
    assert result.ok, result.summary()
    assert bool(result)
    assert result.stats["holds"] == 3


def test_mutex_catches_an_overlap() -> None:
    history = hold("p1", 0, 10, 1) + hold("p2", 5, 20, 2)
    result = check_mutex(history)
    assert kinds(result) == ["overlap"]
    assert not result
    text = str(result.violations[0])
    assert "p2 acquired (token 2)" in text and "p1 (token 1)" in text
    assert "5.000 ms of overlap" in text
    assert "overlap" in result.summary() and "1 violation" in result.summary()


def test_mutex_release_invoke_ends_the_window() -> None:
    """B granted at the very instant A invoked release: no overlap (windows are half-open)."""
    assert check_mutex(hold("p1", 0, 10, 1) + hold("p2", 10, 20, 2)).ok


def test_mutex_catches_a_holder_inside_another_and_counts_pairs() -> None:
    history = hold("p1", 0, 100, 1) + hold("p2", 10, 20, 2) + hold("p3", 30, 40, 3)
    result = check_mutex(history)
    assert kinds(result) == ["overlap", "overlap"]


def test_mutex_uses_the_validity_window() -> None:
    """A Redlock holder may act only until acquire-ok + validity, even if it never releases."""
    a = [
        ev("p1", "acquire", "invoke", 0),
        ev("p1", "acquire", "ok", 1, token=1, validity=0.005),  # valid until 6 ms
    ]
    assert check_mutex(a + hold("p2", 6, 20, 2)).ok
    result = check_mutex(a + hold("p2", 5, 20, 2))
    assert kinds(result) == ["overlap"]
    assert "validity ran out" in result.violations[0].description


def test_mutex_validity_longer_than_the_hold_does_not_extend_it() -> None:
    history = hold("p1", 0, 10, 1, validity=30.0) + hold("p2", 11, 20, 2)
    assert check_mutex(history).ok


def test_mutex_holder_that_never_released_holds_to_the_end() -> None:
    history = [ev("p1", "acquire", "ok", 0, token=1), *hold("p2", 500, 600, 2)]
    result = check_mutex(history)
    assert kinds(result) == ["overlap"]
    assert "never released" in result.violations[0].description


def test_mutex_ignores_failed_and_unknown_acquisitions() -> None:
    history = [
        *hold("p1", 0, 10, 1),
        ev("p2", "acquire", "invoke", 1),
        ev("p2", "acquire", "fail", 3),
        ev("p3", "acquire", "invoke", 2),
        ev("p3", "acquire", "info", 4, error="timeout"),
    ]
    assert check_mutex(history).ok


def test_mutex_zero_validity_is_not_a_hold() -> None:
    history = [ev("p1", "acquire", "ok", 0, token=1, validity=0.0), *hold("p2", 1, 5, 2)]
    assert check_mutex(history).ok


def test_mutex_checks_each_lock_name_apart() -> None:
    history = hold("p1", 0, 10, 1, lock="a") + hold("p2", 5, 20, 1, lock="b")
    assert check_mutex(history).ok
    result = check_mutex(history + hold("p3", 6, 8, 2, lock="a"))
    assert kinds(result) == ["overlap"]
    assert "of lock 'a'" in result.violations[0].description


def test_mutex_accepts_events_out_of_order_and_event_objects() -> None:
    history = hold("p1", 0, 10, 1) + hold("p2", 5, 20, 2)
    events = [Event.from_dict(e) for e in reversed(history)]
    assert kinds(check_mutex(events)) == ["overlap"]


# -- fencing ------------------------------------------------------------------------------------
def test_fencing_passes_a_clean_history() -> None:
    history = [
        *write("p1", 0, 1, 10),
        *write("p1", 2, 3, 10),  # one holder may write several times with its token
        *write("p2", 4, 5, 11),
        *write("p1", 6, 7, 10, "fail", highest=11),  # the paused ex-holder is rejected
        *write("p3", 8, 9, 12),
    ]
    result = check_fencing(history)
    assert result.ok, result.summary()
    assert result.stats["writes_accepted"] == 4
    assert result.stats["writes_rejected"] == 1


def test_fencing_catches_a_stale_token_accepted() -> None:
    history = write("p2", 0, 1, 11) + write("p1", 2, 3, 10)
    result = check_fencing(history)
    assert kinds(result) == ["stale-write-accepted"]
    text = result.violations[0].description
    assert "p1 with token 10" in text and "higher token 11" in text


def test_fencing_allows_concurrent_writes_in_either_order() -> None:
    """Overlapping writes may have been applied in any order: no real-time order to break."""
    history = write("p2", 0, 5, 11) + write("p1", 1, 6, 10)
    assert check_fencing(history).ok


def test_fencing_catches_token_order_reversed_over_several_writes() -> None:
    history = [
        *write("p1", 0, 1, 10),
        *write("p2", 2, 3, 20),
        *write("p3", 4, 5, 15),  # lower than 20, accepted after 20 was
        *write("p4", 6, 7, 30),
    ]
    result = check_fencing(history)
    assert kinds(result) == ["stale-write-accepted"]
    assert "p3 with token 15" in result.violations[0].description


def test_fencing_catches_a_token_used_by_two_holders() -> None:
    result = check_fencing(write("p1", 0, 1, 10) + write("p2", 2, 3, 10))
    assert kinds(result) == ["token-reused"]


def test_fencing_catches_an_unjustified_rejection() -> None:
    history = write("p1", 0, 1, 10) + write("p2", 2, 3, 11, "fail")
    result = check_fencing(history)
    assert kinds(result) == ["unjustified-rejection"]


def test_fencing_rejection_justified_by_a_write_of_unknown_outcome() -> None:
    history = write("p2", 0, 1, 11, "info") + write("p1", 2, 3, 10, "fail")
    assert check_fencing(history).ok


def test_fencing_catches_decreasing_tokens_across_acquisitions() -> None:
    """B began after A's release completed, yet got a token not above A's."""
    history = hold("p1", 0, 10, 100) + hold("p2", 12, 20, 99)
    result = check_fencing(history)
    assert kinds(result) == ["token-not-increasing"]
    text = result.violations[0].description
    assert "token 99" in text and "token 100" in text and "released" in text
    assert kinds(check_fencing(hold("p1", 0, 10, 100) + hold("p2", 12, 20, 100))) == [
        "token-not-increasing"
    ]


def test_fencing_acquisition_that_began_before_the_release_completed_is_not_ordered() -> None:
    history = [
        *hold("p1", 0, 10, 100),
        ev("p2", "acquire", "invoke", 5),  # invoked while p1 held the lease
        ev("p2", "acquire", "ok", 12, token=99),
    ]
    assert check_fencing(history).ok


def test_fencing_expired_lease_orders_acquisitions_by_ttl() -> None:
    """A never released; its lease surely ended ttl (plus slack) after its grant."""
    a = [ev("p1", "acquire", "invoke", 0), ev("p1", "acquire", "ok", 1, token=100, ttl=1.0)]
    late = [ev("p2", "acquire", "invoke", 2000), ev("p2", "acquire", "ok", 2001, token=50)]
    early = [ev("p2", "acquire", "invoke", 500), ev("p2", "acquire", "ok", 501, token=50)]
    assert kinds(check_fencing(a + late)) == ["token-not-increasing"]
    assert check_fencing(a + early).ok
    assert "expired" in check_fencing(a + late).violations[0].description


def test_fencing_checks_each_resource_and_lock_apart() -> None:
    history = [
        *write("p1", 0, 1, 10, resource="a"),
        *write("p2", 2, 3, 5, resource="b"),
        *hold("p1", 10, 20, 100, lock="x"),
        *hold("p2", 21, 30, 50, lock="y"),
    ]
    assert check_fencing(history).ok
    result = check_fencing([*history, *write("p3", 4, 5, 6, resource="a")])
    assert kinds(result) == ["stale-write-accepted"]
    assert "to 'a'" in result.violations[0].description


# -- leases observed on the server: orphans and late validity ------------------------------------


def lease(ms: float, owner: str | None, pttl: int, lock: str = "L") -> dict[str, Any]:
    """A coordinator's sample of the lease: requested at ``ms``, answered 1 ms later."""
    return ev("sampler", "lease", "info", ms + 1, lock=lock, owner=owner, pttl=pttl, sent=ms * MS)


def owned(
    process: str, start: float, end: float, owner: str, **fields: Any
) -> list[dict[str, Any]]:
    """A hold of ``owner`` on lock ``L``: acquire at ``start``, release completing at ``end``."""
    return [
        ev(process, "acquire", "invoke", start - 1, lock="L"),
        ev(process, "acquire", "ok", start, token=1, lock="L", owner=owner, **fields),
        ev(process, "release", "invoke", end - 1, lock="L", owner=owner),
        ev(process, "release", "ok", end, lock="L", owner=owner),
    ]


def test_orphans_passes_leases_that_end_with_their_holders() -> None:
    history = [
        *owned("p1", 10, 100, "a1"),
        lease(5, None, -2),
        lease(50, "a1", 1950),
        lease(99, "a1*", 1900),  # "*": waiters queued behind the holder
        lease(400, "a1", 1600),  # released, but the release's effect is within the bound
        lease(700, None, -2),
    ]
    result = check_orphans(history, bound=0.5)
    assert result.ok, result
    assert result.stats["samples"] == 3


def test_orphans_catches_a_lease_left_by_a_cancelled_release() -> None:
    history = [
        *owned("p1", 10, 100, "a1")[:3],
        ev("p1", "release", "info", 100, lock="L", owner="a1", error="CancelledError"),
        lease(400, "a1", 1600),
        lease(700, "a1", 1300),
        lease(900, "a1", 1100),
    ]
    result = check_orphans(history, bound=0.5)
    assert kinds(result) == ["orphaned-lease"]  # one per lease, not one per sample
    assert "release info CancelledError" in str(result.violations[0])
    assert "600.0 ms before" in str(result.violations[0])


def test_orphans_catches_a_grant_lost_by_a_failed_acquire() -> None:
    """A handoff whose reply was lost: the attempt failed, its owner holds the lease."""
    history = [
        ev("p2", "acquire", "invoke", 0, lock="L", owner_prefix="bb"),
        ev("p2", "acquire", "info", 300, lock="L", error="ConnectionUnavailable"),
        lease(200, "bb7", 1800),  # while the attempt was running: accounted for
        lease(1000, "bb7", 1000),
    ]
    result = check_orphans(history, bound=0.5)
    assert kinds(result) == ["orphaned-lease"]
    assert "acquire info ConnectionUnavailable" in str(result.violations[0])


def test_orphans_unknown_owner_and_unfinished_attempts() -> None:
    history = [
        ev("p3", "acquire", "invoke", 0, lock="L", owner_prefix="cc"),  # never finished
        lease(5000, "cc1", 100),
        lease(5000, "zz1", 100),  # nobody's
        lease(5000, "zz1", 100, lock="other"),  # locks without holders' events: still checked
    ]
    result = check_orphans(history, bound=0.5)
    assert kinds(result) == ["orphaned-lease", "orphaned-lease"]
    assert all("no recorded operation could own it" in str(v) for v in result.violations)


def test_validity_passes_when_the_lease_outlasts_every_claim() -> None:
    history = [
        *owned("p1", 10, 1500, "a1", validity=2.0),
        ev("p1", "held", "ok", 500, lock="L", owner="a1", validity=1.5),
        lease(20, "a1", 1995),  # ends at 2016 ms >= 10 + 2000
        lease(600, "a1*", 1420),  # 2021 ms
        lease(1600, None, -2),  # gone after the release was invoked: fine
    ]
    result = check_validity(history, tolerance=0.005)
    assert result.ok, result
    assert result.stats == {"claims": 2, "samples": 3}


def test_validity_catches_a_claim_later_than_the_server_pttl() -> None:
    """The FIFO handoff case: validity 3 s reported while the server's PTTL said 1 s."""
    history = [
        *owned("p1", 10, 2500, "a1", validity=2.999),
        lease(20, "a1", 999),
    ]
    result = check_validity(history, tolerance=0.005)
    assert kinds(result) == ["validity-late"]
    assert "1989.0 ms late" in str(result.violations[0])
    assert check_validity(history, tolerance=2.0).ok  # the tolerance is honoured


def test_validity_catches_a_lease_gone_while_ensure_held_passes() -> None:
    history = [
        *owned("p1", 10, 2500, "a1", validity=2.0),
        ev("p1", "held", "ok", 1200, lock="L", owner="a1", validity=0.8),
        lease(1300, None, -2),  # gone (or someone else's) before 2010 ms
    ]
    result = check_validity(history)
    assert kinds(result) == ["validity-late", "validity-late"]  # both claims still stood
    assert "the lease was gone" in str(result.violations[0])
    other = [*history[:-1], lease(1300, "b1", 1900)]
    assert "held by b1" in str(check_validity(other).violations[0])


def test_validity_claim_stops_at_extend_or_release_invocation() -> None:
    history = [
        *owned("p1", 10, 2500, "a1", validity=2.0),
        ev("p1", "extend", "invoke", 100, lock="L", owner="a1"),
        ev("p1", "extend", "info", 120, lock="L", owner="a1", error="CancelledError"),
        lease(200, "a1", 300),  # an extend with a shorter ttl may have landed: not late
    ]
    assert check_validity(history).ok
    after = [*owned("p1", 10, 100, "a1", validity=2.0), lease(200, None, -2)]
    assert check_validity(after).ok


def test_result_counts_and_summary_limit() -> None:
    history = [w for i in range(30) for w in write(f"p{i}", 2 * i, 2 * i + 1, 100 - i)]
    result = check_fencing(history)
    assert result.count("stale-write-accepted") == 29
    assert result.count("token-reused") == 0
    assert "... and 9 more" in result.summary(limit=20)


# -- events and recorders -----------------------------------------------------------------------
def test_event_round_trip_and_validation() -> None:
    event = Event.from_dict(ev("p1", "acquire", "ok", 1, token=7, validity=1.5, lock="x"))
    assert event.time == MS and event.token == 7
    assert event.get("validity") == 1.5 and event.get("lock") == "x"
    assert event.get("missing", "d") == "d"
    assert Event.from_dict(event.to_dict()) == event
    assert "p1 acquire ok token=7" in event.describe()
    with pytest.raises(ValueError, match="without 'time'"):
        Event.from_dict({"process": "p", "op": "x", "type": "ok"})
    with pytest.raises(ValueError, match="event type"):
        Event.from_dict(ev("p", "x", "done", 1))
    with pytest.raises(ValueError, match="monotonic ns"):
        Event.from_dict({**ev("p", "x", "ok", 0), "time": 1.5})
    with pytest.raises(ValueError, match="token"):
        Event.from_dict(ev("p", "x", "ok", 0, token="7"))


def test_recorder_writes_json_lines_and_merges_files(tmp_path: Path) -> None:
    with (
        HistoryRecorder(tmp_path / "a.jsonl", "a") as a,
        HistoryRecorder(tmp_path / "b.jsonl") as b,
    ):
        a.invoke("acquire")
        b.invoke("acquire")
        first = a.ok("acquire", token=5, validity=1.0)
        b.fail("acquire")
        with pytest.raises(ValueError, match="event type"):
            a.record("acquire", "maybe")  # type: ignore[arg-type]
    assert b.process == f"pid{os.getpid()}"
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["invoke", "ok"]
    history = read_history(tmp_path)
    assert [e.process for e in history] == ["a", b.process, "a", b.process]
    assert history[2] == first
    with pytest.raises(RuntimeError, match="closed"):
        a.ok("release")
    with pytest.raises(TypeError, match="sink"):
        HistoryRecorder(42)  # type: ignore[arg-type]


def test_read_history_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ev("p", "x", "ok", 0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_history(path)


def test_sort_events_orders_ties_by_process_then_seq() -> None:
    events = sort_events(
        [
            {**ev("b", "x", "ok", 1), "seq": 1},
            {**ev("a", "x", "ok", 1), "seq": 2},
            {**ev("a", "x", "invoke", 1), "seq": 1},
        ]
    )
    assert [(e.process, e.seq) for e in events] == [("a", 1), ("a", 2), ("b", 1)]


def _record_in_child(path: str, name: str, conn: Any) -> None:
    with HistoryRecorder(path, name) as rec:
        rec.ok("step", value="child-first")
        conn.send("recorded")
        assert conn.recv() == "go"
        rec.ok("step", value="child-last")


def _record_forever(path: str) -> None:
    with HistoryRecorder(path, "spinner") as rec:
        i = 0
        while True:
            rec.info("spin", value="x" * (i % 500), i=i)
            i += 1


def _record_to_queue(queue: Any, name: str) -> None:
    rec = HistoryRecorder(queue, name)
    rec.invoke("acquire")
    rec.ok("acquire", token=3)


def test_timestamps_compare_across_processes(tmp_path: Path) -> None:
    """CLOCK_MONOTONIC is system-wide: a child's events and ours interleave in real order."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_record_in_child, args=(str(tmp_path / "c.jsonl"), "child", theirs))
    proc.start()
    try:
        assert ours.poll(30)
        assert ours.recv() == "recorded"
        with HistoryRecorder(tmp_path / "m.jsonl", "main") as rec:
            rec.ok("step", value="main")
        ours.send("go")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
    history = read_history(tmp_path)
    assert [e.value for e in history] == ["child-first", "main", "child-last"]


def test_killed_recorder_leaves_only_whole_lines(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    path = tmp_path / "spin.jsonl"
    proc = ctx.Process(target=_record_forever, args=(str(path),))
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    history = read_history(path)  # raises on a torn line
    assert len(history) > 100
    assert [e.get("i") for e in history] == list(range(len(history)))


def test_queue_recorder_across_processes() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_record_to_queue, args=(queue, f"w{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    history = drain_queue(queue, timeout=1.0)
    assert sorted((e.process, e.type) for e in history) == [
        ("w0", "invoke"),
        ("w0", "ok"),
        ("w1", "invoke"),
        ("w1", "ok"),
    ]
    assert check_mutex(history).stats["holds"] == 2  # neither released: both hold to the end
    assert kinds(check_mutex(history)) == ["overlap"]
