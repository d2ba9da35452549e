"""Retry policies built from ``RetryConfig`` with tenacity, shared by every distkit package.

Only ``ConnectionUnavailable`` is retried, and only around operations whose protocol makes a
repeat harmless (every distkit Lua script is written so that running it twice after a lost reply
gives the same outcome as running it once).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import redis.exceptions as rex
import tenacity
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from ._errors import ConnectionUnavailable

if TYPE_CHECKING:
    from ._config import RetryConfig

__all__ = ["NO_RETRY", "RetryPolicy"]

_T = TypeVar("_T")


def _is_retryable(on_timeout: bool) -> Any:
    def check(exc: BaseException) -> bool:
        if not isinstance(exc, ConnectionUnavailable):
            return False
        # redis-py's TimeoutError is not the builtin one (nor, before 3.11, is asyncio's).
        timeouts = (TimeoutError, asyncio.TimeoutError, rex.TimeoutError)
        return on_timeout or not isinstance(exc.__cause__, timeouts)

    return check


class _Settings(NamedTuple):
    """``RetryConfig``'s fields and defaults, without pydantic (so a default policy is cheap)."""

    attempts: int = 3
    backoff_initial: float = 0.02
    backoff_max: float = 0.5
    jitter: float = 0.02
    max_delay: float | None = None
    retry_on_timeout: bool = True


class RetryPolicy:
    """Tenacity ``stop`` / ``wait`` / ``retry`` objects for one ``RetryConfig``, sync and async."""

    __slots__ = ("_config", "_settings", "retry", "stop", "wait")

    def __init__(self, config: RetryConfig | None = None) -> None:
        if config is None:
            self._setup(None, _Settings())
        else:
            self._setup(config, _Settings(*(getattr(config, n) for n in _Settings._fields)))

    @classmethod
    def _of(cls, settings: _Settings) -> RetryPolicy:
        policy = cls.__new__(cls)
        policy._setup(None, settings)
        return policy

    def _setup(self, config: RetryConfig | None, cfg: _Settings) -> None:
        self._config = config
        self._settings = cfg
        stop: tenacity.stop.stop_base = stop_after_attempt(cfg.attempts)
        if cfg.max_delay is not None:
            stop = stop | stop_after_delay(cfg.max_delay)
        self.stop = stop
        self.wait = wait_exponential(
            multiplier=cfg.backoff_initial, max=cfg.backoff_max
        ) + wait_random(0, cfg.jitter)
        self.retry = retry_if_exception(_is_retryable(cfg.retry_on_timeout))

    @property
    def config(self) -> RetryConfig:
        """The ``RetryConfig`` this policy was built from (the defaults when none was given)."""
        if self._config is None:
            from ._config import RetryConfig

            self._config = RetryConfig(**self._settings._asdict())
        return self._config

    @property
    def attempts(self) -> int:
        """Total tries allowed, the first included."""
        return self._settings.attempts

    def _stop(self, attempts: int | None) -> tenacity.stop.stop_base:
        if attempts is None:
            return self.stop
        stop: tenacity.stop.stop_base = stop_after_attempt(attempts)
        if self._settings.max_delay is not None:  # overriding the count keeps the time limit
            stop = stop | stop_after_delay(self._settings.max_delay)
        return stop

    def retrying(self, *, attempts: int | None = None) -> Retrying:
        """A tenacity ``Retrying`` for this policy (``attempts`` overrides the count)."""
        return Retrying(stop=self._stop(attempts), wait=self.wait, retry=self.retry, reraise=True)

    def async_retrying(self, *, attempts: int | None = None) -> AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy (``attempts`` overrides the count)."""
        stop = self._stop(attempts)
        return AsyncRetrying(stop=stop, wait=self.wait, retry=self.retry, reraise=True)

    def _first_delay(self) -> float:
        cfg = self._settings
        return min(cfg.backoff_initial, cfg.backoff_max) + random.uniform(0, cfg.jitter)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn``, retrying per this policy; the first try costs no tenacity overhead."""
        try:
            return fn()
        except ConnectionUnavailable as exc:
            return self.call_after(exc, fn)

    def call_after(self, first: ConnectionUnavailable, fn: Callable[[], _T]) -> _T:
        """Continue after ``fn``'s first try failed with ``first``: retry per policy or re-raise."""
        attempts = self._settings.attempts
        if attempts == 1 or not self.retry.predicate(first):
            raise first
        time.sleep(self._first_delay())
        return self.retrying(attempts=attempts - 1)(fn)

    async def acall(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``fn()``, retrying per this policy; the first try costs no tenacity overhead."""
        try:
            return await fn()
        except ConnectionUnavailable as exc:
            if self._settings.attempts == 1 or not self.retry.predicate(exc):
                raise
        await asyncio.sleep(self._first_delay())

        async def attempt() -> _T:  # a real coroutine function, so tenacity awaits each try
            return await fn()

        result: _T = await self.async_retrying(attempts=self._settings.attempts - 1)(attempt)
        return result

    def __repr__(self) -> str:
        return f"RetryPolicy({self.config!r})"


NO_RETRY = RetryPolicy._of(_Settings(attempts=1))
