"""Failure policy (C5; issue 6 point 5): reads and fills fail open within one socket timeout, a
circuit breaker stops calling a dead Redis and probes it later, ``strict=True`` raises, and
invalidations never fail silently."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from distcache import (
    AsyncCache,
    Cache,
    CacheEvent,
    CircuitBreaker,
    ConfigError,
    ConnectionUnavailable,
    CounterMetrics,
    cached,
)
from distkit import RetryConfig, ServerError, aconnect, connect
from distkit.testing import FaultProxy, free_port

TIMEOUT = 0.3
SLACK = 0.6  # scheduling noise on a busy 2-core machine
MISSING = object()


class Clock:
    """A clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def state(breaker: CircuitBreaker) -> str:
    """The breaker's state (a call, so that type checkers do not narrow it between checks)."""
    return breaker.state


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    out = fn()
    return out, time.monotonic() - started


def dead_client() -> redis.Redis:
    return connect({"port": free_port(), "connect_timeout": TIMEOUT, "socket_timeout": TIMEOUT})  # type: ignore[return-value]


def test_a_dead_server_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    metrics = CounterMetrics()
    cache = Cache(dead_client(), namespace="dead", metrics=metrics, breaker=False)
    loads: list[int] = []

    def load() -> str:
        loads.append(1)
        return "from the source"

    @cached(cache)
    def fn(x: int) -> int:
        return x * 2

    assert cache.get("k", MISSING) is MISSING
    assert cache.get_many(["a", "b"]) == {}
    assert cache.set("k", 1) is False
    assert cache.set_many({"k": 1}) is False
    assert cache.get_or_set("k", load) == "from the source"
    assert fn(21) == 42
    assert loads == [1]
    assert metrics.count(CacheEvent.ERROR) == 6
    assert "failing open" in caplog.text
    for record in caplog.records:  # the namespace is named once per line, not twice
        assert record.getMessage().count("cache 'dead'") == 1, record.getMessage()


def test_invalidations_never_fail_open() -> None:
    cache = Cache(dead_client(), namespace="dead")
    with pytest.raises(ConnectionUnavailable):
        cache.delete("k")
    with pytest.raises(ConnectionUnavailable):
        cache.invalidate_tags("t")
    with pytest.raises(ConnectionUnavailable):
        cache.clear()


def test_strict_raises_instead_of_failing_open() -> None:
    cache = Cache(dead_client(), namespace="dead", strict=True)
    with pytest.raises(ConnectionUnavailable) as info:
        cache.get("k")
    assert isinstance(info.value.__cause__, (redis.ConnectionError, OSError))
    with pytest.raises(ConnectionUnavailable):
        cache.set("k", 1)
    with pytest.raises(ConnectionUnavailable):
        cache.get_or_set("k", lambda: 1)
    with pytest.raises(ConnectionUnavailable):
        cache.get_many(["k"])


def test_a_server_error_fails_open_and_strict_raises_it(r: redis.Redis) -> None:
    r.rpush("distkit:cache:{wrong}:epoch", "not the epoch")  # a key distcache did not write
    metrics = CounterMetrics()
    assert Cache(r, namespace="wrong", metrics=metrics).set("k", 1) is False
    assert metrics.count(CacheEvent.ERROR) == 1
    with pytest.raises(ServerError) as info:
        Cache(r, namespace="wrong", strict=True).set("k", 1)
    assert isinstance(info.value.__cause__, redis.ResponseError)
    with pytest.raises(ServerError):
        Cache(r, namespace="wrong").invalidate_tags("t")


@pytest.mark.parametrize("fault", ["blackhole", "latency", "refuse"])
def test_read_through_returns_within_one_socket_timeout(proxy: FaultProxy, fault: str) -> None:
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    cache = Cache(client, namespace="slow", breaker=False)
    assert cache.set("warm", 1)  # a pooled connection exists before the fault
    if fault == "blackhole":
        proxy.blackhole()
    elif fault == "latency":
        proxy.set_latency(TIMEOUT * 4)
    else:
        proxy.refuse()
        proxy.cut()

    def load() -> str:
        time.sleep(0.1)
        return "loaded"

    value, took = timed(lambda: cache.get_or_set("k", load))
    assert value == "loaded"
    assert took < TIMEOUT + 0.1 + SLACK  # one timeout (the read; no write is attempted)
    value, took = timed(lambda: cache.get("k", "default"))
    assert value == "default"
    assert took < TIMEOUT + SLACK
    proxy.reset()


def test_the_circuit_breaker_stops_calls_and_probes_again(proxy: FaultProxy) -> None:
    clock = Clock()
    metrics = CounterMetrics()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=30, clock=clock)
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    cache = Cache(client, namespace="cb", breaker=breaker, metrics=metrics, clock=clock)
    assert cache.set("k", "v")
    proxy.blackhole()
    for _ in range(2):
        _, took = timed(lambda: cache.get("k"))
        assert took >= TIMEOUT * 0.9  # really waited for Redis
    assert state(breaker) == "open"
    sent, connections = proxy.bytes_forwarded, proxy.connections_accepted
    values, took = timed(lambda: [cache.get_or_set("k", lambda: "loader") for _ in range(20)])
    assert values == ["loader"] * 20
    assert took < 20 * TIMEOUT / 4  # no call waited for Redis (each would take TIMEOUT)
    assert cache.set("k", "x") is False
    assert metrics.count(CacheEvent.SHORT_CIRCUIT) == 21
    proxy.blackhole(False)
    assert cache.get("k", MISSING) is MISSING  # Redis is back, but the circuit is still open
    assert proxy.connections_accepted == connections  # nothing was sent meanwhile
    assert proxy.bytes_forwarded - sent < 200  # (only what the blackhole held, if anything)
    clock.advance(30)
    assert state(breaker) == "half-open"
    assert cache.get("k") == "v"  # the probe succeeds...
    assert state(breaker) == "closed"  # ...and closes the circuit
    assert cache.get("k") == "v"


def test_a_failed_probe_opens_the_circuit_again(proxy: FaultProxy) -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    cache = Cache(client, namespace="cb2", breaker=breaker)
    cache.set("k", 1)
    proxy.refuse()
    proxy.cut()
    assert cache.get("k") is None
    assert state(breaker) == "open"
    clock.advance(5)
    assert cache.get("k") is None  # the probe fails
    assert state(breaker) == "open"
    clock.advance(4.9)
    connections = proxy.connections_accepted
    assert cache.get("k") is None
    assert proxy.connections_accepted == connections  # still open: Redis was not tried
    proxy.refuse(False)
    clock.advance(0.2)
    assert cache.get("k") == 1
    assert state(breaker) == "closed"


def test_strict_raises_while_the_circuit_is_open() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=5, clock=clock)
    cache = Cache(dead_client(), namespace="s", breaker=breaker, strict=True)
    with pytest.raises(ConnectionUnavailable):
        cache.get("k")
    with pytest.raises(ConnectionUnavailable, match="circuit breaker open"):
        cache.get("k")


def test_retries_are_opt_in(proxy: FaultProxy) -> None:
    client = connect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
    cache = Cache(
        client,
        namespace="retry",
        breaker=False,
        retry=RetryConfig(attempts=3, backoff_initial=0, backoff_max=0, jitter=0),
    )
    assert cache.set("k", 1)
    assert cache.get("k") == 1
    proxy.cut()  # the pooled connection dies; a retry reconnects
    assert cache.get("k") == 1
    proxy.blackhole()
    _, took = timed(lambda: cache.get("k"))
    assert took >= 3 * TIMEOUT * 0.9  # three tries, as configured
    proxy.reset()


def test_async_cache_fails_open(proxy: FaultProxy) -> None:
    async def run() -> None:
        client = aconnect(proxy.config(socket_timeout=TIMEOUT, connect_timeout=TIMEOUT))
        cache = AsyncCache(client, namespace="aslow", breaker=False)
        assert await cache.set("warm", 1)
        proxy.blackhole()

        async def load() -> str:
            await asyncio.sleep(0.1)
            return "loaded"

        @cached(cache)
        async def fn(x: int) -> int:
            return x + 1

        started = time.monotonic()
        assert await cache.get_or_set("k", load) == "loaded"
        assert time.monotonic() - started < TIMEOUT + 0.1 + SLACK
        assert await cache.get("k", "d") == "d"
        assert await cache.set("k", 1) is False
        assert await fn(1) == 2
        with pytest.raises(ConnectionUnavailable):
            await cache.invalidate_tags("t")
        proxy.reset()
        await client.aclose()

    asyncio.run(run())


# -- the breaker on its own --------------------------------------------------------------------
def test_breaker_state_machine() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, reset_timeout=10, clock=clock)
    assert state(b) == "closed" and b.allow()
    b.record_failure()
    b.record_failure()
    b.record_success()  # consecutive failures only
    b.record_failure()
    b.record_failure()
    assert b.allow()
    b.record_failure()
    assert state(b) == "open" and not b.allow()
    clock.advance(10)
    assert state(b) == "half-open"
    assert b.allow()  # one probe...
    assert not b.allow()  # ...at a time
    clock.advance(10)
    assert b.allow()  # a probe that never reported is replaced after reset_timeout
    b.record_success()
    assert state(b) == "closed" and b.allow()
    b.record_failure()
    b.reset()
    assert state(b) == "closed" and b.healthy
    assert "closed" in repr(b)


def test_breaker_arguments_are_validated() -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ConfigError):
        CircuitBreaker(reset_timeout=-1)
    with pytest.raises(ConfigError):
        CircuitBreaker(clock="now")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Cache(dead_client(), breaker="yes")  # type: ignore[arg-type]
