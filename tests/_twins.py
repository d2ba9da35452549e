"""Run one contract test body against a sync handle and its asyncio twin.

``SyncView(handle, loop)`` turns every coroutine method of an async handle into a plain call that
runs on ``loop``; a sync handle is used as it is. Tests then speak one language for both.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any


class SyncView:
    """Blocking view of an async handle: coroutine methods run to completion on ``loop``."""

    def __init__(self, handle: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = handle
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handle, name)
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._loop.run_until_complete(attr(*args, **kwargs))

            return call
        return attr

    def __enter__(self) -> Any:
        self._loop.run_until_complete(self._handle.__aenter__())
        return self

    def __exit__(self, *exc: Any) -> None:
        self._loop.run_until_complete(self._handle.__aexit__(*exc))

    @property
    def handle(self) -> Any:
        """The wrapped async handle."""
        return self._handle


class Twin:
    """A factory of handles of one kind (sync or async) on one server, used by contract tests."""

    def __init__(
        self,
        kind: str,
        sync_cls: Callable[..., Any],
        async_cls: Callable[..., Any],
        sync_client: Callable[[], Any],
        async_client: Callable[[], Any],
    ) -> None:
        self.kind = kind
        self._sync_cls = sync_cls
        self._async_cls = async_cls
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.client = sync_client() if kind == "sync" else async_client()
        self._extra_clients: list[Any] = []
        self._make_async_client = async_client
        self._make_sync_client = sync_client

    def new_client(self) -> Any:
        """A further client of this twin's kind (closed at teardown)."""
        client = self._make_sync_client() if self.kind == "sync" else self._make_async_client()
        self._extra_clients.append(client)
        return client

    def make(self, *args: Any, client: Any = None, **kwargs: Any) -> Any:
        """A new handle; ``client`` defaults to the twin's shared client."""
        target = self.client if client is None else client
        if self.kind == "sync":
            return self._sync_cls(target, *args, **kwargs)
        assert self.loop is not None
        return SyncView(self._async_cls(target, *args, **kwargs), self.loop)

    def close(self) -> None:
        """Close the clients and the loop."""
        clients = [self.client, *self._extra_clients]
        if self.loop is None:
            for client in clients:
                client.close()
            return
        for client in clients:
            self.loop.run_until_complete(client.aclose())
        self.loop.close()
