"""Fan-out of one script to N independent Redis servers, in parallel, with a per-node timeout.

The sync driver sends every request first and then reads the replies on the same thread (one
multiplexed round trip, no thread pool); the async driver runs one task per node. Both return
as soon as the outcome is decided: a quorum granted, or a quorum out of reach.

A request that has not answered within the per-node timeout is *abandoned*: its ``abandon``
script (for a lock: release-by-owner) is written on the **same connection**, right behind it,
and the connection is given up. Redis executes one connection's commands in order, so if the late
request ever lands, the abandon lands after it: nothing is left behind. A given-up connection
is closed only once both replies are read (see ``_linger``): closing it earlier would answer
them with a TCP reset, which may cost the abandon. A straggler that was not
waited for (the quorum decided without it) is settled before the next request to its node goes
out: the sync driver reads its reply first on the same connection; the async driver's next task
for that node waits for the straggler's task.

Connections (sync): every driver over the same client takes its per-node connections from one
small idle list per (client connection pool, per-node timeout), shared by all handles and
threads and held only weakly (it goes with the pool). A connection is used by one fan-out at a
time. It goes back to the idle list after each fan-out, with any replies still owed on it (the
next user reads them first), except after a won quorum: a handle that holds a lock keeps its
connections until its release (or until a later fan-out does not win), so the release travels
behind any straggler on the same connection and a held lock's cycle takes no idle list twice.

Fork: connections belong to the process that opened them. The idle lists are emptied in a
forked child, and a driver used in a forked child (a handle built before ``os.fork()``) notices
the new pid and opens connections of its own, never writing to or reading from the parent's
sockets. The async driver
drops, in the child, the connections its clients' pools inherited (redis-py's asyncio pools do
not check the pid themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._clients import for_loop
from ._errors import ConfigError, ConnectionUnavailable, DistkitError, LockError, translate
from ._fork import forget_inherited_async_pool
from ._protocol import (
    _REDIS_ERRORS,
    TIMED_OUT,
    AsyncDriver,
    Cleanup,
    Eval,
    FanOut,
    Protocol,
    SyncDriver,
)
from ._retry import RetryPolicy
from ._scripts import Script

__all__ = ["TIMED_OUT", "AsyncFanOutDriver", "FanOut", "SyncFanOutDriver"]


def _packed_eval(conn: Any, call: Eval, *, by_sha: bool = True) -> Any:
    head = ("EVALSHA", call.script.sha) if by_sha else ("EVAL", call.script.source)
    return conn.pack_command(*head, len(call.keys), *call.keys, *call.args)


class _LateRetry(Exception):
    """The EVAL sent after a NOSCRIPT reply did not answer within the per-node timeout."""


def _granted_count(step: FanOut, outcomes: Sequence[Any]) -> int:
    granted = step.granted
    assert granted is not None
    count = 0
    for o in outcomes:  # a plain loop: this runs after every reply
        if o is not TIMED_OUT and not isinstance(o, Exception) and granted(o):
            count += 1
    return count


def _hopeless(step: FanOut, outcomes: Sequence[Any], pending: int) -> bool:
    if not step.quorum or step.granted is None:
        return False
    return _granted_count(step, outcomes) + pending < step.quorum


def _won(step: FanOut, outcomes: Sequence[Any]) -> bool:
    if not step.quorum or step.granted is None:
        return False
    return _granted_count(step, outcomes) >= step.quorum


def _error(exc: BaseException, what: str) -> DistkitError:
    mapped = translate(exc, what=what)
    if mapped is None:
        mapped = ConnectionUnavailable(f"{what}: {type(exc).__name__}: {exc}")
    mapped.__cause__ = exc
    return mapped


def _suspension(timeout: float) -> float:
    """How long a node that just failed or timed out is skipped before it is tried again."""
    return min(1.0, max(0.05, 4 * timeout))


# Until when each master (keyed by its client's connection pool) is skipped after a failure:
# shared by every handle over the same client, so a handle per call does not probe a stalled
# master afresh (and wait node_timeout for it) every time.
_suspended_until: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _shared_suspended(pool: Any, now: float) -> bool:
    try:
        return _suspended_until.get(pool, 0.0) > now
    except TypeError:  # a pool that cannot be weakly referenced: the driver's own record only
        return False


def _share_suspension(pool: Any, until: float, cause: BaseException | None) -> None:
    """Suspend the master for every handle over ``pool`` when ``cause`` (None: a timeout) says
    it is unreachable or stalled; a refusal of this client (a wrong password) is not shared: each
    call reports it."""
    if cause is not None and (
        isinstance(cause, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError))
        or not isinstance(cause, (rex.ConnectionError, rex.TimeoutError, OSError))
    ):
        return
    with contextlib.suppress(TypeError):
        if _suspended_until.get(pool, 0.0) < until:
            _suspended_until[pool] = until


_LOOPBACK = frozenset({"localhost", "localhost.localdomain", "127.0.0.1", "::1", "[::1]"})


def server_address(host: Any, port: Any, path: Any = None) -> tuple[Any, ...]:
    """Where a server listens, with the loopback spellings (``localhost``, ``127.0.0.1``,
    ``::1``) made one: two clients with the same address reach the same server, whatever db."""
    if path:
        return ("unix", str(path))
    name = str(host).lower() if host is not None else None
    return ("tcp", "loopback" if name in _LOOPBACK else name, port)


# Each master's server identity (INFO server's run_id), learnt at first use and kept per client
# connection pool: two clients that reach one server (however spelled: an alias, a proxy, another
# db) are refused, as Redlock needs independent masters.
_server_ids: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# One sync probe at a time: threads starting together open one probe connection per master,
# not one each (the others then find the identities known).
_probe_lock = threading.Lock()


def _known_id(pool: Any) -> str | None:
    try:
        return _server_ids.get(pool)
    except TypeError:
        return None


def _learn_id(pool: Any, info: Any) -> None:
    """Remember the run_id in an ``INFO server`` reply (a parsed dict, or the raw text)."""
    run_id: Any = None
    if isinstance(info, dict):
        run_id = info.get("run_id")
    elif isinstance(info, (bytes, str)):
        text = info.decode("utf-8", "replace") if isinstance(info, bytes) else info
        for line in text.splitlines():
            if line.startswith("run_id:"):
                run_id = line[len("run_id:") :].strip()
    if run_id:
        with contextlib.suppress(TypeError):
            _server_ids[pool] = str(run_id)


def _describe(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    if kwargs.get("path"):
        return f"unix:{kwargs['path']} db={kwargs.get('db', 0)}"
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"


def _refuse_duplicates(clients: Sequence[Any], what: str) -> bool:
    """Raise ConfigError when two masters are one server; True once every identity is known."""
    seen: dict[str, int] = {}
    complete = True
    for i, client in enumerate(clients):
        run_id = _known_id(client.connection_pool)
        if run_id is None:
            complete = False
            continue
        if run_id in seen:
            j = seen[run_id]
            raise ConfigError(
                f"{what}: masters {j} ({_describe(clients[j])}) and {i} ({_describe(client)}) "
                f"are the same Redis server (run_id {run_id}); Redlock needs independent masters"
            )
        seen[run_id] = i
    return complete


_MAX_IDLE = 16


# Bumped in a forked child and whenever idle lists are discarded: what a driver remembers of
# the registry (its per-node idle lists) is looked up again. A counter, not a pid compare: no
# system call on the hot path.
_generation = 0


class _Idle:
    """Idle connections to one master (one per-node timeout), with the replies each still owes.

    No lock: ``list.pop`` and ``list.append`` are atomic, and the size cap is a soft one.
    """

    __slots__ = ("conns", "generation", "pid")

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.generation = _generation
        self.conns: list[tuple[Any, list[Script]]] = []

    def _check_fork(self) -> None:
        if self.generation != _generation:  # the pid is asked only after a fork (or discard)
            self.generation = _generation
            if self.pid != os.getpid():  # the parent's sockets: never touched here
                self.pid = os.getpid()
                self.conns = []

    def take(self) -> tuple[Any, list[Script]] | None:
        """An idle connection and the replies it still owes, or None."""
        self._check_fork()
        try:
            return self.conns.pop()
        except IndexError:
            return None

    def put(self, conn: Any, unread: list[Script]) -> None:
        """Give ``conn`` back (closed instead when enough are idle)."""
        self._check_fork()
        if len(self.conns) < _MAX_IDLE:
            self.conns.append((conn, unread))
            return
        _linger(conn, len(unread), _LINGER)


_registry_lock = threading.RLock()  # reentrant: a weakref callback may run inside it (GC)
_registry: dict[tuple[int, float], tuple[weakref.ref[Any], _Idle]] = {}


def _idle_for(pool: Any, timeout: float) -> _Idle:
    """The idle list shared by every driver over ``pool`` with this per-node timeout."""
    key = (id(pool), timeout)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is not None and entry[0]() is pool:
            return entry[1]
        idle = _Idle()

        def forget(ref: weakref.ref[Any], key: tuple[int, float] = key) -> None:
            with _registry_lock:
                if _registry.get(key, (None,))[0] is ref:
                    del _registry[key]

        _registry[key] = (weakref.ref(pool, forget), idle)
        return idle


def discard_idle(pool: Any) -> None:
    """Close the idle connections kept for ``pool`` (its client is being closed)."""
    global _generation
    with _registry_lock:
        keys = [k for k, (ref, _) in _registry.items() if ref() is pool]
        idles = [_registry.pop(k)[1] for k in keys]
        _generation += 1
    for idle in idles:
        while (taken := idle.take()) is not None:
            _linger(taken[0], len(taken[1]), _LINGER)


# Connections given up on while replies are still owed on them (a request that timed out and
# the abandon behind it, a release sent to a suspended master): kept open until those replies
# have been read, then closed. Closing a socket that has unread data, or that data reaches
# afterwards, makes the kernel answer with a TCP reset (RFC 1122 4.2.2.13), and a reset lets the
# network, a proxy or the server drop what this side sent but was not yet processed: the abandon
# behind a late request, so a lease would be left standing for its whole TTL. Reaped by every
# sync fan-out of the process; each is closed at the latest after its bound.
_LINGER = 30.0
_MAX_LINGERING = 256
_lingering: list[tuple[Any, int, float]] = []  # (connection, replies owed, close by)
_lingering_lock = threading.Lock()


def _linger(conn: Any, owed: int, bound: float) -> None:
    """Close ``conn`` once it has answered ``owed`` requests, or after ``bound`` seconds."""
    if owed <= 0:
        with contextlib.suppress(Exception):
            conn.disconnect()
        return
    with _lingering_lock:
        _lingering.append((conn, owed, time.monotonic() + bound))
        evicted = _lingering.pop(0) if len(_lingering) > _MAX_LINGERING else None
    if evicted is not None:
        with contextlib.suppress(Exception):
            evicted[0].disconnect()


def reap_lingering() -> int:
    """Read what the lingering connections have received, close those done or past their
    bound; the number still lingering. Never blocks on a reply that has not arrived."""
    if not _lingering_lock.acquire(blocking=False):
        return len(_lingering)  # another thread reaps
    try:
        now = time.monotonic()
        keep: list[tuple[Any, int, float]] = []
        done: list[Any] = []
        for conn, owed, until in _lingering:
            try:
                while owed and conn.can_read(timeout=0):
                    with contextlib.suppress(rex.ResponseError):
                        conn.read_response()
                    owed -= 1
            except _REDIS_ERRORS:
                owed = 0  # the server closed it, or it broke: nothing more will be read
            if owed and now < until:
                keep.append((conn, owed, until))
            else:
                done.append(conn)
        _lingering[:] = keep
    finally:
        _lingering_lock.release()
    for conn in done:
        with contextlib.suppress(Exception):
            conn.disconnect()
    return len(keep)


def _forget_all_after_fork() -> None:
    global _registry_lock, _generation, _probe_lock, _lingering_lock
    _registry_lock = threading.RLock()
    _probe_lock = threading.Lock()
    _registry.clear()
    _generation += 1
    _lingering_lock = threading.Lock()
    inherited = list(_lingering)
    _lingering.clear()
    for conn, _, _ in inherited:
        with contextlib.suppress(Exception):
            conn.disconnect()  # in the child redis-py only closes the parent's socket


os.register_at_fork(after_in_child=_forget_all_after_fork)


class SyncFanOutDriver(SyncDriver):
    """Runs protocols whose steps fan out to several sync clients (independent masters).

    Each node's connection (taken from the idle list shared per master, see the module docstring)
    has the per-node timeout as its connect and socket timeouts, so a stalled node costs about
    that much, never the client's ``socket_timeout``. A node that failed or timed out is skipped
    (counted as unavailable) for a short suspension, so a dead or stalled minority does not slow
    every operation down; a ``reach_all`` step (a release) is sent to it all the same.
    """

    __slots__ = (
        "_conns",
        "_distinct",
        "_idles",
        "_lock",
        "_pid",
        "_pinned",
        "_suspended",
        "_unread",
        "clients",
    )

    def __init__(self, clients: Sequence[Any], retry: RetryPolicy, what: str) -> None:
        super().__init__(clients[0], retry, what)
        self.clients = list(clients)
        self._distinct = False  # every master's server identity known, none twice
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._conns: list[Any] = [None] * len(self.clients)
        # Replies still owed on each connection: once a quorum has decided, the stragglers are
        # not waited for; their replies are read (and dropped) before the next one there.
        self._unread: list[list[Script]] = [[] for _ in self.clients]
        # A granted quorum's straggler is owed here: the connection stays with this handle.
        self._pinned = [False] * len(self.clients)
        self._suspended = [0.0] * len(self.clients)
        # Each node's idle list, looked up once per (per-node timeout, registry generation).
        self._idles: tuple[float, int, list[_Idle]] | None = None
        # The renewal thread shares the connections. A new lock after a fork too: the parent's
        # may have been held by a thread that does not exist in the child.
        self._lock = threading.Lock()

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's sockets (closed here, never shut down)."""
        inherited = self._conns
        self._reset()
        for conn in inherited:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.disconnect()  # redis-py shuts a socket down only in its own process

    def _step(self, step: Any) -> Any:
        if isinstance(step, FanOut):
            return self._fan_out(step)
        if isinstance(step, Cleanup) and isinstance(step.step, FanOut):
            try:
                return self._fan_out(step.step)
            except Exception as exc:
                step.errors.append(exc)
                return None
        return super()._step(step)

    def close(self) -> None:
        """Give back the connections this driver holds (those owing a straggler are closed)."""
        if self._pid != os.getpid():
            self._after_fork()
            return
        with self._lock:
            for i, conn in enumerate(self._conns):
                if conn is not None:
                    self._drop(i, 0.0, 0.0, suspend=False)
        reap_lingering()

    def _idle(self, i: int, timeout: float) -> _Idle:
        known = self._idles
        if known is None or known[0] != timeout or known[1] != _generation:
            idles = [_idle_for(client.connection_pool, timeout) for client in self.clients]
            known = self._idles = (timeout, _generation, idles)
        return known[2][i]

    def _checkin(self, timeout: float) -> None:
        for i, conn in enumerate(self._conns):
            if conn is not None and not self._pinned[i]:
                self._conns[i] = None
                unread, self._unread[i] = self._unread[i], []
                self._idle(i, timeout).put(conn, unread)

    def _connection(self, i: int, timeout: float, *, fresh: bool = False) -> Any:
        conn = self._conns[i]
        if conn is None and not fresh:
            idle = self._idle(i, timeout).take()
            if idle is not None:
                conn, self._unread[i] = idle
                self._conns[i] = conn
        if conn is None:
            conn = self._open(i, timeout)
            self._conns[i] = conn
        return conn

    def _open(self, i: int, timeout: float) -> Any:
        """A new connection to node ``i`` (not connected yet) with ``timeout`` as its timeouts."""
        pool = self.clients[i].connection_pool
        options = dict(pool.connection_kwargs)
        options["socket_timeout"] = timeout
        options["socket_connect_timeout"] = timeout
        # No health-check PING: it would be sent before the straggler replies still owed on
        # this connection are read, take one of them for its answer and drop the connection
        # (and the request about to go out). Failures are detected by the fan-out itself.
        options["health_check_interval"] = 0
        # One connection attempt: redis-py's retries would multiply the per-node timeout.
        options["retry"] = Retry(NoBackoff(), 0)
        # A new connection's handshake is paid serially per node, a round trip per step: no
        # CLIENT SETINFO, no maintenance notifications, and RESP2 (no HELLO; the scripts'
        # replies read the same). AUTH and SELECT stay when configured.
        if "driver_info" in options:  # redis-py >= 7
            options["driver_info"] = None
        else:
            options["lib_name"] = options["lib_version"] = None
        options["protocol"] = 2
        if "maint_notifications_config" in options:  # redis-py >= 7
            from redis.maint_notifications import MaintNotificationsConfig

            options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
            options.pop("maint_notifications_pool_handler", None)
        return pool.connection_class(**options)

    def _check_distinct(self, timeout: float) -> None:
        """At first use: learn each master's server identity (``INFO server``, on connections of
        its own, all sent before any reply is read) and refuse two masters that are one server.
        A master that does not answer within ``timeout`` is suspended (the fan-out would wait
        for it just as long) and asked again at a later fan-out."""
        with _probe_lock:
            self._probe(timeout)
        self._distinct = _refuse_duplicates(self.clients, self.what)

    def _probe(self, timeout: float) -> None:
        now = time.monotonic()
        probes: dict[int, Any] = {}
        for i, client in enumerate(self.clients):
            if _known_id(client.connection_pool) is not None or self._is_suspended(i, now):
                continue
            conn = None
            try:
                conn = self._open(i, timeout)
                conn.send_command("INFO", "server")
                probes[i] = conn
            except _REDIS_ERRORS as exc:
                if conn is not None:
                    conn.disconnect()
                if isinstance(exc, (TimeoutError, rex.TimeoutError)):  # else: the grant reports it
                    self._suspended[i] = now + _suspension(timeout)
                    _share_suspension(client.connection_pool, self._suspended[i], exc)
        deadline = time.monotonic() + timeout
        for i, conn in probes.items():
            pool = self.clients[i].connection_pool
            try:
                if conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                    _learn_id(pool, conn.read_response())
                else:
                    self._suspended[i] = time.monotonic() + _suspension(timeout)
                    _share_suspension(pool, self._suspended[i], None)
            except rex.ResponseError:
                pass  # INFO refused (an ACL): this master is not checked
            except _REDIS_ERRORS as exc:
                if isinstance(exc, (TimeoutError, rex.TimeoutError)):  # else: the grant reports it
                    self._suspended[i] = time.monotonic() + _suspension(timeout)
                    _share_suspension(pool, self._suspended[i], exc)
            finally:
                conn.disconnect()

    def _drop(
        self,
        i: int,
        now: float,
        timeout: float,
        *,
        suspend: bool = True,
        cause: BaseException | None = None,
        owed: int = 0,
        bound: float = _LINGER,
    ) -> None:
        """Stop using node ``i``'s connection: closed at once after a failure (``cause``), else
        kept open until the ``owed`` replies sent on it (plus the stragglers' still unread) are
        read (see ``_linger``)."""
        conn, self._conns[i] = self._conns[i], None
        owed = 0 if cause is not None else owed + len(self._unread[i])
        self._unread[i] = []
        self._pinned[i] = False
        if conn is not None:
            _linger(conn, owed, bound)
        if suspend:
            self._suspended[i] = now + _suspension(timeout)
            _share_suspension(self.clients[i].connection_pool, self._suspended[i], cause)

    def _is_suspended(self, i: int, now: float) -> bool:
        return self._suspended[i] > now or _shared_suspended(self.clients[i].connection_pool, now)

    def _drain(self, i: int, deadline: float, unloaded: list[Script]) -> bool:
        """Read the replies still owed on node ``i``'s connection; False if they are late.

        A straggler that answered NOSCRIPT did nothing (fine: it was not needed); its script is
        collected in ``unloaded`` and loaded once this fan-out's replies are all read.
        """
        conn = self._conns[i]
        while self._unread[i]:
            if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                return False
            script = self._unread[i].pop(0)
            try:
                conn.read_response()
            except rex.NoScriptError:
                unloaded.append(script)
            except rex.ResponseError:
                pass
        self._pinned[i] = False
        return True

    def _once_more(self, i: int, call: Eval, deadline: float, timeout: float) -> Any:
        try:
            conn = self._connection(i, timeout, fresh=True)
            conn.send_packed_command(_packed_eval(conn, call, by_sha=False))
            if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                # sent: it lands, or the lease expires
                self._drop(i, time.monotonic(), timeout, owed=1)
                return TIMED_OUT
            return conn.read_response()
        except rex.ResponseError as exc:
            return _error(exc, self.what)
        except _REDIS_ERRORS as exc:
            self._drop(i, time.monotonic(), timeout, cause=exc)
            return _error(exc, self.what)

    def _abandon_behind(self, i: int, abandon: Eval) -> None:
        conn = self._conns[i]
        try:
            conn.send_packed_command(_packed_eval(conn, abandon, by_sha=False), check_health=False)
            self._unread[i].append(abandon.script)
        except _REDIS_ERRORS as exc:
            self._drop(i, time.monotonic(), 0.0, suspend=False, cause=exc)

    def _load(self, i: int, scripts: list[Script], timeout: float) -> None:
        conn = self._conns[i]
        if conn is None or self._unread[i]:
            return
        try:
            for script in scripts:
                conn.send_packed_command(conn.pack_command("SCRIPT", "LOAD", script.source))
                if not conn.can_read(timeout=timeout):
                    raise TimeoutError("SCRIPT LOAD timed out")
                conn.read_response()
        except _REDIS_ERRORS as exc:
            self._drop(i, time.monotonic(), timeout, cause=exc)

    def _fan_out(self, step: FanOut) -> list[Any]:
        if self._pid != os.getpid():
            self._after_fork()
        if _lingering:
            reap_lingering()
        with self._lock:
            if not self._distinct and not step.reach_all:
                self._check_distinct(step.timeout)
            keep = False
            try:
                outcomes = self._fan_out_locked(step)
                # A won quorum (a lock now held) keeps its connections until its release.
                keep = step.quorum > 0 and not step.reach_all and _won(step, outcomes)
                return outcomes
            finally:
                if not keep:
                    self._checkin(step.timeout)

    def _fan_out_locked(self, step: FanOut) -> list[Any]:
        n = len(self.clients)
        outcomes: list[Any] = [TIMED_OUT] * n
        sent = [False] * n
        unawaited = [False] * n  # sent; the reply is read before the next request there
        now = time.monotonic()
        for i, call in enumerate(step.calls):
            suspended = self._is_suspended(i, now)
            if suspended and not step.reach_all:
                outcomes[i] = ConnectionUnavailable(
                    f"{self.what}: node {i} suspended after a failure"
                )
                continue
            for fresh in (False, True) if step.reach_all else (False,):
                try:
                    conn = self._connection(i, step.timeout, fresh=fresh)
                    # An unawaited release's reply is read later, where NOSCRIPT could only be
                    # noted: it goes by EVAL. Awaited ones answer NOSCRIPT in time or get an EVAL
                    # behind them.
                    # A release to a suspended master is not waited for at all: sent by EVAL
                    # (behind any straggler on this connection), which is then closed, as after
                    # a timeout; it lands when the master gets to it.
                    fire = step.wait and step.reach_all and suspended
                    later = not step.wait or fire
                    conn.send_packed_command(_packed_eval(conn, call, by_sha=not later))
                    sent[i] = not later
                    unawaited[i] = not step.wait
                    outcomes[i] = TIMED_OUT
                    if fire:
                        self._drop(
                            i,
                            time.monotonic(),
                            step.timeout,
                            suspend=False,
                            owed=1,
                            bound=max(_LINGER, step.late),
                        )
                    break
                except _REDIS_ERRORS as exc:
                    outcomes[i] = _error(exc, self.what)
                    self._drop(i, time.monotonic(), step.timeout, cause=exc)
        for i in range(n):
            if unawaited[i]:
                self._unread[i].append(step.calls[i].script)
        if not step.wait:
            return outcomes
        # The per-node timeout starts once every request is out.
        deadline = time.monotonic() + step.timeout
        unloaded: list[list[Script]] = [[] for _ in range(n)]
        for i in range(n):
            if not sent[i]:
                continue
            if _won(step, outcomes):
                # Decided: a quorum granted. The others' replies are left on their connections
                # (read before the next request there), and whatever they do lands before the
                # release, which travels on the same connection.
                for j in range(i, n):
                    if sent[j]:
                        self._unread[j].append(step.calls[j].script)
                        self._pinned[j] = True
                        sent[j] = False
                break
            if _hopeless(step, outcomes, sum(sent)):
                # Decided: a quorum is out of reach. The others keep their connection: their
                # abandon script goes right behind them and both replies are read later.
                for j in range(i, n):
                    if sent[j]:
                        self._unread[j].append(step.calls[j].script)
                        if step.abandon is not None:
                            self._abandon_behind(j, step.abandon[j])
                        sent[j] = False
                break
            conn = self._conns[i]
            try:
                # Past the deadline still poll (timeout 0): a stalled node read first must not
                # make the replies that already arrived from the others count as timed out.
                if not self._drain(i, deadline, unloaded[i]):
                    continue  # stays pending: abandoned below
                if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                    continue  # stays pending: abandoned below
                try:
                    outcomes[i] = conn.read_response()
                except rex.NoScriptError:
                    conn.send_packed_command(_packed_eval(conn, step.calls[i], by_sha=False))
                    if not conn.can_read(timeout=max(0.0, deadline - time.monotonic())):
                        raise _LateRetry from None
                    outcomes[i] = conn.read_response()
            except _LateRetry:
                continue  # stays pending: abandoned below
            except rex.ResponseError as exc:
                outcomes[i] = _error(exc, self.what)
            except _REDIS_ERRORS as exc:
                outcomes[i] = _error(exc, self.what)
                self._drop(i, time.monotonic(), step.timeout, cause=exc)
                if step.reach_all:
                    # A pooled connection the server closed (say, it restarted): once more on a
                    # new one. A release is idempotent, so a second landing is harmless.
                    outcomes[i] = self._once_more(i, step.calls[i], deadline, step.timeout)
            sent[i] = False
        for i in range(n):
            if not sent[i]:
                continue
            outcomes[i] = TIMED_OUT
            conn = self._conns[i]
            owed = 1  # the request itself
            failed: BaseException | None = None
            try:
                if step.abandon is not None:
                    conn.send_packed_command(
                        _packed_eval(conn, step.abandon[i], by_sha=False), check_health=False
                    )
                    owed += 1
                elif step.reach_all:
                    # The late master may answer our EVALSHA with NOSCRIPT (its script cache
                    # lost): the EVAL behind it lands either way. A release is idempotent.
                    conn.send_packed_command(
                        _packed_eval(conn, step.calls[i], by_sha=False), check_health=False
                    )
                    owed += 1
            except _REDIS_ERRORS as exc:
                failed = exc
            finally:
                self._drop(
                    i,
                    time.monotonic(),
                    step.timeout,
                    cause=failed,
                    owed=owed,
                    bound=max(_LINGER, step.late),
                )
        for i, scripts in enumerate(unloaded):
            if scripts:
                self._load(i, scripts, step.timeout)
        return outcomes


class AsyncFanOutDriver(AsyncDriver):
    """The asyncio twin of ``SyncFanOutDriver``: one task per node, decided at the quorum.

    A fan-out returns as soon as its outcome is decided (a quorum granted, a quorum out of reach,
    or every node answered). Nodes still owing a reply keep their task: it reads the reply, or
    writes the ``abandon`` script behind the request on the same connection once the per-node
    timeout passes. The next request to that node waits for that task first, so whatever a
    straggler does lands before, say, the release that follows it.

    One event loop at a time: a call on another loop while one is in progress on a loop that
    still runs (two threads, each with its loop, sharing a handle) raises ``LockError`` before
    anything is sent or any state changes; the node tasks another loop left behind are waited
    for (bounded) before the handle moves to the new loop.
    """

    __slots__ = (
        "_active",
        "_distinct",
        "_guard",
        "_hint",
        "_lingering",
        "_live",
        "_loop",
        "_pending",
        "_pid",
        "_suspended",
        "clients",
    )

    def __init__(self, clients: Sequence[Any], retry: RetryPolicy, what: str) -> None:
        super().__init__(clients[0], retry, what)
        self.clients = list(clients)
        self._live = list(clients)  # each client, or its twin for the running loop (for_loop)
        self._pid = os.getpid()
        self._suspended = [0.0] * len(self.clients)
        self._pending: list[asyncio.Task[None] | None] = [None] * len(self.clients)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._active = 0  # protocols running on self._loop
        self._guard = threading.Lock()  # _loop, _active and the swap: one thread at a time
        self._hint = 0.05  # the last per-node timeout seen (bounds the wait for stragglers)
        self._distinct = False  # every master's server identity known, none twice
        self._lingering: set[asyncio.Task[None]] = set()  # connections kept until answered

    def _after_fork(self) -> None:
        """In a forked child: drop the connections the clients' pools inherited from the parent
        (their sockets closed in the child only, never through the parent's event loop)."""
        self._pid = os.getpid()
        self._lingering = set()
        self._suspended = [0.0] * len(self.clients)
        self._pending = [None] * len(self.clients)
        self._loop = None
        self._active = 0
        self._guard = threading.Lock()
        for client in self._live:
            # never pool.reset() alone, nor disconnect(): closing the inherited transports
            # goes through the parent's epoll and stalls the parent's connections
            forget_inherited_async_pool(client.connection_pool)

    async def run(self, protocol: Protocol[Any]) -> Any:
        """Drive ``protocol`` on the running loop, which holds the handle until it returns."""
        try:
            await self._claim(asyncio.get_running_loop())
        except BaseException:
            protocol.close()
            raise
        try:
            return await super().run(protocol)
        finally:
            with self._guard:
                self._active = max(0, self._active - 1)

    def _elsewhere(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop | None:
        """The other loop that still runs and may still use the handle, if any."""
        other = self._loop
        if other is None or other is loop or other.is_closed() or not other.is_running():
            return None  # a loop that stopped or closed runs none of its tasks again
        return other

    async def _claim(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make ``loop`` the handle's loop for one protocol (see the class docstring)."""
        waited_until = time.monotonic() + max(1.0, 20 * self._hint)
        while True:
            with self._guard:
                if self._pid != os.getpid():
                    self._after_fork()
                other = self._elsewhere(loop)
                if other is not None and self._active:
                    raise LockError(
                        f"{self.what}: called on one event loop while a call is in progress on "
                        "another that is still running (two threads, each with its loop?); a "
                        "handle serves one loop at a time: give each loop its own handle, or "
                        "retry once the other call returned"
                    )
                stragglers = other is not None and any(
                    t is not None and not t.done() for t in self._pending
                )
                if not stragglers or time.monotonic() >= waited_until:
                    if self._loop is not loop:
                        # Tasks of another loop cannot be awaited here, nor its connections
                        # used: each master's client for this loop (a twin, for aconnect()'s).
                        self._live = [for_loop(c, loop, self.what) for c in self.clients]
                        self._loop = loop
                        self._pending = [None] * len(self.clients)
                        self._active = 0
                    self._active += 1
                    return
            # the other loop's node tasks still read replies or send abandons: let them land
            # first (they end within their own bounds), as a node's next request always does
            await asyncio.sleep(0.002)

    async def wait_idle(self) -> None:
        """Wait for the node tasks still reading a straggler's reply (or abandoning it)."""
        if self._loop is not asyncio.get_running_loop():
            return
        pending = {t for t in self._pending if t is not None and not t.done()}
        if pending:  # bounded: a late release may keep trying for as long as its lease lasts
            await asyncio.wait(pending, timeout=max(1.0, 20 * self._hint))

    def _is_suspended(self, i: int, now: float) -> bool:
        return self._suspended[i] > now or _shared_suspended(self.clients[i].connection_pool, now)

    def _suspend(self, i: int, until: float, cause: BaseException | None) -> None:
        self._suspended[i] = until
        _share_suspension(self.clients[i].connection_pool, until, cause)

    async def _check_distinct(self, timeout: float) -> None:
        """The twin of ``SyncFanOutDriver._check_distinct``: one ``INFO server`` per master whose
        identity is not known yet, all at once, each bounded by ``timeout``."""
        now = time.monotonic()

        async def probe(i: int) -> None:
            pool = self.clients[i].connection_pool
            try:
                info = await asyncio.wait_for(
                    self._live[i].execute_command("INFO", "server"), timeout
                )
            except rex.ResponseError:
                return  # INFO refused (an ACL): this master is not checked
            except (*_REDIS_ERRORS, TimeoutError) as exc:
                if isinstance(exc, (TimeoutError, rex.TimeoutError)):  # else: the grant reports it
                    self._suspend(i, time.monotonic() + _suspension(timeout), None)
                return
            _learn_id(pool, info)

        todo = [
            i
            for i, client in enumerate(self.clients)
            if _known_id(client.connection_pool) is None and not self._is_suspended(i, now)
        ]
        if todo:
            await asyncio.gather(*(probe(i) for i in todo))
        self._distinct = _refuse_duplicates(self.clients, self.what)

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    @staticmethod
    async def _linger(pool: Any, conn: Any, owed: int, bound: float) -> None:
        """Read the ``owed`` replies (at most ``bound`` seconds), then close ``conn``: closing it
        with replies still to come would answer them with a TCP reset (see ``_linger`` above)."""

        async def read_all() -> None:
            for _ in range(owed):
                with contextlib.suppress(rex.ResponseError):
                    await conn.read_response(disconnect_on_error=False)

        try:
            await asyncio.wait_for(read_all(), bound)
        except (*_REDIS_ERRORS, TimeoutError, asyncio.TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            with contextlib.suppress(Exception):
                await pool.release(conn)

    async def _send_late(self, pool: Any, call: Eval, bound: float) -> None:
        conn = None
        try:
            conn = await asyncio.wait_for(pool.get_connection(), bound)
            await conn.send_packed_command(_packed_eval(conn, call, by_sha=False))
            await asyncio.wait_for(conn.read_response(disconnect_on_error=False), bound)
        except (*_REDIS_ERRORS, TimeoutError):
            if conn is not None:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await conn.disconnect()
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await pool.release(conn)

    async def _step(self, step: Any) -> Any:
        if isinstance(step, FanOut):
            return await self._fan_out(step)
        if isinstance(step, Cleanup) and isinstance(step.step, FanOut):
            task = asyncio.ensure_future(self._fan_out(step.step))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                step.errors.append(exc)
                return None
        return await super()._step(step)

    async def _fan_out(self, step: FanOut) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._pid != os.getpid():  # not through run(): claim now
            await self._claim(loop)
            with self._guard:
                self._active = max(0, self._active - 1)
        self._hint = step.timeout
        if not self._distinct and not step.reach_all:
            await self._check_distinct(step.timeout)
        n = len(self.clients)
        outcomes: list[Any] = [TIMED_OUT] * n
        decided = asyncio.Event()
        deadline = time.monotonic() + step.timeout
        state: dict[str, Any] = {"left": n, "result": None}
        crashed: list[Exception] = []
        out = asyncio.Event()
        unsent = set(range(n))

        def mark(i: int) -> None:
            unsent.discard(i)
            if not unsent:
                out.set()

        settled: set[int] = set()

        def settle(i: int, outcome: Any) -> None:
            mark(i)
            if i in settled:  # reported already (not waited for): the task went on sending
                return
            settled.add(i)
            outcomes[i] = outcome
            state["left"] -= 1
            if state["result"] is None and (
                state["left"] == 0
                or _won(step, outcomes)
                or _hopeless(step, outcomes, state["left"])
            ):
                state["result"] = list(outcomes)  # a snapshot: stragglers settle later
                decided.set()

        for i in range(n):
            prev = self._pending[i]
            self._pending[i] = loop.create_task(
                self._one(i, step, prev, deadline, settle, crashed, mark)
            )
        if not step.wait:
            # Every request is out (or failed) when this returns; the replies are read by the
            # node tasks, which the next request to that node waits for.
            await out.wait()
            return [TIMED_OUT] * n
        # Cancelling the caller leaves the node tasks running to their deadline: a request sent
        # is always either answered or followed by its abandon script.
        if step.reach_all:
            # A release waits for no master longer than node_timeout, counted from here once:
            # one still busy (connecting, or behind its straggler) is reported as timed out and
            # its task still sends the release, in order.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(decided.wait(), max(0.0, deadline - time.monotonic()))
            if state["result"] is None:
                state["result"] = list(outcomes)
                for i in range(n):
                    settled.add(i)
        else:
            await decided.wait()
        if crashed:
            raise crashed[0]
        result: list[Any] = state["result"]
        return result

    async def _one(
        self,
        i: int,
        step: FanOut,
        prev: asyncio.Task[None] | None,
        deadline: float,
        settle: Any,
        crashed: list[Exception],
        mark: Any,
    ) -> None:
        pool = self._live[i].connection_pool  # read before any await: the step's own loop
        call = step.calls[i]
        suspended = self._is_suspended(i, time.monotonic())
        if suspended and not step.reach_all:
            settle(i, ConnectionUnavailable(f"{self.what}: node {i} suspended after a failure"))
            return
        if prev is not None and not prev.done() and not suspended:
            # Its request (or its abandon) lands before ours, but the wait is bounded by this
            # step's deadline (a late release may retry for max(1 s, 20 x timeout)).
            await asyncio.wait({prev}, timeout=max(0.0, deadline - time.monotonic()))
            if not prev.done():
                if not step.reach_all:
                    settle(i, ConnectionUnavailable(f"{self.what}: node {i} is still busy"))
                    return
                # The caller has its answer; the release still goes out, behind the earlier one.
                settle(i, TIMED_OUT)
                await asyncio.wait({prev})
                await self._send_late(pool, call, max(1.0, 20 * step.timeout, step.late))
                return
        if step.reach_all and self._is_suspended(i, time.monotonic()):
            # A release to a suspended master (maybe just now, by the straggler waited for):
            # not waited for, but sent, behind its straggler.
            settle(i, TIMED_OUT)
        if prev is not None and not prev.done():
            await asyncio.wait({prev})  # bounded by its own bounds; ours goes out behind it
        if step.reach_all:
            # Waiting for the straggler must not cost the release its chance to go out.
            deadline = max(deadline, time.monotonic() + step.timeout)
        conn = None
        sent = False
        started = time.monotonic()
        try:
            # Opening a connection to a stalled node may wait for socket_timeout: bound it.
            conn = await asyncio.wait_for(
                pool.get_connection(), max(0.0, deadline - time.monotonic())
            )
            await conn.send_packed_command(_packed_eval(conn, call))
            sent = True
            mark(i)
            try:
                reply = await asyncio.wait_for(
                    conn.read_response(disconnect_on_error=False),
                    max(0.0, deadline - time.monotonic()),
                )
            except rex.NoScriptError:
                await conn.send_packed_command(_packed_eval(conn, call, by_sha=False))
                reply = await asyncio.wait_for(
                    conn.read_response(disconnect_on_error=False),
                    max(0.0, deadline - time.monotonic()),
                )
        except rex.ResponseError as exc:
            settle(i, _error(exc, self.what))
        except asyncio.CancelledError:  # only when the loop shuts down
            settle(i, TIMED_OUT)
            if conn is not None:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await conn.disconnect()  # a reply may be half read
            raise
        except (*_REDIS_ERRORS, TimeoutError) as exc:
            timed_out = isinstance(exc, (TimeoutError, asyncio.TimeoutError))
            settle(i, TIMED_OUT if timed_out and sent else _error(exc, self.what))
            # From when the failure was due: a deadline seen late (the loop did not run, say a
            # sync bridge between calls) must not suspend a master that is fine by now.
            # Nor one left less than half its timeout by the straggler it waited for.
            late = timed_out or isinstance(exc, rex.TimeoutError)
            at = min(time.monotonic(), deadline) if late else time.monotonic()
            if not late or at - started >= step.timeout / 2:
                self._suspend(i, at + _suspension(step.timeout), None if timed_out else exc)
            behind = step.abandon[i] if step.abandon is not None else None
            if behind is None and step.reach_all:
                behind = call  # a late EVALSHA may meet NOSCRIPT: the EVAL behind it lands
            owed = 1 if sent and late else 0  # the request, unanswered
            if sent and behind is not None and conn is not None:
                try:
                    await conn.send_packed_command(
                        _packed_eval(conn, behind, by_sha=False), check_health=False
                    )
                    owed += 1 if late else 0
                except _REDIS_ERRORS:
                    owed = 0
            if conn is not None:
                if owed:
                    # Closed once both replies are read (see ``_linger``), by a task of its own:
                    # the node's next request goes out on another connection meanwhile.
                    self._keep(
                        asyncio.ensure_future(
                            self._linger(pool, conn, owed, max(_LINGER, step.late))
                        )
                    )
                    conn = None  # not given back to the pool below: the task does
                else:
                    with contextlib.suppress(*_REDIS_ERRORS):
                        await conn.disconnect()
            if step.reach_all and not sent:
                # A release that never went out (the node stalled while connecting): the caller
                # has its answer; this task (which the node's next request waits for) still
                # sends it, within a bounded time.
                await self._send_late(pool, call, max(1.0, 20 * step.timeout, step.late))
        except Exception as exc:  # not Redis's doing (a closed event loop, a bug): the caller's
            crashed.append(exc)
            settle(i, exc)
        else:
            settle(i, reply)
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await pool.release(conn)
