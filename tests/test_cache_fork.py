"""A cache built (and used) before ``os.fork()`` (a module-level cache in a pre-fork server): the
child must not serve its parent's L1 copies without a listener of its own, must renew the fill
locks it takes, and must not wait on loads led by parent threads that do not exist in it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from distcache import Cache, CacheEvent, NearCache, Stampede
from distkit.testing import RedisServer

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # fork() with threads around
]


def in_child(body: Callable[[], dict[str, Any]], before: Callable[[], None] | None = None,
             timeout: float = 30.0) -> dict[str, Any]:  # fmt: skip
    """Fork; run ``body`` in the child; return what it returned (JSON through a pipe).

    ``before`` runs in the parent right after the fork (while the child runs)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        code = 1
        try:
            out = body()
            os.write(w, json.dumps(out).encode())
            code = 0
        except BaseException as exc:
            os.write(w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        if before is not None:
            before()
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child did not finish")
            time.sleep(0.02)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
    out: dict[str, Any] = json.loads(data)
    assert "error" not in out, out["error"]
    assert os.waitstatus_to_exitcode(status) == 0
    return out


def test_a_forked_child_never_serves_the_parents_l1(redis_server: RedisServer) -> None:
    """After another client's set() returned, the child reads the new value at once (not for two
    health-check intervals), gets a listener of its own, and the parent's link stays up."""
    redis_server.client().flushall()
    cache = Cache(redis_server.client(), namespace="nf",
                  near_cache=NearCache(ttl=600, health_check_interval=2.0))  # fmt: skip
    other = Cache(redis_server.client(), namespace="nf")
    near = cache._near
    assert near is not None
    cache.set("k", "old")
    assert near.wait_live(10)
    deadline = time.monotonic() + 5.0  # the invalidation of our own set() may come late
    while near.stats()["entries"] != 1 and time.monotonic() < deadline:
        assert cache.get("k") == "old"
        time.sleep(0.01)
    assert near.stats()["entries"] == 1

    def child() -> dict[str, Any]:
        child_near = cache._near
        assert child_near is not None
        entries = child_near.stats()["entries"]
        other.set("k", "new")
        first = cache.get("k")
        live = child_near.wait_live(10)
        cache.get("k")  # fills the child's L1
        other.set("k", "newer")
        deadline = time.monotonic() + 2.0
        while cache.get("k") != "newer" and time.monotonic() < deadline:
            time.sleep(0.001)
        return {"entries": entries, "first": first, "live": live, "after": cache.get("k")}

    out = in_child(child)
    # The parent's own L1 may still hold "old" for the moment its listener takes (not the point).
    assert out == {"entries": 0, "first": "new", "live": True, "after": "newer"}
    # The child closed its copy of the parent's socket without shutting it down: still live.
    assert near.live
    other.set("k", "parent")
    deadline = time.monotonic() + 2.0
    while cache.get("k") != "parent" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cache.get("k") == "parent"
    assert near.live
    cache.close()


def test_a_forked_child_renews_its_fill_locks(redis_server: RedisServer) -> None:
    """The parent's renewer thread ran before the fork: the child's loader that outlasts the
    lock TTL keeps its fill lock (no second loader meanwhile)."""
    redis_server.client().flushall()
    cache = Cache(redis_server.client(), namespace="fr", stampede=Stampede(lock_ttl=0.6, wait=10))
    cache.get_or_set("warm", lambda: (time.sleep(0.4), 1)[1])  # starts the renewer thread
    assert cache._flow._renewer._thread is not None

    def child() -> dict[str, Any]:
        value = cache.get_or_set("k", lambda: (time.sleep(2.0), "child")[1])
        return {"value": value}

    second: list[Any] = []

    def parent_side() -> None:
        time.sleep(1.2)  # the child's lock (0.6 s) is gone unless renewed
        rival = Cache(redis_server.client(), namespace="fr",
                      stampede=Stampede(lock_ttl=0.6, wait=10))  # fmt: skip
        second.append(rival.get_or_set("k", lambda: "second loader"))

    out = in_child(child, parent_side)
    assert out == {"value": "child"}
    assert second == ["child"]


def test_a_forked_child_does_not_join_a_parent_threads_load(redis_server: RedisServer) -> None:
    """A parent thread leads a load of ``k`` at the fork: the child runs its own (or reads the
    parent's result) without waiting ``Stampede.wait`` for a leader that is not there."""
    redis_server.client().flushall()
    cache = Cache(redis_server.client(), namespace="ff", stampede=Stampede(wait=5))
    started = threading.Event()

    def lead() -> None:
        cache.get_or_set("k", lambda: (started.set(), time.sleep(1.0), "parent")[2])

    thread = threading.Thread(target=lead, daemon=True)
    thread.start()
    assert started.wait(5)

    def child() -> dict[str, Any]:
        t0 = time.monotonic()
        value = cache.get_or_set("k", lambda: "child")
        return {"value": value, "took": time.monotonic() - t0}

    out = in_child(child)
    thread.join(10)
    assert out["value"] in ("parent", "child")
    assert out["took"] < 3.0, out


def test_the_async_flight_table_is_emptied_in_a_forked_child(redis_server: RedisServer) -> None:
    """The async twin: a flight entry present at the fork is gone in the child."""
    import asyncio

    from distcache import AsyncCache

    async def build() -> tuple[AsyncCache, int]:
        acache = AsyncCache(redis.asyncio.Redis.from_url(redis_server.url), namespace="af")
        loop = asyncio.get_running_loop()
        acache._flow._flights["x"] = (loop.create_future(), None, 0.0)  # type: ignore[assignment]
        return acache, len(acache._flow._flights)

    acache, before = asyncio.run(build())
    assert before == 1
    out = in_child(lambda: {"flights": len(acache._flow._flights)})
    assert out == {"flights": 0}


@pytest.mark.parametrize("which", ["namespace", "registry"])
def test_a_forked_child_never_waits_on_an_invalidation_lock_a_parent_thread_held(
    redis_server: RedisServer, which: str
) -> None:
    """Re-review: a parent thread inside ``set()``/``delete()`` at the fork held the namespace's
    invalidation registry lock (or the registry's own lock); the child's copy of that lock was
    never freed and every ``set()`` there hung. Held here deterministically across the fork."""
    from distcache import _stampede

    redis_server.client().flushall()
    cache = Cache(redis_server.client(), namespace=f"fg-{which}")
    cache.set("k", 1)
    lock = (
        _stampede._FORGOTTEN[cache._core.epoch_key].guard
        if which == "namespace"
        else _stampede._FORGOTTEN_GUARD
    )

    def child() -> dict[str, Any]:
        cache.set("k", 2)
        Cache(redis_server.client(), namespace=f"fg-{which}-new").set("k", 3)
        return {"value": cache.get("k")}

    with lock:  # as a parent thread mid-invalidation at the moment of the fork
        out = in_child(child, timeout=10.0)
    assert out["value"] == 2


@pytest.mark.parametrize("which", ["breaker", "metrics", "decorator-names", "django-shared"])
def test_a_forked_child_never_waits_on_a_lock_a_parent_thread_held_on_a_call_path(
    redis_server: RedisServer, which: str
) -> None:
    """The circuit breaker's and the metrics' locks, the ``@cached`` name registry's and the
    Django backend's shared-cache lock: held by a parent thread at the fork, each one hung the
    child's first call that took it. Held here deterministically across the fork."""
    from distcache import CircuitBreaker, CounterMetrics, _decorator, cached

    redis_server.client().flushall()
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=0.001)
    metrics = CounterMetrics()
    cache = Cache(redis_server.client(), namespace=f"fl-{which}", breaker=breaker,
                  metrics=metrics)  # fmt: skip
    breaker.record_failure()  # open: allow() takes the lock (half-open probe)
    time.sleep(0.01)

    def child() -> dict[str, Any]:
        out: dict[str, Any] = {"allowed": breaker.allow()}
        metrics.record(CacheEvent.HIT, "x")
        out["hits"] = metrics.count(CacheEvent.HIT, "x")

        @cached(cache, name=f"f-{which}")
        def f(x: int) -> int:
            return x + 1

        out["f"] = f(1)
        if which == "django-shared":
            from django.conf import settings  # type: ignore[import-untyped]

            from distcache.contrib import django as backend

            if not settings.configured:  # this child's own settings; the parent's are untouched
                settings.configure(SECRET_KEY="fork-test")

            out["shared"] = backend._shared(redis_server.url, {}) is not None
        return out

    if which == "breaker":
        lock: Any = breaker._lock
    elif which == "metrics":
        lock = metrics._lock
    elif which == "decorator-names":
        lock = _decorator._NAMES_GUARD
    else:
        pytest.importorskip("django")
        from distcache.contrib import django as backend

        lock = backend._SHARED_LOCK
    with lock:  # as a parent thread inside the call at the moment of the fork
        out = in_child(child, timeout=10.0)
    assert out["allowed"] is True and out["hits"] == 1 and out["f"] == 2


def test_every_module_level_lock_of_the_library_is_new_in_a_forked_child() -> None:
    """The class of the bug above, for every module: a module-level lock (or RLock) that the
    child inherits as the parent's object could be held by a parent thread at the fork."""
    import importlib
    import pkgutil
    import sys

    import distcache
    import distkit
    import distlock

    lock_types = (type(threading.Lock()), type(threading.RLock()))
    for package in (distkit, distlock, distcache):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".testing" in info.name or info.name.endswith("__main__"):
                continue
            with contextlib.suppress(Exception):  # an optional extra missing or unconfigured
                importlib.import_module(info.name)

    def module_locks() -> dict[str, int]:
        found = {}
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] not in ("distkit", "distlock", "distcache") or ".testing" in name:
                continue
            for attr, value in list(vars(module).items()):
                if type(value) in lock_types:  # type(): no lazy object (Django settings) set up
                    found[f"{name}.{attr}"] = id(value)
        return found

    before = module_locks()
    assert len(before) >= 5, before  # the scan sees the library's locks
    out = in_child(lambda: {"locks": module_locks()}, timeout=10.0)
    kept = sorted(name for name, ident in out["locks"].items() if before.get(name) == ident)
    assert not kept, f"inherited as the parent's object, never renewed in the child: {kept}"
