"""``@cached``: read-through caching of plain functions, coroutine functions and methods.

Keys are canonical (``_keys.call_key``): the function's qualified name, an optional version and
the bound arguments with defaults applied. For a method (defined in a class body, first
parameter named ``self`` or ``cls``, called as an instance or class method; not a
``staticmethod``, not a plain function) that first argument is not part of the key: every
instance shares the entries, and
``invalidate`` / ``key_for`` take the method's arguments with or without the instance
(``repo.get.invalidate(7)``, ``Repo.get.invalidate(repo, 7)`` and ``Repo.get.invalidate(7)``
are the same). Results that depend on the instance need ``key=``. A name shared by different
functions (lambdas, closures of one factory) is refused: ``name=`` gives each its own.
Framework objects are not part of a key: a parameter annotated with a type registered by
``register_unkeyed`` (``distcache.contrib.starlette`` registers Starlette's and FastAPI's
request, response and background-task types), or an argument that is an instance of one, is
left out, and ``invalidate`` / ``key_for`` may omit such a parameter.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import sys
import threading
import typing
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from distkit import ConfigError

from ._cache import AsyncCache, Cache
from ._core import PLAIN_KEY_MAX, CacheCore, Seconds, TagArgs
from ._keys import arg_text, call_key, check_version, unkeyed_annotation

__all__ = ["AsyncCachedFunction", "AsyncCachedMethod", "CachedFunction", "CachedMethod", "cached"]

_P = ParamSpec("_P")
_P2 = ParamSpec("_P2")
_R = TypeVar("_R")
_R2 = TypeVar("_R2")
_R_co = TypeVar("_R_co", covariant=True)
_S = TypeVar("_S")
_S_contra = TypeVar("_S_contra", contravariant=True)

_FROM_CACHE: Any = type("_FromCache", (), {"__repr__": lambda self: "<from cache>"})()
_NO_SELF = object()
_SIMPLE_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_MAX_WRAPPER_DEPTH = 16
_MEMO_SIZE = 4096
_OWNERS_KEPT = 256  # classes whose first-argument binding a keyer remembers
# Immutable, and hashed by value: the only arguments whose key may be remembered. (A mutable
# object hashed by identity, e.g. a dataclass(eq=False), could change after its key was stored.)
_MEMO_TYPES = frozenset({str, int, float, bool, bytes, type(None)})
_NAME = re.compile(r"[A-Za-z0-9_.:/\-]{1,200}")
# The function that owns each name, by namespace (its epoch key: prefix and namespace), for the
# life of the process (see _claim): shared by every cache handle, and independent of when
# handles are collected. Not by server: a client cannot tell two spellings of one server
# (localhost / 127.0.0.1, a DNS alias, a proxy) apart without asking it, and a name refused
# costs a name=, while a name shared mixes two functions' entries.
_NAMES: dict[str, dict[str, tuple[weakref.ref[Any], Any]]] = {}
_NAMES_GUARD = threading.Lock()


def _renew_names_guard() -> None:
    global _NAMES_GUARD
    _NAMES_GUARD = threading.Lock()  # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_renew_names_guard)


class CachedFunction(Protocol[_P, _R_co]):
    """A function wrapped by ``@cached`` (sync): call it, or drop / name one call's entry."""

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R_co:
        """Return the cached result of this call, computing and storing it on a miss."""

    def invalidate(self, *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """Delete the entry of this call (``True`` if one was cached)."""

    def key_for(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of this call (``cache.get(f.key_for(...))`` reads its entry)."""

    @overload
    def __get__(
        self: CachedFunction[Concatenate[_S, _P2], _R2], obj: None, owner: type[_S]
    ) -> CachedMethod[_S, _P2, _R2]: ...
    @overload
    def __get__(self, obj: None, owner: type[Any]) -> CachedFunction[_P, _R_co]: ...
    @overload
    def __get__(
        self: CachedFunction[Concatenate[_S, _P2], _R2], obj: _S, owner: type[Any]
    ) -> CachedFunction[_P2, _R2]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        """Bind a method's instance, as functions do."""


class CachedMethod(Protocol[_S_contra, _P, _R_co]):
    """A ``@cached`` method seen through its class (``invalidate`` / ``key_for``: no instance)."""

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __call__(self, obj: _S_contra, /, *args: _P.args, **kwargs: _P.kwargs) -> _R_co:
        """Call the method on ``obj`` (cached)."""

    def invalidate(self, *args: _P.args, **kwargs: _P.kwargs) -> bool:
        """Delete the entry of this call, for every instance (``True`` if one was cached)."""

    def key_for(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of this call (the instance is not part of it)."""


class AsyncCachedFunction(Protocol[_P, _R_co]):
    """A coroutine function wrapped by ``@cached``: await it; ``invalidate`` is awaitable too."""

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _R_co]:
        """Return the cached result of this call, computing and storing it on a miss."""

    def invalidate(self, *args: _P.args, **kwargs: _P.kwargs) -> Awaitable[bool]:
        """Delete the entry of this call (``True`` if one was cached)."""

    def key_for(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of this call (``await cache.get(f.key_for(...))`` reads its entry)."""

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[_S, _P2], _R2], obj: None, owner: type[_S]
    ) -> AsyncCachedMethod[_S, _P2, _R2]: ...
    @overload
    def __get__(self, obj: None, owner: type[Any]) -> AsyncCachedFunction[_P, _R_co]: ...
    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[_S, _P2], _R2], obj: _S, owner: type[Any]
    ) -> AsyncCachedFunction[_P2, _R2]: ...
    def __get__(self, obj: Any, owner: type[Any]) -> Any:
        """Bind a method's instance, as functions do."""


class AsyncCachedMethod(Protocol[_S_contra, _P, _R_co]):
    """A ``@cached`` coroutine method seen through its class (``invalidate`` needs no instance)."""

    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __call__(
        self, obj: _S_contra, /, *args: _P.args, **kwargs: _P.kwargs
    ) -> Coroutine[Any, Any, _R_co]:
        """Call the method on ``obj`` (cached)."""

    def invalidate(self, *args: _P.args, **kwargs: _P.kwargs) -> Awaitable[bool]:
        """Delete the entry of this call, for every instance (``True`` if one was cached)."""

    def key_for(self, *args: _P.args, **kwargs: _P.kwargs) -> str:
        """The cache key of this call (the instance is not part of it)."""


class _Keyer(Generic[_P]):
    """Builds the canonical key (and the tags) of one call of ``fn``."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        key: Callable[..., str] | None,
        tags: TagArgs | Callable[..., Iterable[str]],
        typed: bool,
        version: str | None,
        core: CacheCore,
        name: str,
    ) -> None:
        self.fn = fn
        self.core = core
        self.name = name
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters.values())
        # A method's instance (or class) is not part of the key. The name of the first parameter
        # alone does not make a method: the function must also be defined in a class body (its
        # qualname's last enclosing scope is a class), and the call's first argument must be
        # bound to it as an instance or class method (not a staticmethod): see _bound().
        scopes = getattr(fn, "__qualname__", "").split(".")
        self.method = (
            bool(params)
            and params[0].name in ("self", "cls")
            and params[0].kind in _SIMPLE_KINDS
            and len(scopes) >= 2
            and scopes[-2] not in ("<locals>", "<lambda>")
        )
        self.attr = getattr(fn, "__name__", "")
        self._owners: dict[type, bool] = {}  # _bound's answers by class (bounded)
        # Parameters annotated with a registered framework type (a Request, a session) are not
        # part of the key, whatever they receive; key_for / invalidate may leave them out.
        self.skipped = frozenset(p.name for p in params if _unkeyed_param(fn, p))
        self.simple = not self.skipped and all(p.kind in _SIMPLE_KINDS for p in params)
        self.names = [p.name for p in params]
        self.defaults = [p.default for p in params]
        self.key = key
        self.tags = tags
        self.typed = typed
        self.version = version
        self.head = f"{self.name}@{version}:(" if version else f"{self.name}:("
        self.wrapper: Any = None
        # positional arguments -> Redis key. Only untyped (Python equality is then exactly
        # "same key"), only immutable scalars, only short keys: memory stays bounded.
        self.memo: dict[tuple[Any, ...], str] | None = None if typed or key else {}

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any], partial: bool = False) -> str:
        """The key of a call of the wrapper (a method's first argument is its instance);
        ``partial``: the unkeyed parameters may be missing (``key_for`` / ``invalidate``)."""
        if self.key is not None:
            return _checked_key(self.key(*args, **kwargs), self.name)
        names = self.names
        skip = 1 if self.method and args and self._bound(args[0]) else 0
        if not kwargs and len(args) == len(names) and self.simple:  # the hot case: no dict
            if len(args) - skip == 1:
                return self.head + arg_text(self.name, names[skip], args[skip], self.typed) + ")"
            typed, fname = self.typed, self.name
            texts = (
                arg_text(fname, p, v, typed) for p, v in zip(names[skip:], args[skip:], strict=True)
            )
            return self.head + ",".join(t for t in texts if t) + ")"
        arguments: dict[str, Any] | None = None
        if self.simple and not kwargs:  # the common case, without Signature.bind
            if len(args) == len(names):
                arguments = dict(zip(names, args, strict=True))
            elif len(args) < len(names):
                arguments = dict(zip(names, args, strict=False))
                for name, default in zip(
                    names[len(args) :], self.defaults[len(args) :], strict=True
                ):
                    if default is inspect.Parameter.empty:
                        arguments = None  # missing: let bind() raise the usual TypeError
                        break
                    arguments[name] = default
        if arguments is None:
            if partial and self.skipped:
                bound = self.signature.bind_partial(*args, **kwargs)
                bound.apply_defaults()
                self._check_missing(bound.arguments)
            else:
                bound = self.signature.bind(*args, **kwargs)
                bound.apply_defaults()
            arguments = bound.arguments
        if skip:
            arguments.pop(names[0])
        for name in self.skipped:
            arguments.pop(name, None)
        return call_key(self.name, self.version, arguments, self.typed)

    def _check_missing(self, arguments: dict[str, Any]) -> None:
        """Raise ``bind``'s ``TypeError`` for a missing parameter that is part of the key."""
        for param in self.signature.parameters.values():
            if (
                param.name not in arguments
                and param.name not in self.skipped
                and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)
            ):
                raise TypeError(f"missing a required argument: {param.name!r}")

    def redis_key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The Redis key of a call (memoized for repeated positional arguments)."""
        memo = self.memo
        if memo is None or kwargs:
            return self.core.entry_key(self.call(args, kwargs))
        if self.method:
            if not (args and self._bound(args[0])):  # a first argument that is part of the key:
                return self.core.entry_key(self.call(args, kwargs))  # not memoized (rare)
            part = args[1:]
        else:
            part = args
        # Types first: an IntEnum / Decimal / numpy scalar equal to a remembered int must not
        # get that int's key (its own key differs; the memo would make keys depend on history).
        # Within _MEMO_TYPES, equal values have equal canonical text (1 == 1.0 == True: "n1").
        if len(part) == 1:  # the hot case, without a loop
            if type(part[0]) not in _MEMO_TYPES:
                return self.core.entry_key(self.call(args, kwargs))
        elif not _MEMO_TYPES.issuperset(map(type, part)):
            return self.core.entry_key(self.call(args, kwargs))
        try:
            return memo[part]
        except KeyError:
            pass
        key = self.call(args, kwargs)
        rkey = self.core.entry_key(key)
        if len(key) <= PLAIN_KEY_MAX:
            if len(memo) >= _MEMO_SIZE:
                memo.clear()
            memo[part] = rkey
        return rkey

    def outside(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """``args`` as the wrapper would receive them, from ``invalidate`` / ``key_for``.

        A method's instance may be left out; a static method's first argument is an argument
        like any other. A first argument that is no instance of the class is taken as left out
        only if the arguments bind that way (so a static method defined in a function body,
        whose class cannot be looked up, still gets its own arguments).
        """
        if not self.method or (args and self._holder(args[0]) is not None):
            return args
        if self._static():
            return args
        filler = None if self.key is not None else _NO_SELF
        try:
            if self.skipped:  # unkeyed parameters may be left out here
                self._check_missing(self.signature.bind_partial(filler, *args, **kwargs).arguments)
            else:
                self.signature.bind(filler, *args, **kwargs)
        except TypeError:
            return args
        return (filler, *args)

    def _bound(self, obj: Any) -> bool:
        """Whether ``obj``, a call's first argument, is the instance (or, for ``cls``, the class)
        the method is bound to: its class has the wrapper as an instance or class method."""
        if obj is _NO_SELF:
            return True
        owner = obj if isinstance(obj, type) else type(obj)
        owners = self._owners
        try:
            return owners[owner]
        except KeyError:
            pass
        bound = self._holder(obj) is False
        if len(owners) >= _OWNERS_KEPT:
            owners.clear()
        owners[owner] = bound
        return bound

    def _holder(self, obj: Any) -> bool | None:
        """How the class of ``obj`` (or ``obj``, a class) holds the wrapper: ``False`` as an
        instance or class method, ``True`` as a static method, ``None`` not at all. The MRO is
        searched past overrides, so a subclass's ``super().method()`` call is bound too."""
        owner = obj if isinstance(obj, type) else type(obj)
        for klass in getattr(owner, "__mro__", ()):
            found = self._reaches(vars(klass).get(self.attr))
            if found is not None:
                return found
        return None

    def _reaches(self, attr: Any) -> bool | None:
        """``_holder``'s answer for one class attribute (through classmethod / staticmethod and
        decorators that set ``__wrapped__``)."""
        static = False
        for _ in range(_MAX_WRAPPER_DEPTH):
            if attr is None:
                return None
            if attr is self.wrapper:
                return static
            if isinstance(attr, staticmethod):
                static = True
            attr = getattr(attr, "__func__", None) or getattr(attr, "__wrapped__", None)
        return None

    def _static(self) -> bool:
        """Whether the wrapper is a static method of a class that can be looked up by name."""
        scopes = getattr(self.fn, "__qualname__", "").split(".")[:-1]
        if "<locals>" in scopes:
            return False
        owner: Any = sys.modules.get(getattr(self.fn, "__module__", None) or "")
        for scope in scopes:
            owner = getattr(owner, scope, None)
        return isinstance(owner, type) and self._reaches(vars(owner).get(self.attr)) is True

    def tags_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TagArgs:
        """The validated tags of one call."""
        tags = self.tags
        return self.core.tag_args(tags(*args, **kwargs)) if callable(tags) else tags


def _claim(
    cache: Cache | AsyncCache, fn: Callable[..., Any], *, explicit_key: bool, name: str | None
) -> str:
    """The name of ``fn``'s entries (``name``, or the derived ``module.qualname``), refused where
    another function of this namespace (through any handle, on any server) has had it in this
    process.

    A lambda's qualname is ``<lambda>``; closures made by one factory (or by a decorator that
    does not use ``functools.wraps``) share theirs, and their captured values are not part of a
    key. Two such functions would read each other's entries, so ``@cached`` refuses a lambda
    without a name, and a second function under a name (derived or given) that another function
    of the namespace holds or held. Only a module-level function may take over the name of a
    dead one, or of one defined at the same place (its module reloaded).
    """
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str):
        if name is None:
            raise ConfigError(f"@cached {fn!r:.80} has no __qualname__: pass name= or key=")
        qualname = "<locals>"  # unknown: never takes over a name
    derived = f"{module}.{qualname}"
    if explicit_key:  # key= names every entry itself; the name only appears in messages
        return derived if name is None else name
    if name is None:
        if "<lambda>" in qualname:
            raise ConfigError(
                f"@cached {derived}: every lambda of a module has this name, so their entries "
                "would collide; pass name= (or key=), or use a def"
            )
        name = derived
    code = getattr(fn, "__code__", None)
    with _NAMES_GUARD:
        owners = _NAMES.setdefault(cache._core.epoch_key, {})
        held = owners.get(name)
        if held is not None:
            ref, held_code = held
            other = ref()
            if other is fn:
                return name
            local = "<locals>" in qualname or "<lambda>" in qualname
            if local or (other is not None and not _same_source(held_code, code)):
                raise ConfigError(
                    f"@cached {name}: another function of this namespace already has this name "
                    "(closures made by one factory, or functions wrapped by a decorator without "
                    "functools.wraps, share a name, and what they capture is not part of the "
                    "key); pass a distinct name= (or key=)"
                )
        owners[name] = (weakref.ref(fn), code)
    return name


def _same_source(a: Any, b: Any) -> bool:
    """Whether two code objects come from one place in one file (a module reloaded)."""
    return (
        a is not None
        and b is not None
        and (a.co_filename, a.co_firstlineno) == (b.co_filename, b.co_firstlineno)
    )


def _unkeyed_param(fn: Callable[..., Any], param: inspect.Parameter) -> bool:
    """Whether ``param`` of ``fn`` is annotated with a registered unkeyed (framework) type."""
    annotation = param.annotation
    if isinstance(annotation, str):  # postponed evaluation: resolve it as get_type_hints would
        try:  # this parameter's alone: a forward reference elsewhere must not hide it
            annotation = eval(annotation, getattr(inspect.unwrap(fn), "__globals__", {}))
        except Exception:  # unresolvable here: only instances are left out
            return False
    return unkeyed_annotation(annotation)


def _checked_key(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"the key= function of @cached {name} returned {type(value).__name__}")
    return value


def _return_type(fn: Callable[..., Any]) -> Any:
    """The declared return type of ``fn`` (``None`` when there is none)."""
    hints = typing.get_type_hints(fn)  # raises NameError for an unresolvable forward reference
    return hints.get("return")


class _Cached:
    def __init__(
        self,
        cache: Cache | AsyncCache,
        *,
        ttl: Seconds | None,
        key: Callable[..., str] | None,
        tags: Iterable[str] | Callable[..., Iterable[str]],
        typed: bool,
        version: str | int | None,
        negative_ttl: Seconds | None,
        value_type: Any,
        name: str | None,
    ) -> None:
        if not isinstance(cache, (Cache, AsyncCache)):
            raise ConfigError(f"@cached needs a Cache or AsyncCache, got {type(cache).__name__}")
        core = cache._core
        if key is not None and not callable(key):
            raise ConfigError(f"key must be a function returning a str, got {key!r}")
        if not isinstance(typed, bool):
            raise ConfigError(f"typed must be a bool, got {typed!r}")
        if negative_ttl is _FROM_CACHE:
            negative_ttl = core.negative_ttl
        # validated once here; a tags function's results are validated at each call
        self.ttl, self.negative_ttl, static_tags = core.check_fill_args(
            ttl, negative_ttl, () if callable(tags) else tags
        )
        self.tags: TagArgs | Callable[..., Iterable[str]] = tags if callable(tags) else static_tags
        self.cache = cache
        self.key = key
        self.typed = typed
        self.version = check_version(version)
        self.value_type = value_type
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise ConfigError(f"name must match [A-Za-z0-9_.:/-]{{1,200}}, got {name!r:.80}")
        self.name = name

    @overload
    def __call__(  # type: ignore[overload-overlap]  # coroutine functions first, on purpose
        self, fn: Callable[_P, Coroutine[Any, Any, _R]]
    ) -> AsyncCachedFunction[_P, _R]: ...
    @overload
    def __call__(self, fn: Callable[_P, _R]) -> CachedFunction[_P, _R]: ...
    def __call__(self, fn: Callable[_P, Any]) -> Any:
        if not callable(fn) or isinstance(fn, (staticmethod, classmethod)):
            raise ConfigError(
                f"@cached decorates a function (put it below @staticmethod/@classmethod), "
                f"got {fn!r}"
            )
        is_async = inspect.iscoroutinefunction(fn)
        cache = self.cache
        if is_async and not isinstance(cache, AsyncCache):
            raise ConfigError("@cached on a coroutine function needs an AsyncCache")
        if not is_async and not isinstance(cache, Cache):
            raise ConfigError("@cached on a plain function needs a (sync) Cache")
        keyer: _Keyer[_P] = _Keyer(
            fn,
            key=self.key,
            tags=self.tags,
            typed=self.typed,
            version=self.version,
            core=cache._core,
            name=_claim(cache, fn, explicit_key=self.key is not None, name=self.name),
        )
        ttl, negative_ttl = self.ttl, self.negative_ttl
        static_tags = self.tags if not callable(self.tags) else ((), [])
        tags_fn = self.tags if callable(self.tags) else None
        resolved: list[Any] = [] if self.value_type is _FROM_CACHE else [self.value_type]

        def value_type() -> Any:
            if not resolved:
                try:
                    hint = _return_type(fn)
                except Exception as exc:
                    raise ConfigError(
                        f"@cached {keyer.name}: cannot resolve the return annotation ({exc}); "
                        "pass value_type="
                    ) from exc
                resolved.append(cache._core.value_type if hint is None else hint)
            return resolved[0]

        with contextlib.suppress(ConfigError):  # a forward reference is retried at first call
            value_type()

        wrapper: Any
        if isinstance(cache, AsyncCache):
            acache = cache

            @functools.wraps(fn)
            async def async_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                return await acache._get_or_set(
                    keyer.redis_key(args, kwargs),
                    fn,
                    args,
                    kwargs,
                    ttl,
                    negative_ttl,
                    static_tags if tags_fn is None else keyer.tags_for(args, kwargs),
                    resolved[0] if resolved else value_type(),
                )

            async def ainvalidate(*args: Any, **kwargs: Any) -> bool:
                return await acache.delete(keyer.call(keyer.outside(args, kwargs), kwargs, True))

            wrapper = async_wrapper
            wrapper.invalidate = ainvalidate
        else:
            scache = cache

            @functools.wraps(fn)
            def sync_wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                return scache._get_or_set(
                    keyer.redis_key(args, kwargs),
                    fn,
                    args,
                    kwargs,
                    ttl,
                    negative_ttl,
                    static_tags if tags_fn is None else keyer.tags_for(args, kwargs),
                    resolved[0] if resolved else value_type(),
                )

            def invalidate(*args: Any, **kwargs: Any) -> bool:
                return scache.delete(keyer.call(keyer.outside(args, kwargs), kwargs, True))

            wrapper = sync_wrapper
            wrapper.invalidate = invalidate

        def key_for(*args: Any, **kwargs: Any) -> str:
            return keyer.call(keyer.outside(args, kwargs), kwargs, True)

        wrapper.key_for = key_for
        keyer.wrapper = wrapper
        return wrapper


def cached(
    cache: Cache | AsyncCache,
    *,
    ttl: Seconds | None = None,
    key: Callable[..., str] | None = None,
    tags: Iterable[str] | Callable[..., Iterable[str]] = (),
    typed: bool = False,
    version: str | int | None = None,
    negative_ttl: Seconds | None = _FROM_CACHE,
    value_type: Any = _FROM_CACHE,
    name: str | None = None,
) -> _Cached:
    """Cache a function's results in ``cache``, keyed by its canonical bound arguments.

    Coroutine functions need an ``AsyncCache``, plain functions a ``Cache``. The wrapper keeps
    the function's signature and gains ``invalidate(*args, **kwargs)`` (awaitable for coroutine
    functions) and ``key_for(*args, **kwargs)``.

    Args:
        cache: where results are stored.
        ttl: time to live (default: the cache's).
        key: a function with the wrapped function's parameters returning the full cache key
            (default: ``module.qualname[@version]:(arg=value,...)``, leaving out framework
            objects: see ``register_unkeyed``).
        tags: tags of every result, or a function of the call's arguments returning them.
        typed: distinguish arguments of different types that compare equal (``1``, ``1.0``,
            ``True``), as ``functools.lru_cache(typed=True)``.
        version: part of every key: change it when the function's results change meaning.
        negative_ttl: time to live of a ``None`` result (default: the cache's).
        value_type: the type results decode to (default: the return annotation).
        name: replaces ``module.qualname`` in every key (``[A-Za-z0-9_.:/-]{1,200}``); needed for
            a lambda, and for a second function whose qualified name another function of this
            cache already holds (closures made by one factory).

    Raises:
        ConfigError: an option is invalid, the cache does not match the function's kind, or
            the function's derived name is not its own (a lambda, a second closure of one
            factory): pass ``name=`` or ``key=``.
    """
    return _Cached(
        cache,
        ttl=ttl,
        key=key,
        tags=tags,
        typed=typed,
        version=version,
        negative_ttl=negative_ttl,
        value_type=value_type,
        name=name,
    )
