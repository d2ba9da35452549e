"""The Lua script registry: EVALSHA first, EVAL once after NOSCRIPT, on one server and a Cluster."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
import redis.exceptions as rex

from distkit import KeySpace, Script, aconnect, connect
from distkit._scripts import registered_scripts
from distkit.testing import RedisCluster, RedisServer

# KEYS: counter;  ARGV: increment;  returns the new value.
INCR = Script(
    "tests.scripts.incr",
    "return redis.call('INCRBY', KEYS[1], ARGV[1])",
)

# KEYS: a, b (one name's keys: same slot);  ARGV: value;  returns the number of keys written.
PAIR = Script(
    "tests.scripts.pair",
    "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 2",
)


def script_calls(client: redis.Redis) -> tuple[int, int]:
    """(EVALSHA calls, EVAL calls) since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    eval_ = stats.get("cmdstat_eval", {}).get("calls", 0)
    return int(evalsha), int(eval_)


def fresh_stats(client: redis.Redis) -> None:
    client.script_flush()
    client.config_resetstat()


# -- one server -------------------------------------------------------------------------------


def test_sha_is_the_sha1_the_server_computes(r: redis.Redis) -> None:
    assert INCR.sha == hashlib.sha1(INCR.source.encode()).hexdigest()
    assert r.script_load(INCR.source) == INCR.sha


def test_runs_with_evalsha_and_loads_once_after_noscript(r: redis.Redis) -> None:
    fresh_stats(r)
    assert r.script_exists(INCR.sha) == [False]

    assert INCR(r, ["counter"], [5]) == 5  # EVALSHA -> NOSCRIPT -> EVAL (which caches it)
    assert script_calls(r) == (1, 1)
    assert r.script_exists(INCR.sha) == [True]

    assert INCR(r, ["counter"], [2]) == 7  # EVALSHA only
    assert INCR(r, ["counter"], [3]) == 10
    assert script_calls(r) == (3, 1)
    assert r.get("counter") == b"10"


def test_falls_back_again_after_script_flush(r: redis.Redis) -> None:
    assert INCR(r, ["c"], [1]) == 1
    fresh_stats(r)
    assert INCR(r, ["c"], [1]) == 2
    assert script_calls(r) == (1, 1)
    assert INCR(r, ["c"], [1]) == 3
    assert script_calls(r) == (2, 1)


def test_script_errors_propagate_raw(r: redis.Redis) -> None:
    r.set("not-a-number", "x")
    with pytest.raises(rex.ResponseError):
        INCR(r, ["not-a-number"], [1])


def test_async_runs_with_evalsha_and_falls_back(
    r: redis.Redis, ar: Callable[[], redis.asyncio.Redis]
) -> None:
    fresh_stats(r)

    async def main() -> list[int]:
        client = ar()
        try:
            out = [await INCR.acall(client, ["acounter"], [4])]
            out.append(await INCR.acall(client, ["acounter"], [4]))
            await client.script_flush()
            out.append(await INCR.acall(client, ["acounter"], [4]))
            return out
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [4, 8, 12]
    # EVALSHA each time; EVAL for the first call and once more after the flush.
    assert script_calls(r) == (3, 2)


def test_works_through_connect_with_str_and_bytes_keys(
    redis_server: RedisServer, r: redis.Redis
) -> None:
    client = connect(redis_server.config())
    try:
        assert PAIR(client, [b"pa", "pb"], ["v"]) == 2
        assert r.mget("pa", "pb") == [b"v", b"v"]
    finally:
        client.close()


# -- registry ---------------------------------------------------------------------------------


def test_same_name_same_source_is_fine() -> None:
    again = Script(INCR.name, INCR.source)
    assert again.sha == INCR.sha
    assert registered_scripts()[INCR.name].source == INCR.source


def test_different_source_under_a_taken_name_raises() -> None:
    with pytest.raises(ValueError, match=r"tests\.scripts\.incr"):
        Script(INCR.name, "return 0")
    assert registered_scripts()[INCR.name].source == INCR.source


def test_registered_scripts_is_a_copy() -> None:
    scripts = registered_scripts()
    scripts.pop(INCR.name)
    assert INCR.name in registered_scripts()


def test_distlock_registers_its_scripts() -> None:
    import distlock  # noqa: F401

    scripts = registered_scripts()
    for name in ("distlock.acquire", "distlock.release", "distlock.extend"):
        assert name in scripts, name
        assert isinstance(scripts[name], Script)
        assert scripts[name].sha == hashlib.sha1(scripts[name].source.encode()).hexdigest()
    assert all(isinstance(s, Script) and s.name == n for n, s in scripts.items())


def test_registered_scripts_compile(r: redis.Redis) -> None:
    import distlock  # noqa: F401

    for script in registered_scripts().values():
        assert r.script_load(script.source) == script.sha, script.name


def test_repr_names_the_script() -> None:
    assert repr(INCR) == f"Script('tests.scripts.incr', sha={INCR.sha[:10]})"


# -- Redis Cluster ----------------------------------------------------------------------------


def keys_on_every_node(cluster: RedisCluster, tag: str) -> list[str]:
    """One key per master, found by the cluster's slot assignment."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(cluster.nodes):
        key = f"{tag}:{i}"
        found.setdefault(cluster.nodes.index(cluster.node_for_key(key)), key)
        i += 1
    return [found[n] for n in range(len(cluster.nodes))]


def flush_scripts(cluster: RedisCluster) -> None:
    for node in cluster.nodes:
        with node.client() as conn:
            conn.script_flush()


def test_works_on_every_cluster_node(cluster: RedisCluster) -> None:
    flush_scripts(cluster)
    keys = keys_on_every_node(cluster, f"scripts-{uuid.uuid4().hex}")
    client = connect(cluster.config())
    try:
        assert isinstance(client, redis.RedisCluster)
        for key in keys:
            assert INCR(client, [key], [3]) == 3
            assert INCR(client, [key], [3]) == 6  # EVALSHA, now cached on that node
    finally:
        client.close()
    for key, node in zip(keys, cluster.nodes, strict=True):
        with node.client() as conn:
            assert conn.get(key) == b"6"  # the write landed on the slot's owner
            assert conn.script_exists(INCR.sha) == [True]


def test_async_works_on_every_cluster_node(cluster: RedisCluster) -> None:
    flush_scripts(cluster)
    keys = keys_on_every_node(cluster, f"ascripts-{uuid.uuid4().hex}")

    async def main() -> list[int]:
        client = aconnect(cluster.config())
        assert isinstance(client, redis.asyncio.RedisCluster)
        try:
            return [await INCR.acall(client, [key], [7]) for key in keys * 2]
        finally:
            await client.aclose()

    assert asyncio.run(main()) == [7] * len(keys) + [14] * len(keys)
    for key, node in zip(keys, cluster.nodes, strict=True):
        with node.client() as conn:
            assert conn.get(key) == b"14"


def test_multi_key_script_on_one_names_keys_in_a_cluster(cluster: RedisCluster) -> None:
    ks = KeySpace("scripts-test")
    name = f"n-{uuid.uuid4().hex}"
    lease, fence = ks.key("lock", name), ks.key("lock", name, "fence")
    client = connect(cluster.config())
    try:
        assert PAIR(client, [lease, fence], ["x"]) == 2
        assert client.get(lease) == client.get(fence) == b"x"
    finally:
        client.close()


def test_the_queue_entry_bounds_match_what_distlock_writes() -> None:
    """The lock's and the semaphore's scripts share one rule for a queue entry (docs/locks.md,
    "Failures"), spelled out in literal Lua: its bounds are the longest keep-alive a waiter
    writes and the longest ttl distkit accepts."""
    from distkit._units import MAX_SECONDS
    from distlock import _scripts, _semaphore_scripts

    assert _scripts._WAITER == _semaphore_scripts._WAITER
    assert int(MAX_SECONDS * 1000) == _scripts.MAX_TTL_MS
    assert f"now + {_scripts.MAX_KEEPALIVE_MS})" in _scripts._WAITER
    assert f"tonumber(ttl) > {_scripts.MAX_TTL_MS} " in _scripts._WAITER
    assert f"now + {_scripts.MAX_TTL_MS})" in _semaphore_scripts._HELPERS
    assert _scripts.MAX_WAIT_MS <= _scripts.MAX_KEEPALIVE_MS
