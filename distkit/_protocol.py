"""Protocols written once, without I/O, and the two thin drivers that run them.

A protocol is a generator that yields *steps* ("run this script", "block on this list", "sleep")
and receives each step's result; the sync driver executes steps on a ``redis.Redis`` and the async
driver on a ``redis.asyncio.Redis``. A step that fails is thrown back into the generator as a
distkit error, so cleanup logic lives in the protocol, next to the logic it cleans up after.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import redis.exceptions as rex

from ._clients import for_loop
from ._errors import ConnectionUnavailable, DistkitError, translate
from ._retry import NO_RETRY, RetryPolicy
from ._scripts import Script, ScriptArg

__all__ = [
    "AsyncDriver",
    "Cleanup",
    "Command",
    "Eval",
    "FanOut",
    "Pop",
    "Protocol",
    "Replicated",
    "Sleep",
    "Step",
    "SyncDriver",
    "TIMED_OUT",
    "settled",
]

_T = TypeVar("_T")

# BLPOP takes seconds with millisecond resolution; a timeout that rounds to 0 would block forever.
_MIN_BLOCK = 0.001
_DEFAULT_MAX_BLOCK = 1.0
# A BLPOP ends up to 1000/hz ms late (hz 10: 100 ms) plus a round trip: keep this much of the
# socket timeout free. Shorter server-side waits than _MIN_SERVER_BLOCK are not worth it: poll.
_BLOCK_MARGIN = 0.15
_MIN_SERVER_BLOCK = 0.02
# A polled Pop: one LPOP every _POLL_EVERY seconds, for up to _POLL_BLOCK seconds per step.
_POLL_EVERY = 0.05
_POLL_BLOCK = 0.5
# Connections of a bounded pool that blocking waits leave free (at most; 1/8 of the pool).
_MAX_RESERVE = 4
# How long a call waits for a free connection of a full pool before ConnectionUnavailable: the
# blocking waits that fill it end within max_block (+ the server's lateness).
_POOL_WAIT_EXTRA = 1.0
_POOL_WAIT_EVERY = 0.005
# RedisClusterException is not a RedisError ("Redis Cluster cannot be connected..." is one).
_REDIS_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError, asyncio.TimeoutError)


class Eval(NamedTuple):
    """Run ``script`` with ``keys`` / ``args``; retried per policy (scripts must be idempotent)."""

    script: Script
    keys: Sequence[str]
    args: Sequence[ScriptArg]
    # async: a cancelled caller waits until the call has finished (see ``settled``), so nothing
    # the protocol sends afterwards (a cleanup) can overtake it on another connection
    shield: bool = False


@dataclass(frozen=True, slots=True)
class Command:
    """Run one plain, read-only or idempotent Redis command; retried per policy."""

    args: tuple[ScriptArg, ...]


@dataclass(frozen=True, slots=True)
class Pop:
    """Block on list ``key`` for up to ``timeout`` seconds; result: the popped value or ``None``."""

    key: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Sleep:
    """Sleep ``seconds`` (``asyncio.sleep`` in the async driver)."""

    seconds: float


class _TimedOut:
    """Marker for a node that did not answer within the per-node timeout."""

    def __repr__(self) -> str:
        return "TIMED_OUT"


TIMED_OUT = _TimedOut()


@dataclass(frozen=True, slots=True)
class FanOut:
    """Run ``calls[i]`` on node ``i`` of the driver, all at once; result: one outcome per node.

    An outcome is the node's reply, a ``DistkitError`` (the node failed), or ``TIMED_OUT``.
    With ``quorum`` and ``granted``, waiting stops as soon as a quorum of ``granted`` replies has
    become impossible; the nodes still pending are then abandoned too.

    ``reach_all`` (releases): every node gets the request, suspended ones included; a
    connection that fails before the request is out is replaced once. A slow or restarted
    node's script cache may lack the script, so a late ``EVALSHA`` alone could do nothing: a
    node that does not answer in time gets the same call by ``EVAL`` right behind it (the
    request is idempotent), and an unawaited one (``wait=False``) is sent by ``EVAL``.
    ``wait=False``: send and return at once (every outcome ``TIMED_OUT``); the replies are read
    before the next request on each connection.
    ``late`` (``reach_all``, async driver): a request that could not go out in time (no
    connection within ``timeout``) keeps trying in the background for ``max(1 s, 20 x timeout,
    late)``; for a release, the longest lease it may free (after that there is nothing left).
    """

    calls: Sequence[Eval]
    timeout: float
    abandon: Sequence[Eval] | None = None
    quorum: int = 0
    granted: Callable[[Any], bool] | None = None
    reach_all: bool = False
    wait: bool = True
    late: float = 0.0


@dataclass(frozen=True, slots=True)
class Cleanup:
    """Best-effort ``step``: one try, and one more after a dropped connection (a reset in
    flight; never after a timeout), errors swallowed; async: shielded from cancel."""

    step: Eval | Command | FanOut
    errors: list[BaseException] = field(default_factory=list, compare=False)


def _always(reply: Any) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Replicated:
    """Run ``step``, then ``WAIT replicas timeout`` on the same connection if ``needed(reply)``.

    Result: ``(reply, acks)``, where ``acks`` counts the replicas that acknowledged every write
    made on that connection so far (so the step's own), or is ``None`` when WAIT was not needed.
    WAIT proves something only on the connection that wrote, hence the pinned connection. An
    ``Eval`` pair is retried as a whole per policy (a script whose retried call would not write
    must write anyway, e.g. refresh a TTL, so that the WAIT covers the first call's write); a
    ``Pop`` pair is not retried.
    """

    step: Eval | Pop
    replicas: int
    timeout: float
    needed: Callable[[Any], bool] = _always


Step = Eval | Command | Pop | Sleep | Cleanup | FanOut | Replicated
Protocol = Generator[Step, Any, _T]


def _max_block(client: Any) -> tuple[float, bool]:
    """The longest wait of one ``Pop`` step, and whether it may be a server-side BLPOP.

    A BLPOP's reply can come up to ``1000 / hz`` ms after its timeout (100 ms at the default hz
    10), plus a round trip: the wait must end ``_BLOCK_MARGIN`` before the client's socket
    timeout, or a healthy server's late reply reads as a dead connection. A socket timeout too
    short for that margin makes every ``Pop`` poll with LPOP instead.
    """
    timeout: Any = None
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        timeout = pool.connection_kwargs.get("socket_timeout")
    else:  # RedisCluster keeps the connection kwargs on its nodes manager
        manager = getattr(client, "nodes_manager", None)
        kwargs = getattr(manager, "connection_kwargs", None) or {}
        timeout = kwargs.get("socket_timeout")
    if isinstance(timeout, (int, float)) and timeout > 0:
        block = min(_DEFAULT_MAX_BLOCK, float(timeout) * 0.5, float(timeout) - _BLOCK_MARGIN)
        if block < _MIN_SERVER_BLOCK:
            return _POLL_BLOCK, False
        return block, True
    return _DEFAULT_MAX_BLOCK, True


def _pool_reserve(client: Any) -> tuple[Any, int] | None:
    """``(pool, reserve)`` for a client with one bounded pool (``None``: unbounded or unknown):
    blocking waits leave ``reserve`` of its connections free for releases, extends, cleanups."""
    pool = getattr(client, "connection_pool", None)
    cap = getattr(pool, "max_connections", None)
    if (
        pool is None
        or not isinstance(cap, int)
        or cap >= 2**31 - 1  # redis-py's "no limit"
        or not hasattr(pool, "_in_use_connections")
    ):
        return None
    return pool, min(_MAX_RESERVE, max(1, cap // 8))


def _pool_has_room(bounded: tuple[Any, int] | None) -> bool:
    """Whether a blocking wait may take a connection (more than the reserve is free)."""
    if bounded is None:
        return True
    pool, reserve = bounded
    try:
        return int(pool.max_connections) - len(pool._in_use_connections) > reserve
    except Exception:  # a pool shape we cannot read: block as before
        return True


def _pool_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a connection pool at its ``max_connections`` (nothing was sent).

    redis-py raises ``MaxConnectionsError`` for it since 6.4 (sync pools) and 8.0 (asyncio
    pools); before, a plain ``ConnectionError("Too many connections")``. Both count: the pool
    reserve and the wait for a free connection work on every supported redis-py.
    """
    return isinstance(exc, rex.MaxConnectionsError) or (
        type(exc) is rex.ConnectionError and str(exc) == "Too many connections"
    )


def _translated(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, _REDIS_ERRORS) and not isinstance(exc, DistkitError):
        mapped = translate(exc, what=what)
        if mapped is not None:
            mapped.__cause__ = exc
            return mapped
    return exc


def _was_reset(exc: BaseException) -> bool:
    """Whether ``exc`` (or the redis-py error behind a distkit one) is a dropped connection:
    reset, refused or closed, not a timeout and not a refusal of the credentials."""
    if isinstance(exc, DistkitError):
        exc = exc.__cause__ or exc
    return isinstance(exc, (rex.ConnectionError, ConnectionError)) and not isinstance(
        exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError)
    )


def _block_seconds(timeout: float, cap: float) -> float:
    return math.ceil(max(_MIN_BLOCK, min(timeout, cap)) * 1000) / 1000


def _wait_args(step: Replicated) -> tuple[str, int, int]:
    # WAIT's timeout is in ms and 0 means forever: never send 0
    return "WAIT", step.replicas, max(1, math.ceil(step.timeout * 1000))


class SyncDriver:
    """Runs protocols on a sync redis-py client (``Redis``, ``RedisCluster``, Sentinel master)."""

    __slots__ = (
        "_bounded",
        "_execute",
        "client",
        "max_block",
        "pool_wait",
        "retry",
        "server_block",
        "what",
    )

    def __init__(self, client: Any, retry: RetryPolicy, what: str) -> None:
        self.client = client
        self.retry = retry
        self.what = what
        self.max_block, self.server_block = _max_block(client)
        self._bounded = _pool_reserve(client)
        self.pool_wait = self.max_block + _POOL_WAIT_EXTRA
        self._execute = client.execute_command

    def run(self, protocol: Protocol[_T]) -> _T:
        """Drive ``protocol`` to completion and return its value."""
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = protocol.throw(error) if error is not None else protocol.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            try:
                send = self._eval(step) if type(step) is Eval else self._step(step)
            except BaseException as exc:  # thrown into the protocol, which cleans up and re-raises
                send, error = None, _translated(exc, self.what)

    def _eval(self, step: Eval) -> Any:
        """The hot path: one direct call; the retry machinery only runs after a failure."""
        try:
            return step.script(self.client, step.keys, step.args)
        except _REDIS_ERRORS as exc:
            if _pool_full(exc):  # nothing was sent: wait for a connection (in _once)
                return self.retry.call(lambda: self._once(step))
            first = _translated(exc, self.what)
            if not isinstance(first, ConnectionUnavailable):
                raise first from exc
        return self.retry.call_after(first, lambda: self._once(step))

    def _pooled(self, fn: Callable[[], _T]) -> _T:
        """``fn()``; while the pool is full (nothing was sent), retry for up to ``pool_wait``."""
        try:
            return fn()
        except rex.ConnectionError as exc:
            if not _pool_full(exc):
                raise
            end = time.monotonic() + self.pool_wait
        while True:
            time.sleep(_POOL_WAIT_EVERY)
            try:
                return fn()
            except rex.ConnectionError as exc:
                if not _pool_full(exc) or time.monotonic() >= end:
                    raise

    def _pop(self, step: Pop) -> Any:
        """BLPOP, or LPOP polls when the pool's reserve is reached or BLPOP cannot fit."""
        seconds = _block_seconds(step.timeout, self.max_block)
        if self.server_block and _pool_has_room(self._bounded):
            try:
                reply = self._execute("BLPOP", step.key, seconds)
                return None if reply is None else reply[1]
            except rex.ConnectionError as exc:
                if not _pool_full(exc):
                    raise
        end = time.monotonic() + seconds
        while True:
            try:
                value = self._execute("LPOP", step.key)
            except rex.ConnectionError as exc:
                if not _pool_full(exc):
                    raise
                value = None
            if value is not None:
                return value
            left = end - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(_POLL_EVERY, left))

    def _once(self, step: Eval | Command) -> Any:
        try:
            if isinstance(step, Eval):
                return self._pooled(lambda: step.script(self.client, step.keys, step.args))
            return self._pooled(lambda: self._execute(*step.args))
        except _REDIS_ERRORS as exc:
            mapped = translate(exc, what=self.what)
            if mapped is None:  # pragma: no cover - every RedisError/OSError maps
                raise
            raise mapped from exc

    def _replicated(self, step: Replicated) -> tuple[Any, int | None]:
        try:
            pinned = self.client.client()  # one connection of the same pool, for both commands
            try:
                inner = step.step
                if isinstance(inner, Eval):
                    reply = inner.script(pinned, inner.keys, inner.args)
                else:
                    seconds = _block_seconds(inner.timeout, self.max_block)
                    popped = pinned.execute_command("BLPOP", inner.key, seconds)
                    reply = None if popped is None else popped[1]
                if not step.needed(reply):
                    return reply, None
                return reply, int(pinned.execute_command(*_wait_args(step)))
            finally:
                pinned.close()
        except _REDIS_ERRORS as exc:
            mapped = translate(exc, what=self.what)
            if mapped is None:  # pragma: no cover - every RedisError/OSError maps
                raise
            raise mapped from exc

    def _step(self, step: Step) -> Any:
        if isinstance(step, (Eval, Command)):
            return self.retry.call(lambda: self._once(step))
        if isinstance(step, Replicated):
            if isinstance(step.step, Eval):
                return self.retry.call(lambda: self._replicated(step))
            return self._replicated(step)
        if isinstance(step, Pop):
            return self._pop(step)
        if isinstance(step, Sleep):
            if step.seconds > 0:
                time.sleep(step.seconds)
            return None
        if isinstance(step, FanOut) or isinstance(step.step, FanOut):
            raise TypeError("FanOut steps need a fan-out driver (distkit._fanout)")
        inner = step.step
        for last in (False, True):
            try:
                return NO_RETRY.call(lambda: self._once(inner))
            except Exception as exc:  # best effort by contract
                # one more try only after a dropped connection (a reset in flight; the next
                # try connects afresh); a timeout is not tried again
                if not last and _was_reset(exc):
                    continue
                step.errors.append(exc)
        return None


class AsyncDriver:
    """Runs protocols on an asyncio redis-py client; shielded steps survive cancellation."""

    __slots__ = (
        "_bound_loop",
        "_bounded",
        "_execute",
        "_given",
        "client",
        "max_block",
        "pool_wait",
        "retry",
        "server_block",
        "what",
    )

    def __init__(self, client: Any, retry: RetryPolicy, what: str) -> None:
        self.client = self._given = client
        self.retry = retry
        self.what = what
        self.max_block, self.server_block = _max_block(client)
        self._bounded = _pool_reserve(client)
        self.pool_wait = self.max_block + _POOL_WAIT_EXTRA
        self._execute = client.execute_command
        self._bound_loop: asyncio.AbstractEventLoop | None = None

    def _on_running_loop(self) -> None:
        """Use the given client, or its twin for this loop (``distkit._clients.for_loop``)."""
        loop = asyncio.get_running_loop()
        if loop is not self._bound_loop:
            self.client = for_loop(self._given, loop, self.what)
            self._execute = self.client.execute_command
            self._bounded = _pool_reserve(self.client)
            self._bound_loop = loop

    def execute(self, *args: ScriptArg) -> Awaitable[Any]:
        """One command, once, on the client for the running loop; redis-py errors unchanged.

        Not a coroutine function itself (the cache's hit path saves a frame): it hands back the
        client's own awaitable, to be awaited on the running loop.
        """
        if asyncio.get_running_loop() is not self._bound_loop:
            self._on_running_loop()
        return self._execute(*args)  # type: ignore[no-any-return]

    async def run(self, protocol: Protocol[_T]) -> _T:
        """Drive ``protocol`` to completion and return its value."""
        if asyncio.get_running_loop() is not self._bound_loop:
            try:
                self._on_running_loop()
            except BaseException:
                protocol.close()
                raise
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = protocol.throw(error) if error is not None else protocol.send(send)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            try:
                send = await self._step(step)
            except BaseException as exc:  # thrown into the protocol, which cleans up and re-raises
                send, error = None, _translated(exc, self.what)

    async def _pooled(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """``await fn()``; while the pool is full (nothing was sent), retry up to ``pool_wait``."""
        try:
            return await fn()
        except rex.ConnectionError as exc:
            if not _pool_full(exc):
                raise
            end = time.monotonic() + self.pool_wait
        while True:
            await asyncio.sleep(_POOL_WAIT_EVERY)
            try:
                return await fn()
            except rex.ConnectionError as exc:
                if not _pool_full(exc) or time.monotonic() >= end:
                    raise

    async def _pop(self, step: Pop) -> Any:
        """BLPOP, or LPOP polls when the pool's reserve is reached or BLPOP cannot fit."""
        seconds = _block_seconds(step.timeout, self.max_block)
        if self.server_block and _pool_has_room(self._bounded):
            try:
                reply = await self._execute("BLPOP", step.key, seconds)
                return None if reply is None else reply[1]
            except rex.ConnectionError as exc:
                if not _pool_full(exc):
                    raise
        end = time.monotonic() + seconds
        while True:
            try:
                value = await self._execute("LPOP", step.key)
            except rex.ConnectionError as exc:
                if not _pool_full(exc):
                    raise
                value = None
            if value is not None:
                return value
            left = end - time.monotonic()
            if left <= 0:
                return None
            await asyncio.sleep(min(_POLL_EVERY, left))

    async def _once(self, step: Eval | Command) -> Any:
        try:
            if isinstance(step, Eval):
                return await self._pooled(
                    lambda: step.script.acall(self.client, step.keys, step.args)
                )
            return await self._pooled(lambda: self._execute(*step.args))
        except _REDIS_ERRORS as exc:
            mapped = translate(exc, what=self.what)
            if mapped is None:  # pragma: no cover
                raise
            raise mapped from exc

    async def _replicated(self, step: Replicated) -> tuple[Any, int | None]:
        try:
            pinned = self.client.client()  # one connection of the same pool, for both commands
            try:
                inner = step.step
                if isinstance(inner, Eval):
                    reply = await inner.script.acall(pinned, inner.keys, inner.args)
                else:
                    seconds = _block_seconds(inner.timeout, self.max_block)
                    popped = await pinned.execute_command("BLPOP", inner.key, seconds)
                    reply = None if popped is None else popped[1]
                if not step.needed(reply):
                    return reply, None
                return reply, int(await pinned.execute_command(*_wait_args(step)))
            finally:
                await pinned.aclose()
        except _REDIS_ERRORS as exc:
            mapped = translate(exc, what=self.what)
            if mapped is None:  # pragma: no cover - every RedisError/OSError maps
                raise
            raise mapped from exc

    async def _step(self, step: Step) -> Any:
        if isinstance(step, Replicated):
            if isinstance(step.step, Eval):
                return await settled(self.retry.acall(lambda: self._replicated(step)))
            return await self._replicated(step)
        if isinstance(step, Eval):
            if step.shield:
                return await settled(self.retry.acall(lambda: self._once(step)))
            return await self.retry.acall(lambda: self._once(step))
        if isinstance(step, Command):
            return await self.retry.acall(lambda: self._once(step))
        if isinstance(step, Pop):
            return await self._pop(step)
        if isinstance(step, Sleep):
            await asyncio.sleep(max(0.0, step.seconds))
            return None
        if isinstance(step, FanOut) or isinstance(step.step, FanOut):
            raise TypeError("FanOut steps need a fan-out driver (distkit._fanout)")
        task = asyncio.ensure_future(self._cleanup(step))
        return await asyncio.shield(task)

    async def _cleanup(self, step: Cleanup) -> None:
        """A best-effort step: one try, and one more after a dropped connection (as the sync
        driver does); errors are collected on the step, never raised."""
        inner = step.step
        if isinstance(inner, FanOut):  # checked by _step; narrows the type
            raise TypeError("FanOut steps need a fan-out driver (distkit._fanout)")
        for last in (False, True):
            try:
                await NO_RETRY.acall(lambda: self._once(inner))
                return
            except Exception as exc:  # best effort by contract
                if not last and _was_reset(exc):
                    continue
                step.errors.append(exc)
        return None


async def settled(awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile.

    On cancellation the call still runs to completion (its result or error is dropped), and only
    then does ``CancelledError`` propagate: whatever the caller does next (a cleanup on another
    connection, a state reset) happens after the call, never beside it. Further cancellations
    while waiting are absorbed; the wait is bounded by the call's own timeouts.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                continue
        if not task.cancelled():
            task.exception()  # retrieved: the caller was cancelled, the outcome is moot
        raise


def monotonic() -> float:
    """The default clock of distkit's timing decisions (``time.monotonic``)."""
    return time.monotonic()
