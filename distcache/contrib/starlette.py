"""Starlette and FastAPI support (extra ``starlette``): framework-aware keys, a lifespan, locks
per path parameter and conditional HTTP responses.

Importing this module registers Starlette's (and, if installed, FastAPI's) framework types with
``distcache.register_unkeyed``: a ``Request``, ``WebSocket``, ``Response`` or ``BackgroundTasks``
argument of a ``@cached`` endpoint is never part of its key (a ``Request`` is a ``Mapping``, so
without this the key builder would walk the whole ASGI scope).

``Distkit`` owns the app's Redis resources: its ``lifespan`` builds the asyncio client and the
caches on the running loop at startup and closes them at shutdown; ``Distkit.cached`` decorates
endpoints before the caches exist (the real ``@cached`` is applied at startup);
``Distkit.lock_for("invoice:{invoice_id}")`` is a dependency that holds a fenced ``AsyncLock``
for the request, answering 409 (or waiting) when another request holds it. ``cached_response``
serves a cached value as JSON with ``ETag`` / ``Cache-Control`` and answers ``304`` to a
matching ``If-None-Match``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Literal, ParamSpec, TypeVar

from starlette.background import BackgroundTask, BackgroundTasks
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from distkit import (
    AsyncClient,
    ConfigError,
    DistkitError,
    RedisConfig,
    SerializationError,
    aconnect,
)
from distkit._units import seconds
from distlock import AsyncLock

from .. import AsyncCache, AsyncCachedFunction, cached, register_unkeyed
from .._core import Seconds

__all__ = ["Distkit", "cached_response"]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

# Not FastAPI's SecurityScopes: the scopes decide the answer (an /admin check must not be served
# from a /me check's entry), so one is a value to key on, or refused, never left out.
register_unkeyed(HTTPConnection, Response, BackgroundTask, BackgroundTasks)

_CACHE_OPTIONS = frozenset(inspect.signature(AsyncCache.__init__).parameters) - {"self", "client"}
_CACHED_OPTIONS = frozenset(inspect.signature(cached).parameters) - {"cache"}


class Distkit:
    """The Redis resources of one app: an asyncio client and named ``AsyncCache`` s, built on
    startup (on the server's running loop) by ``lifespan`` and closed on shutdown.

    Args:
        config: a ``RedisConfig`` or a redis URL.
        caches: cache name -> ``AsyncCache`` keyword options (``namespace`` defaults to the
            name); default: one cache named ``"default"``.

    Raises:
        ConfigError: an unknown cache option.
    """

    def __init__(
        self,
        config: RedisConfig | str,
        *,
        caches: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._config = config if isinstance(config, RedisConfig) else RedisConfig(url=config)
        specs = {"default": {}} if caches is None else dict(caches)
        for name, options in specs.items():
            unknown = set(options) - _CACHE_OPTIONS
            if unknown:
                raise ConfigError(f"cache {name!r}: unknown AsyncCache options {sorted(unknown)}")
        self._specs = {name: {"namespace": name, **opts} for name, opts in specs.items()}
        self._client: AsyncClient | None = None
        self._caches: dict[str, AsyncCache] = {}
        # (function, its proxy's slot, cache name, @cached options): bound at each startup
        self._deferred: list[tuple[Callable[..., Any], list[Any], str, dict[str, Any]]] = []

    @property
    def started(self) -> bool:
        """Whether the lifespan is between startup and shutdown."""
        return self._client is not None

    @property
    def client(self) -> AsyncClient:
        """The asyncio client (``ConfigError`` outside the lifespan)."""
        if self._client is None:
            raise ConfigError("Distkit is not started: pass Distkit.lifespan to the app")
        return self._client

    def cache(self, name: str = "default") -> AsyncCache:
        """The ``AsyncCache`` named ``name`` (``ConfigError`` outside the lifespan)."""
        self.client  # noqa: B018 - raises when not started
        try:
            return self._caches[name]
        except KeyError:
            raise ConfigError(f"no cache named {name!r}: {sorted(self._specs)}") from None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """Starlette's / FastAPI's ``lifespan=``: build everything on startup, close on shutdown.

        Inside a lifespan of your own: ``async with dk.lifespan(app): yield``. It yields no
        lifespan state (not every ASGI server supports it): use the ``Distkit`` object.
        """
        if self._client is not None:
            raise ConfigError("Distkit is already started (one lifespan at a time)")
        client = aconnect(self._config)
        caches: dict[str, AsyncCache] = {}
        try:
            for name, options in self._specs.items():
                caches[name] = AsyncCache(client, **options)
            for fn, slot, name, options in self._deferred:
                slot[:] = [cached(caches[name], **options)(fn)]
            self._client, self._caches = client, caches
            yield
        finally:
            self._client, self._caches = None, {}
            for _fn, slot, _name, _options in self._deferred:
                slot.clear()
            try:
                for cache in caches.values():
                    try:
                        await cache.aclose()
                    except DistkitError:
                        _log.warning("closing cache %r failed", cache.namespace, exc_info=True)
            finally:
                await client.aclose()

    def cached(
        self, cache: str = "default", **options: Any
    ) -> Callable[[Callable[_P, Coroutine[Any, Any, _R]]], AsyncCachedFunction[_P, _R]]:
        """``@cached`` for endpoints, on the cache named ``cache`` (``options``: those of
        ``distcache.cached``). The decorated coroutine function keeps its signature (FastAPI
        reads it) and gains ``invalidate`` and ``key_for``; ``@cached`` itself is applied on
        startup, where its option errors are raised. Calls outside the lifespan raise
        ``ConfigError``.

        Raises:
            ConfigError: an unknown cache or option, or ``fn`` is not a coroutine function.
        """
        if cache not in self._specs:
            raise ConfigError(f"no cache named {cache!r}: {sorted(self._specs)}")
        unknown = set(options) - _CACHED_OPTIONS
        if unknown:
            raise ConfigError(f"unknown @cached options {sorted(unknown)}")

        def decorate(fn: Callable[_P, Coroutine[Any, Any, _R]]) -> AsyncCachedFunction[_P, _R]:
            if not inspect.iscoroutinefunction(fn):
                raise ConfigError(f"Distkit.cached decorates a coroutine function, got {fn!r:.80}")
            slot: list[Any] = []
            self._deferred.append((fn, slot, cache, dict(options)))

            def real() -> Any:
                if not slot:
                    raise ConfigError(
                        f"{fn.__qualname__}: Distkit is not started (pass Distkit.lifespan)"
                    )
                return slot[0]

            @functools.wraps(fn)
            async def proxy(*args: Any, **kwargs: Any) -> Any:
                return await real()(*args, **kwargs)

            async def invalidate(*args: Any, **kwargs: Any) -> bool:
                return bool(await real().invalidate(*args, **kwargs))

            def key_for(*args: Any, **kwargs: Any) -> str:
                return str(real().key_for(*args, **kwargs))

            wrapper: Any = proxy
            wrapper.invalidate = invalidate
            wrapper.key_for = key_for
            return wrapper  # type: ignore[no-any-return]

        return decorate

    def lock_for(
        self,
        template: str,
        *,
        ttl: Seconds = 30.0,
        on_locked: Literal["conflict", "wait"] = "conflict",
        timeout: Seconds = 10.0,
        auto_renew: bool = False,
        status_code: int = 409,
    ) -> Callable[[Request], AsyncIterator[AsyncLock]]:
        """A dependency (``Depends(dk.lock_for("invoice:{invoice_id}"))``) that holds the
        ``AsyncLock`` named by ``template`` over the request's path parameters while the
        endpoint runs, and yields it (``lock.fencing_token`` fences the endpoint's writes).

        Args:
            template: the lock name; each ``{field}`` names a path parameter.
            ttl: the lease (seconds); ``auto_renew`` renews it while the request runs.
            on_locked: ``"conflict"``: another holder means an immediate HTTP ``status_code``;
                ``"wait"``: wait up to ``timeout`` seconds first.
            timeout: the longest wait with ``on_locked="wait"``.
            status_code: the answer when the lock is not acquired.

        A path parameter that makes no valid lock name (a brace, a control character) is
        answered ``400``.

        Raises:
            ConfigError: an invalid template or option (at once); at request time, a field
                that is no path parameter of the route.
        """
        fields = _template_fields(template)
        if on_locked not in ("conflict", "wait"):
            raise ConfigError(f"on_locked must be 'conflict' or 'wait', got {on_locked!r}")
        ttl = seconds(ttl, field="ttl")
        timeout = seconds(timeout, field="timeout", allow_zero=True)
        if type(status_code) is not int or not 400 <= status_code <= 599:
            raise ConfigError(f"status_code must be an HTTP error status, got {status_code!r}")
        dk = self

        async def hold_lock(request: Request) -> AsyncIterator[AsyncLock]:
            params = request.path_params
            missing = [f for f in fields if f not in params]
            if missing:
                raise ConfigError(
                    f"lock {template!r}: {missing} are not path parameters of {request.url.path!r}"
                    f" (it has {sorted(params)})"
                )
            name = template.format_map({f: params[f] for f in fields})
            try:
                lock = AsyncLock(dk.client, name, ttl=ttl, auto_renew=auto_renew)
            except ConfigError as exc:  # the path came from the client: its mistake, not ours
                raise HTTPException(400, f"no valid lock name: {exc}") from exc
            if on_locked == "wait":
                held = await lock.acquire(timeout=timeout)
            else:
                held = await lock.acquire(blocking=False)
            if not held:
                raise HTTPException(status_code, f"{name} is locked by another request")
            try:
                yield lock
            finally:
                try:
                    await lock.release()
                except DistkitError:  # the lease lapsed (or Redis failed) while the request ran
                    _log.warning("releasing lock %r failed", name, exc_info=True)

        return hold_lock


def _template_fields(template: str) -> list[str]:
    """The field names of a lock name template (plain names only)."""
    if not isinstance(template, str) or not template:
        raise ConfigError(f"a lock name template must be a non-empty str, got {template!r:.80}")
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"lock name template {template!r:.80}: {exc}") from None
    for _text, field, _spec, _conv in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            raise ConfigError(
                f"lock name template {template!r:.80}: {{{field}}} must name a path parameter"
            )
        fields.append(field)
    return fields


async def cached_response(
    request: HTTPConnection,
    cache: AsyncCache,
    key: str,
    loader: Callable[[], Awaitable[Any]],
    *,
    ttl: Seconds | None = None,
    tags: Iterable[str] = (),
    private: bool = False,
) -> Response:
    """``cache.get_or_set(key, loader)`` as a JSON response with HTTP caching headers.

    ``ETag`` is a digest of the entry's content (a new value gets a new tag, an unchanged one
    keeps it); ``Cache-Control: public|private, max-age=N`` with ``N`` the seconds the entry
    has left (``no-cache`` when it is not stored). A request whose ``If-None-Match`` names the
    tag (or ``*``) gets ``304 Not Modified`` with no body.

    Raises:
        ConfigError: invalid key, ttl or tag.
        SerializationError: the value cannot be encoded.
    """
    value = await cache.get_or_set(key, loader, ttl=ttl, tags=tags)
    try:
        body = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"the value of {key!r:.80} is not JSON: {exc}") from exc
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    left = await cache.ttl_of(key)
    scope = "private" if private else "public"
    control = f"{scope}, max-age={int(left)}" if left is not None and left >= 1 else "no-cache"
    headers = {"ETag": etag, "Cache-Control": control}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False
