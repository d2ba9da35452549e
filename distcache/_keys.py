"""Cache keys: validation of user keys, and canonical keys for ``@cached`` calls.

A call key is ``module.qualname[@version]:(name=value,...)`` over the *bound* arguments (defaults
applied), so ``f(1, b=2)``, ``f(a=1, b=2)`` and ``f(1)`` with ``b=2`` as default share one key.
Each value is written in a tagged, self-delimiting form that is injective: two argument values
get the same text only if they are equal (and, with ``typed=True``, of the same type). Values
without a canonical form (arbitrary objects, whose repr would show a memory address) are refused
with ``SerializationError`` rather than risk two calls sharing an entry. The text is a function of
each value's type and value only (equal values of different types, ``IntEnum`` ``1`` and ``1``,
may get different texts; never the other way round).

Framework objects (a web request, a response, a database session) are not values: a registry
filled by ``register_unkeyed`` (and by the ``contrib`` modules, for their framework's types) names
the types whose instances never enter a key. A parameter annotated with such a type, or an
argument that is an instance of one, is left out of the call key; nested inside another value
such an object is refused with ``SerializationError`` (it has no canonical form).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import fractions
import json
import os
import re
import threading
import types
import typing
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from enum import Enum
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel

from distkit import ConfigError, SerializationError

__all__ = [
    "arg_text",
    "call_key",
    "check_key",
    "check_tag",
    "check_version",
    "is_unkeyed",
    "register_unkeyed",
    "unkeyed_annotation",
]

MAX_TAG_LENGTH = 256
_VERSION = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_TAG_FORBIDDEN = frozenset("|,={}")
# Compared by value; written as ``t<type>:<repr>`` (an exact repr, with no address in it).
_VALUE_TYPES = (
    dt.datetime,
    dt.date,
    dt.time,
    dt.timedelta,
    dt.timezone,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
    PurePath,
    complex,
    range,
)
# Types whose instances are never part of a key (see register_unkeyed). A tuple, so that a
# lookup needs no lock; replaced whole under _UNKEYED_GUARD.
_UNKEYED: tuple[type, ...] = ()
_UNKEYED_GUARD = threading.Lock()


def _renew_unkeyed_guard() -> None:
    global _UNKEYED_GUARD
    _UNKEYED_GUARD = threading.Lock()  # a parent thread may have held it at the fork


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_renew_unkeyed_guard)


def register_unkeyed(*types: type) -> None:
    """Leave instances of ``types`` (and their subclasses) out of every ``@cached`` key.

    For framework objects passed to cached functions (a request, a response, a database
    session): a parameter annotated with one of these types, or an argument that is an instance
    of one, is not part of the call key. Register before decorating (annotations are read when
    ``@cached`` is applied). Registering a type twice is harmless.

    Raises:
        ConfigError: an argument is not a class.
    """
    global _UNKEYED
    for cls in types:
        if not isinstance(cls, type):
            raise ConfigError(f"register_unkeyed takes classes, got {cls!r:.80}")
    with _UNKEYED_GUARD:
        _UNKEYED = _UNKEYED + tuple(cls for cls in types if cls not in _UNKEYED)


def is_unkeyed(value: object) -> bool:
    """Whether ``value`` is an instance of a type registered with ``register_unkeyed``."""
    return bool(_UNKEYED) and isinstance(value, _UNKEYED)


def unkeyed_annotation(annotation: object) -> bool:
    """Whether a parameter annotation names a registered unkeyed type: the type itself, a
    subclass, ``X | None``, ``Optional[X]`` or ``Annotated[X, ...]`` (FastAPI's ``Depends``)."""
    if not _UNKEYED:
        return False
    origin = typing.get_origin(annotation)
    # On Python 3.10 ``list[X]`` passes isinstance(..., type) yet makes an ABC's
    # issubclass raise, so parameterised generics never reach issubclass.
    if origin is None and isinstance(annotation, type):
        try:
            return issubclass(annotation, _UNKEYED)
        except TypeError:  # a metaclass whose __subclasscheck__ refuses this class
            return False
    if origin is typing.Annotated:
        return unkeyed_annotation(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(unkeyed_annotation(a) for a in args)
    return False


def _control_char(text: str) -> str | None:
    if text.isprintable():
        return None
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return ch
    return None


def check_key(key: object) -> str:
    """Return ``key`` if it is a usable cache key (a non-empty str without control characters)."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise ConfigError(f"a cache key must be a str, got {type(key).__name__}: {key!r:.80}")
        key = str.__str__(key)
    if not key:
        raise ConfigError("a cache key must not be empty")
    bad = _control_char(key)
    if bad is not None:
        raise ConfigError(f"cache key {key!r:.80} contains the control character {bad!r}")
    return key


def check_tag(tag: object) -> str:
    """Return ``tag`` if it is a usable tag: a non-empty str, no control characters, ``|,={}``."""
    if not isinstance(tag, str):
        raise ConfigError(f"a tag must be a str, got {type(tag).__name__}: {tag!r:.80}")
    if not tag or len(tag) > MAX_TAG_LENGTH:
        raise ConfigError(f"a tag must have 1 to {MAX_TAG_LENGTH} characters, got {tag!r:.80}")
    bad = _control_char(tag)
    if bad is not None:
        raise ConfigError(f"tag {tag!r:.80} contains the control character {bad!r}")
    for ch in tag:
        if ch in _TAG_FORBIDDEN:
            raise ConfigError(f"tag {tag!r:.80} contains {ch!r}, reserved by the entry format")
    return tag


def check_version(version: object) -> str | None:
    """Validate a ``@cached`` ``version``: ``None``, an int, or ``[A-Za-z0-9_.-]{1,64}``."""
    if version is None:
        return None
    if isinstance(version, int) and not isinstance(version, bool):
        return str(version)
    if isinstance(version, str) and _VERSION.fullmatch(version):
        return version
    raise ConfigError(f"version must be an int or a short [A-Za-z0-9_.-] string, got {version!r}")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _int(value: int, out: list[str]) -> None:
    # hex: exact for any size (str() of a huge int is limited, and slower)
    out.append("n" + format(value, "x"))


def _canon(value: Any, typed: bool, out: list[str]) -> None:
    cls = type(value)
    if value is None:
        out.append("N")
    elif cls is str:
        out.append(repr(value))  # quoted, escaped, printable: injective and self-delimiting
    elif cls is bool:
        if typed:
            out.append("b1" if value else "b0")
        else:
            _int(int(value), out)
    elif cls is int:
        if typed:
            out.append("i" + format(value, "x"))
        else:
            _int(value, out)
    elif cls is float:
        if not typed and value.is_integer():
            _int(int(value), out)
        else:
            out.append("f" + repr(value if value != 0 else 0.0))  # -0.0 == 0.0
    elif _UNKEYED and isinstance(value, _UNKEYED):  # e.g. a Request, which is also a Mapping
        raise SerializationError(
            f"a {_qualified(cls)} is a framework object, never part of a cache key, and cannot "
            "be nested in an argument (pass it as a parameter of its own, or pass key=)"
        )
    elif isinstance(value, Enum):
        out.append(f"E{_qualified(cls)}.{json.dumps(value.name)}")
    elif isinstance(value, (tuple, list)):
        is_tuple = isinstance(value, tuple)
        if typed and cls is not tuple and cls is not list:  # a namedtuple equals its tuple
            out.append(f"S{_qualified(cls)}:")
        out.append("(" if is_tuple else "[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canon(item, typed, out)
        out.append(")" if is_tuple else "]")
    elif isinstance(value, Mapping):
        items = [_text(k, typed) + ":" + _text(v, typed) for k, v in value.items()]
        if isinstance(value, OrderedDict):  # two OrderedDicts are equal only in the same order
            out.append(f"o{_qualified(cls)}:{{" + ",".join(items) + "}")
            return
        if typed and cls is not dict:
            out.append(f"S{_qualified(cls)}:")
        out.append("{" + ",".join(sorted(items)) + "}")
    elif isinstance(value, (set, frozenset)):
        tag = "F<" if typed and isinstance(value, frozenset) else "<"
        out.append(tag + ",".join(sorted(_text(v, typed) for v in value)) + ">")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        tag = "x" if not typed or cls is bytes else f"x{_qualified(cls)}:"
        out.append(tag + bytes(value).hex())
    elif isinstance(value, BaseModel):
        out.append(f"M{_qualified(cls)}(")
        for i, name in enumerate(cls.model_fields):
            out.append(("," if i else "") + name + "=")
            _canon(getattr(value, name), typed, out)
        extra = value.__pydantic_extra__  # extra="allow": part of the model's equality too
        if extra:
            items = sorted(repr(str(k)) + "=" + _text(v, typed) for k, v in extra.items())
            out.append(";" + ",".join(items))
        out.append(")")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        out.append(f"D{_qualified(cls)}(")
        for i, field in enumerate(dataclasses.fields(value)):
            out.append(("," if i else "") + field.name + "=")
            _canon(getattr(value, field.name), typed, out)
        out.append(")")
    elif isinstance(value, _VALUE_TYPES):
        out.append(f"t{_qualified(cls)}:{json.dumps(repr(value))}")
    elif isinstance(value, (str, int, float)):  # subclasses (e.g. class UserId(int))
        if typed:
            out.append(f"S{_qualified(cls)}:")
        # the base type's own conversion: a subclass may override __str__ / __int__
        if isinstance(value, str):
            _canon(str.__str__(value), typed, out)
        elif isinstance(value, int):
            _canon(int.__int__(value), typed, out)
        else:
            _canon(float.__float__(value), typed, out)
    else:
        raise SerializationError(
            f"a value of type {_qualified(cls)} has no canonical form for a cache key "
            "(use plain values, dataclasses, pydantic models, or pass key= to @cached)"
        )


def _text(value: Any, typed: bool) -> str:
    out: list[str] = []
    _canon(value, typed, out)
    return "".join(out)


def call_key(name: str, version: str | None, arguments: Mapping[str, Any], typed: bool) -> str:
    """The canonical key of one call: ``name[@version]:(param=value,...)``; arguments that are
    registered framework objects (``register_unkeyed``) are left out.

    Raises:
        SerializationError: an argument has no canonical form (the message names its type).
    """
    head = f"{name}@{version}:(" if version else f"{name}:("
    texts = (arg_text(name, p, v, typed) for p, v in arguments.items())
    return head + ",".join(t for t in texts if t) + ")"


def arg_text(name: str, param: str, value: Any, typed: bool) -> str:
    """``param=<canonical value>``, or ``""`` for a registered framework object (``name``: the
    function, for error messages)."""
    cls = type(value)
    if cls is str:
        return f"{param}={value!r}"
    if cls is int and not typed:
        return f"{param}=n{value:x}"
    if _UNKEYED and isinstance(value, _UNKEYED):
        return ""
    out: list[str] = [param, "="]
    try:
        _canon(value, typed, out)
    except SerializationError as exc:
        within = ""
        if f" {_qualified(cls)} " not in str(exc):  # the failure is nested inside the argument
            within = f" (within a {_qualified(cls)})"
            if cls.__module__ != "builtins":  # e.g. a web request, which is also a Mapping
                within += (
                    f" [if a {cls.__qualname__} is a framework object, "
                    "distcache.register_unkeyed() or the framework's distcache.contrib module "
                    "leaves it out of keys]"
                )
        raise SerializationError(f"{name}(): argument {param!r}{within}: {exc}") from None
    except RecursionError:
        raise SerializationError(
            f"{name}(): argument {param!r} is nested too deeply (or contains itself)"
        ) from None
    return "".join(out)
