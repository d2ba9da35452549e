"""Type-checked by tests/test_typing.py: ``# R:`` is the revealed type, ``# E:`` an error code."""

from typing import Any

import redis
import redis.asyncio
from typing_extensions import reveal_type

from distcache import AsyncCache, Cache
from distkit import aconnect, connect

sync = redis.Redis()
asyn = redis.asyncio.Redis()

users: Cache[int] = Cache(sync, namespace="typed", value_type=int)
reveal_type(users.get("k"))  # R: int | None
reveal_type(users.get("k", 0))  # R: int
reveal_type(users.get("k", "none"))  # R: int | str
reveal_type(users.get_many(["k"]))  # R: dict[str, int]
reveal_type(users.get_or_set("k", lambda: 5))  # R: int
users.set("k", 1)
users.set("k", "one")  # E: arg-type
users.set_many({"k": "one"})  # E: dict-item

untyped = Cache(connect("redis://localhost"))
reveal_type(untyped)  # R: distcache._cache.Cache[Any]
reveal_type(untyped.get("k"))  # R: Any | None
untyped.set("k", object())

values: AsyncCache[list[str]] = AsyncCache(aconnect("redis://localhost"))


async def read() -> None:
    reveal_type(await values.get("k"))  # R: list[str] | None
    await values.set("k", [1])  # E: list-item


def annotated(cache: Cache[dict[str, Any]]) -> None:
    reveal_type(cache.get("k", {}))  # R: dict[str, Any]
