"""RetryPolicy: which errors are retried, how often, how long it waits, sync and async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.exceptions as rex

from distkit import (
    ConnectionUnavailable,
    LockNotOwned,
    RetryConfig,
    RetryPolicy,
    ServerError,
    aconnect,
    connect,
)
from distkit._errors import translating
from distkit._retry import NO_RETRY
from distkit.testing import FaultProxy

FAST = {"backoff_initial": 0.001, "backoff_max": 0.002, "jitter": 0.0}


def policy(**fields: Any) -> RetryPolicy:
    return RetryPolicy(RetryConfig(**{**FAST, **fields}))


def unavailable(i: int, cause: BaseException | None = None) -> ConnectionUnavailable:
    exc = ConnectionUnavailable(f"down #{i}")
    exc.__cause__ = cause if cause is not None else rex.ConnectionError("refused")
    return exc


class Flaky:
    """Raises ``errors[i]`` on call ``i`` (while there are any), then returns ``"ok"``."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= len(self.errors):
            raise self.errors[self.calls - 1]
        return "ok"

    async def acall(self) -> str:
        await asyncio.sleep(0)
        return self()


# -- sync -------------------------------------------------------------------------------------


def test_success_first_time_is_one_call() -> None:
    fn = Flaky([])
    assert policy(attempts=5).call(fn) == "ok"
    assert fn.calls == 1


@pytest.mark.parametrize("failures", [1, 2, 4])
def test_retries_connection_unavailable_until_success(failures: int) -> None:
    fn = Flaky([unavailable(i) for i in range(failures)])
    assert policy(attempts=5).call(fn) == "ok"
    assert fn.calls == failures + 1


@pytest.mark.parametrize("attempts", [1, 2, 3, 6])
def test_gives_up_after_attempts_and_reraises_the_last(attempts: int) -> None:
    errors: list[BaseException] = [unavailable(i) for i in range(10)]
    fn = Flaky(errors)
    with pytest.raises(ConnectionUnavailable) as info:
        policy(attempts=attempts).call(fn)
    assert fn.calls == attempts
    assert info.value is errors[attempts - 1]


@pytest.mark.parametrize(
    "error",
    [
        ServerError("ERR"),
        LockNotOwned("no", name="n"),
        ValueError("v"),
        rex.ConnectionError("raw redis error: not translated, not retried"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_are_not_retried(error: BaseException) -> None:
    fn = Flaky([error])
    with pytest.raises(type(error)) as info:
        policy(attempts=5).call(fn)
    assert info.value is error
    assert fn.calls == 1


def test_a_non_retryable_error_after_retries_stops_at_once() -> None:
    server_error = ServerError("ERR later")
    fn = Flaky([unavailable(0), unavailable(1), server_error])
    with pytest.raises(ServerError) as info:
        policy(attempts=10).call(fn)
    assert info.value is server_error
    assert fn.calls == 3


@pytest.mark.parametrize(
    "cause",
    [rex.TimeoutError("Timeout reading from socket"), TimeoutError("timed out")],
    ids=lambda e: type(e).__module__,
)
def test_retry_on_timeout_false_stops_on_a_timeout(cause: BaseException) -> None:
    fn = Flaky([unavailable(0, cause), unavailable(1, cause)])
    with pytest.raises(ConnectionUnavailable):
        policy(attempts=5, retry_on_timeout=False).call(fn)
    assert fn.calls == 1
    # ...but still retries a refused connection,
    refused = Flaky([unavailable(0), unavailable(1)])
    assert policy(attempts=5, retry_on_timeout=False).call(refused) == "ok"
    assert refused.calls == 3
    # ...and with the default, retries timeouts too.
    timeouts = Flaky([unavailable(0, cause), unavailable(1, cause)])
    assert policy(attempts=5).call(timeouts) == "ok"
    assert timeouts.calls == 3


def test_retry_on_timeout_false_with_a_translated_redis_timeout() -> None:
    def timing_out() -> None:
        with translating("get"):
            raise rex.TimeoutError("Timeout reading from socket")

    fn = Flaky([])
    calls = 0

    def call() -> str:
        nonlocal calls
        calls += 1
        timing_out()
        return fn()

    with pytest.raises(ConnectionUnavailable) as info:
        policy(attempts=4, retry_on_timeout=False).call(call)
    assert isinstance(info.value.__cause__, rex.TimeoutError)
    assert calls == 1


def test_max_delay_stops_before_attempts_run_out() -> None:
    fn = Flaky([unavailable(i) for i in range(1000)])
    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable):
        policy(attempts=100, backoff_initial=0.03, backoff_max=0.03, max_delay=0.15).call(fn)
    assert 2 <= fn.calls < 20
    assert time.monotonic() - started < 10  # did not hang


def test_waits_grow_exponentially_up_to_backoff_max(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    fn = Flaky([unavailable(i) for i in range(10)])
    with pytest.raises(ConnectionUnavailable):
        policy(attempts=8, backoff_initial=0.01, backoff_max=0.04, jitter=0.0).call(fn)
    assert fn.calls == 8
    assert len(delays) == 7  # one wait between each pair of attempts
    assert delays[0] == pytest.approx(0.01)
    assert delays == sorted(delays)
    assert max(delays) == pytest.approx(0.04)
    assert delays[-1] == pytest.approx(0.04)


def test_jitter_is_added_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    for _ in range(20):
        fn = Flaky([unavailable(i) for i in range(3)])
        policy(attempts=4, backoff_initial=0.01, backoff_max=0.01, jitter=0.005).call(fn)
    assert len(delays) == 60
    assert all(0.01 <= d <= 0.015 + 1e-9 for d in delays)
    assert len({round(d, 9) for d in delays}) > 1  # jitter really varies


def test_retrying_objects_follow_the_policy() -> None:
    p = policy(attempts=3)
    fn = Flaky([unavailable(i) for i in range(5)])
    with pytest.raises(ConnectionUnavailable):
        p.retrying()(fn)
    assert fn.calls == 3
    fn = Flaky([unavailable(i) for i in range(5)])
    with pytest.raises(ConnectionUnavailable):
        p.retrying(attempts=5)(fn)
    assert fn.calls == 5


def test_defaults_and_no_retry() -> None:
    assert RetryPolicy().config == RetryConfig()
    assert RetryPolicy().attempts == RetryConfig().attempts
    assert NO_RETRY.attempts == 1
    fn = Flaky([unavailable(0)])
    with pytest.raises(ConnectionUnavailable):
        NO_RETRY.call(fn)
    assert fn.calls == 1
    assert "attempts=7" in repr(policy(attempts=7))


# -- async ------------------------------------------------------------------------------------


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def test_async_retries_until_success() -> None:
    fn = Flaky([unavailable(0), unavailable(1)])
    assert run(lambda: policy(attempts=5).acall(fn.acall)) == "ok"
    assert fn.calls == 3


def test_async_accepts_a_lambda_returning_a_coroutine() -> None:
    fn = Flaky([unavailable(0), unavailable(1), unavailable(2)])
    assert run(lambda: policy(attempts=5).acall(lambda: fn.acall())) == "ok"
    assert fn.calls == 4


def test_async_gives_up_after_attempts_and_reraises_the_last() -> None:
    errors: list[BaseException] = [unavailable(i) for i in range(10)]
    fn = Flaky(errors)
    with pytest.raises(ConnectionUnavailable) as info:
        run(lambda: policy(attempts=4).acall(fn.acall))
    assert fn.calls == 4
    assert info.value is errors[3]


def test_async_does_not_retry_other_errors() -> None:
    fn = Flaky([ServerError("ERR")])
    with pytest.raises(ServerError):
        run(lambda: policy(attempts=4).acall(fn.acall))
    assert fn.calls == 1


def test_async_retry_on_timeout_false() -> None:
    fn = Flaky([unavailable(0, rex.TimeoutError("t")), unavailable(1)])
    with pytest.raises(ConnectionUnavailable):
        run(lambda: policy(attempts=4, retry_on_timeout=False).acall(fn.acall))
    assert fn.calls == 1


def test_async_max_delay_stops_early() -> None:
    fn = Flaky([unavailable(i) for i in range(1000)])
    with pytest.raises(ConnectionUnavailable):
        run(
            lambda: policy(
                attempts=100, backoff_initial=0.03, backoff_max=0.03, max_delay=0.15
            ).acall(fn.acall)
        )
    assert 2 <= fn.calls < 20


def test_async_sleeps_without_blocking_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> str:
        task = asyncio.create_task(ticker())
        fn = Flaky([unavailable(i) for i in range(3)])
        try:
            return await policy(attempts=5, backoff_initial=0.05, backoff_max=0.05).acall(fn.acall)
        finally:
            task.cancel()

    assert asyncio.run(main()) == "ok"
    assert ticks >= 5  # the loop kept running during the ~0.15 s of backoff


# -- against a real (black-holed) server -------------------------------------------------------


def test_real_timeout_with_retry_on_timeout_false_is_one_attempt(proxy: FaultProxy) -> None:
    cfg = proxy.config(socket_timeout=0.3, connect_timeout=0.3)
    client = connect(cfg)
    calls = 0

    def ping() -> bool:
        nonlocal calls
        calls += 1
        with translating("ping"):
            return bool(client.ping())

    try:
        assert ping()
        calls = 0
        proxy.blackhole()
        with pytest.raises(ConnectionUnavailable) as info:
            policy(attempts=4, retry_on_timeout=False).call(ping)
        assert calls == 1
        assert isinstance(info.value.__cause__, rex.TimeoutError)
        calls = 0
        with pytest.raises(ConnectionUnavailable):
            policy(attempts=3).call(ping)
        assert calls == 3
    finally:
        proxy.reset()
        client.close()


def test_real_async_retries_then_succeeds_after_recovery(proxy: FaultProxy) -> None:
    async def main() -> tuple[bool, int]:
        client = aconnect(proxy.config(socket_timeout=0.3, connect_timeout=0.3))
        calls = 0

        async def ping() -> bool:
            nonlocal calls
            calls += 1
            if calls == 2:
                proxy.refuse(False)
            with translating("ping"):
                return bool(await client.ping())

        try:
            proxy.refuse(True)
            ok = await policy(attempts=5, backoff_initial=0.05, backoff_max=0.05).acall(ping)
            return ok, calls
        finally:
            proxy.reset()
            await client.aclose()

    ok, calls = asyncio.run(main())
    assert ok
    assert calls >= 2


def test_the_pydantic_free_defaults_match_retry_config() -> None:
    from distkit import RetryConfig
    from distkit._retry import _Settings

    assert _Settings()._asdict() == RetryConfig().model_dump()
    assert RetryPolicy().config == RetryConfig()
    assert NO_RETRY.config == RetryConfig(attempts=1) and NO_RETRY.attempts == 1
