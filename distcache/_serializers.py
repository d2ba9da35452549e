"""Serializers: JSON by default (never executes code), signed pickle only on explicit opt-in.

A serializer turns a value into bytes and back, optionally guided by a declared type (a pydantic
model, a dataclass, ``list[datetime]``...). Its one-byte ``id`` is written into every entry's
envelope; a cache decodes only entries carrying its own serializer's id, so a JSON cache never
hands bytes to pickle, whatever Redis holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import pickle
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, TypeAdapter

from distkit import ConfigError, SerializationError

__all__ = ["JsonSerializer", "PickleSerializer", "Serializer", "is_untyped"]

_MIN_KEY_BYTES = 16
_MAC_BYTES = 32
_MAC_CONTEXT = b"distcache.pickle.v1\x00"


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes and back; ``id`` is one ASCII letter recorded in each entry."""

    @property
    def id(self) -> bytes:
        """One ASCII letter naming the format (``b"j"`` JSON, ``b"p"`` signed pickle)."""

    def dumps(self, value: Any, type_: Any = None) -> bytes:
        """Encode ``value`` (of the declared ``type_``, if any); ``SerializationError`` if not."""

    def loads(self, data: bytes, type_: Any = None) -> Any:
        """Decode ``data`` (into ``type_``, if declared); raises on corrupt or foreign bytes."""


def is_untyped(type_: Any) -> bool:
    """Whether ``type_`` declares nothing that plain JSON decoding would miss."""
    return type_ is None or type_ is Any or type_ is object


def _type_name(value: Any) -> str:
    cls = type(value)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _json_default(value: Any) -> Any:
    """Encode the objects plain JSON lacks but that have an obvious JSON form (models)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return TypeAdapter(type(value)).dump_python(value, mode="json")
    raise TypeError(f"a value of type {_type_name(value)} is not JSON-serializable")


class JsonSerializer:
    """The default: compact JSON; a declared type is encoded and decoded through pydantic.

    Without a declared type, pydantic models and dataclasses are stored as JSON objects and come
    back as dicts; with one (``value_type=`` or a return annotation) they come back as instances.
    """

    __slots__ = ("_adapters",)

    def __init__(self) -> None:
        self._adapters: dict[Any, TypeAdapter[Any]] = {}

    @property
    def id(self) -> bytes:
        """``b"j"``."""
        return b"j"

    def _adapter(self, type_: Any) -> TypeAdapter[Any]:
        try:
            return self._adapters[type_]
        except KeyError:
            pass
        except TypeError:  # an unhashable annotation: build one each time
            return TypeAdapter(type_)
        adapter: TypeAdapter[Any] = TypeAdapter(type_)
        self._adapters[type_] = adapter
        return adapter

    def dumps(self, value: Any, type_: Any = None) -> bytes:
        """Encode ``value`` as UTF-8 JSON (through pydantic when ``type_`` is declared)."""
        try:
            if is_untyped(type_):
                return json.dumps(
                    value, separators=(",", ":"), ensure_ascii=False, default=_json_default
                ).encode()
            return self._adapter(type_).dump_json(value, warnings="error")
        except SerializationError:
            raise
        except Exception as exc:  # TypeError, ValueError (circular), PydanticSerializationError
            raise SerializationError(
                f"cannot encode a value of type {_type_name(value)} as JSON: {exc}"
            ) from exc

    def loads(self, data: bytes, type_: Any = None) -> Any:
        """Decode JSON bytes (validated into ``type_`` by pydantic when it is declared)."""
        if type_ is None:
            return json.loads(data)
        if is_untyped(type_):
            return json.loads(data)
        return self._adapter(type_).validate_json(data)

    def __repr__(self) -> str:
        return "JsonSerializer()"


class PickleSerializer:
    """Opt-in pickle, HMAC-SHA256 signed: bytes without a valid signature are never unpickled.

    Args:
        keys: signing keys (``bytes`` or ``str``, at least 16 bytes each). New entries are signed
            with the first; entries signed with any of them are accepted (key rotation: put the
            new key first, keep the old one until its entries have expired).
        protocol: the pickle protocol.

    Anyone who can write to Redis *and* knows a key can run code in every process that reads the
    cache: keep the keys secret, and prefer JSON.

    Raises:
        ConfigError: no key, or a key that is too short.
    """

    __slots__ = ("_keys", "_protocol")

    def __init__(
        self, keys: Sequence[bytes | str], *, protocol: int = pickle.HIGHEST_PROTOCOL
    ) -> None:
        if isinstance(keys, (bytes, str)) or not isinstance(keys, Sequence):
            raise ConfigError("PickleSerializer needs a list of signing keys, e.g. [key]")
        out = []
        for i, key in enumerate(keys):
            raw = key.encode() if isinstance(key, str) else key
            if not isinstance(raw, bytes) or len(raw) < _MIN_KEY_BYTES:
                raise ConfigError(
                    f"PickleSerializer key #{i} must be bytes or str of at least "
                    f"{_MIN_KEY_BYTES} bytes"
                )
            out.append(raw)
        if not out:
            raise ConfigError("PickleSerializer needs at least one signing key")
        if not isinstance(protocol, int) or not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ConfigError(f"protocol must be a pickle protocol number, got {protocol!r}")
        self._keys = tuple(out)
        self._protocol = protocol

    @property
    def id(self) -> bytes:
        """``b"p"``."""
        return b"p"

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.new(key, _MAC_CONTEXT + body, hashlib.sha256).digest()

    def dumps(self, value: Any, type_: Any = None) -> bytes:
        """Pickle ``value`` and prefix the HMAC-SHA256 of the bytes under the first key."""
        try:
            body = pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle a value of type {_type_name(value)}: {exc}"
            ) from exc
        return self._mac(self._keys[0], body) + body

    def loads(self, data: bytes, type_: Any = None) -> Any:
        """Verify the signature in constant time (any key), then unpickle; refuse otherwise."""
        mac, body = data[:_MAC_BYTES], data[_MAC_BYTES:]
        if len(mac) != _MAC_BYTES:
            raise SerializationError("a pickled entry is too short to carry a signature")
        valid = False
        for key in self._keys:  # every key, so the time taken does not tell which one matched
            valid |= hmac.compare_digest(mac, self._mac(key, body))
        if not valid:
            raise SerializationError("a pickled entry's signature does not match any key")
        return pickle.loads(body)  # signed with one of our keys: verified above

    def __repr__(self) -> str:
        return f"PickleSerializer(keys=<{len(self._keys)} hidden>)"
