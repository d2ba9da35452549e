"""The Lua script registry: each script declared once, run with EVALSHA, loaded on NOSCRIPT.

A script is registered by the module that owns it (``distlock/_scripts.py``...), with a comment
that states its KEYS / ARGV / returns contract. ``EVALSHA`` is routed by its keys, so the same
object works on a standalone server, a Sentinel-managed master and every node of a Cluster; a
node that does not know the script yet answers NOSCRIPT and gets ``EVAL`` once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as rex

__all__ = ["Script", "registered_scripts"]

_REGISTRY: dict[str, Script] = {}

KeyArg = str | bytes
ScriptArg = str | bytes | int | float


class Script:
    """A named Lua script; call it with a sync client, or ``await acall`` with an async one.

    Raises redis-py's exceptions unchanged: callers translate them at their own boundary, where
    the lock name or cache key is known.
    """

    __slots__ = ("name", "sha", "source")

    name: str
    source: str
    sha: str

    def __init__(self, name: str, source: str) -> None:
        if name in _REGISTRY and _REGISTRY[name].source != source:
            raise ValueError(f"a different script is already registered as {name!r}")
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        _REGISTRY[name] = self

    def __call__(
        self,
        client: Any,
        keys: Sequence[KeyArg],
        args: Sequence[ScriptArg],
        *,
        before_reload: Callable[[], None] | None = None,
    ) -> Any:
        """Run on a sync client (``redis.Redis`` or ``RedisCluster``; not a pipeline: its NOSCRIPT
        would surface only at ``execute()``, past the fallback). ``before_reload`` runs between
        a NOSCRIPT answer and the ``EVAL`` that follows it (it may raise to stop there)."""
        try:
            return client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            if before_reload is not None:
                before_reload()
            return client.execute_command("EVAL", self.source, len(keys), *keys, *args)

    async def acall(self, client: Any, keys: Sequence[KeyArg], args: Sequence[ScriptArg]) -> Any:
        """Run on an asyncio client (``redis.asyncio.Redis`` or ``RedisCluster``)."""
        try:
            return await client.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            return await client.execute_command("EVAL", self.source, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:10]})"


def registered_scripts() -> dict[str, Script]:
    """Every script registered so far, by name (a copy)."""
    return dict(_REGISTRY)
