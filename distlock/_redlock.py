"""``Redlock`` / ``AsyncRedlock``: the Redlock algorithm over N independent masters.

Same methods, context manager, renewal and lost signal as ``Lock``; see docs/redlock.md for the
algorithm, the fencing argument across masters, and the timing assumptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Union

from distkit import ConfigError, DistkitError, EventLoopMismatch, LockError, RetryPolicy
from distkit._clients import is_config

if TYPE_CHECKING:
    from distkit import AsyncClient, RedlockConfig, RetryConfig, SyncClient
from distkit._fanout import (
    AsyncFanOutDriver,
    SyncFanOutDriver,
    _describe,
    discard_idle,
    server_address,
)
from distkit._protocol import monotonic

from ._core import Clock, Seconds, check_client
from ._lock import _AsyncLock, _SyncLock
from ._redlock_core import Fencing, RedlockCore

__all__ = ["AsyncRedlock", "Redlock"]

Clients = Union[Sequence[Any], "RedlockConfig"]
SyncClients = Union[Sequence["SyncClient"], "RedlockConfig"]
AsyncClients = Union[Sequence["AsyncClient"], "RedlockConfig"]


def _target(client: Any) -> tuple[Any, ...]:
    """The server a client reaches, as far as its settings tell: any db, loopback spellings made
    one (the server's own identity is compared at first use, docs/redlock.md)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {}) or {}
    if all(kwargs.get(k) is None for k in ("host", "port", "path")):
        return (id(client),)
    return server_address(kwargs.get("host"), kwargs.get("port"), kwargs.get("path"))


class _Closed:
    """The driver of a closed handle: every use raises ``LockError``."""

    max_block = 0.0

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, protocol: Any) -> Any:
        """Refuse (the protocol is closed unstarted)."""
        protocol.close()
        raise LockError(f"Redlock handle {self.name!r} is closed", name=self.name)


def _masters(clients: Clients, *, want_async: bool, cls: str) -> list[Any]:
    if is_config(clients, "RedlockConfig"):
        from distkit import aconnect, connect

        make = aconnect if want_async else connect
        return [make(master) for master in clients.masters]  # type: ignore[union-attr]
    if isinstance(clients, (str, bytes)) or not isinstance(clients, Sequence):
        raise ConfigError(
            f"{cls} needs a sequence of clients (one per independent master) or a "
            f"RedlockConfig, got {type(clients).__name__}"
        )
    if not clients:
        raise ConfigError(f"{cls} needs at least one master")
    seen: dict[tuple[Any, ...], int] = {}
    for i, client in enumerate(clients):
        check_client(client, want_async=want_async, cls=cls)
        if hasattr(client, "nodes_manager"):
            raise ConfigError(
                f"{cls} takes independent masters; a RedisCluster is one deployment (use Lock)"
            )
        target = _target(client)
        if target in seen:
            j = seen[target]
            raise ConfigError(
                f"{cls} was given the same master twice: clients {j} ({_describe(clients[j])}) "
                f"and {i} ({_describe(client)}) reach one server (whatever the db); Redlock "
                "needs independent masters"
            )
        seen[target] = i
    return list(clients)


class Redlock(_SyncLock):
    """A lock held by a quorum (``N // 2 + 1``) of N independent Redis masters.

    Args:
        clients: sync clients, one per independent master (3 or 5 recommended), or a
            ``RedlockConfig``.
        name: the lock's name.
        ttl: lease length on each master.
        retry_count: retries of a blocking acquire (``None``: until ``timeout``).
        retry_delay: upper bound of the random delay between attempts (lower bound: half).
        drift_factor: clock drift allowance; validity = ttl - elapsed - (ttl * factor + 2 ms).
        node_timeout: per-master reply timeout, < ttl / 2 (default
            ``min(0.5 s, max(5 ms, ttl / 50), ttl / 4)``).
        fencing: ``"quorum"`` (default: the token is also written back to a quorum of masters
            that still hold the lease before ``acquire`` returns; no clock assumption) or
            ``"clock"`` (opt-in, one round trip less: the max of the granting masters'
            hybrid-clock tokens; later holders get larger tokens only while the masters' clocks
            differ by less than the shortest gap between two grants, which after a release is
            the critical section plus a round trip; docs/redlock.md).
        Other arguments are those of ``Lock``.

    Connections: the per-master connections are shared by every handle over the same clients
    (one small idle list per master, thread- and fork-safe; docs/redlock.md), so a handle per
    call costs no connection of its own. A handle holds a connection between two calls only
    while a straggler of its granted quorum is owed on it; ``close()`` gives those back, and
    closes the clients the handle built itself from a ``RedlockConfig``.

    Raises:
        ConfigError: an argument is invalid.
    """

    _core_class: ClassVar[type[RedlockCore]] = RedlockCore

    def __init__(
        self,
        clients: SyncClients,
        name: str,
        *,
        ttl: Seconds = 30.0,
        blocking_timeout: Seconds | None = None,
        auto_renew: bool = False,
        renew_interval: Seconds | None = None,
        on_lost: Callable[[Any], None] | None = None,
        prefix: str = "distkit",
        fence_retention: Seconds = 3600.0,
        retry: RetryConfig | RetryPolicy | None = None,
        clock: Clock = monotonic,
        retry_count: int | None = None,
        retry_delay: Seconds = 0.2,
        drift_factor: float = 0.01,
        node_timeout: Seconds | None = None,
        fencing: Fencing = "quorum",
    ) -> None:
        masters = _masters(clients, want_async=self._is_async, cls=type(self).__name__)
        self._owned: list[Any] = masters if is_config(clients, "RedlockConfig") else []
        core = self._core_class(
            name,
            masters=len(masters),
            ttl=ttl,
            prefix=prefix,
            clock=clock,
            fence_retention=fence_retention,
            retry_count=retry_count,
            retry_delay=retry_delay,
            drift_factor=drift_factor,
            node_timeout=node_timeout,
            fencing=fencing,
        )
        self._setup(
            core,
            blocking_timeout=blocking_timeout,
            auto_renew=auto_renew,
            renew_interval=renew_interval,
            on_lost=on_lost,
            retry=retry,
        )
        self._setup_io(self._make_driver(masters))

    @property
    def quorum(self) -> int:
        """How many masters must agree: ``N // 2 + 1``."""
        return self._core.quorum  # type: ignore[attr-defined, no-any-return]

    def _make_driver(self, masters: list[Any]) -> Any:
        return SyncFanOutDriver(masters, self._retry, f"redlock {self.name!r}")

    def close(self) -> None:
        """Release the lock if held (errors ignored), give back the connections; idempotent.

        A closed handle raises ``LockError`` on every other call. Leaving ``with`` needs no
        ``close()``: the release leaves the handle holding no connection.
        """
        driver: Any = self._driver
        if isinstance(driver, _Closed):
            return
        with _not_acquiring(self):
            if self._core.owner is not None or getattr(self._core, "_unreleased", None) is not None:
                with contextlib.suppress(DistkitError):
                    self.release()
            self._stop_renewer()
            self._driver = _Closed(self.name)  # type: ignore[assignment]
            driver.close()
            for client in self._owned:
                discard_idle(client.connection_pool)
                with contextlib.suppress(Exception):
                    client.close()
            self._owned.clear()


@contextlib.contextmanager
def _not_acquiring(lock: Any) -> Iterator[None]:
    """Hold the handle's acquire guard while closing: an acquire in progress makes ``close()``
    raise ``LockError`` (it would otherwise take leases through a driver closed under it and
    report True on a closed handle); an acquire started during ``close()`` is refused."""
    busy = lock._core._busy
    if not busy.acquire(blocking=False):
        raise LockError(
            f"lock {lock.name!r}: close() while an acquire is in progress on this handle "
            "(let the acquire return first)",
            name=lock.name,
        )
    try:
        yield
    finally:
        busy.release()


class AsyncRedlock(_AsyncLock):
    """The asyncio twin of ``Redlock`` (same arguments; takes ``redis.asyncio`` clients)."""

    _is_async = True
    _core_class: ClassVar[type[RedlockCore]] = RedlockCore
    _owned: list[Any]

    if TYPE_CHECKING:  # Redlock's __init__ with asyncio clients (tests/test_typing.py: in step)

        def __init__(
            self,
            clients: AsyncClients,
            name: str,
            *,
            ttl: Seconds = 30.0,
            blocking_timeout: Seconds | None = None,
            auto_renew: bool = False,
            renew_interval: Seconds | None = None,
            on_lost: Callable[[Any], None] | None = None,
            prefix: str = "distkit",
            fence_retention: Seconds = 3600.0,
            retry: RetryConfig | RetryPolicy | None = None,
            clock: Clock = monotonic,
            retry_count: int | None = None,
            retry_delay: Seconds = 0.2,
            drift_factor: float = 0.01,
            node_timeout: Seconds | None = None,
            fencing: Fencing = "quorum",
        ) -> None: ...

    else:
        __init__ = Redlock.__init__
    quorum = Redlock.quorum

    def _make_driver(self, masters: list[Any]) -> Any:
        return AsyncFanOutDriver(masters, self._retry, f"redlock {self.name!r}")

    async def close(self) -> None:
        """Release the lock if held (errors ignored, but ``EventLoopMismatch`` raises), close
        owned clients; idempotent.

        The asyncio handle uses its clients' own connection pools and holds no connection of
        its own; a closed handle raises ``LockError`` on every other call.
        """
        driver: Any = self._driver
        if isinstance(driver, _Closed):
            return
        with _not_acquiring(self):
            if self._core.owner is not None or getattr(self._core, "_unreleased", None) is not None:
                try:
                    await self.release()
                except EventLoopMismatch:
                    raise  # a misuse to fix, not an outage to ride out: the lease would stand
                except DistkitError:
                    pass
            await self._stop_renewer()
            self._driver = _Closed(self.name)  # type: ignore[assignment]
            await driver.wait_idle()
            for client in self._owned:
                with contextlib.suppress(Exception):
                    await client.aclose()
            self._owned.clear()
