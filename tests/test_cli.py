"""The ``distkit`` command line, run as a user runs it: a subprocess against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from distcache import Cache
from distkit import ForeignDataError, LockNotOwned
from distkit.testing import RedisServer, free_port
from distlock import Lock, Redlock

SECRET = "cli-s3cret"


def cli(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distkit", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ping_reports_version_mode_latency_and_capabilities(redis_server: RedisServer) -> None:
    data = as_json(cli("--url", redis_server.url, "--json", "ping"))
    assert data["version"].split(".")[0].isdigit() and data["mode"] == "standalone"
    assert data["latency_p50_ms"] > 0 and data["masters"] == 1
    assert data["capabilities"]["client_tracking"] is True
    assert data["maxmemory_policy"] == "noeviction" and data["warnings"] == []
    text = cli("--url", redis_server.url, "ping")
    assert text.returncode == 0 and "PONG" in text.stdout and "noeviction" in text.stdout


def test_ping_warns_when_the_eviction_policy_can_evict_locks(fresh_server: RedisServer) -> None:
    with fresh_server.client() as admin:
        admin.config_set("maxmemory", "100mb")
        admin.config_set("maxmemory-policy", "allkeys-lru")
    data = as_json(cli("--url", fresh_server.url, "--json", "ping"))
    assert data["warnings"] and "allkeys-lru" in data["warnings"][0]
    assert "WARNING" in cli("--url", fresh_server.url, "ping").stdout


def test_ping_on_a_cluster_counts_its_masters(cluster: Any) -> None:
    node = cluster.config().cluster_nodes[0]
    data = as_json(cli("--url", f"redis://{node.host}:{node.port}/0", "--json", "ping"))
    assert data["mode"].startswith("cluster")


def test_exit_codes(fresh_server: RedisServer) -> None:
    dead = cli("--url", f"redis://127.0.0.1:{free_port()}/0", "ping")
    assert dead.returncode == 3 and "unavailable" in dead.stderr
    assert cli("--url", "redis://127.0.0.1:1/0?bogus=1", "ping").returncode == 2
    assert cli("no-such-command").returncode == 2
    with fresh_server.client() as admin:
        admin.acl_setuser("cli", enabled=True, passwords=[f"+{SECRET}"], keys=["*"],
                          commands=["+@all"])  # fmt: skip
    wrong = cli("--url", f"redis://cli:wrong@{fresh_server.host}:{fresh_server.port}/0", "ping")
    assert wrong.returncode == 3 and "credentials" in wrong.stderr
    assert ":wrong@" not in wrong.stderr  # the password is never echoed
    ok = cli("--url", f"redis://cli:{SECRET}@{fresh_server.host}:{fresh_server.port}/0", "ping")
    assert ok.returncode == 0 and SECRET not in ok.stdout + ok.stderr


def test_the_environment_configures_the_target(redis_server: RedisServer) -> None:
    env = {**os.environ, "DISTKIT_URL": redis_server.url}
    assert cli("--json", "ping", env=env).returncode == 0
    env["DISTKIT_URLL"] = "x"
    misspelt = cli("ping", env=env)
    assert misspelt.returncode == 2 and "DISTKIT_URLL" in misspelt.stderr


# -- lock and cache subcommands (registered by distlock._cli and distcache._cli) -------------------
def _queued(client: Any, name: str) -> int:
    return int(client.zcard(f"distkit:lock:{{{name}}}:queue"))


def _wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_force_release_never_deletes_a_key_that_is_not_a_lock(redis_server: RedisServer) -> None:
    """A plain string without a TTL, or a key of another type, is refused: exit 2, kept."""
    with redis_server.client() as client:
        client.flushall()
        client.set("distkit:lock:{userdata}", "precious")
        client.rpush("distkit:lock:{listdata}", "x")
        for name in ("userdata", "listdata"):
            done = cli("--url", redis_server.url, "lock", "release", name, "--force", "--yes")
            assert done.returncode == 2 and "distkit did not write" in done.stderr, done
            with pytest.raises(ForeignDataError):
                Lock.force_release(client, name)
        assert client.get("distkit:lock:{userdata}") == b"precious"
        assert client.lrange("distkit:lock:{listdata}", 0, -1) == [b"x"]


def test_lock_list_inspect_and_force_release_hand_over_to_the_waiter(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    with redis_server.client() as client:
        client.flushall()
        holder = Lock(client, "cli-job", ttl=60)
        assert holder.acquire()
        first = holder.fencing_token
        got: list[int | None] = []
        waiter = Lock(client, "cli-job", ttl=60)
        thread = threading.Thread(
            target=lambda: got.append(waiter.acquire(timeout=30) and waiter.fencing_token)
        )
        thread.start()
        _wait_for(lambda: _queued(client, "cli-job") == 1)
        time.sleep(0.05)
        listed = as_json(cli("--url", url, "--json", "lock", "list", "cli-*"))
        assert [one["name"] for one in listed["locks"]] == ["cli-job"]
        data = as_json(cli("--url", url, "--json", "lock", "inspect", "cli-job"))
        assert data["held"] and data["waiters"] == 1 and 0 < data["ttl_seconds"] <= 60
        assert data["oldest_waiter_age_seconds"] >= 0.05
        assert data["last_fencing_token"] == first
        text = cli("--url", url, "lock", "inspect", "cli-job")
        assert "held by" in text.stdout and "1 waiting" in text.stdout
        # without --yes it asks; "n" aborts with exit 1 and changes nothing
        no = cli("--url", url, "lock", "release", "cli-job", "--force", stdin="n\n")
        assert no.returncode == 1 and "[y/N]" in no.stderr and "aborted" in no.stdout
        assert client.get("distkit:lock:{cli-job}") is not None and thread.is_alive()
        assert cli("--url", url, "lock", "release", "cli-job").returncode == 2  # no --force
        done = as_json(cli("--url", url, "--json", "lock", "release", "cli-job", "--force",
                           "--yes"))  # fmt: skip
        assert done["released"] and done["handed_to"] is not None
        thread.join(10)
        assert got and got[0] is not None and got[0] > first  # the fence was kept
        after = as_json(cli("--url", url, "--json", "lock", "inspect", "cli-job"))
        assert after["held"] and after["waiters"] == 0 and after["last_fencing_token"] == got[0]
        waiter.release()
        yes = cli("--url", url, "lock", "release", "cli-job", "--force", stdin="y\n")
        assert yes.returncode == 1 and "not held" in yes.stdout  # free: nothing to release
        assert cli("--url", url, "lock", "inspect", "no-such-lock").returncode == 1
        assert as_json(cli("--url", url, "--json", "lock", "list", "zz*"))["locks"] == []


def test_lock_inspect_per_redlock_master(masters: Any) -> None:
    clients = masters.clients()
    for client in clients:
        client.flushall()
    lock = Redlock(clients, "cli-rl", ttl=60)
    assert lock.acquire()
    flags = [f"--master={u}" for u in masters.urls]
    data = as_json(cli("--json", "lock", "inspect", "cli-rl", *flags))
    assert data["held"] and len(data["masters"]) == len(clients)
    held = [u for u, m in data["masters"].items() if m["held"]]
    assert len(held) >= data["quorum"] == 3
    assert all(data["masters"][u]["holder"] == data["holder"] for u in held)
    for client, url in zip(clients, masters.urls, strict=True):
        if url.split("//")[1].split("/")[0] in held[0]:
            client.delete("distkit:lock:{cli-rl}")
    one = as_json(cli("--json", "lock", "inspect", "cli-rl", *flags))
    assert sum(m["held"] for m in one["masters"].values()) == len(held) - 1
    assert one["held"] is (len(held) - 1 >= 3)
    if one["held"]:
        lock.release()
    else:
        with pytest.raises(LockNotOwned):  # as the CLI said: no quorum any more
            lock.release()
    for client in clients:
        client.close()


def _cache_env(url: str) -> list[str]:
    return ["--url", url, "--json", "cache"]


def test_cache_stats_get_invalidate_clear(redis_server: RedisServer) -> None:
    url = redis_server.url
    with redis_server.client() as client:
        client.flushall()
        cache = Cache(client, namespace="cli-users", ttl=60)
        for i in range(30):
            cache.set(f"u{i}", {"id": i}, tags=["team:1" if i % 2 else "team:2"])
        stats = as_json(cli(*_cache_env(url), "stats", "cli-users"))
        assert stats["entries"] == 30 and stats["tag_records"] == 2 and stats["bytes"] > 30 * 20
        (shard,) = stats["shards"].values()
        assert shard["epoch"] is not None and shard["bytes_sampled"] == 30
        assert as_json(cli(*_cache_env(url), "get", "cli-users", "u3"))["value"] == {"id": 3}
        raw = as_json(cli(*_cache_env(url), "get", "cli-users", "u3", "--raw"))["raw"]
        assert raw.startswith("dc1:") and raw.endswith('{"id":3}')
        assert cli(*_cache_env(url), "invalidate", "cli-users", "team:1").returncode == 0
        assert cache.get("u3") is None and cache.get("u2") == {"id": 2}
        gone = cli(*_cache_env(url), "get", "cli-users", "u3")
        assert gone.returncode == 1 and "not found" in gone.stderr + gone.stdout
        assert as_json(cli(*_cache_env(url), "stats", "cli-users"))["tag_records"] == 2
        assert cli("--url", url, "cache", "clear", "cli-users").returncode == 0
        assert cache.get("u2") is None
        assert cli(*_cache_env(url), "get", "cli-users", "u2").returncode == 1
        assert cli(*_cache_env(url), "stats", "no-such-ns").returncode == 1
        assert cli(*_cache_env(url), "get", "cli-users", "never-set").returncode == 1


def test_cache_get_of_a_planted_entry_is_a_message_not_a_traceback(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    with redis_server.client() as client:
        client.flushall()
        Cache(client, namespace="cli-planted", ttl=60).set("ok", 1)
        epoch = client.get("distkit:cache:{cli-planted}:epoch")
        assert epoch is not None
        planted = {
            "garbage": b"not an entry at all",
            "short": b"dc1:",
            "badjson": b"dc1:" + epoch + b"jv0005" + b"1|0|1|1|" + b"{nope",
            "foreign": b"dc1:" + epoch + b"pv0007" + b"1|0|1|1|" + b"x",
        }
        for key, raw in planted.items():
            client.set(f"distkit:cache:{{cli-planted}}:k:{key}", raw)
            for extra in ([], ["--json"]):
                done = cli("--url", url, *extra, "cache", "get", "cli-planted", key)
                assert done.returncode == 1, (key, done.stderr)
                assert "Traceback" not in done.stderr + done.stdout
                assert "corrupt" in done.stdout or "serializer" in done.stdout, key


def test_cache_and_lock_commands_on_a_cluster(cluster: Any) -> None:
    env = {
        **os.environ,
        "DISTKIT_MODE": "cluster",
        "DISTKIT_CLUSTER_NODES": ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes),
    }
    client = cluster.client()
    try:
        cache = Cache(client, namespace="cli-clu", ttl=60)
        assert cache.shards > 1
        for i in range(40):
            cache.set(f"k{i}", i, tags=["even" if i % 2 == 0 else "odd"])
        stats = as_json(cli("--json", "cache", "stats", "cli-clu", env=env))
        assert stats["entries"] == 40 and len(stats["shards"]) > 1
        assert as_json(cli("--json", "cache", "get", "cli-clu", "k7", env=env))["value"] == 7
        assert cli("cache", "invalidate", "cli-clu", "odd", env=env).returncode == 0
        assert cache.get("k7") is None and cache.get("k8") == 8
        assert cli("cache", "clear", "cli-clu", env=env).returncode == 0
        assert cache.get("k8") is None
        lock = Lock(client, "cli-clu-lock", ttl=60)
        assert lock.acquire()
        listed = as_json(cli("--json", "lock", "list", env=env))
        assert "cli-clu-lock" in [one["name"] for one in listed["locks"]]
        done = as_json(
            cli("--json", "lock", "release", "cli-clu-lock", "--force", "--yes", env=env)
        )
        assert done["released"] and done["handed_to"] is None
    finally:
        client.close()


def test_plugins_are_loaded_by_name_and_distkit_does_not_import_them() -> None:
    with open(os.path.join(os.path.dirname(__file__), "..", "distkit", "_cli.py")) as file:
        src = file.read()
    assert "import distlock" not in src and "from distlock" not in src
    assert "import distcache" not in src and "from distcache" not in src
    env = {**os.environ, "DISTKIT_CLI_PLUGINS": ""}
    assert cli("lock", "list", env=env).returncode == 2  # no plugin: no such command
    env["DISTKIT_CLI_PLUGINS"] = "distlock._cli:register"
    helped = cli("--help", env=env)
    assert "lock" in helped.stdout and "cache" not in helped.stdout.split("positional")[-1]


# Every subcommand, with arguments that exist and that do not: --json always parses, no traceback,
# exit 1 for a missing object, exit 3 against a dead server. New subcommands must be added here
# (the test below fails for a registered command missing from this table).
_EVERY = {
    "ping": (["ping"], None),
    "lock list": (["lock", "list"], None),  # an empty listing is exit 0
    "lock inspect": (["lock", "inspect", "every-lock"], ["lock", "inspect", "missing"]),
    "lock release": (
        ["lock", "release", "every-lock", "--force", "--yes"],
        ["lock", "release", "missing", "--force", "--yes"],
    ),
    "cache stats": (["cache", "stats", "every-ns"], ["cache", "stats", "missing"]),
    "cache get": (["cache", "get", "every-ns", "k"], ["cache", "get", "every-ns", "missing"]),
    "cache invalidate": (["cache", "invalidate", "every-ns", "t"], None),
    "cache clear": (["cache", "clear", "every-ns"], None),
}


def test_the_table_covers_every_registered_command() -> None:
    from distkit._cli import COMMANDS, _parser

    _parser()  # loads the plugins, which fill COMMANDS
    assert set(COMMANDS) == set(_EVERY)


@pytest.mark.parametrize("command", sorted(_EVERY))
def test_every_command_json_missing_and_unreachable(
    command: str, fresh_server: RedisServer
) -> None:
    present, missing = _EVERY[command]
    url = fresh_server.url
    with fresh_server.client() as client:
        assert Lock(client, "every-lock", ttl=60).acquire()
        Cache(client, namespace="every-ns", ttl=60).set("k", [1, "two"], tags=["t"])
    done = cli("--url", url, "--json", *present)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), dict)
    if missing is not None:
        gone = cli("--url", url, "--json", *missing)
        assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr
        if gone.stdout:
            json.loads(gone.stdout)
    with fresh_server.client() as client:
        stats = client.info("commandstats")
        assert "cmdstat_keys" not in stats  # SCAN only
        assert command not in ("lock list", "cache stats") or "cmdstat_scan" in stats
    dead = cli("--url", f"redis://127.0.0.1:{free_port()}/0", "--json", *present)
    assert dead.returncode == 3 and "Traceback" not in dead.stderr, dead.stderr


@pytest.mark.parametrize("shards", [1, 4])
def test_cache_commands_find_the_namespaces_shards_and_only_its_keys(
    shards: int, fresh_server: RedisServer
) -> None:
    url = fresh_server.url
    with fresh_server.client() as client:
        glob = Cache(client, namespace="a*b", ttl=60, shards=shards)
        other = Cache(client, namespace="aXb", ttl=60, shards=shards)
        nested = Cache(client, namespace="a*b.1", ttl=60, shards=1)
        for i in range(12):
            glob.set(f"k{i}", i)
            other.set(f"k{i}", -i)
        nested.set("n", 0)
        stats = as_json(cli("--url", url, "--json", "cache", "stats", "a*b"))
        assert stats["entries"] == 12 and len(stats["shards"]) == min(shards, 12)
        assert as_json(cli("--url", url, "--json", "cache", "get", "a*b", "k5"))["value"] == 5
        assert cli("--url", url, "cache", "clear", "a*b").returncode == 0
        assert [glob.get(f"k{i}") for i in range(12)] == [None] * 12
        assert other.get("k5") == -5 and nested.get("n") == 0  # untouched


ESC = "\x1b[2J\x1b]0;pwned\x07"  # clear screen + set the terminal title


def test_lock_list_prints_planted_control_characters_escaped(fresh_server: RedisServer) -> None:
    """Key names and owner ids are what anyone with write access planted: escaped, never raw."""
    with fresh_server.client() as client:
        client.set(f"distkit:lock:{{evil{ESC}}}", f"own{ESC}\r\n", px=60_000)
        client.set(f"distkit:lock:{{evil{ESC}}}:fence", f"tok{ESC}")
        assert Lock(client, "plain", ttl=60).acquire()
    for extra in ([], ["--json"]):
        done = cli("--url", fresh_server.url, *extra, "lock", "list")
        assert done.returncode == 0, done.stderr
        for raw in ("\x1b", "\x07", "\r"):
            assert raw not in done.stdout + done.stderr
        if not extra:
            assert "\\x1b[2J" in done.stdout and "plain:" in done.stdout
        else:
            names = [one["name"] for one in json.loads(done.stdout)["locks"]]
            assert f"evil{ESC}" in names  # JSON keeps the exact name, as an escape
    done = cli("--url", fresh_server.url, "lock", "inspect", f"evil{ESC}")
    assert "\x1b" not in done.stdout + done.stderr


def test_lock_list_reports_an_unreadable_lock_and_goes_on(fresh_server: RedisServer) -> None:
    """A key of the wrong type does not abort the listing: it is listed as unreadable with the
    reason, every other lock is listed, and the exit code is 4."""
    with fresh_server.client() as client:
        assert Lock(client, "a-good", ttl=60).acquire()
        client.rpush("distkit:lock:{b-list}", "x")  # a lease of the wrong type
        client.hset("distkit:lock:{c-fence}:fence", "a", "b")  # a fence of the wrong type
        client.set("distkit:lock:{d-queue}:queue", "x")  # a queue of the wrong type
        assert Lock(client, "e-good", ttl=60).acquire()
    done = cli("--url", fresh_server.url, "lock", "list")
    assert done.returncode == 4, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("a-good: held by") for line in lines), lines
    assert any(line.startswith("e-good: held by") for line in lines), lines
    for name in ("b-list", "c-fence", "d-queue"):
        assert any(line.startswith(f"{name}: unreadable (") for line in lines), lines
    data = json.loads(cli("--url", fresh_server.url, "--json", "lock", "list").stdout)
    unreadable = {one["name"]: one["unreadable"] for one in data["locks"] if "unreadable" in one}
    assert set(unreadable) == {"b-list", "c-fence", "d-queue"}
    assert all("WRONGTYPE" in why or "distkit did not write" in why for why in unreadable.values())
    assert cli("--url", fresh_server.url, "--json", "lock", "list").returncode == 4
    assert cli("--url", fresh_server.url, "lock", "list", "a-*").returncode == 0  # all readable


@pytest.mark.parametrize(
    "score", [-1.0, 0.0, float("-inf"), float("inf"), 4e12, 1e300, -1e300], ids=repr
)
def test_an_absurd_queue_age_is_shown_as_unknown(fresh_server: RedisServer, score: float) -> None:
    with fresh_server.client() as client:
        assert Lock(client, "aged", ttl=60).acquire()
        client.zadd("distkit:lock:{aged}:queue", {"60000:someone": score})
    data = as_json(cli("--url", fresh_server.url, "--json", "lock", "list"))
    (one,) = data["locks"]
    assert one["waiters"] == 1 and one["oldest_waiter_age_seconds"] is None
    text = cli("--url", fresh_server.url, "lock", "list")
    assert text.returncode == 0, text.stderr
    assert "1 waiting (oldest age unknown)" in text.stdout, text.stdout
