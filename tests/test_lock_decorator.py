"""``@locked`` with a name built from the call's arguments: one lock per invoice (issue 15.13)."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from distkit import ConfigError, aconnect, connect
from distkit.testing import RedisServer
from distlock import locked


def _overlaps(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(b[0] < a[1] for a, b in itertools.pairwise(spans))


def test_a_template_gives_one_lock_per_argument_value(redis_server: RedisServer) -> None:
    client = connect(redis_server.config())
    spans: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    names: list[str] = []

    @locked(client, "invoice:{invoice_id}", ttl=10)
    def pay(invoice_id: int, amount: int = 0) -> None:
        start = time.monotonic()
        names.extend(k.decode() for k in redis_server.client().keys("distkit:lock:{invoice:*}"))
        time.sleep(0.05)
        spans[invoice_id].append((start, time.monotonic()))

    threads = [threading.Thread(target=pay, args=(i % 2 + 1,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spans[1]) == len(spans[2]) == 4
    assert not _overlaps(spans[1]) and not _overlaps(spans[2])  # same invoice: one at a time
    # different invoices ran side by side (their sections overlap)
    both = sorted(spans[1] + spans[2])
    assert any(b[0] < a[1] for a, b in itertools.pairwise(both))
    assert {"distkit:lock:{invoice:1}", "distkit:lock:{invoice:2}"} <= set(names)


def test_templates_use_defaults_keywords_attributes_and_indexes(redis_server: RedisServer) -> None:
    client = connect(redis_server.config())
    seen: list[str] = []

    @dataclass
    class Order:
        id: int

    def spy(*_: Any, **__: Any) -> None:
        seen.extend(k.decode() for k in redis_server.client().keys("distkit:lock:{o:*}"))

    @locked(client, "o:{order.id}:{region}:{ids[0]}", ttl=5)
    def ship(order: Order, ids: list[int], region: str = "eu") -> None:
        spy()

    ship(Order(7), [3, 4])
    ship(ids=[5], order=Order(8), region="us")
    assert seen == ["distkit:lock:{o:7:eu:3}", "distkit:lock:{o:8:us:5}"]


def test_a_callable_builds_the_name(redis_server: RedisServer) -> None:
    client = connect(redis_server.config())
    seen: list[bytes] = []

    @locked(client, lambda user, **_: f"user:{user.lower()}", ttl=5)
    def touch(user: str, note: str = "") -> None:
        seen.extend(redis_server.client().keys("distkit:lock:{user:*}"))

    touch("ADA", note="x")
    assert seen == [b"distkit:lock:{user:ada}"]

    @locked(client, lambda user: 42, ttl=5)  # type: ignore[arg-type,return-value]
    def bad(user: str) -> None: ...

    with pytest.raises(ConfigError, match="not a str"):
        bad("x")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("invoice:{invoice}", "'invoice', which is not a parameter"),
        ("invoice:{0}", "fields must name parameters"),
        ("invoice:{}", "fields must name parameters"),
        ("invoice:{args}", "not a parameter"),
        ("invoice:{invoice_id", "malformed"),
    ],
)
def test_a_template_that_names_no_parameter_fails_at_decoration(
    redis_server: RedisServer, template: str, message: str
) -> None:
    client = connect(redis_server.config())

    def pay(invoice_id: int, *args: Any) -> None: ...

    with pytest.raises(ConfigError, match=message):
        locked(client, template, ttl=5)(pay)


def test_an_async_template(redis_server: RedisServer) -> None:
    async def main() -> list[tuple[float, float]]:
        client = aconnect(redis_server.config())
        spans: list[tuple[float, float]] = []

        @locked(client, "job:{job}", ttl=5)
        async def run(job: str) -> None:
            start = time.monotonic()
            await asyncio.sleep(0.03)
            spans.append((start, time.monotonic()))

        await asyncio.gather(*(run("a") for _ in range(4)))
        await client.aclose()
        return spans

    spans = asyncio.run(main())
    assert len(spans) == 4 and not _overlaps(spans)


def _worker(url: str, invoice: int, rounds: int) -> None:
    client = redis.Redis.from_url(url)

    @locked(client, "proc-invoice:{invoice_id}", ttl=10)
    def pay(invoice_id: int) -> None:
        start = time.time()
        time.sleep(0.02)
        client.rpush(f"spans:{invoice_id}", f"{start}:{time.time()}")

    for _ in range(rounds):
        pay(invoice)


def test_processes_calling_with_the_same_argument_exclude_each_other(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(redis_server.url, i % 2, 5)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for invoice in (0, 1):
        raw = r.lrange(f"spans:{invoice}", 0, -1)
        spans = [tuple(map(float, item.decode().split(":"))) for item in raw]
        assert len(spans) == 10
        assert not _overlaps(spans)  # type: ignore[arg-type]


def test_template_failures_at_call_time_are_config_errors(redis_server: RedisServer) -> None:
    """Hostile review: nested fields, empty attributes, missing attributes or indexes, and objects
    whose str() is a memory address (no mutual exclusion across calls) raised raw or passed."""
    client = connect(redis_server.config())

    with pytest.raises(ConfigError, match="not a parameter"):
        locked(client, "a:{x:{w}}", ttl=5)(lambda x: None)  # nested field names no parameter

    @locked(client, "a:{x.nope}", ttl=5)
    def attr(x: Any) -> None: ...

    @locked(client, "a:{x[0]}", ttl=5)
    def index(x: Any) -> None: ...

    @locked(client, "a:{x}", ttl=5)
    def plain(x: Any) -> None: ...

    with pytest.raises(ConfigError, match="cannot be formatted"):
        attr(1)
    with pytest.raises(ConfigError, match="cannot be formatted"):
        index(1)
    with pytest.raises(ConfigError, match="no stable text"):
        plain(object())
    empty = locked(client, "a:{x.}", ttl=5)(lambda x: None)
    with pytest.raises(ConfigError, match="cannot be formatted"):
        empty(1)


def test_names_follow_str_of_the_arguments_as_documented(redis_server: RedisServer) -> None:
    """docs/locks.md: ``pay(5)`` and ``pay(5.0)`` lock different names; so do ``1`` and ``True``."""
    client = connect(redis_server.config())
    seen: list[str] = []

    @locked(client, "invoice:{invoice_id}", ttl=5)
    def pay(invoice_id: object) -> None:
        seen.extend(k.decode() for k in redis_server.client().keys("distkit:lock:{invoice:*}"))

    for value in (5, 5.0, 1, True):
        pay(value)
    assert seen == [
        "distkit:lock:{invoice:5}",
        "distkit:lock:{invoice:5.0}",
        "distkit:lock:{invoice:1}",
        "distkit:lock:{invoice:True}",
    ]
