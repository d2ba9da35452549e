"""A local Redis Sentinel deployment: one master, replicas and a quorum of sentinels.

Timings are shortened (``down-after-milliseconds`` 1000, ``failover-timeout`` 3000) so that a
failover after ``kill_master()`` completes in a few seconds; every wait polls a condition
against a deadline and fails with the tails of the servers' logs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from distkit.testing._server import (
    _CLIENT_DEFAULTS,
    _LOG_NAME,
    RedisServer,
    _tail,
    find_redis_server,
)

if TYPE_CHECKING:
    from distkit._config import RedisConfig

__all__ = ["RedisSentinelGroup", "SentinelServer"]

SERVICE = "distkit-main"
_READY_TIMEOUT = 20.0
_FAILOVER_TIMEOUT = 30.0
_POLL = 0.05
_PROBE: dict[str, Any] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "retry": Retry(NoBackoff(), 0),
}

_G = TypeVar("_G", bound="RedisSentinelGroup")
_T = TypeVar("_T")


class SentinelServer(RedisServer):
    """One ``redis-server --sentinel`` process monitoring ``service`` at a given master."""

    def __init__(
        self,
        *,
        service: str,
        master: tuple[str, int],
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        binary: str | None = None,
    ) -> None:
        super().__init__(binary=binary)
        self._service = service
        self._master = master
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SentinelServer {self.host}:{self._port} {self._service} {state}>"

    @property
    def config_path(self) -> Path:
        """The sentinel's config file (sentinels rewrite it as they learn the topology)."""
        return self.directory / "sentinel.conf"

    def _command(self) -> list[str]:
        path = self.config_path
        if not path.exists():  # written once: a restarted sentinel keeps what it learnt
            host, port = self._master
            name = self._service
            path.write_text(
                f"sentinel monitor {name} {host} {port} {self._quorum}\n"
                f"sentinel down-after-milliseconds {name} {self._down_after_ms}\n"
                f"sentinel failover-timeout {name} {self._failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
        directory = self.directory
        return [
            self._binary or find_redis_server(),
            str(path),  # the config file must come first
            "--sentinel",
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(directory / _LOG_NAME),
        ]  # fmt: skip


class RedisSentinelGroup:
    """``replicas`` + 1 data servers and ``sentinels`` sentinels on loopback, quorum ``quorum``.

    ``start()`` returns once every sentinel knows the master, every replica and every other
    sentinel; ``kill_master()`` crashes the master (SIGKILL) and ``wait_for_failover()`` waits
    until every sentinel names a new master that reports ``role:master``.
    """

    def __init__(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        service: str = SERVICE,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
    ) -> None:
        if replicas < 1 or sentinels < 1 or not 1 <= quorum <= sentinels:
            raise ValueError("need replicas >= 1, sentinels >= 1 and 1 <= quorum <= sentinels")
        self.service = service
        self.quorum = quorum
        self._binary = binary
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self.servers: list[RedisServer] = [RedisServer(binary=binary) for _ in range(replicas + 1)]
        self._master_index = 0
        self._sentinel_count = sentinels
        self.sentinels: list[SentinelServer] = []

    def __repr__(self) -> str:
        ports = ",".join(str(s.port) for s in self.sentinels if s.running)
        return f"<RedisSentinelGroup {self.service} sentinels={ports or '-'}>"

    # -- topology -----------------------------------------------------------------------------

    @property
    def master(self) -> RedisServer:
        """The data server that is master as far as this group last observed."""
        return self.servers[self._master_index]

    @property
    def replicas(self) -> list[RedisServer]:
        """The data servers other than :attr:`master`."""
        return [s for i, s in enumerate(self.servers) if i != self._master_index]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every sentinel."""
        return [s.address for s in self.sentinels]

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self: _G) -> _G:
        """Start master, replicas (synced) and sentinels; wait until the sentinels agree."""
        try:
            for server in self.servers:
                server._spawn()
            for server in self.servers:
                server._wait_ready()
            for server in self.servers:  # a full sync starts at once, not after 5 s
                with server.client(**_PROBE) as conn:
                    conn.config_set("repl-diskless-sync-delay", 0)
            host, port = self.master.address
            for replica in self.replicas:
                with replica.client() as conn:
                    conn.execute_command("REPLICAOF", host, port)
            # Replicas first: a sentinel learns them from the master's first INFO reply, while
            # a replica that appears later would only be noticed at the next 10 s INFO period.
            self._wait("replicas in sync", self._replicas_in_sync, _READY_TIMEOUT)
            self.sentinels = [
                SentinelServer(
                    service=self.service,
                    master=self.master.address,
                    quorum=self.quorum,
                    down_after_ms=self._down_after_ms,
                    failover_timeout_ms=self._failover_timeout_ms,
                    binary=self._binary,
                )
                for _ in range(self._sentinel_count)
            ]
            for sentinel in self.sentinels:
                sentinel._spawn()
            for sentinel in self.sentinels:
                sentinel._wait_ready()
            self._wait("sentinels ready", self._sentinels_ready, _READY_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every sentinel and data server by pid (idempotent)."""
        for server in [*self.sentinels, *self.servers]:
            server.stop()

    def __enter__(self: _G) -> _G:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------------

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (no shutdown, no last replication); return it."""
        master = self.master
        master.kill()
        return master

    @contextlib.contextmanager
    def replication_cut(self) -> Iterator[None]:
        """Inside the block, no write of the master reaches any replica.

        The replicas are paused (SIGSTOP) and the master drops its replication links, so the
        writes made inside stay in the master's backlog only; kill the master inside the block
        to lose them in the failover that follows. On leaving, the replicas resume (and, if the
        master still lives, reconnect and catch up at their next replication cron). Keep the
        block shorter than ``down_after_ms``, or the sentinels see the replicas down too.
        """
        replicas = [r for r in self.replicas if r.running]
        for replica in replicas:
            replica.pause()
        try:
            with self.master.client(**_PROBE) as conn:
                conn.execute_command("CLIENT", "KILL", "TYPE", "replica")
            yield
        finally:
            for replica in replicas:
                replica.resume()

    def wait_for_failover(self, timeout: float = _FAILOVER_TIMEOUT) -> RedisServer:
        """Wait until every sentinel names a new, writable master; return that server."""
        old = self.master.address

        def promoted() -> RedisServer | None:
            names = {self._master_address(s) for s in self.sentinels if s.running}
            if len(names) != 1:
                return None
            (name,) = names
            if name is None or name == old:
                return None
            for index, server in enumerate(self.servers):
                if server.address == name and server.running and _role(server) == "master":
                    self._master_index = index
                    return server
            return None

        return self._wait("failover", promoted, timeout)

    def wait_replicated(self, timeout: float = _READY_TIMEOUT) -> None:
        """Wait until every running replica has acknowledged the master's replication offset."""
        self._wait("replicas in sync", self._replicas_in_sync, timeout)

    # -- clients and config -------------------------------------------------------------------

    def sentinel(self, **kwargs: Any) -> redis.sentinel.Sentinel:
        """A redis-py ``Sentinel`` over every sentinel of the group."""
        options = {**_CLIENT_DEFAULTS, **kwargs}
        return redis.sentinel.Sentinel(self.sentinel_addresses, **options)  # type: ignore[no-untyped-call,unused-ignore]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client for the current master, found through the sentinels."""
        master: redis.Redis = self.sentinel(**kwargs).master_for(self.service)  # type: ignore[no-untyped-call,unused-ignore]
        return master

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """An asyncio client for the current master, found through the sentinels."""
        options = {**_CLIENT_DEFAULTS, **kwargs}
        sentinel = redis.asyncio.sentinel.Sentinel(self.sentinel_addresses, **options)  # type: ignore[no-untyped-call,unused-ignore]
        master: redis.asyncio.Redis = sentinel.master_for(self.service)
        return master

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``distkit`` ``RedisConfig`` with ``mode="sentinel"`` listing every sentinel."""
        from distkit._config import RedisConfig

        fields: dict[str, Any] = {
            "mode": "sentinel",
            "sentinels": [f"{h}:{p}" for h, p in self.sentinel_addresses],
            "sentinel_service": self.service,
        }
        fields.update(overrides)
        return RedisConfig(**fields)

    def logs(self, lines: int = 15) -> str:
        """The tail of every server's and sentinel's log, for failure messages."""
        parts = []
        for server in [*self.servers, *self.sentinels]:
            parts.append(f"--- {server!r} ---\n{_tail(server.log_path, lines)}")
        return "\n".join(parts)

    # -- internals ----------------------------------------------------------------------------

    def _wait(self, what: str, condition: Callable[[], _T | None], timeout: float) -> _T:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self!r}: {what} not reached after {timeout:g} s\n{self.logs()}"
                )
            time.sleep(_POLL)

    def _replicas_in_sync(self) -> bool:
        try:
            with self.master.client(**_PROBE) as conn:
                info = conn.info("replication")
        except redis.RedisError:
            return False
        offset = int(info.get("master_repl_offset", 0))
        ports = {r.port for r in self.replicas if r.running}
        synced = set()
        for key, value in info.items():
            if (
                key.startswith("slave")
                and isinstance(value, dict)
                and value.get("state") == "online"
                and int(value.get("offset", -1)) >= offset
            ):
                synced.add(int(value["port"]))
        return synced >= ports

    def _sentinels_ready(self) -> bool:
        replicas = len(self.replicas)
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            try:
                with sentinel.client(**_PROBE) as conn:
                    state = conn.execute_command("SENTINEL", "MASTER", self.service)
            except redis.RedisError:
                return False
            fields = _pairs(state)
            if fields.get("ip") != self.master.host or fields.get("port") != str(self.master.port):
                return False
            if "s_down" in fields.get("flags", "") or "o_down" in fields.get("flags", ""):
                return False
            if int(fields.get("num-slaves", 0)) < replicas:
                return False
            if int(fields.get("num-other-sentinels", 0)) < others:
                return False
        return True

    def _master_address(self, sentinel: SentinelServer) -> tuple[str, int] | None:
        try:
            with sentinel.client(**_PROBE) as conn:
                reply = conn.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        except redis.RedisError:
            return None
        if not reply:
            return None
        host, port = reply
        return _text(host), int(port)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(reply: Any) -> dict[str, str]:
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    items = [_text(v) for v in reply]
    return dict(zip(items[::2], items[1::2], strict=False))


def _role(server: RedisServer) -> str | None:
    with contextlib.suppress(redis.RedisError), server.client(**_PROBE) as conn:
        return str(conn.info("replication").get("role"))
    return None
