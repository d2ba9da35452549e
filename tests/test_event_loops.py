"""Async objects used from one event loop after another (issue 15, item 10).

redis-py's asyncio connections belong to the loop that opened them. ``asyncio.run()`` twice,
pytest-asyncio's per-test loops and reloaders all reuse objects built once: with a client built by
``aconnect()`` each loop gets a twin of the client; with a client of the user's that still holds
another loop's connections, every operation raises ``EventLoopMismatch``, never a raw
``RuntimeError`` (and ``AsyncCache`` does not fail open on it: it is a misconfiguration).

The generator: every public coroutine method of every async class has a recipe below (a test fails
when a method without one appears), and each recipe runs on a second loop after a first loop
opened connections, for ``aconnect()`` clients (works) and for the user's clients (typed error).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
import redis.asyncio

from distcache import AsyncCache, NearCache
from distkit import DistkitError, EventLoopMismatch, LockError, aconnect
from distkit._clients import _TWINS
from distkit.testing import IndependentMasters, RedisCluster, RedisServer
from distlock import AsyncLock, AsyncRedlock, AsyncSemaphore


@dataclass
class Setup:
    """One async object and what built it."""

    obj: Any
    clients: list[Any]
    name: str = "loops"
    seen: dict[str, Any] = field(default_factory=dict)


Step = Callable[[Setup], Awaitable[Any]]


async def _nothing(s: Setup) -> None:
    return None


async def _loader() -> int:
    return 7


@dataclass(frozen=True)
class Recipe:
    """``before`` runs on the first loop (opening connections), ``call`` on the next one."""

    call: Step
    before: Step = _nothing
    io: bool = True  # False: the method needs no Redis, so it works with any client
    check: Callable[[Any], bool] = lambda result: True


async def _acquire(s: Setup) -> None:
    assert await s.obj.acquire(blocking=False)


async def _hold_with(s: Setup) -> None:
    async with s.obj:
        assert await s.obj.owned()


async def _enter_exit(s: Setup) -> bool:
    await s.obj.__aenter__()
    await s.obj.__aexit__(None, None, None)
    return True


async def _force_release(s: Setup) -> bool:
    return bool(await type(s.obj).force_release(s.clients[0], s.name))


LOCK_RECIPES: dict[str, Recipe] = {
    "acquire": Recipe(lambda s: s.obj.acquire(blocking=False), check=lambda got: got is True),
    "release": Recipe(lambda s: s.obj.release(), before=_acquire),
    "extend": Recipe(lambda s: s.obj.extend(), before=_acquire),
    "locked": Recipe(lambda s: s.obj.locked(), before=_acquire, check=lambda got: got is True),
    "owned": Recipe(lambda s: s.obj.owned(), before=_acquire, check=lambda got: got is True),
    "__aenter__": Recipe(_hold_with),
    "__aexit__": Recipe(_enter_exit),
    "force_release": Recipe(_force_release, before=_acquire, check=lambda got: got is True),
    "aclose": Recipe(lambda s: s.obj.aclose(), io=False),
}


async def _set(s: Setup) -> None:
    await s.obj.set("k", 1, tags=["t"])


CACHE_RECIPES: dict[str, Recipe] = {
    "get": Recipe(lambda s: s.obj.get("k"), before=_set, check=lambda got: got == 1),
    "get_many": Recipe(
        lambda s: s.obj.get_many(["k", "absent"]), before=_set, check=lambda got: got == {"k": 1}
    ),
    "set": Recipe(lambda s: s.obj.set("k", 2), before=_set, check=lambda got: got is True),
    "set_many": Recipe(lambda s: s.obj.set_many({"a": 1, "b": 2}), before=_set),
    "get_or_set": Recipe(
        lambda s: s.obj.get_or_set("loaded", _loader), before=_set, check=lambda got: got == 7
    ),
    "delete": Recipe(lambda s: s.obj.delete("k"), before=_set, check=lambda got: got is True),
    "invalidate_tags": Recipe(lambda s: s.obj.invalidate_tags("t"), before=_set),
    "clear": Recipe(lambda s: s.obj.clear(), before=_set),
    "add": Recipe(lambda s: s.obj.add("new", 3), before=_set, check=lambda got: got is True),
    "incr": Recipe(lambda s: s.obj.incr("k", 2), before=_set, check=lambda got: got == 3),
    "decr": Recipe(lambda s: s.obj.decr("k"), before=_set, check=lambda got: got == 0),
    "touch": Recipe(lambda s: s.obj.touch("k", 60), before=_set, check=lambda got: got is True),
    "ttl_of": Recipe(
        lambda s: s.obj.ttl_of("k"), before=_set, check=lambda got: got is not None and got > 0
    ),
    "delete_many": Recipe(
        lambda s: s.obj.delete_many(["k", "absent"]), before=_set, check=lambda got: got == 1
    ),
    "drain": Recipe(lambda s: s.obj.drain(1.0), before=_set, io=False),
    "aclose": Recipe(lambda s: s.obj.aclose(), before=_set, io=False),
}

SEMAPHORE_RECIPES: dict[str, Recipe] = {
    **LOCK_RECIPES,
    # locked(): every permit taken; one of two is held
    "locked": Recipe(lambda s: s.obj.locked(), before=_acquire, check=lambda got: got is False),
    "holders": Recipe(lambda s: s.obj.holders(), before=_acquire, check=lambda got: got == 1),
}

REDLOCK_RECIPES: dict[str, Recipe] = {
    **LOCK_RECIPES,
    "close": Recipe(lambda s: s.obj.close(), before=_acquire),  # releases the held lock
}

RECIPES: dict[type, dict[str, Recipe]] = {
    AsyncLock: LOCK_RECIPES,
    AsyncSemaphore: SEMAPHORE_RECIPES,
    AsyncRedlock: REDLOCK_RECIPES,
    AsyncCache: CACHE_RECIPES,
}


def _coroutine_methods(cls: type) -> set[str]:
    return {
        name
        for name, member in inspect.getmembers(cls)
        if inspect.iscoroutinefunction(member)
        and (not name.startswith("_") or name in ("__aenter__", "__aexit__"))
    }


@pytest.mark.parametrize("cls", list(RECIPES), ids=lambda c: c.__name__)
def test_every_coroutine_method_has_a_recipe(cls: type) -> None:
    """A public coroutine method added without a cross-loop recipe fails here."""
    assert _coroutine_methods(cls) <= set(RECIPES[cls])


def _cases() -> Iterator[Any]:
    for cls, recipes in RECIPES.items():
        for method in sorted(_coroutine_methods(cls)):
            yield pytest.param(cls, method, recipes[method], id=f"{cls.__name__}.{method}")


Maker = Callable[[str], Any]


def _build(
    cls: type, make: Maker, server: RedisServer, masters: IndependentMasters, **kw: Any
) -> Setup:
    if cls is AsyncRedlock:
        clients = [make(url) for url in masters.urls[:3]]
        return Setup(AsyncRedlock(clients, "loops", ttl=10, **kw), clients)
    client = make(server.url)
    if cls is AsyncLock:
        return Setup(AsyncLock(client, "loops", ttl=10, **kw), [client])
    if cls is AsyncSemaphore:
        return Setup(AsyncSemaphore(client, "loops", 2, ttl=10, **kw), [client])
    return Setup(AsyncCache(client, namespace="loops", breaker=False), [client])


@pytest.fixture
def clean(redis_server: RedisServer, masters: IndependentMasters) -> None:
    for client in [redis_server.client(), *masters.clients()]:
        client.flushall()
        client.close()


async def _before_and_touch(recipe: Recipe, s: Setup) -> None:
    await recipe.before(s)
    for client in s.clients:  # the application's own use opens a connection on this loop too
        await client.ping()


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize(("cls", "method", "recipe"), list(_cases()))
def test_aconnect_clients_work_on_every_new_loop(
    cls: type, method: str, recipe: Recipe, redis_server: RedisServer, masters: IndependentMasters
) -> None:
    """Built once, outside any loop; connections opened on loop 1; the method runs on loop 2."""
    s = _build(cls, aconnect, redis_server, masters)
    asyncio.run(_before_and_touch(recipe, s))
    got = asyncio.run(recipe.call(s))
    assert recipe.check(got), got
    asyncio.run(_nothing(s))


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize(("cls", "method", "recipe"), list(_cases()))
def test_user_clients_raise_event_loop_mismatch(
    cls: type, method: str, recipe: Recipe, redis_server: RedisServer, masters: IndependentMasters
) -> None:
    """A user's client with loop 1's connections: loop 2 gets the typed error naming the fix."""
    s = _build(cls, redis.asyncio.Redis.from_url, redis_server, masters)
    asyncio.run(_before_and_touch(recipe, s))
    if not recipe.io:
        asyncio.run(recipe.call(s))
        return
    with pytest.raises(EventLoopMismatch) as info:
        asyncio.run(recipe.call(s))
    text = str(info.value)
    assert "has been closed" in text
    assert "distkit.aconnect()" in text
    assert "aclose()" in text


LOCKS = [AsyncLock, AsyncSemaphore, AsyncRedlock]


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("cls", LOCKS, ids=lambda c: c.__name__)
def test_a_renewer_of_another_loop_never_stops_or_hangs_a_release(
    cls: type, redis_server: RedisServer, masters: IndependentMasters
) -> None:
    """auto_renew acquired on loop 1 (closed, or still running elsewhere), released on loop 2:
    released with an aconnect client, EventLoopMismatch with a plain one; never a hang."""
    s = _build(cls, aconnect, redis_server, masters, auto_renew=True)
    asyncio.run(_acquire(s))
    asyncio.run(s.obj.release())
    assert not asyncio.run(s.obj.locked())
    # a renewer of a loop that still runs in another thread never hangs the release
    s = _build(cls, aconnect, redis_server, masters, auto_renew=True)
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(_acquire(s), other).result(10)
        asyncio.run(asyncio.wait_for(s.obj.release(), 10))
        assert not asyncio.run(s.obj.locked())
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(10)
        other.close()
    plain = _build(cls, redis.asyncio.Redis.from_url, redis_server, masters, auto_renew=True)
    asyncio.run(_acquire(plain))
    with pytest.raises(EventLoopMismatch):
        asyncio.run(plain.obj.release())


@pytest.mark.usefixtures("clean")
@pytest.mark.parametrize("cls", list(RECIPES), ids=lambda c: c.__name__)
def test_user_clients_closed_at_loop_end_move_to_the_next_loop(
    cls: type, redis_server: RedisServer, masters: IndependentMasters
) -> None:
    """No false alarm: a client closed with ``aclose()`` before its loop ended holds nothing."""
    s = _build(cls, redis.asyncio.Redis.from_url, redis_server, masters)
    recipe = RECIPES[cls]["get" if cls is AsyncCache else "acquire"]

    async def use_and_close(s: Setup) -> Any:
        await recipe.before(s)
        got = await recipe.call(s)
        if cls is not AsyncCache:
            await s.obj.release()
        for client in s.clients:
            await client.aclose()
        return got

    for _ in range(3):
        assert recipe.check(asyncio.run(use_and_close(s)))


def test_a_cache_does_not_fail_open_on_a_loop_mismatch(redis_server: RedisServer) -> None:
    """``get`` is fail-open for outages, not for a client that cannot work on this loop."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    cache = AsyncCache(client, namespace="loops-open")
    asyncio.run(cache.set("k", 1))
    for call in (lambda: cache.get("k", "default"), lambda: cache.get_or_set("k", _loader)):
        with pytest.raises(EventLoopMismatch):
            asyncio.run(call())  # type: ignore[arg-type]


def test_a_loop_still_running_elsewhere_is_named(redis_server: RedisServer) -> None:
    """Two live loops (threads) sharing a user's client: the message says which case it is."""
    client = redis.asyncio.Redis.from_url(redis_server.url)
    lock = AsyncLock(client, "loops-live", ttl=5)
    first = asyncio.new_event_loop()
    try:
        assert first.run_until_complete(lock.acquire())
        first.run_until_complete(lock.release())
        with pytest.raises(EventLoopMismatch, match="is another loop"):
            asyncio.run(lock.acquire())
    finally:
        first.run_until_complete(client.aclose())
        first.close()


def test_twins_of_finished_loops_are_dropped(redis_server: RedisServer) -> None:
    """One twin per live loop: twenty ``asyncio.run()`` calls do not keep twenty clients."""
    client = aconnect(redis_server.url)
    lock = AsyncLock(client, "loops-twins", ttl=5)

    async def cycle() -> None:
        async with lock:
            pass

    for _ in range(20):
        asyncio.run(cycle())
    assert len(_TWINS[client]) == 1
    gc.collect()


def test_near_cache_keeps_invalidating_across_loops(redis_server: RedisServer) -> None:
    """The near cache's listener is a thread of its own: a write seen on loop 3 evicts L1."""
    client = aconnect(redis_server.url)
    other = redis.Redis.from_url(redis_server.url)
    cache = AsyncCache(client, namespace="loops-near", near_cache=NearCache())
    writer = AsyncCache(aconnect(redis_server.url), namespace="loops-near")
    try:
        asyncio.run(cache.set("k", 1))
        assert asyncio.run(cache.get("k")) == 1
        assert asyncio.run(cache.get("k")) == 1  # an L1 hit on another loop

        async def write_then_read() -> Any:
            await writer.set("k", 2)
            for _ in range(200):
                got = await cache.get("k")
                if got == 2:
                    return got
                await asyncio.sleep(0.01)
            return got

        assert asyncio.run(write_then_read()) == 2
    finally:
        asyncio.run(cache.aclose())
        other.close()


def test_cluster_aconnect_clients_work_on_every_new_loop(cluster: RedisCluster) -> None:
    """Cluster clients from ``aconnect()`` get a twin per loop as well."""
    client = aconnect(cluster.config())
    lock = AsyncLock(client, "loops-cluster", ttl=5)
    cache = AsyncCache(client, namespace="loops-cluster")

    async def use(i: int) -> Any:
        async with lock:
            await cache.set(f"k{i}", i)
        return await cache.get(f"k{i}")

    assert [asyncio.run(use(i)) for i in range(3)] == [0, 1, 2]


def test_cluster_user_clients_raise_event_loop_mismatch(cluster: RedisCluster) -> None:
    """A user's ``RedisCluster`` with another loop's connections: the typed error."""
    nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in cluster.startup_nodes]
    client = redis.asyncio.RedisCluster(startup_nodes=nodes)
    lock = AsyncLock(client, "loops-cluster-user", ttl=5)

    async def cycle() -> None:
        async with lock:
            pass

    asyncio.run(cycle())
    with pytest.raises(EventLoopMismatch):
        asyncio.run(cycle())


def _run_in_thread(coro: Any) -> tuple[threading.Thread, list[Any]]:
    """Run ``coro`` on an event loop of its own, in a thread of its own."""
    out: list[Any] = []

    def main() -> None:
        try:
            out.append(asyncio.run(coro))
        except BaseException as exc:  # the test inspects it
            out.append(exc)

    thread = threading.Thread(target=main)
    thread.start()
    return thread, out


def _leases(masters: IndependentMasters, name: str) -> list[int]:
    found = []
    for client in masters.clients():
        found.append(client.exists(f"distkit:lock:{{{name}}}"))
        client.close()
    return found


def test_an_async_redlock_in_use_on_a_running_loop_refuses_another_loop(
    redis_binary: str,
) -> None:
    """Loop A (a thread) is inside a call that waits for stalled masters; loop B calls the same
    handle: a ``LockError`` naming the cause, before anything is sent; A's call and the lease
    are unharmed, and the release afterwards leaves nothing."""
    with IndependentMasters(3, binary=redis_binary) as group:
        lock = AsyncRedlock([aconnect(u) for u in group.urls], "two-loops", ttl=10,
                            node_timeout=1.0)  # fmt: skip
        held, out = _run_in_thread(lock.acquire(blocking=False))
        held.join(10)
        assert out == [True]
        for server in group.servers[:2]:
            server.pause()
        try:
            busy, out = _run_in_thread(lock.extend())  # waits up to node_timeout on 2 masters
            time.sleep(0.3)
            assert busy.is_alive()
            for call in (lock.locked, lock.release, lock.extend):
                with pytest.raises(LockError, match="another that is still running"):
                    asyncio.run(asyncio.wait_for(call(), 5))
            assert lock.fencing_token is not None  # the refused release changed nothing
        finally:
            for server in group.servers[:2]:
                server.resume()
        busy.join(10)
        assert not busy.is_alive() and len(out) == 1
        assert out[0] is None or isinstance(out[0], DistkitError), out  # typed, never raw
        if lock.fencing_token is None:  # the extend failed: the handle gave the lease up
            assert lock._core._unreleased is not None  # type: ignore[attr-defined]
        asyncio.run(asyncio.wait_for(lock.release(), 10))
        assert _leases(group, "two-loops") == [0, 0, 0]


def test_an_async_redlock_shared_by_two_loops_raises_only_typed_errors(
    masters: IndependentMasters,
) -> None:
    """Two threads, each running its own loop, hammer one handle (acquire, release, extend,
    locked): every failure is a distkit error, nothing hangs, and no lease is left behind."""
    for client in masters.clients():
        client.flushall()
        client.close()
    lock = AsyncRedlock([aconnect(u) for u in masters.urls[:3]], "hammer", ttl=10)
    raw: list[BaseException] = []
    refused = [0]

    async def hammer(seed: int) -> None:
        rng = random.Random(seed)
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            op = rng.choice(["acquire", "release", "extend", "locked"])
            call = {"acquire": lambda: lock.acquire(blocking=False), "release": lock.release,
                    "extend": lock.extend, "locked": lock.locked}[op]  # fmt: skip
            try:
                await asyncio.wait_for(call(), 5)
            except LockError as exc:
                refused[0] += "another that is still running" in str(exc)
            except DistkitError:
                pass
            except BaseException as exc:  # raw: the defect
                raw.append(exc)

    threads = [_run_in_thread(hammer(seed))[0] for seed in (1, 2)]
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive(), "a call hung"
    assert raw == [], raw[:3]
    assert refused[0] > 0  # the two loops did meet
    if lock.fencing_token is not None:
        asyncio.run(lock.release())
    else:
        with contextlib.suppress(LockError):
            asyncio.run(lock.release())  # a lease a lost call left behind, if any
    assert _leases(masters, "hammer")[:3] == [0, 0, 0]
