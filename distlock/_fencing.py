"""Fencing guards for the protected resource: a Redis-side compare-and-write, sync and async.

A guard accepts a write only if its token is >= the highest token it has seen, and stores the
token with the value in one script, so a paused ex-holder's late write can never overwrite the
work of a newer holder. The SQL version of the same rule is in docs/fencing.md.
"""

from __future__ import annotations

from typing import Any

from distkit import ConfigError, ForeignDataError, KeySpace, StaleFencingToken
from distkit._keys import validate_name
from distkit._protocol import AsyncDriver, Command, Eval, Protocol, SyncDriver
from distkit._retry import RetryPolicy

from ._core import check_client
from ._scripts import FENCED_WRITE

__all__ = ["AsyncFencedStore", "FencedStore"]

Value = str | bytes

# Tokens are integers below 2^53: distlock never issues more (docs/fencing.md), and below it a
# Lua double compares them exactly.
_MAX_TOKEN = 2**53


class _FencedCore:
    """Protocols of a fenced value (no I/O)."""

    __slots__ = ("key", "resource")

    def __init__(self, resource: str, prefix: str) -> None:
        self.resource = validate_name(resource, what="resource name")
        self.key = KeySpace(prefix).key("fenced", self.resource)

    def write(self, token: int, value: Value) -> Protocol[None]:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < _MAX_TOKEN:
            raise ConfigError(
                f"token must be an int in [0, 2**53) (distlock issues no other), got {token!r}"
            )
        if not isinstance(value, (str, bytes)):
            raise ConfigError(f"value must be str or bytes, got {type(value).__name__}")
        applied, highest = yield Eval(FENCED_WRITE, (self.key,), (token, value))
        if applied != 1:
            raise StaleFencingToken(
                f"write to {self.resource!r} with token {token} rejected: "
                f"token {int(highest)} was already accepted",
                name=self.resource,
                token=token,
                highest=int(highest),
            )

    def read(self) -> Protocol[tuple[bytes, int] | None]:
        value, token = yield Command(("HMGET", self.key, "value", "token"))
        if value is None or token is None:
            return None
        text = token.decode("ascii", "replace") if isinstance(token, bytes) else str(token)
        number = int(text) if text.isascii() and text.isdigit() else -1  # no sign, space, "_"
        if not 0 <= number < _MAX_TOKEN or str(number) != text:
            raise ForeignDataError(
                f"fenced {self.resource!r}: a key holds data distkit did not write "
                f"(token {token!r} at {self.key})"
            )
        return value, number


class FencedStore:
    """A value in Redis that only accepts writes carrying the highest fencing token seen so far.

    Args:
        client: a sync redis-py client.
        resource: the resource's name (stored at ``{prefix}:fenced:{resource}``).
        prefix: key prefix.
    """

    def __init__(self, client: Any, resource: str, *, prefix: str = "distkit") -> None:
        check_client(client, want_async=False, cls="FencedStore")
        self._core = _FencedCore(resource, prefix)
        self._driver = SyncDriver(client, RetryPolicy(), f"fenced {resource!r}")

    def write(self, token: int, value: Value) -> None:
        """Store ``value`` if ``token`` >= every token accepted before.

        Raises:
            StaleFencingToken: a higher token was already accepted; nothing was written.
            ConfigError: ``token`` is not an int in ``[0, 2**53)`` or ``value`` is not str or
                bytes; nothing was sent.
            ForeignDataError: the stored token is not one a ``FencedStore`` writes.
        """
        self._driver.run(self._core.write(token, value))

    def read(self) -> tuple[bytes, int] | None:
        """The stored value and the token it was written with, or ``None``.

        Raises:
            ForeignDataError: the stored token is not one a ``FencedStore`` writes.
        """
        return self._driver.run(self._core.read())


class AsyncFencedStore:
    """The asyncio twin of ``FencedStore``."""

    def __init__(self, client: Any, resource: str, *, prefix: str = "distkit") -> None:
        check_client(client, want_async=True, cls="AsyncFencedStore")
        self._core = _FencedCore(resource, prefix)
        self._driver = AsyncDriver(client, RetryPolicy(), f"fenced {resource!r}")

    async def write(self, token: int, value: Value) -> None:
        """Store ``value`` if ``token`` >= every token accepted before.

        Raises:
            StaleFencingToken: a higher token was already accepted; nothing was written.
            ConfigError: ``token`` is not an int in ``[0, 2**53)`` or ``value`` is not str or
                bytes; nothing was sent.
            ForeignDataError: the stored token is not one a ``FencedStore`` writes.
        """
        await self._driver.run(self._core.write(token, value))

    async def read(self) -> tuple[bytes, int] | None:
        """The stored value and the token it was written with, or ``None``.

        Raises:
            ForeignDataError: the stored token is not one a ``FencedStore`` writes.
        """
        return await self._driver.run(self._core.read())
