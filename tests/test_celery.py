"""distlock.contrib.celery against a real Celery worker, with Redis as broker and result backend.

One in-process worker (threads pool, four slots) serves the module; the killed-worker test starts
a worker of its own in a subprocess, on a queue of its own, and SIGKILLs it by pid.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

celery = pytest.importorskip("celery")

from celery.contrib.testing.worker import start_worker  # noqa: E402
from celery.signals import task_prerun, task_retry  # noqa: E402

from distkit import ConfigError, LockLost, LockNotAcquired, connect  # noqa: E402
from distkit.testing import RedisServer  # noqa: E402
from distlock import Lock  # noqa: E402
from distlock.contrib.celery import LockedTask  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20  # seconds: a bound on waiting for a result, never an expectation of speed


class Recorder:
    """What the tasks saw: (invoice, start, end, token, retries) per run, across worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: list[tuple[Any, float, float, int, int]] = []

    def record(self, invoice: Any, start: float, token: int, retries: int) -> None:
        with self.lock:
            self.runs.append((invoice, start, time.monotonic(), token, retries))

    def of(self, invoice: Any) -> list[tuple[Any, float, float, int, int]]:
        with self.lock:
            return sorted(run for run in self.runs if run[0] == invoice)


class Rig:
    """The app, its tasks and the recorder of one module's worker."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = connect(url)
        self.recorder = Recorder()
        self.barrier = threading.Barrier(2, timeout=WAIT)
        self.app = app = celery.Celery("distlock-test", broker=url, backend=url)
        app.conf.update(
            distlock_client=url,
            worker_hijack_root_logger=False,
            broker_connection_retry_on_startup=True,
            task_default_queue="distlock-test",
        )
        recorder = self.recorder
        barrier = self.barrier
        opts: dict[str, Any] = {"base": LockedTask, "shared": False, "bind": True, "lock_ttl": 5}

        def body(task: Any, invoice: Any, hold: float) -> int:
            start = time.monotonic()
            time.sleep(hold)  # widens the window in which an overlap would show
            token = task.request.fencing_token
            assert token == task.request.lock.fencing_token
            recorder.record(invoice, start, token, task.request.retries)
            return int(token)

        @app.task(lock_name="invoice:{invoice_id}", on_locked="wait", **opts)
        def pay_wait(self: Any, invoice_id: int, hold: float = 0.05) -> int:
            return body(self, ("wait", invoice_id), hold)

        @app.task(
            lock_name="invoice:{invoice_id}",
            on_locked="retry",
            lock_retry_countdown=0.05,
            lock_max_retries=200,
            **opts,
        )
        def pay_retry(self: Any, invoice_id: int, hold: float = 0.05) -> int:
            return body(self, ("retry", invoice_id), hold)

        @app.task(lock_name="invoice:{invoice_id}", on_locked="retry", lock_max_retries=0, **opts)
        def pay_once(self: Any, invoice_id: int) -> int:
            return body(self, ("once", invoice_id), 0)

        @app.task(lock_name="invoice:{invoice_id}", on_locked="skip", **opts)
        def pay_skip(self: Any, invoice_id: int) -> int:
            return body(self, ("skip", invoice_id), 0)

        @app.task(lock_name="invoice:{invoice_id}", on_locked="wait", lock_wait_timeout=0.2, **opts)
        def pay_bounded(self: Any, invoice_id: int) -> int:
            return body(self, ("bounded", invoice_id), 0)

        @app.task(base=LockedTask, shared=False, lock_name="invoice:{invoice_id}", lock_ttl=5)
        def meet(invoice_id: int, fencing_token: int | None = None) -> int:
            barrier.wait()  # both invoices inside their locks at once, or BrokenBarrierError
            assert fencing_token is not None
            return fencing_token

        self.pay_wait = pay_wait
        self.pay_retry = pay_retry
        self.pay_once = pay_once
        self.pay_skip = pay_skip
        self.pay_bounded = pay_bounded
        self.meet = meet


@pytest.fixture(scope="module")
def broker(redis_binary: str) -> Iterator[RedisServer]:
    """A redis-server of this module's own: other tests' FLUSHALL must not hit the broker."""
    with RedisServer(binary=redis_binary) as server:
        yield server


@pytest.fixture(scope="module")
def rig(broker: RedisServer) -> Iterator[Rig]:
    rig = Rig(broker.url)
    with start_worker(
        rig.app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"
    ):
        yield rig
    # results still pending unsubscribe on collection: done now, while the server is up (after
    # it stops, each would retry its reconnect for seconds)
    gc.collect()
    rig.app.close()
    rig.client.close()


def assert_no_overlap(runs: list[tuple[Any, float, float, int, int]]) -> None:
    for before, after in itertools.pairwise(runs):
        assert before[2] <= after[1], f"runs overlap: {before} and {after}"
        assert before[3] < after[3], f"fencing tokens did not rise: {before} then {after}"


@pytest.mark.parametrize("task", ["pay_wait", "pay_retry"])
def test_two_deliveries_of_one_invoice_never_run_at_once(rig: Rig, task: str) -> None:
    fn = getattr(rig, task)
    results = [fn.delay(1) for _ in range(4)]
    tokens = [result.get(timeout=WAIT) for result in results]
    runs = rig.recorder.of((task.removeprefix("pay_"), 1))
    assert len(runs) == 4
    assert sorted(tokens) == sorted(run[3] for run in runs)
    assert_no_overlap(runs)
    if task == "pay_retry":
        assert any(run[4] > 0 for run in runs), "four deliveries at once, and none retried"


def test_different_invoices_run_in_parallel(rig: Rig) -> None:
    first, second = rig.meet.delay(2), rig.meet.delay(3)
    assert first.get(timeout=WAIT) != second.get(timeout=WAIT)


def test_skip_succeeds_with_none_and_does_not_run_the_body(rig: Rig) -> None:
    with Lock(rig.client, "invoice:4", ttl=10) as held:
        held_token = held.fencing_token
        assert rig.pay_skip.delay(4).get(timeout=WAIT) is None
    assert rig.recorder.of(("skip", 4)) == []
    assert held_token is not None and rig.pay_skip.delay(4).get(timeout=WAIT) > held_token


def watch(sig: Any, task: Any) -> threading.Event:
    seen = threading.Event()

    def handler(sender: Any = None, **kwargs: Any) -> None:
        if getattr(sender, "name", None) == task.name:
            seen.set()

    sig.connect(handler, weak=False)
    seen.handler = handler  # type: ignore[attr-defined]
    return seen


def test_retry_retries_until_the_lock_is_free(rig: Rig) -> None:
    retried = watch(task_retry, rig.pay_retry)
    try:
        with Lock(rig.client, "invoice:5", ttl=10) as held:
            held_token = held.fencing_token
            result = rig.pay_retry.delay(5, hold=0)
            assert retried.wait(WAIT), "the delivery was not retried while the lock was held"
            assert rig.recorder.of(("retry", 5)) == []
        assert result.get(timeout=WAIT) > (held_token or 0)
        [run] = rig.recorder.of(("retry", 5))
        assert run[4] >= 1
    finally:
        task_retry.disconnect(retried.handler)  # type: ignore[attr-defined]


def test_retry_fails_with_lock_not_acquired_once_retries_are_spent(rig: Rig) -> None:
    with Lock(rig.client, "invoice:6", ttl=10):
        result = rig.pay_once.delay(6)
        with pytest.raises(Exception) as caught:
            result.get(timeout=WAIT)
    assert result.state == "FAILURE"
    assert type(caught.value).__name__ == LockNotAcquired.__name__
    assert "invoice:6" in str(caught.value)
    assert rig.recorder.of(("once", 6)) == []


def test_wait_runs_once_the_holder_releases(rig: Rig) -> None:
    started = watch(task_prerun, rig.pay_wait)
    try:
        with Lock(rig.client, "invoice:7", ttl=10) as held:
            held_token = held.fencing_token
            result = rig.pay_wait.delay(7, hold=0)
            assert started.wait(WAIT)
            assert rig.recorder.of(("wait", 7)) == []
        assert result.get(timeout=WAIT) > (held_token or 0)
    finally:
        task_prerun.disconnect(started.handler)  # type: ignore[attr-defined]


def test_wait_gives_up_after_lock_wait_timeout(rig: Rig) -> None:
    with Lock(rig.client, "invoice:8", ttl=10):
        result = rig.pay_bounded.delay(8)
        with pytest.raises(Exception) as caught:
            result.get(timeout=WAIT)
    assert type(caught.value).__name__ == LockNotAcquired.__name__
    assert rig.recorder.of(("bounded", 8)) == []


KILLED_WORKER = """
import sys, time
import celery
from distlock.contrib.celery import LockedTask

url = sys.argv[1]
app = celery.Celery("distlock-killed", broker=url, backend=url)
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

@app.task(base=LockedTask, bind=True, name="hang", lock_name="invoice:{invoice_id}",
          lock_client=url, lock_ttl=1)
def hang(self, invoice_id):
    app.backend.client.set("killed:token", self.request.fencing_token)
    time.sleep(600)  # renewed all along, until the process dies

app.worker_main(["worker", "--pool=solo", "-Q", "killed", "--loglevel=WARNING",
                 "--without-heartbeat", "--without-mingle", "--without-gossip"])
"""


def test_a_killed_worker_frees_the_lock_within_its_ttl(rig: Rig, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(KILLED_WORKER))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, str(script), rig.url], env=env, stderr=subprocess.PIPE
    )
    try:
        rig.app.send_task("hang", args=(9,), queue="killed")
        deadline = time.monotonic() + WAIT
        while rig.client.get("killed:token") is None:
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
            assert time.monotonic() < deadline, "the subprocess worker never started the task"
            time.sleep(0.05)
        dead_token = int(rig.client.get("killed:token"))
        time.sleep(1.5)  # past the first lease: still held, so it is being renewed
        assert Lock(rig.client, "invoice:9", ttl=1).locked()
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(WAIT)
        # the lease the dead worker left is at most its ttl long, as the server counts it
        left = rig.client.pttl("distkit:lock:{invoice:9}")
        assert left == -2 or 0 <= left <= 1000  # -2: expired already; -1 would be no expiry
        successor = Lock(rig.client, "invoice:9", ttl=5)
        assert successor.acquire(timeout=5)  # a bound on failure, not a speed expectation
        assert successor.fencing_token is not None and successor.fencing_token > dead_token
        successor.release()
    finally:
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(WAIT)
        if worker.stderr:
            worker.stderr.close()


# -- registration-time validation (no worker) -------------------------------------------------


def finalized_app() -> Any:
    app = celery.Celery("distlock-config", broker="memory://", backend="cache+memory://")
    app.finalize()
    return app


def test_a_template_field_that_is_no_argument_fails_at_registration() -> None:
    app = finalized_app()
    with pytest.raises(ConfigError, match="invoce_id") as caught:

        @app.task(base=LockedTask, shared=False, lock_name="invoice:{invoce_id}")
        def pay(invoice_id: int) -> None: ...

    assert "parameters: invoice_id" in str(caught.value)


def test_a_lazy_app_raises_when_it_finalizes() -> None:
    app = celery.Celery("distlock-lazy", broker="memory://", backend="cache+memory://")

    @app.task(base=LockedTask, shared=False, bind=True, lock_name="invoice:{invoice}")
    def pay(self: Any, invoice_id: int) -> None: ...

    with pytest.raises(ConfigError, match="'invoice'"):
        app.finalize()


def test_class_based_task_is_validated_at_class_definition() -> None:
    with pytest.raises(ConfigError, match="'order'"):

        class Pay(LockedTask):  # type: ignore[misc]
            lock_name = "order:{order}"

            def run(self, invoice_id: int) -> None: ...

    class Fine(LockedTask):  # type: ignore[misc]
        lock_name = "invoice:{invoice_id}"

        def run(self, invoice_id: int) -> None: ...

    assert Fine._distlock_namer is not None
    assert Fine._distlock_namer(7) == "invoice:7"  # self is not one of the template's arguments


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({}, "lock_name is required"),
        ({"lock_name": "x", "on_locked": "sometimes"}, "on_locked"),
        ({"lock_name": "x", "lock_ttl": 0}, "lock_ttl"),
        ({"lock_name": "x", "lock_wait_timeout": -1}, "lock_wait_timeout"),
        ({"lock_name": "x", "lock_retry_countdown": "soon"}, "lock_retry_countdown"),
        ({"lock_name": "x", "lock_max_retries": -1}, "lock_max_retries"),
        ({"lock_name": "x", "lock_options": {"ttl": 3}}, "lock_ttl"),
        ({"lock_name": "x", "lock_options": {"renew_interval": 60}}, "renew_interval"),
        ({"lock_name": "x", "lock_client": object()}, "redis-py client"),
        ({"lock_name": "{fencing_token}"}, "fencing_token"),
    ],
)
def test_bad_options_fail_at_registration(options: dict[str, Any], needle: str) -> None:
    app = finalized_app()
    with pytest.raises(ConfigError, match=needle):

        @app.task(base=LockedTask, shared=False, **options)
        def pay(invoice_id: int = 1, fencing_token: int | None = None) -> None: ...


def test_the_token_parameter_needs_a_default() -> None:
    app = finalized_app()
    with pytest.raises(ConfigError, match="give it a default"):

        @app.task(base=LockedTask, shared=False, lock_name="invoice:{invoice_id}")
        def pay(invoice_id: int, fencing_token: int) -> None: ...


def test_no_client_anywhere_is_a_config_error_at_the_call() -> None:
    app = finalized_app()

    @app.task(base=LockedTask, shared=False, lock_name="invoice:{invoice_id}")
    def pay(invoice_id: int) -> None: ...

    with pytest.raises(ConfigError, match="distlock_client"):
        pay(1)


def test_the_token_replaces_a_value_the_caller_passed(broker: RedisServer) -> None:
    app = finalized_app()

    @app.task(
        base=LockedTask, shared=False, lock_name="invoice:{invoice_id}", lock_client=broker.url
    )
    def pay(invoice_id: int, fencing_token: int | None = None) -> int | None:
        return fencing_token

    by_position, by_name, left_out = pay(1, 5), pay(1, fencing_token=5), pay(1)
    assert all(isinstance(t, int) and t != 5 for t in (by_position, by_name, left_out))
    assert by_position < by_name < left_out


def test_a_forked_worker_child_builds_clients_even_if_a_parent_thread_was_building_one() -> None:
    """Prefork pools fork the worker: the client cache's lock must not be inherited held."""
    from distlock.contrib import celery as contrib
    from tests.test_cache_fork import in_child

    with contrib._CLIENTS._lock:  # a parent thread inside _CLIENTS.get at the fork
        out = in_child(lambda: {"free": contrib._CLIENTS._lock.acquire(timeout=5)}, timeout=10.0)
    assert out == {"free": True}


def test_a_lease_lost_during_the_run_fails_the_task(broker: RedisServer) -> None:
    app = finalized_app()
    client = connect(broker.url)

    @app.task(base=LockedTask, shared=False, lock_name="invoice:{invoice_id}", lock_client=client)
    def pay(invoice_id: int) -> str:
        assert Lock.force_release(client, f"invoice:{invoice_id}")  # the lease is gone mid-run
        return "paid"

    with pytest.raises(LockLost, match="invoice:1"):
        pay(1)
    assert not Lock(client, "invoice:1").locked()
    client.close()
