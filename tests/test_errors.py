"""The error tree, and the translation of redis-py's exceptions at distkit's boundary."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
import redis.exceptions as rex

from distkit import (
    AuthenticationFailed,
    CacheError,
    ConfigError,
    ConnectionUnavailable,
    DistkitError,
    EventLoopMismatch,
    ForeignDataError,
    LoaderError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    SerializationError,
    ServerError,
    StaleFencingToken,
    _errors,
)
from distkit._errors import redact, translate, translating

EXPECTED_TREE: dict[type[BaseException], type[BaseException]] = {
    ConfigError: DistkitError,
    ConnectionUnavailable: DistkitError,
    AuthenticationFailed: DistkitError,
    EventLoopMismatch: DistkitError,
    ServerError: DistkitError,
    ForeignDataError: ServerError,
    LockError: DistkitError,
    LockNotAcquired: LockError,
    LockNotOwned: LockError,
    LockLost: LockError,
    StaleFencingToken: LockError,
    CacheError: DistkitError,
    SerializationError: CacheError,
    LoaderError: CacheError,
}


def drawn_tree() -> dict[str, str]:
    """Parse the tree drawn in ``distkit/_errors.py``'s docstring: child name -> parent name."""
    doc = _errors.__doc__
    assert doc is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.split("::", 1)[1].splitlines():
        match = re.match(r"^(?P<indent>[ │├└─]+)(?P<name>[A-Za-z]+)", line)
        if match is None:  # blank, or the prose after the drawing
            continue
        depth = len(match["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[match["name"]] = stack[-1][1]
        stack.append((depth, match["name"]))
    return parents


def test_the_tree_is_as_drawn_in_the_docstring() -> None:
    drawn = drawn_tree()
    assert drawn == {child.__name__: parent.__name__ for child, parent in EXPECTED_TREE.items()}
    for child, parent in EXPECTED_TREE.items():
        assert child.__bases__[0] is parent, child
        assert issubclass(child, DistkitError)


def test_every_error_class_in_the_module_is_in_the_tree() -> None:
    classes = {
        obj
        for obj in vars(_errors).values()
        if isinstance(obj, type)
        and issubclass(obj, BaseException)
        and obj.__module__ == _errors.__name__
    }
    assert classes == set(EXPECTED_TREE) | {DistkitError}


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        raise ConfigError("x")


def test_siblings_are_not_related() -> None:
    assert not issubclass(ConnectionUnavailable, ServerError)
    assert not issubclass(ServerError, ConnectionUnavailable)
    assert not issubclass(LockError, CacheError)
    assert not issubclass(ConnectionUnavailable, ValueError)
    assert not issubclass(AuthenticationFailed, ConnectionUnavailable)
    assert not issubclass(LockNotOwned, LockNotAcquired)


def test_errors_carry_their_name_or_key() -> None:
    err = LockNotOwned("not yours", name="orders")
    assert (str(err), err.name) == ("not yours", "orders")
    stale = StaleFencingToken("stale", name="orders", token=3, highest=9)
    assert (stale.name, stale.token, stale.highest) == ("orders", 3, 9)
    cache = SerializationError("bad bytes", key="user:1")
    assert cache.key == "user:1"
    assert LockError("x").name is None
    assert CacheError("x").key is None


# -- translate() ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        rex.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
        rex.TimeoutError("Timeout reading from socket"),
        rex.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        rex.ReadOnlyError("READONLY You can't write against a read only replica."),
        rex.ClusterDownError("CLUSTERDOWN The cluster is down"),
        rex.TryAgainError("TRYAGAIN"),
        rex.ClusterError("TTL exhausted."),  # redis-py gave up on MOVED/ASK/TRYAGAIN (resharding)
        rex.MasterDownError("MASTERDOWN Link with MASTER is down"),
        rex.MaxConnectionsError("Too many connections"),
        rex.SlotNotCoveredError('Slot "1" is not covered by the cluster.'),
        rex.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one reachable node: x"
        ),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        asyncio.TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_unavailability_maps_to_connection_unavailable(exc: BaseException) -> None:
    mapped = translate(exc, what="acquire lock 'a'")
    assert type(mapped) is ConnectionUnavailable
    assert str(mapped).startswith("acquire lock 'a': ")
    assert type(exc).__name__ in str(mapped)


def test_read_only_is_unavailable_not_a_server_error() -> None:
    # ReadOnlyError is a ResponseError in redis-py: a failed-over master, i.e. transient.
    assert isinstance(rex.ReadOnlyError("READONLY"), rex.ResponseError)
    assert type(translate(rex.ReadOnlyError("READONLY x"))) is ConnectionUnavailable


def test_wrongtype_maps_to_foreign_data_error() -> None:
    exc = rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    mapped = translate(exc, what="get cache key")
    assert type(mapped) is ForeignDataError
    assert isinstance(mapped, ServerError)
    assert "WRONGTYPE" in str(mapped)
    assert "get cache key" in str(mapped)


@pytest.mark.parametrize(
    "exc",
    [
        rex.ResponseError("ERR unknown command 'NOPE'"),
        rex.NoScriptError("NOSCRIPT No matching script"),
        rex.OutOfMemoryError("OOM command not allowed"),
        rex.DataError("Invalid input of type: 'dict'"),
        rex.RedisError("something else"),
        rex.ClusterError("Cannot execute on this node"),
        rex.RedisClusterException("EVAL - all keys must map to the same key slot"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_redis_errors_map_to_server_error(exc: BaseException) -> None:
    mapped = translate(exc)
    assert type(mapped) is ServerError
    assert type(exc).__name__ in str(mapped)


@pytest.mark.parametrize(
    "exc", [ValueError("v"), KeyError("k"), RuntimeError("r"), ZeroDivisionError()]
)
def test_non_redis_exceptions_are_not_translated(exc: BaseException) -> None:
    assert translate(exc) is None


def test_distkit_errors_pass_through_unchanged() -> None:
    err = LockNotOwned("x", name="n")
    assert translate(err) is err


def test_translate_redacts_url_passwords() -> None:
    exc = rex.ConnectionError("cannot reach redis://alice:s3cr3t-pw@h:1/0")
    mapped = translate(exc)
    assert mapped is not None
    assert "s3cr3t" not in str(mapped)
    assert "redis://alice:***@h:1/0" in str(mapped)


def test_translate_names_an_empty_message_by_type() -> None:
    mapped = translate(rex.TimeoutError())
    assert mapped is not None
    assert "TimeoutError" in str(mapped)


# -- translating() ----------------------------------------------------------------------------


def test_translating_raises_from_the_original() -> None:
    original = rex.ConnectionError("boom")
    with pytest.raises(ConnectionUnavailable, match=r"ping: .*boom") as info, translating("ping"):
        raise original
    assert info.value.__cause__ is original


def test_translating_covers_cluster_exceptions() -> None:
    original = rex.RedisClusterException("Redis Cluster cannot be connected. Please provide ...")
    with pytest.raises(ConnectionUnavailable) as info, translating():
        raise original
    assert info.value.__cause__ is original


def test_translating_leaves_other_exceptions_alone() -> None:
    original = ValueError("not redis")
    with pytest.raises(ValueError) as info, translating("x"):
        raise original
    assert info.value is original
    assert not isinstance(info.value, DistkitError)


def test_translating_is_silent_without_an_error() -> None:
    with translating("nothing"):
        value = 1
    assert value == 1


# -- redact() ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://alice:pw@h:1/0", "redis://alice:***@h:1/0"),
        ("rediss://:pw@h", "rediss://:***@h"),
        (
            "see redis://u:pw@a/0 and redis://v:pw2@b/1",
            "see redis://u:***@a/0 and redis://v:***@b/1",
        ),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),  # an unescaped @ in the password
        ("got 'redis://u:p@ss@h:1' (x)", "got 'redis://u:***@h:1' (x)"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("no url here: a@b", "no url here: a@b"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


# -- against the real server ------------------------------------------------------------------


def test_real_wrongtype_becomes_foreign_data_error(r: redis.Redis) -> None:
    r.set("distkit:test:str", "plain")
    with pytest.raises(ForeignDataError) as info, translating("push onto 'distkit:test:str'"):
        r.lpush("distkit:test:str", "x")
    assert "WRONGTYPE" in str(info.value)
    assert "push onto 'distkit:test:str'" in str(info.value)
    assert isinstance(info.value.__cause__, rex.ResponseError)
    assert r.get("distkit:test:str") == b"plain"


def test_real_unknown_command_becomes_server_error(r: redis.Redis) -> None:
    with pytest.raises(ServerError) as info, translating():
        r.execute_command("DISTKIT-NO-SUCH-COMMAND")
    assert not isinstance(info.value, ForeignDataError)
    assert "unknown command" in str(info.value).lower()


def test_real_wrongtype_async(ar: Callable[[], redis.asyncio.Redis]) -> None:
    async def main() -> BaseException | None:
        client = ar()
        try:
            await client.hset("distkit:test:hash", "f", "v")
            with translating("get"):
                await client.get("distkit:test:hash")
        except DistkitError as exc:
            return exc
        finally:
            await client.aclose()
        return None

    err = asyncio.run(main())
    assert isinstance(err, ForeignDataError)
    assert isinstance(err.__cause__, rex.ResponseError)
