"""A TCP proxy that injects network faults between a client and a Redis server.

The proxy runs an asyncio loop in a daemon thread; its controls are called from any thread and
take effect before they return, for open connections and new ones alike::

    client ──► FaultProxy (127.0.0.1:port) ──► target (host, port)
               latency / blackhole / cut / refuse
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio

from distkit.testing._server import _CLIENT_DEFAULTS

if TYPE_CHECKING:
    from distkit._config import RedisConfig

__all__ = ["FaultProxy"]

logger = logging.getLogger(__name__)

_CHUNK = 65536
_CONTROL_TIMEOUT = 5.0
_P = TypeVar("_P", bound="FaultProxy")
_T = TypeVar("_T")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection and its upstream twin."""

    def __init__(self, downstream: asyncio.StreamWriter) -> None:
        self.downstream = downstream
        self.upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        _abort(self.downstream)
        if self.upstream is not None:
            _abort(self.upstream)

    def close(self) -> None:
        self.downstream.close()
        if self.upstream is not None:
            self.upstream.close()


class FaultProxy:
    """A fault-injecting TCP proxy in front of ``target`` (e.g. ``RedisServer.address``)."""

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._target = target
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._latency = 0.0
        self._latency_up: float | None = None  # client -> target, when it differs
        self._latency_down: float | None = None  # target -> client, when it differs
        self._blackholed = False
        self._refusing = False
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None  # set while not blackholed; loop-owned
        self.connections_accepted = 0
        self.bytes_forwarded = 0

    def __repr__(self) -> str:
        target = f"{self._target[0]}:{self._target[1]}"
        return f"<FaultProxy {self._host}:{self._port} -> {target}>"

    # -- properties ---------------------------------------------------------------------------

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` that traffic is forwarded to."""
        return self._target

    @property
    def host(self) -> str:
        """Interface the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """Port the proxy listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the proxy listens on."""
        return self._host, self.port

    @property
    def url(self) -> str:
        """``redis://host:port/0`` through the proxy."""
        return f"redis://{self._host}:{self.port}/0"

    @property
    def latency(self) -> float:
        """Delay in seconds added to every forwarded chunk, in each direction."""
        return self._latency

    @property
    def blackholed(self) -> bool:
        """True while nothing is forwarded."""
        return self._blackholed

    @property
    def refusing(self) -> bool:
        """True while new connections are closed as soon as they are accepted."""
        return self._refusing

    @property
    def active_connections(self) -> int:
        """Number of client connections currently open through the proxy."""
        return len(self._connections)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self: _P) -> _P:
        """Start listening; a no-op when already started."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"FaultProxy->{self._target}", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._listen)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Drop every connection, stop listening and stop the loop thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=_CONTROL_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
            self._server = None
            self._open = None

    def __enter__(self: _P) -> _P:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults -------------------------------------------------------------------------------

    def set_latency(
        self, seconds: float, *, up: float | None = None, down: float | None = None
    ) -> None:
        """Delay every forwarded chunk by ``seconds`` in both directions (0 disables).

        ``up`` (client to target) and ``down`` (target to client) override ``seconds`` for one
        direction: an asymmetric path, where a request lands late but its reply comes back at
        once (the reply can then reach a client that has already given up on it).
        """
        for value in (seconds, up, down):
            if value is not None and not value >= 0:
                raise ValueError(f"latency must be >= 0, got {value}")
        self._latency = float(seconds)
        self._latency_up = None if up is None else float(up)
        self._latency_down = None if down is None else float(down)

    def blackhole(self, on: bool = True) -> None:
        """Forward nothing while on: data is held (as TCP would during a partition), so callers
        time out; switching it off delivers what was held."""

        def apply() -> None:
            self._blackholed = on
            assert self._open is not None
            if on:
                self._open.clear()
            else:
                self._open.set()

        self._call_sync(apply)

    def cut(self) -> None:
        """Reset every open connection (TCP RST on both sides); new connections still work."""
        self._call_sync(self._abort_all)

    def refuse(self, on: bool = True) -> None:
        """While on, close new connections right after accepting them."""
        self._refusing = on

    def reset(self) -> None:
        """Remove every fault: no latency, no blackhole, accept connections."""
        self.set_latency(0.0)
        self.refuse(False)
        self.blackhole(False)

    # -- clients and config -------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new sync client connected through the proxy (socket timeouts default to 5 s)."""
        return redis.Redis(host=self._host, port=self.port, **{**_CLIENT_DEFAULTS, **kwargs})

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """A new asyncio client connected through the proxy (socket timeouts default to 5 s)."""
        options = {**_CLIENT_DEFAULTS, **kwargs}
        return redis.asyncio.Redis(host=self._host, port=self.port, **options)

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``distkit`` standalone ``RedisConfig`` pointing at the proxy."""
        from distkit._config import RedisConfig

        fields: dict[str, Any] = {"host": self._host, "port": self.port, "mode": "standalone"}
        fields.update(overrides)
        return RedisConfig(**fields)

    # -- loop side ----------------------------------------------------------------------------

    def _call(self, factory: Callable[[], Any]) -> Any:
        """Run the coroutine ``factory()`` on the proxy loop and wait for its result."""
        if self._loop is None:
            raise RuntimeError("the proxy is not started")
        future = asyncio.run_coroutine_threadsafe(factory(), self._loop)
        return future.result(timeout=_CONTROL_TIMEOUT)

    def _call_sync(self, function: Callable[[], None]) -> None:
        async def run() -> None:
            function()

        self._call(run)

    async def _listen(self) -> None:
        self._open = asyncio.Event()
        if not self._blackholed:
            self._open.set()
        self._server = await asyncio.start_server(
            self._on_connect, self._host, self._requested_port
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _abort_all(self) -> None:
        for connection in list(self._connections):
            connection.abort()
        self._connections.clear()

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task rather than a coroutine callback: asyncio.streams logs a spurious error
        # when a handler task it created is cancelled at shutdown.
        task = asyncio.get_running_loop().create_task(self._handle(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self._refusing:
            _abort(writer)
            return
        connection = _Connection(writer)
        self._connections.add(connection)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError as exc:
                logger.debug("proxy %s: target unreachable: %s", self._port, exc)
                return
            connection.upstream = up_writer
            if connection not in self._connections:  # cut() while we were connecting
                _abort(up_writer)
                return
            pumps = [
                asyncio.ensure_future(self._pump(reader, up_writer, upstream=True)),
                asyncio.ensure_future(self._pump(up_reader, writer, upstream=False)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            if connection in self._connections:  # ended on its own: pass the FIN along
                self._connections.discard(connection)
                connection.close()

    def _delay(self, upstream: bool) -> float:
        override = self._latency_up if upstream else self._latency_down
        return self._latency if override is None else override

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        assert self._open is not None
        try:
            while data := await source.read(_CHUNK):
                delay = self._delay(upstream)
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._open.wait()
                sink.write(data)
                await sink.drain()
                self.bytes_forwarded += len(data)
        except (ConnectionError, OSError):
            pass
