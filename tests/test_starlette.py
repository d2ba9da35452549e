"""distcache.contrib.starlette against a real redis-server: with Starlette's TestClient, and
once through a real uvicorn server on 127.0.0.1 (an ephemeral port)."""

import asyncio
import itertools
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import pytest

pytest.importorskip("starlette")
fastapi = pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from distcache import AsyncCache, SerializationError, cached  # noqa: E402
from distcache.contrib.starlette import Distkit, cached_response  # noqa: E402
from distkit import ConfigError, aconnect  # noqa: E402
from distkit.testing import RedisServer  # noqa: E402
from distlock import AsyncLock, Lock  # noqa: E402

APPS = itertools.count()


@pytest.fixture
def dk(redis_server: RedisServer) -> Distkit:
    redis_server.client().flushall()
    return Distkit(redis_server.url, caches={"items": {"ttl": 60}})


def item_app(dk: Distkit, calls: list[Any]) -> FastAPI:
    app = FastAPI(lifespan=dk.lifespan)

    @app.get("/items/{item_id}")
    @dk.cached("items", name=f"read_item.{next(APPS)}")  # one name per app this file builds
    async def read_item(
        request: Request, response: Response, tasks: BackgroundTasks, item_id: int
    ) -> dict[str, Any]:
        calls.append(item_id)
        return {"id": item_id, "path": request.url.path}

    @app.post("/invoices/{invoice_id}/pay")
    async def pay(
        invoice_id: int, lock: Annotated[AsyncLock, Depends(dk.lock_for("invoice:{invoice_id}"))]
    ) -> dict[str, Any]:
        assert await lock.owned()
        return {"invoice": invoice_id, "token": lock.fencing_token}

    @app.post("/queue/{invoice_id}")
    async def queued(
        invoice_id: int,
        lock: Annotated[
            AsyncLock,
            Depends(dk.lock_for("invoice:{invoice_id}", on_locked="wait", timeout=0.2)),
        ],
    ) -> dict[str, Any]:
        return {"token": lock.fencing_token}

    @app.get("/price/{sku}")
    async def price(request: Request, sku: str) -> Response:
        async def load() -> dict[str, Any]:
            calls.append(sku)
            return {"sku": sku, "price": len(calls)}

        return await cached_response(request, dk.cache("items"), f"price:{sku}", load, ttl=30)

    @app.put("/docs/{name}")
    async def edit(
        name: str, lock: Annotated[AsyncLock, Depends(dk.lock_for("doc:{name}"))]
    ) -> dict[str, Any]:
        if name == "teapot":
            raise HTTPException(418, "the endpoint failed")
        return {"doc": name}

    @app.put("/misrouted/{name}")
    async def misrouted(
        name: str, lock: Annotated[AsyncLock, Depends(dk.lock_for("doc:{title}"))]
    ) -> dict[str, Any]:
        return {}

    gate = threading.Event()

    @app.post("/slow/{invoice_id}")
    async def slow(
        invoice_id: int, lock: Annotated[AsyncLock, Depends(dk.lock_for("invoice:{invoice_id}"))]
    ) -> dict[str, Any]:
        for _ in range(1000):  # until the test opens the gate (a hang guard: 10 s)
            if gate.is_set():
                break
            await asyncio.sleep(0.01)
        return {"token": lock.fencing_token}

    app.state.read_item = read_item
    app.state.gate = gate
    return app


def test_framework_objects_never_enter_the_key(dk: Distkit) -> None:
    calls: list[Any] = []
    app = item_app(dk, calls)
    with TestClient(app) as client:
        first = client.get("/items/3")
        assert first.status_code == 200, first.text
        assert first.json() == {"id": 3, "path": "/items/3"}
        again = client.get("/items/3", headers={"X-Other": "header"})
        assert again.json() == first.json()
        assert client.get("/items/4").json()["id"] == 4
        assert calls == [3, 4]  # a different Request each time, one load per item
        read_item = app.state.read_item
        # the framework parameters may be left out (or given anything) when naming an entry
        key = read_item.key_for(item_id=3)
        assert key.endswith(":(item_id=n3)")  # no request, response or tasks in it
        assert read_item.key_for(None, None, None, 3) == key
        with pytest.raises(TypeError, match="item_id"):  # positionally, 3 binds to request
            client.portal.call(read_item.invalidate, 3)
        assert client.portal.call(lambda: read_item.invalidate(item_id=3)) is True
        client.get("/items/3")
        assert calls == [3, 4, 3]
    assert not dk.started
    with pytest.raises(ConfigError, match="not started"):
        dk.cache("items")
    with pytest.raises(ConfigError, match="not started"):
        read_item.key_for(item_id=3)


def test_plain_cached_on_a_starlette_endpoint(redis_server: RedisServer) -> None:
    """Plain ``@cached`` with an unannotated ``request`` (Starlette's style): the instance is left
    out of the key; nested in another argument, a Request is refused with a clear error."""
    calls: list[str] = []
    acache = AsyncCache(aconnect(redis_server.url), namespace="plain")

    @cached(acache)
    async def catalogue(request) -> dict[str, str]:  # type: ignore[no-untyped-def]
        calls.append(request.url.path)
        return {"page": "catalogue"}

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse(await catalogue(request))

    @cached(acache)
    async def nested(requests: list[Any]) -> int:
        return 1

    async def bad(request: Request) -> JSONResponse:
        try:
            await nested([request])
        except SerializationError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        return JSONResponse({})

    app = Starlette(routes=[Route("/", endpoint), Route("/bad", bad)])
    with TestClient(app) as client:
        client.portal.call(acache.clear)
        assert client.get("/").json() == {"page": "catalogue"}
        assert client.get("/").json() == {"page": "catalogue"}
        assert calls == ["/"]
        error = client.get("/bad").json()["error"]
        assert "starlette.requests.Request is a framework object" in error
        assert "'requests'" in error
        client.portal.call(acache.aclose)


def test_lock_for_answers_409_or_waits(dk: Distkit, redis_server: RedisServer) -> None:
    app = item_app(dk, [])
    sync = redis_server.client()
    with TestClient(app) as client:
        paid = client.post("/invoices/7/pay")
        assert paid.status_code == 200, paid.text
        assert isinstance(paid.json()["token"], int)
        with Lock(sync, "invoice:7", ttl=30):
            refused = client.post("/invoices/7/pay")
            assert refused.status_code == 409
            assert "invoice:7" in refused.json()["detail"]
            assert client.post("/invoices/8/pay").status_code == 200  # another invoice
            assert client.post("/queue/7").status_code == 409  # waited 0.2 s, then gave up
        again = client.post("/invoices/7/pay")
        assert again.status_code == 200
        assert again.json()["token"] > paid.json()["token"]  # released, and fenced
        assert client.post("/queue/7").status_code == 200
        assert not Lock(sync, "invoice:7").locked()  # the dependency released it
    sync.close()


def test_lock_for_releases_on_failure_and_refuses_bad_names(
    dk: Distkit, redis_server: RedisServer
) -> None:
    sync = redis_server.client()
    with TestClient(item_app(dk, [])) as client:
        assert client.put("/docs/teapot").status_code == 418
        assert not Lock(sync, "doc:teapot").locked()  # released although the endpoint raised
        bad = client.put("/docs/a%7Bb")  # a brace: not a valid lock name
        assert bad.status_code == 400 and "lock name" in bad.json()["detail"]
        assert client.put("/docs/a%00b").status_code == 400  # a control character
        assert client.put("/docs/readme").json() == {"doc": "readme"}
        with pytest.raises(ConfigError, match=r"\['title'\] are not path parameters"):
            client.put("/misrouted/x")
    sync.close()


def test_http_caching_etag_and_304(dk: Distkit) -> None:
    calls: list[Any] = []
    with TestClient(item_app(dk, calls)) as client:
        first = client.get("/price/abc")
        etag = first.headers["etag"]
        assert first.json() == {"sku": "abc", "price": 1}
        assert first.headers["cache-control"].startswith("public, max-age=")
        assert 0 < int(first.headers["cache-control"].rsplit("=", 1)[1]) <= 30
        unchanged = client.get("/price/abc", headers={"If-None-Match": f'"x", W/{etag}'})
        assert unchanged.status_code == 304 and unchanged.content == b""
        assert unchanged.headers["etag"] == etag
        assert client.get("/price/abc", headers={"If-None-Match": '"other"'}).status_code == 200
        assert calls == ["abc"]
        client.portal.call(dk.cache("items").delete, "price:abc")
        client.get("/price/zzz")  # the next load of abc sees a different price
        changed = client.get("/price/abc", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["etag"] != etag
        assert changed.json()["price"] == 3


def test_bad_configuration_is_refused_at_once(dk: Distkit) -> None:
    with pytest.raises(ConfigError, match="unknown AsyncCache options"):
        Distkit("redis://127.0.0.1:1/0", caches={"x": {"tll": 3}})
    with pytest.raises(ConfigError, match="no cache named"):
        dk.cached("nope")
    with pytest.raises(ConfigError, match="unknown @cached options"):
        dk.cached("items", tll=3)
    with pytest.raises(ConfigError, match="coroutine function"):
        dk.cached("items")(lambda: 1)
    with pytest.raises(ConfigError, match="must name a path parameter"):
        dk.lock_for("invoice:{0.x}")
    with pytest.raises(ConfigError, match="on_locked"):
        dk.lock_for("invoice:{id}", on_locked="skip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ttl"):
        dk.lock_for("invoice:{id}", ttl=0)
    bad = Distkit(dk._config)

    @bad.cached(ttl=-1, name="bad-ttl")  # @cached's own checks run at startup
    async def endpoint(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="ttl"), TestClient(FastAPI(lifespan=bad.lifespan)):
        pass
    assert not bad.started
    with pytest.raises(ConfigError, match="timeout"):
        dk.lock_for("invoice:{id}", on_locked="wait", timeout=float("inf"))
    with pytest.raises(ConfigError, match="status_code"):
        dk.lock_for("invoice:{id}", status_code=200)
    with pytest.raises(ConfigError, match="template"):
        dk.lock_for("")


def start(config: Any) -> tuple[Any, threading.Thread]:
    """A uvicorn server run in a thread, once it has started (its lifespan startup done)."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(3000):  # a hang guard (30 s), not a speed check
        if server.started:
            return server, thread
        thread.join(0.01)
        assert thread.is_alive(), "uvicorn stopped during startup"
    server.should_exit = True
    raise AssertionError("uvicorn did not start")


@pytest.fixture
def served(dk: Distkit) -> Iterator[tuple[str, list[Any], FastAPI]]:
    """The app run by a real uvicorn server on 127.0.0.1 (a port the OS picks)."""
    calls: list[Any] = []
    app = item_app(dk, calls)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on", log_level="warning")
    server, thread = start(config)
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", calls, app
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


def test_under_uvicorn(
    served: tuple[str, list[Any], FastAPI], dk: Distkit, redis_server: RedisServer
) -> None:
    base, calls, app = served
    assert dk.started  # the lifespan ran on the server's loop
    with httpx.Client(base_url=base, timeout=10) as http:
        # two requests for one invoice at once: the second is refused while the first holds it
        first: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: first.append(http.post("/slow/9")))
        holder.start()
        sync = redis_server.client()
        for _ in range(1000):  # until the first request holds the lock (hang guard: 10 s)
            if Lock(sync, "invoice:9").locked():
                break
            holder.join(0.01)
        assert http.post("/invoices/9/pay").status_code == 409
        app.state.gate.set()
        holder.join(10)
        assert first[0].status_code == 200 and first[0].json()["token"] > 0
        assert http.post("/invoices/9/pay").status_code == 200
        sync.close()

        assert http.get("/items/5").json() == {"id": 5, "path": "/items/5"}
        assert http.get("/items/5").json()["id"] == 5
        assert calls == [5]
        assert http.post("/invoices/5/pay").status_code == 200
        etag = http.get("/price/q").headers["etag"]
        assert http.get("/price/q", headers={"If-None-Match": etag}).status_code == 304


def test_uvicorn_shutdown_closes_everything(redis_server: RedisServer) -> None:
    dk = Distkit(redis_server.url)
    config = uvicorn.Config(FastAPI(lifespan=dk.lifespan), host="127.0.0.1", port=0, lifespan="on")
    server, thread = start(config)
    assert dk.started
    server.should_exit = True
    thread.join(10)
    assert not thread.is_alive() and not dk.started


def test_security_scopes_are_never_left_out_of_a_key() -> None:
    """The review's case: SecurityScopes was registered as unkeyed, so a cached `current_user`
    dependency answered an /admin check (scope "admin") from the entry a /me check ("read")
    filled. Two calls that differ only in their scopes must never share a key: the argument is
    keyed or refused."""
    from fastapi.security import SecurityScopes

    from distcache._keys import call_key

    keys = []
    for scopes in (["read"], ["admin"]):
        try:
            keys.append(
                call_key("current_user", None, {"s": SecurityScopes(scopes), "tok": "t"}, False)
            )
        except SerializationError:
            keys.append(None)
    assert keys[0] is None or keys[0] != keys[1], keys
