"""What distkit remembers about a client, and checks that need no configuration machinery."""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._errors import EventLoopMismatch

if TYPE_CHECKING:
    from ._config import RetryConfig

__all__ = ["client_retry", "decodes_responses", "for_loop", "is_config"]

# The RetryConfig each client of connect()/aconnect() was built with: the default retry of every
# Lock and Cache on that client (weak: the entry goes with the client).
_RETRY: weakref.WeakKeyDictionary[Any, RetryConfig] = weakref.WeakKeyDictionary()


def client_retry(client: Any) -> RetryConfig | None:
    """The ``RetryConfig`` that ``connect``/``aconnect`` built ``client`` with, else ``None``."""
    try:
        return _RETRY.get(client)
    except TypeError:  # not weak-referenceable: not a client of ours
        return None


def decodes_responses(client: Any) -> bool:
    """Whether ``client`` was built with ``decode_responses=True`` (replies as ``str``)."""
    encoder = getattr(client, "get_encoder", None)
    try:
        if callable(encoder):
            return bool(encoder().decode_responses)
        kwargs = client.connection_pool.connection_kwargs
        return bool(kwargs.get("decode_responses", False))
    except Exception:  # not a redis-py client we can inspect: the kind check reports it
        return False


def is_config(obj: Any, name: str) -> bool:
    """``isinstance(obj, distkit.<name>)`` for a config model, without importing pydantic: no
    such object can exist before ``distkit._config`` was loaded."""
    module = sys.modules.get("distkit._config")
    return module is not None and isinstance(obj, getattr(module, name))


# redis-py's asyncio connections belong to the loop that opened them: used from another loop
# they fail with "Event loop is closed" or "attached to a different loop". So each async client
# that distkit uses has a home loop (the first it ran on); aconnect() also leaves a recipe to
# build the same client again, which gives every other loop a twin of its own.
_HOME: weakref.WeakKeyDictionary[Any, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()
_RECIPE: weakref.WeakKeyDictionary[Any, Callable[[], Any]] = weakref.WeakKeyDictionary()
_TWINS: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, Any]] = (
    weakref.WeakKeyDictionary()
)


def remember_recipe(client: Any, recipe: Callable[[], Any]) -> None:
    """Let ``for_loop`` build a twin of ``client`` (``aconnect``'s) for another event loop."""
    _RECIPE[client] = recipe


_UNKNOWN: Any = object()  # a loop we could not find out


def _open_loops(client: Any) -> set[Any]:
    """The loops that own ``client``'s connected sockets (``_UNKNOWN`` for a shape we cannot read).

    Reads redis-py internals (pools, cluster nodes, stream writers); any surprise counts as
    unknown, which the caller treats as "maybe another loop".
    """
    try:
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            conns = [*pool._available_connections, *pool._in_use_connections]
        else:
            nodes = client.nodes_manager.nodes_cache.values()
            conns = [conn for node in nodes for conn in node._connections]
        return {
            getattr(conn._writer, "_loop", None) or _UNKNOWN for conn in conns if conn.is_connected
        }
    except Exception:
        return {_UNKNOWN}


def for_loop(client: Any, loop: asyncio.AbstractEventLoop, what: str) -> Any:
    """The client to use for ``client`` on ``loop``: itself, or (``aconnect``'s) a twin.

    A client of the user's that holds connections opened on another loop raises
    ``EventLoopMismatch``; one without such connections (closed with ``aclose()``, or never
    used) moves to ``loop``.
    """
    home = _HOME.get(client)
    if home is loop:
        return client
    foreign = _open_loops(client) - {loop}
    if home is None and foreign == {_UNKNOWN}:
        foreign = set()  # first use, shape unknown: trust it (redis-py's own error if wrong)
    elif home is not None and not home.is_closed():
        foreign.add(home)  # may open a connection there at any moment
    if not foreign:
        _HOME[client] = loop
        return client
    recipe = _RECIPE.get(client)
    if recipe is not None:
        twins = _TWINS.setdefault(client, {})
        twin = twins.get(loop)
        if twin is None:
            # A twin holds its loop alive through its sockets: drop those of finished loops.
            for dead in [done for done in twins if done.is_closed()]:
                del twins[dead]
            twin = twins[loop] = recipe()
            _HOME[twin] = loop
        return twin
    closed = all(other is not _UNKNOWN and other.is_closed() for other in foreign)
    state = "has been closed" if closed else "is another loop (or one distkit cannot identify)"
    raise EventLoopMismatch(
        f"{what}: this redis.asyncio client holds connections opened on an event loop that "
        f"{state}, and they belong to that loop (asyncio.run() called twice, a per-test loop, a "
        "reloader). Build the client on the loop that uses it, close it with "
        "`await client.aclose()` before the loop ends, or build it with distkit.aconnect(), "
        "whose clients open a twin per event loop"
    )
