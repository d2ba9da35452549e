"""Celery tasks that run under a ``distlock.Lock``: ``@app.task(base=LockedTask, lock_name=...)``.

The lock's name is a template of the task's arguments (``"invoice:{invoice_id}"``: one lock per
invoice) or a callable of them; a field that names no argument is a ``ConfigError`` when Celery
builds the task class (at decoration on a finalized app or with ``lazy=False``, else when the app
finalizes: at the latest when a worker starts or the task is first sent). ``on_locked`` says what
a delivery does when another holds the lock: ``"retry"`` (the default: ``self.retry`` with
``lock_retry_countdown``, failing with ``LockNotAcquired`` once the retries are spent), ``"skip"``
(succeed at once with ``None``, the body not run) or ``"wait"`` (block the worker slot up to
``lock_wait_timeout``, then fail with ``LockNotAcquired``). The lease renews itself while the task
runs, so ``lock_ttl`` bounds only how long a killed worker keeps the lock. The fencing token is
``self.request.fencing_token`` (bound tasks; the handle is ``self.request.lock``) and the value
of a ``fencing_token`` parameter, which ``run`` may declare (with a default) to receive it.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from celery import Task  # type: ignore[import-untyped]

from distkit import ConfigError, LockNotAcquired, RedisConfig, connect
from distkit._fork import renew_locks_after_fork
from distkit._units import seconds

from .._core import check_client
from .._decorator import _namer
from .._lock import Lock

__all__ = ["ON_LOCKED", "TOKEN_PARAMETER", "LockedTask"]

log = logging.getLogger(__name__)

ON_LOCKED = ("retry", "skip", "wait")
"""The values of ``LockedTask.on_locked``."""

TOKEN_PARAMETER = "fencing_token"
"""A parameter of ``run`` with this name receives the fencing token."""

# Lock options that LockedTask sets itself (from its own attributes, or always).
_OWN_OPTIONS = frozenset({"ttl", "blocking_timeout"})
_LOCK_OPTIONS = frozenset(inspect.signature(Lock.__init__).parameters) - {
    "self",
    "client",
    "name",
}


class _ClientCache:
    """Clients that ``LockedTask`` built from a URL or ``RedisConfig``, one per task class."""

    _FORK_LOCKS = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[type[Any], Any] = {}
        renew_locks_after_fork(self)

    def get(self, cls: type[Any], config: str | RedisConfig) -> Any:
        with self._lock:
            client = self._clients.get(cls)
            if client is None:
                client = self._clients[cls] = connect(config)
            return client


_CLIENTS = _ClientCache()


def _run_signature(cls: type[Any]) -> inspect.Signature:
    """The signature of ``cls.run`` as a caller sees it (without ``self`` for a method)."""
    static = inspect.getattr_static(cls, "run")
    if isinstance(static, staticmethod):
        return inspect.signature(static.__func__)
    sig = inspect.signature(static)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _check_client(client: Any, where: str) -> None:
    if client is None or isinstance(client, (str, RedisConfig)):
        return
    check_client(client, want_async=False, cls=where)


class LockedTask(Task):  # type: ignore[misc]
    """A Celery task base whose every run holds a ``distlock.Lock`` named from its arguments.

    Set the ``lock_*`` attributes as task options (``@app.task(base=LockedTask,
    lock_name="invoice:{invoice_id}", on_locked="skip")``) or on a subclass. They are validated
    when Celery builds the task class: a bad value is a ``ConfigError`` naming it.
    """

    lock_name: ClassVar[str | Callable[..., str] | None] = None
    """A template of the task's arguments (``"invoice:{invoice_id}"``), a fixed name, or a
    callable that takes the task's arguments and returns the name. Required."""

    lock_client: ClassVar[Any] = None
    """A sync redis-py client, a redis URL or a ``distkit.RedisConfig`` (a client is built from
    it once per process); ``None``: the app's ``distlock_client`` setting."""

    lock_ttl: ClassVar[float] = 30.0
    """The lease in seconds; renewed while the task runs, so it bounds how long a killed worker
    keeps the lock."""

    on_locked: ClassVar[str] = "retry"
    """What a delivery does when the lock is held: ``"retry"``, ``"skip"`` or ``"wait"``."""

    lock_wait_timeout: ClassVar[float | None] = None
    """``"wait"``: how long to wait before failing with ``LockNotAcquired``; ``None``: no limit."""

    lock_retry_countdown: ClassVar[float] = 1.0
    """``"retry"``: seconds until the retried delivery."""

    lock_max_retries: ClassVar[int | None] = None
    """``"retry"``: retries before failing with ``LockNotAcquired``; ``None``: the task's
    ``max_retries``."""

    lock_options: ClassVar[Mapping[str, Any]] = {}
    """Further ``Lock`` keyword arguments (``prefix``, ``retry``, ``renew_interval``, ...);
    ``auto_renew`` is on unless set to ``False`` here."""

    _distlock_namer: ClassVar[Callable[..., str] | None] = None
    _distlock_inject: ClassVar[bool] = False
    _distlock_signature: ClassVar[inspect.Signature]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.getattr_static(cls, "run") is inspect.getattr_static(Task, "run"):
            return  # an abstract base: validated in the subclasses that define run
        where = f"LockedTask {getattr(cls, 'name', None) or cls.__qualname__}"
        if cls.lock_name is None:
            raise ConfigError(f"{where}: lock_name is required (e.g. 'invoice:{{invoice_id}}')")
        sig = _run_signature(cls)
        run = inspect.getattr_static(cls, "run")
        fn = run.__func__ if isinstance(run, staticmethod) else run
        namer = _namer(cls.lock_name, fn, signature=sig, label=f"{where} lock_name")
        token = sig.parameters.get(TOKEN_PARAMETER)
        if token is not None:
            if token.default is inspect.Parameter.empty:
                raise ConfigError(
                    f"{where}: the {TOKEN_PARAMETER!r} parameter receives the fencing token; give "
                    f"it a default ({TOKEN_PARAMETER}: int | None = None) so that callers may "
                    "leave it out"
                )
            if isinstance(cls.lock_name, str) and f"{{{TOKEN_PARAMETER}" in cls.lock_name:
                raise ConfigError(
                    f"{where} lock_name {cls.lock_name!r} names {TOKEN_PARAMETER!r}, which the "
                    "lock itself fills in"
                )
        # a staticmethod: a plain function stored on the class would bind the task as its self
        cls._distlock_namer = None if namer is None else staticmethod(namer)
        cls._distlock_inject = token is not None
        cls._distlock_signature = sig
        if cls.on_locked not in ON_LOCKED:
            raise ConfigError(
                f"{where}: on_locked must be one of {ON_LOCKED}, got {cls.on_locked!r}"
            )
        if cls.lock_wait_timeout is not None:
            seconds(cls.lock_wait_timeout, field=f"{where} lock_wait_timeout", allow_zero=True)
        seconds(cls.lock_retry_countdown, field=f"{where} lock_retry_countdown", allow_zero=True)
        retries = cls.lock_max_retries
        if retries is not None and (
            not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
        ):
            raise ConfigError(f"{where}: lock_max_retries must be an int >= 0, got {retries!r}")
        if not isinstance(cls.lock_options, Mapping):
            raise ConfigError(f"{where}: lock_options must be a mapping, got {cls.lock_options!r}")
        unknown = set(cls.lock_options) - (_LOCK_OPTIONS - _OWN_OPTIONS)
        if unknown:
            raise ConfigError(
                f"{where}: lock_options {sorted(unknown)} are not Lock options (ttl is lock_ttl; "
                "waiting is on_locked='wait' with lock_wait_timeout)"
            )
        _check_client(cls.lock_client, f"{where} lock_client")
        # every Lock option checked now, on a client that does no I/O until its first command
        probe = connect("redis://127.0.0.1:6379/0")
        try:
            Lock(probe, "celery-template", **cls._distlock_lock_kwargs(where))
        finally:
            probe.close()

    @classmethod
    def _distlock_lock_kwargs(cls, where: str) -> dict[str, Any]:
        return {
            "auto_renew": True,
            **cls.lock_options,
            "ttl": seconds(cls.lock_ttl, field=f"{where} lock_ttl"),
        }

    def _distlock_client(self) -> Any:
        client = self.lock_client
        if client is None:
            client = self.app.conf.get("distlock_client")
            if client is None:
                raise ConfigError(
                    f"LockedTask {self.name}: no lock_client, and the app has no "
                    "distlock_client setting"
                )
            _check_client(client, "the distlock_client setting")
        if isinstance(client, (str, RedisConfig)):
            return _CLIENTS.get(type(self), client)
        return client

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task holding its lock; what happens when it is held is ``on_locked``.

        Raises:
            LockNotAcquired: ``"wait"`` timed out, or ``"retry"`` spent its retries.
            LockLost: the lease lapsed while the task ran (its result is discarded).
            ConnectionUnavailable: Redis could not be reached (the task never runs unlocked).
        """
        namer = self._distlock_namer
        name = str(self.lock_name) if namer is None else namer(*args, **kwargs)
        lock = Lock(self._distlock_client(), name, **self._distlock_lock_kwargs(self.name))
        wait = self.on_locked == "wait"
        timeout = self.lock_wait_timeout if wait else None
        if not lock.acquire(blocking=wait, timeout=timeout):
            return self._distlock_locked(name, timeout)
        token = lock.fencing_token
        try:
            if self._distlock_inject:  # replaces a value the caller passed, by name or position
                bound = self._distlock_signature.bind_partial(*args, **kwargs)
                bound.arguments[TOKEN_PARAMETER] = token
                args, kwargs = bound.args, dict(bound.kwargs)
            self.push_request(fencing_token=token, lock=lock)
            try:
                result = super().__call__(*args, **kwargs)
            finally:
                self.pop_request()
        except BaseException as exc:
            lock.__exit__(type(exc), exc, exc.__traceback__)
            raise
        lock.__exit__(None, None, None)  # LockLost if the lease lapsed meanwhile
        return result

    def _distlock_locked(self, name: str, timeout: float | None) -> Any:
        if self.on_locked == "skip":
            log.info("task %s skipped: lock %r is held", self.name, name)
            return None
        if self.on_locked == "wait":
            raise LockNotAcquired(f"lock {name!r} not acquired within {timeout}s", name=name)
        exc = LockNotAcquired(f"lock {name!r} is held", name=name)
        raise self.retry(
            exc=exc,
            countdown=self.lock_retry_countdown,
            max_retries=self.lock_max_retries,  # None: the task's max_retries
        )
