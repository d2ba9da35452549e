"""The ``distkit`` command line, run as a user runs it: a subprocess against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from distkit.testing import RedisServer, free_port

SECRET = "cli-s3cret"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "distkit", *args],
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
