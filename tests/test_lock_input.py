"""Bad input and bad servers: typed errors, never a hang, never a false success."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis

from distkit import ConfigError, ConnectionUnavailable, RetryConfig, aconnect, connect
from distkit.testing import FaultProxy, RedisServer, free_port
from distlock import AsyncLock, Lock, Redlock, Semaphore


@pytest.mark.parametrize(
    "name", ["", 5, None, b"bytes", "a{b}", "x\ny", "nul\x00", "a" * 1025, ["list"]]
)
def test_bad_names_are_config_errors(r: redis.Redis, name: Any) -> None:
    with pytest.raises(ConfigError):
        Lock(r, name)


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, None, "30", timedelta(0), True])
def test_bad_ttls_are_config_errors(r: redis.Redis, ttl: Any) -> None:
    with pytest.raises(ConfigError):
        Lock(r, "ok", ttl=ttl)


def test_ttl_accepts_timedelta(r: redis.Redis) -> None:
    lock = Lock(r, "td", ttl=timedelta(milliseconds=1500))
    assert lock.ttl == 1.5
    assert lock.acquire()
    assert 0 < r.pttl("distkit:lock:{td}") <= 1500
    lock.release()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": -0.5},
        {"timeout": math.nan},
        {"timeout": "1"},
        {"blocking": False, "timeout": 1},
        {"blocking": "yes"},
    ],
)
def test_bad_acquire_arguments_are_config_errors(r: redis.Redis, kwargs: Any) -> None:
    lock = Lock(r, "args")
    with pytest.raises(ConfigError):
        lock.acquire(**kwargs)
    assert r.exists("distkit:lock:{args}") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renew_interval": 40},
        {"renew_interval": 0},
        {"auto_renew": "yes"},
        {"on_lost": 3},
        {"prefix": ""},
        {"prefix": "a{b"},
        {"retry": {"attempts": 2}},
        {"clock": 5},
        {"blocking_timeout": -1},
    ],
)
def test_bad_options_are_config_errors(r: redis.Redis, kwargs: Any) -> None:
    with pytest.raises(ConfigError):
        Lock(r, "opts", ttl=30, **kwargs)


def test_wrong_client_kinds_are_config_errors(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="needs a redis-py client"):
        Lock(object(), "x")
    with pytest.raises(ConfigError, match="use AsyncLock"):
        Lock(redis_server.async_client(), "x")
    with pytest.raises(ConfigError, match="use Lock"):
        AsyncLock(redis_server.client(), "x")


def test_dead_server_is_connection_unavailable_fast() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}/0")
    lock = Lock(client, "dead", retry=RetryConfig(attempts=2, backoff_initial=0.01))
    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable):
        lock.acquire()
    assert time.monotonic() - started < 5
    assert lock.fencing_token is None


def test_black_holed_server_fails_within_its_timeouts(proxy: FaultProxy) -> None:
    config = proxy.config(
        socket_timeout=0.3, connect_timeout=0.3, retry={"attempts": 2, "backoff_initial": 0.01}
    )
    lock = Lock(connect(config), "hole")
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable) as info:
        lock.acquire(timeout=30)
    elapsed = time.monotonic() - started
    assert elapsed < 3  # 2 attempts x 0.3 s, plus slack: not the 30 s timeout, not a hang
    assert isinstance(info.value.__cause__, (redis.exceptions.TimeoutError, TimeoutError))
    assert lock.fencing_token is None
    assert not lock.validity


def test_black_holed_server_async(proxy: FaultProxy) -> None:
    async def run() -> None:
        config = proxy.config(socket_timeout=0.3, connect_timeout=0.3, retry={"attempts": 1})
        client = aconnect(config)
        lock = AsyncLock(client, "ahole")
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(ConnectionUnavailable):
            await lock.acquire()
        assert time.monotonic() - started < 3
        assert lock.fencing_token is None
        proxy.reset()
        await client.aclose()

    asyncio.run(run())


def test_server_dies_while_a_waiter_blocks(fresh_server: RedisServer) -> None:
    client = connect(fresh_server.config(socket_timeout=1, retry={"attempts": 1}))
    holder = Lock(client, "dies", ttl=30)
    assert holder.acquire()
    waiter = Lock(connect(fresh_server.config(socket_timeout=1, retry={"attempts": 1})), "dies")
    fresh_server.pause()
    started = time.monotonic()
    with pytest.raises(ConnectionUnavailable):
        waiter.acquire(timeout=20)
    assert time.monotonic() - started < 5
    fresh_server.resume()
    assert waiter.fencing_token is None


class _Readings:
    """A clock= that returns the given readings in turn, then keeps returning the last one."""

    def __init__(self, *readings: Any) -> None:
        self.readings = list(readings)

    def __call__(self) -> Any:
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


BAD_CLOCKS = {
    "str": lambda: _Readings("now"),
    "none": lambda: _Readings(None),
    "nan": lambda: _Readings(math.nan),
    "inf": lambda: _Readings(math.inf),
    "bool": lambda: _Readings(True),
    "backwards": lambda: _Readings(100.0, 50.0),
}


@pytest.mark.parametrize(
    ("make", "timeout"),
    # an untimed uncontended acquire reads the clock once: "backwards" needs a second reading
    [
        (make, t)
        for kind, make in BAD_CLOCKS.items()
        for t in (None, 1.0)
        if (kind, t) != ("backwards", None)
    ],
)
def test_a_bad_clock_is_a_config_error_at_first_use_and_leaves_nothing(
    r: redis.Redis, make: Any, timeout: float | None
) -> None:
    """A ``clock=`` that returns no finite number, or goes backwards, raises ``ConfigError`` at
    the reading (never a raw TypeError after the grant), and the acquire leaves no lease."""
    lock = Lock(r, "clk", ttl=10, clock=make())  # not read at construction
    with pytest.raises(ConfigError, match="clock must"):
        lock.acquire(timeout=timeout) if timeout is not None else lock.acquire()
    assert lock.fencing_token is None
    assert r.keys("distkit:lock:{clk}") == []


@pytest.mark.parametrize("make", BAD_CLOCKS.values(), ids=BAD_CLOCKS.keys())
def test_a_bad_clock_async_semaphore_and_redlock(redis_server: RedisServer, make: Any) -> None:
    r = redis_server.client()
    r.flushall()
    with pytest.raises(ConfigError, match="clock must"):
        Semaphore(r, "clk", 2, ttl=10, clock=make()).acquire(timeout=1)
    assert r.zcard("distkit:sem:{clk}:holders") == 0
    with pytest.raises(ConfigError, match="clock must"):
        Redlock([r], "clk", ttl=10, clock=make()).acquire(timeout=1)
    assert r.exists("distkit:lock:{clk}") == 0

    async def main() -> None:
        client = redis_server.async_client()
        try:
            with pytest.raises(ConfigError, match="clock must"):
                await AsyncLock(client, "clk", ttl=10, clock=make()).acquire(timeout=1)
            assert await client.exists("distkit:lock:{clk}") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_clock_that_goes_backwards_later_is_caught_there(r: redis.Redis) -> None:
    clock = _Readings(1.0, 2.0, 3.0, 4.0, 5.0)
    lock = Lock(r, "later", ttl=10, clock=clock)
    assert lock.acquire()
    clock.readings = [0.5]
    with pytest.raises(ConfigError, match="went backwards"):
        lock.validity  # noqa: B018 - the property reads the clock
    lock.release()  # the release itself needs no clock reading
    assert r.exists("distkit:lock:{later}") == 0


def test_a_clock_that_breaks_under_the_renewer_declares_the_lock_lost(r: redis.Redis) -> None:
    """The renewer thread reads the clock too: a bad reading there fires ``on_lost`` (the lease
    cannot be timed, so it is not claimed) instead of killing the thread with a traceback."""
    clock = _Readings(1.0, 2.0)
    lost = threading.Event()
    lock = Lock(r, "renew-clk", ttl=5, auto_renew=True, renew_interval=0.05, clock=clock,
                on_lost=lambda _: lost.set())  # fmt: skip
    assert lock.acquire()
    clock.readings = ["broken"]
    assert lost.wait(5)
    assert lock.lost and lock.fencing_token is None
