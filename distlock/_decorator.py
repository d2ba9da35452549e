"""``@locked``: run a function (plain or coroutine) while holding a lock."""

from __future__ import annotations

import functools
import inspect
import string
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar, overload

from distkit import ConfigError
from distkit._clients import is_config

from ._core import check_client
from ._lock import AsyncLock, Lock
from ._redlock import AsyncRedlock, Redlock

__all__ = ["locked"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


_NameFn = Callable[..., str]


def _fields(template: str) -> list[str]:
    """Every replacement field of ``template``, those nested in format specs included."""
    out = []
    for _, field, spec, _ in string.Formatter().parse(template):
        if field is not None:
            out.append(field)
        if spec:
            out.extend(_fields(spec))
    return out


def _namer(
    name: str | _NameFn,
    fn: Callable[..., Any],
    *,
    signature: inspect.Signature | None = None,
    label: str = "@locked name",
) -> Callable[..., str] | None:
    """``None`` for a fixed name; else a function of the call's arguments that builds the name.

    A template's fields name the decorated function's parameters (``"invoice:{invoice_id}"``,
    ``"{order.id}"``, ``"{ids[0]}"``); a field that names no parameter, or a positional field,
    is a ``ConfigError`` now rather than at the first call. ``signature`` overrides ``fn``'s
    (a bound method's, without ``self``); ``label`` names the option in error messages.
    """
    if callable(name):
        make: _NameFn = name

        def from_callable(*args: Any, **kwargs: Any) -> str:
            out = make(*args, **kwargs)
            if not isinstance(out, str):
                raise ConfigError(f"{label} callable returned {out!r}, not a str")
            return out

        return from_callable
    if not isinstance(name, str):
        raise ConfigError(f"{label} must be a str, a template or a callable, got {name!r}")
    try:
        fields = _fields(name)
    except ValueError as exc:
        raise ConfigError(f"{label} template {name!r} is malformed: {exc}") from None
    if not fields:
        return None
    sig = inspect.signature(fn) if signature is None else signature
    params = sig.parameters
    for field in fields:
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ConfigError(
                f"{label} template {name!r}: fields must name parameters, got {{{field}}}"
            )
        if root not in params or params[root].kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            raise ConfigError(
                f"{label} template {name!r} names {root!r}, which is not a parameter of "
                f"{getattr(fn, '__qualname__', fn)!r} (parameters: {', '.join(params) or 'none'})"
            )

    def from_template(*args: Any, **kwargs: Any) -> str:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        for value in bound.arguments.values():
            kind: Any = type(value)
            if kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__:
                raise ConfigError(
                    f"{label} template {name!r}: a {kind.__name__} has no stable text "
                    "(its str() is a memory address, different in every process); name one of "
                    "its attributes ('{order.id}') or pass a callable"
                )
        try:
            return name.format_map(bound.arguments)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"{label} template {name!r} cannot be formatted with this call's "
                f"arguments: {type(exc).__name__}: {exc}"
            ) from exc

    return from_template


class _Locked:
    def __init__(self, client: Any, name: str | _NameFn, options: dict[str, Any]) -> None:
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
        options = self.options
        namer = _namer(self.name, fn)
        # a fixed name, or a placeholder that validates everything but the name now
        name = "locked-template" if namer is not None else self.name
        redlock = isinstance(self.client, (list, tuple)) or is_config(self.client, "RedlockConfig")
        if inspect.iscoroutinefunction(fn):
            async_cls: Any = AsyncRedlock if redlock else AsyncLock
            client = self.client
            if is_config(client, "RedlockConfig"):
                from distkit import aconnect

                client = [aconnect(master) for master in client.masters]
            elif not redlock:
                check_client(client, want_async=True, cls="@locked (coroutine function)")
            async_cls(client, name, **options)  # validate everything at decoration time

            @functools.wraps(fn)
            async def async_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                called = name if namer is None else namer(*args, **kwargs)
                async with async_cls(client, called, **options):
                    return await fn(*args, **kwargs)

            return async_wrapper
        sync_cls: Any = Redlock if redlock else Lock
        client = self.client
        if is_config(client, "RedlockConfig"):
            from distkit import connect

            client = [connect(master) for master in client.masters]
        elif not redlock:
            check_client(client, want_async=False, cls="@locked")
        sync_cls(client, name, **options)

        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
            called = name if namer is None else namer(*args, **kwargs)
            with sync_cls(client, called, **options):
                return fn(*args, **kwargs)

        return wrapper


def locked(client: Any, name: str | Callable[..., str], **options: Any) -> _Locked:
    """Decorate a function so that each call runs inside ``with Lock(client, name, **options)``.

    ``name`` is a fixed name, a template formatted with the call's bound arguments
    (``@locked(client, "invoice:{invoice_id}")``: one lock per invoice; defaults apply; attribute
    and index fields such as ``"{order.id}"`` work), or a callable that takes the call's
    arguments and returns the name.

    Coroutine functions get an ``AsyncLock`` (pass an asyncio client); a list of clients or a
    ``RedlockConfig`` gives a ``Redlock`` / ``AsyncRedlock``. Each call uses a new handle, so
    concurrent calls exclude each other. ``options`` are the lock's keyword arguments (``ttl``,
    ``blocking_timeout``, ``auto_renew``...).

    Raises:
        ConfigError: the client does not match the function's kind, an option is invalid, or a
            template names something that is not a parameter (at decoration time).
    """
    return _Locked(client, name, options)
