"""A connection given up on while replies are still owed on it is closed only once they are read.

The fan-out abandons a request that does not answer within the per-node timeout: it writes the
abandon script (release-by-owner) right behind it on the same connection. Closing that socket
before both replies have come back makes the kernel answer them with a TCP reset, and a reset
lets a proxy, the network or the server drop what was sent but not yet processed: the abandon
behind a late grant, leaving a lease standing for its whole TTL. The connection must stay open
until both replies are read (bounded), and only then be closed.

Observed from the server: once resumed, it runs the late request and its abandon, answers both,
and still sees the connection (had the client closed it, the server would have read EOF and
dropped it); the next fan-out reads the replies and closes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from distkit import RetryConfig, RetryPolicy
from distkit._fanout import TIMED_OUT, AsyncFanOutDriver, SyncFanOutDriver, reap_lingering
from distkit._protocol import Eval, FanOut
from distkit._scripts import Script
from distkit.testing import RedisServer

_SET = Script("test-linger-set", "return redis.call('SET', KEYS[1], ARGV[1], 'PX', 60000) and 1")
_DEL = Script("test-linger-del", "return redis.call('DEL', KEYS[1])")
_TIMEOUT = 0.05


@pytest.fixture
def server(redis_binary: str) -> Iterator[RedisServer]:
    with RedisServer(binary=redis_binary) as server:
        yield server


def _step(key: str) -> FanOut:
    return FanOut(
        [Eval(_SET, [key], ["v"])],
        _TIMEOUT,
        abandon=[Eval(_DEL, [key], [])],
        quorum=1,
        granted=lambda reply: reply == 1,
    )


def _clients(probe: redis.Redis) -> int:
    """Connections the server has, not counting ``probe``'s own."""
    return int(probe.info("clients")["connected_clients"]) - 1


def _wait_for(predicate: Any, within: float = 5.0) -> bool:
    give_up = time.monotonic() + within
    while not predicate():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.02)
    return True


def _landed_and_still_open(probe: redis.Redis, open_before: int) -> None:
    """The late request and its abandon ran (nothing left behind), and a moment later the
    connection is still open: the client did not close it with both replies on their way."""
    assert _wait_for(lambda: probe.exists("late") == 0 and probe.get("warm") is not None)
    time.sleep(0.2)  # an EOF, had the client closed the socket, would be read by now
    assert _clients(probe) == open_before


def test_sync_an_abandoned_request_keeps_its_connection_until_both_replies_are_read(
    server: RedisServer,
) -> None:
    client = server.client()
    probe = server.client()
    driver = SyncFanOutDriver([client], RetryPolicy(RetryConfig(attempts=1)), "linger")
    assert driver._step(_step("warm")) == [1]  # scripts loaded, the master's identity known
    open_before = _clients(probe)  # the warm connection waits in the idle list
    server.pause()
    try:
        assert driver._step(_step("late")) == [TIMED_OUT]
    finally:
        server.resume()
    _landed_and_still_open(probe, open_before)
    assert _wait_for(lambda: reap_lingering() == 0)  # both replies read: closed
    assert _wait_for(lambda: _clients(probe) == open_before - 1)
    driver.close()
    client.close()
    probe.close()


def test_async_an_abandoned_request_keeps_its_connection_until_both_replies_are_read(
    server: RedisServer,
) -> None:
    probe = server.client()

    async def main() -> None:
        client = server.async_client()
        driver = AsyncFanOutDriver([client], RetryPolicy(RetryConfig(attempts=1)), "linger")
        assert await driver._step(_step("warm")) == [1]
        await driver.wait_idle()
        open_before = _clients(probe)  # the warm connection waits in the pool
        server.pause()
        try:
            assert await driver._step(_step("late")) == [TIMED_OUT]
            await driver.wait_idle()  # the node task has sent the abandon and handed over
        finally:
            server.resume()
        _landed_and_still_open(probe, open_before)  # blocks this loop: nothing is read yet
        for _ in range(250):  # now the loop runs: the replies are read, the socket closed
            if _clients(probe) == open_before - 1:
                break
            await asyncio.sleep(0.02)
        assert _clients(probe) == open_before - 1
        await client.aclose()

    asyncio.run(main())
    probe.close()
