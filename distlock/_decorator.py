"""``@locked``: run a function (plain or coroutine) while holding a lock."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from distkit import ConfigError, RedlockConfig, aconnect, connect

from ._core import check_client
from ._lock import AsyncLock, Lock
from ._redlock import AsyncRedlock, Redlock

__all__ = ["locked"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _Locked:
    def __init__(self, client: Any, name: str, options: dict[str, Any]) -> None:
        self.client = client
        self.name = name
        self.options = options

    @overload
    def __call__(self, fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]: ...
    @overload
    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R]: ...
    def __call__(self, fn: Callable[_P, Any]) -> Callable[_P, Any]:
        if not callable(fn):
            raise ConfigError(f"@locked decorates a function, got {fn!r}")
        name, options = self.name, self.options
        redlock = isinstance(self.client, (list, tuple, RedlockConfig))
        if inspect.iscoroutinefunction(fn):
            async_cls: Any = AsyncRedlock if redlock else AsyncLock
            client = self.client
            if isinstance(client, RedlockConfig):
                client = [aconnect(master) for master in client.masters]
            elif not redlock:
                check_client(client, want_async=True, cls="@locked (coroutine function)")
            async_cls(client, name, **options)  # validate everything at decoration time

            @functools.wraps(fn)
            async def async_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                async with async_cls(client, name, **options):
                    return await fn(*args, **kwargs)

            return async_wrapper
        sync_cls: Any = Redlock if redlock else Lock
        client = self.client
        if isinstance(client, RedlockConfig):
            client = [connect(master) for master in client.masters]
        elif not redlock:
            check_client(client, want_async=False, cls="@locked")
        sync_cls(client, name, **options)

        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            with sync_cls(client, name, **options):
                return fn(*args, **kwargs)

        return wrapper


def locked(client: Any, name: str, **options: Any) -> _Locked:
    """Decorate a function so that each call runs inside ``with Lock(client, name, **options)``.

    Coroutine functions get an ``AsyncLock`` (pass an asyncio client); a list of clients or a
    ``RedlockConfig`` gives a ``Redlock`` / ``AsyncRedlock``. Each call uses a new handle, so
    concurrent calls exclude each other. ``options`` are the lock's keyword arguments (``ttl``,
    ``blocking_timeout``, ``auto_renew``...).

    Raises:
        ConfigError: the client does not match the function's kind, or an option is invalid.
    """
    return _Locked(client, name, options)
