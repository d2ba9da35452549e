"""What distkit remembers about a client, and checks that need no configuration machinery."""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._config import RetryConfig

__all__ = ["client_retry", "decodes_responses", "is_config"]

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
