"""Safe, typed serialization (C4; issue 6 points 2 and 6): JSON by default, pydantic models and
dataclasses decoded to their declared type, pickle only signed and on opt-in; whatever bytes sit
in Redis, a read is a hit or a miss, never an exception and never code execution."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import BaseModel

from distcache import (
    Cache,
    CacheEvent,
    ConfigError,
    CounterMetrics,
    JsonSerializer,
    PickleSerializer,
    SerializationError,
    cached,
)

MISSING = object()


def get_bytes(r: redis.Redis, key: str) -> bytes | None:
    """``r.get(key)``, typed: these clients return bytes."""
    value = r.get(key)
    assert value is None or isinstance(value, bytes)
    return value


KEY_A = b"a" * 32
KEY_B = b"b" * 32


class User(BaseModel):
    id: int
    name: str
    joined: dt.datetime


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float
    label: tuple[str, ...] = ()


def entry(ns: str, key: str) -> str:
    return f"distkit:cache:{{{ns}}}:k:{key}"


def envelope(r: redis.Redis, ns: str, payload: bytes, serializer: bytes = b"j") -> bytes:
    """A well-formed envelope around ``payload``, stamped with the namespace's current epoch."""
    epoch = get_bytes(r, f"distkit:cache:{{{ns}}}:epoch")
    assert epoch is not None
    meta = b"0|0|1000|0|"
    return b"dc1:" + epoch + serializer + b"v" + b"%04x" % len(meta) + meta + payload


# -- typed values ------------------------------------------------------------------------------
def test_pydantic_models_and_dataclasses_decode_to_the_declared_type(r: redis.Redis) -> None:
    user = User(id=1, name="ada", joined=dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc))
    users = Cache(r, namespace="typed", value_type=User)
    users.set("u", user)
    got = users.get("u")
    assert isinstance(got, User) and got == user
    points = Cache(r, namespace="typed", value_type=list[Point])
    pts = [Point(1, 2.5, ("a",)), Point(3, 4.0)]
    points.set("p", pts)
    assert points.get("p") == pts and isinstance(points.get("p")[0], Point)
    when = Cache(r, namespace="typed", value_type=dt.date)
    when.set("d", dt.date(2020, 1, 2))
    assert when.get("d") == dt.date(2020, 1, 2)


def test_untyped_models_are_stored_as_plain_json(r: redis.Redis) -> None:
    cache = Cache(r, namespace="plain")
    cache.set("u", User(id=1, name="ada", joined=dt.datetime(2024, 1, 1)))
    cache.set("p", Point(1, 2.0))
    assert cache.get("u") == {"id": 1, "name": "ada", "joined": "2024-01-01T00:00:00"}
    assert cache.get("p") == {"x": 1, "y": 2.0, "label": []}


def test_the_decorator_decodes_to_the_return_annotation(r: redis.Redis) -> None:
    cache = Cache(r, namespace="annot")
    calls: list[int] = []

    @cached(cache)
    def load(uid: int) -> User:
        calls.append(uid)
        return User(id=uid, name="u", joined=dt.datetime(2024, 1, 1))

    @cached(cache)
    def point() -> Point:
        return Point(1, 2.0, ("x",))

    first, second = load(7), load(7)
    assert calls == [7]
    assert isinstance(second, User) and second == first
    assert point() == point() == Point(1, 2.0, ("x",))
    assert isinstance(point(), Point)


def test_a_value_that_does_not_match_the_declared_type_is_a_decode_miss(r: redis.Redis) -> None:
    metrics = CounterMetrics()
    Cache(r, namespace="mismatch").set("u", {"id": "not a number"})
    users = Cache(r, namespace="mismatch", value_type=User, metrics=metrics)
    assert users.get("u", MISSING) is MISSING
    assert metrics.count(CacheEvent.DECODE_ERROR) == 1


# -- bad values --------------------------------------------------------------------------------
class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (Opaque(), "test_cache_serialization.Opaque"),
        ({"nested": [1, {"deep": Opaque()}]}, "Opaque"),
        (b"bytes", "bytes"),
        (dt.datetime(2024, 1, 1), "datetime"),
        ({(1, 2): "tuple key"}, "tuple"),
    ],
)
def test_unserializable_values_raise_serialization_error_naming_the_type(
    r: redis.Redis, value: Any, type_name: str
) -> None:
    cache = Cache(r, namespace="bad")
    with pytest.raises(SerializationError, match=type_name) as info:
        cache.set("k", value)
    assert info.value.key == "k"
    with pytest.raises(SerializationError, match=type_name):
        cache.get_or_set("k2", lambda: value)
    with pytest.raises(SerializationError, match=type_name):
        cache.set_many({"a": 1, "b": value})
    assert r.keys("*:k:*") == []  # nothing half-written


def test_circular_values_raise_serialization_error(r: redis.Redis) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="list"):
        Cache(r, namespace="bad").set("k", loop)


def test_a_declared_type_the_value_does_not_match_raises(r: redis.Redis) -> None:
    with pytest.raises(SerializationError, match="str"):
        Cache(r, namespace="bad", value_type=int).set("k", "not an int")


def test_oversize_values_raise_and_the_limit_is_configurable(r: redis.Redis) -> None:
    cache = Cache(r, namespace="size", max_value_size=100)
    cache.set("ok", "x" * 90)
    with pytest.raises(SerializationError, match="limit is 100") as info:
        cache.set("big", "x" * 200)
    assert info.value.key == "big"
    with pytest.raises(SerializationError, match="max_value_size"):
        cache.get_or_set("big", lambda: "y" * 500)
    assert cache.get("big", MISSING) is MISSING
    with pytest.raises(ConfigError):
        Cache(r, max_value_size=0)


# -- what Redis may hold -----------------------------------------------------------------------
def test_corrupt_truncated_and_foreign_bytes_are_misses(
    r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = CounterMetrics()
    cache = Cache(r, namespace="junk", metrics=metrics)
    cache.set("good", {"a": 1})
    good = get_bytes(r, entry("junk", "good"))
    assert good is not None
    plants = {
        "foreign": b"plain text someone else wrote",
        "empty": b"",
        "truncated": good[:-3],
        "header-only": good[:20],
        "bad-length": good[:22] + b"zzzz" + good[26:],
        "bad-json": envelope(r, "junk", b"{not json"),
        "utf8": envelope(r, "junk", b"\xff\xfe"),
        "old-epoch-garbage": good[:26] + b"\xff" * 40,
        "other-serializer": envelope(r, "junk", b"{}", serializer=b"p"),
    }
    for name, raw in plants.items():
        r.set(entry("junk", name), raw)
    r.rpush(entry("junk", "a-list"), "x")  # not even a string
    caplog.set_level(logging.WARNING, logger="distcache")
    for name in [*plants, "a-list"]:
        assert cache.get(name, MISSING) is MISSING, name
    assert cache.get_many([*plants, "good"]) == {"good": {"a": 1}}
    assert metrics.count(CacheEvent.DECODE_ERROR) == 2 * len(plants)
    assert "undecodable entry" in caplog.text
    # a read-through replaces the junk (it compares against exactly the bytes it read)
    assert cache.get_or_set("bad-json", lambda: "fresh") == "fresh"
    assert cache.get("bad-json") == "fresh"


class Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _exploit(marker: Path) -> bytes:
    payload = pickle.dumps(Exploit(marker))
    pickle.loads(payload)  # the payload is live: unpickling it does run the command
    assert marker.exists()
    marker.unlink()
    return payload


def test_a_planted_pickle_never_runs_under_the_default_serializer(
    r: redis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = _exploit(marker)
    metrics = CounterMetrics()
    cache = Cache(r, namespace="evil", metrics=metrics)
    cache.set("warm", 1)
    plants = {
        "raw": payload,
        "as-json": envelope(r, "evil", payload),
        "as-pickle": envelope(r, "evil", payload, serializer=b"p"),
        "signed-shape": envelope(r, "evil", b"\x00" * 32 + payload, serializer=b"p"),
    }
    for name, raw in plants.items():
        r.set(entry("evil", name), raw)
    for name in plants:
        assert cache.get(name, MISSING) is MISSING
        assert cache.get_or_set(name, lambda: "safe") == "safe"  # read (a miss), then replaced
    assert metrics.count(CacheEvent.DECODE_ERROR) == 2 * len(plants)
    assert cache.get_many(list(plants)) == dict.fromkeys(plants, "safe")
    assert not marker.exists()


def test_signed_pickle_refuses_unsigned_and_wrongly_signed_payloads(
    r: redis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    payload = _exploit(marker)
    metrics = CounterMetrics()
    cache = Cache(r, namespace="pk", serializer=PickleSerializer([KEY_A]), metrics=metrics)
    cache.set("warm", 1)
    wrong = PickleSerializer([KEY_B]).dumps(Exploit(marker))
    plants = {
        "unsigned": envelope(r, "pk", payload, serializer=b"p"),
        "zero-mac": envelope(r, "pk", b"\x00" * 32 + payload, serializer=b"p"),
        "wrong-key": envelope(r, "pk", wrong, serializer=b"p"),
        "short": envelope(r, "pk", b"abc", serializer=b"p"),
        "flipped": envelope(
            r, "pk", bytes([wrong[0] ^ 1]) + PickleSerializer([KEY_A]).dumps(1)[1:], b"p"
        ),
    }
    for name, raw in plants.items():
        r.set(entry("pk", name), raw)
        assert cache.get(name, MISSING) is MISSING, name
    assert metrics.count(CacheEvent.DECODE_ERROR) == len(plants)
    assert not marker.exists()


def test_signed_pickle_round_trips_and_rotates_keys(r: redis.Redis) -> None:
    old = Cache(r, namespace="rot", serializer=PickleSerializer([KEY_A]))
    value = {"set": {1, 2}, "when": dt.datetime(2024, 1, 1), "point": Point(1, 2.0)}
    old.set("k", value)
    assert old.get("k") == value
    rotating = Cache(r, namespace="rot", serializer=PickleSerializer([KEY_B, KEY_A]))
    assert rotating.get("k") == value  # signed with the old key: still accepted
    rotating.set("new", 1)
    raw = get_bytes(r, entry("rot", "new"))
    assert raw is not None
    start = 26 + int(raw[22:26], 16)
    assert PickleSerializer([KEY_B]).loads(raw[start:]) == 1  # signed with the first key
    retired = Cache(r, namespace="rot", serializer=PickleSerializer([KEY_B]))
    assert retired.get("k", MISSING) is MISSING  # the old key is gone: a miss
    assert retired.get("new") == 1
    json_cache = Cache(r, namespace="rot")
    assert json_cache.get("new", MISSING) is MISSING  # a JSON cache never unpickles


def test_pickle_serializer_needs_real_keys() -> None:
    with pytest.raises(ConfigError, match="list"):
        PickleSerializer(KEY_A)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one"):
        PickleSerializer([])
    with pytest.raises(ConfigError, match="16 bytes"):
        PickleSerializer([b"short"])
    assert "aaaa" not in repr(PickleSerializer([KEY_A]))


def test_a_custom_serializer_needs_a_one_letter_id(r: redis.Redis) -> None:
    class Weird(JsonSerializer):
        @property
        def id(self) -> bytes:
            return b"jj"

    with pytest.raises(ConfigError, match="one ASCII letter"):
        Cache(r, serializer=Weird())
    with pytest.raises(ConfigError):
        Cache(r, serializer=object())  # type: ignore[arg-type]
