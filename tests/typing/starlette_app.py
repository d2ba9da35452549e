"""Type-checked by tests/test_typing.py: ``# R:`` is the revealed type, ``# E:`` an error code."""

from starlette.requests import Request
from typing_extensions import reveal_type

from distcache.contrib.starlette import Distkit

dk = Distkit("redis://localhost:6379/0")


@dk.cached()
async def read_item(request: Request, item_id: int) -> dict[str, int]:
    return {"id": item_id}


async def use(request: Request) -> None:
    reveal_type(await read_item(request, 3))  # R: dict[str, int]
    await read_item(request, "3")  # E: arg-type
    reveal_type(read_item.key_for(request, 3))  # R: str
    reveal_type(dk.cache())  # R: distcache._cache.AsyncCache[Any]


dk.lock_for("invoice:{invoice_id}", on_locked="skip")  # E: arg-type
