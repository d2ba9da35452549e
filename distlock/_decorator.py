"""``@locked``: run a function (plain or coroutine) while holding a lock."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from distkit import ConfigError

from ._core import check_client
from ._lock import AsyncLock, Lock

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
        client, name, options = self.client, self.name, self.options
        if inspect.iscoroutinefunction(fn):
            check_client(client, want_async=True, cls="@locked (coroutine function)")
            AsyncLock(client, name, **options)  # validate the options at decoration time

            @functools.wraps(fn)
            async def async_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                async with AsyncLock(client, name, **options):
                    return await fn(*args, **kwargs)

            return async_wrapper
        check_client(client, want_async=False, cls="@locked")
        Lock(client, name, **options)

        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            with Lock(client, name, **options):
                return fn(*args, **kwargs)

        return wrapper


def locked(client: Any, name: str, **options: Any) -> _Locked:
    """Decorate a function so that each call runs inside ``with Lock(client, name, **options)``.

    Coroutine functions get an ``AsyncLock`` (pass an asyncio client); each call uses a new
    handle, so concurrent calls exclude each other. ``options`` are ``Lock``'s keyword arguments
    (``ttl``, ``blocking_timeout``, ``auto_renew``...).

    Raises:
        ConfigError: the client does not match the function's kind, or an option is invalid.
    """
    return _Locked(client, name, options)
