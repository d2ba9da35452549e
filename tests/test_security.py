"""Security review, tested (issue 9 point 5; written up in docs/security.md).

Against real redis-server processes:

- TLS: a throwaway CA and server / client certificates are generated per module with the
  ``openssl`` CLI; a redis-server is started with ``--tls-port``; ``connect`` and ``aconnect``
  verify the server (a foreign CA is refused), mutual TLS needs the client certificate.
- ACL: a user whose keys are confined to ``~app:*`` runs locks, Redlock, fenced writes and caches
  (hostile names included) with ``prefix="app"``; the server's own permission check proves no key
  is built outside the prefix, and the same user with another prefix is refused.
- Secrets never in ``repr``, ``str``, exceptions (their whole chain) or logs captured at DEBUG
  while connections fail (refused, wrong password, disabled user, TLS mismatch).
- Signed pickle: truncated, unsigned, wrong-key, downgraded (weaker MAC, no domain separation,
  another serializer's entry) payloads are refused; the MAC check is ``hmac.compare_digest`` over
  every key; a planted code-executing pickle under *every* kind of distkit key never runs.
- Lua: every registered script is a constant built from string literals (an AST scan of the
  packages); at run time, with hostile names, only registered scripts are sent and user data
  travels in KEYS / ARGV only.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import pickle
import shutil
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import distcache
import distcache._serializers as serializers_module
import distkit
import distlock
from distcache import AsyncCache, Cache, CacheEvent, CounterMetrics, PickleSerializer, cached
from distkit import (
    AuthenticationFailed,
    ConnectionUnavailable,
    DistkitError,
    RedisConfig,
    RedlockConfig,
    aconnect,
    connect,
)
from distkit._scripts import registered_scripts
from distkit.testing import RedisServer, free_port
from distlock import AsyncLock, FencedStore, Lock, Redlock

SECRET = "S3cr3t-pa55-" + "x7q" * 4  # distinctive: any occurrence in text is a leak
KEY_A = b"a" * 32
KEY_B = b"b" * 32
HOSTILE = [
    "x*",
    "a:b:c",
    "..:lock:..",
    "' .. redis.call('FLUSHALL') .. '",
    "]]; redis.call('FLUSHALL') --",
    "%s%d\\0",
    "日本語 ☃ 🔒",
    "ns:epoch",
    "k:other",
    "*:*",
]


# -- certificates and servers ------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(cwd: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip


def _make_cert(cwd: Path, name: str, ca: str, san: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA with a server and a client certificate, plus an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    root = tmp_path_factory.mktemp("pki")
    _make_ca(root, "ca")
    _make_ca(root, "other-ca")
    _make_cert(root, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _make_cert(root, "client", "ca", "DNS:client")
    _make_cert(root, "misnamed", "ca", "DNS:elsewhere.invalid")  # valid CA, wrong name
    for key in root.glob("*.key"):
        key.chmod(0o600)
    return root


def _tls_server(
    binary: str, pki: Path, *, auth_clients: bool, cert: str = "server"
) -> tuple[RedisServer, int]:
    tls_port = free_port()
    server = RedisServer(
        binary=binary,
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(pki / f"{cert}.crt"),
            "--tls-key-file", str(pki / f"{cert}.key"),
            "--tls-ca-cert-file", str(pki / "ca.crt"),
            "--tls-auth-clients", "yes" if auth_clients else "no",
        ],
    )  # fmt: skip
    try:
        server.start()  # the plain port stays open: the rig's readiness probe uses it
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        raise
    return server, tls_port


@pytest.fixture(scope="module")
def tls_server(redis_binary: str, pki: Path) -> Iterator[tuple[RedisServer, int]]:
    """A redis-server with a TLS port (server certificate only) and an ACL user."""
    server, tls_port = _tls_server(redis_binary, pki, auth_clients=False)
    with server:
        with server.client() as admin:
            admin.acl_setuser(
                "tls-user", enabled=True, passwords=[f"+{SECRET}"], keys=["*"], commands=["+@all"]
            )
        yield server, tls_port


def _tls_config(pki: Path, port: int, **extra: Any) -> RedisConfig:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": True,
        "tls_ca_file": pki / "ca.crt",
        "connect_timeout": 2.0,
        "socket_timeout": 2.0,
    }
    fields.update(extra)
    return RedisConfig(**fields)


# -- TLS ---------------------------------------------------------------------------------------
def test_tls_connect_verifies_the_server_and_carries_locks_and_caches(
    tls_server: tuple[RedisServer, int], pki: Path
) -> None:
    server, tls_port = tls_server
    client = connect(_tls_config(pki, tls_port, username="tls-user", password=SECRET))
    try:
        assert client.acl_whoami() == "tls-user"
        info = client.client_info()
        assert int(info["laddr"].rsplit(":", 1)[1]) == tls_port != server.port
        lock = Lock(client, "tls-lock", ttl=5)
        assert lock.acquire(blocking=False)
        assert lock.fencing_token is not None
        lock.release()
        cache = Cache(client, namespace="tls", strict=True)
        cache.set("k", {"v": 1}, tags=["t"])
        assert cache.get("k") == {"v": 1}
        cache.invalidate_tags("t")
        assert cache.get("k") is None
    finally:
        client.close()
    # the same through a rediss:// URL (password percent-encoded in it)
    url = f"rediss://tls-user:{SECRET}@localhost:{tls_port}/0"
    by_url = connect(RedisConfig(url=url, tls_ca_file=pki / "ca.crt"))
    try:
        assert by_url.ping()
    finally:
        by_url.close()


def test_tls_aconnect_verifies_the_server(tls_server: tuple[RedisServer, int], pki: Path) -> None:
    _, tls_port = tls_server

    async def main() -> None:
        client = aconnect(_tls_config(pki, tls_port, username="tls-user", password=SECRET))
        try:
            assert await client.acl_whoami() == "tls-user"
            lock = AsyncLock(client, "tls-alock", ttl=5)
            assert await lock.acquire(blocking=False)
            await lock.release()
            cache = AsyncCache(client, namespace="atls", strict=True)
            await cache.set("k", [1, 2])
            assert await cache.get("k") == [1, 2]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_tls_refuses_a_server_signed_by_an_unknown_ca(
    tls_server: tuple[RedisServer, int], pki: Path
) -> None:
    _, tls_port = tls_server
    client = connect(_tls_config(pki, tls_port, tls_ca_file=pki / "other-ca.crt"))
    try:
        with pytest.raises(ConnectionUnavailable, match=r"(?i)certificate|ssl"):
            Lock(client, "mitm", ttl=5).acquire(blocking=False)
    finally:
        client.close()

    async def main() -> None:
        aclient = aconnect(_tls_config(pki, tls_port, tls_ca_file=pki / "other-ca.crt"))
        try:
            with pytest.raises(ConnectionUnavailable):
                await AsyncLock(aclient, "mitm", ttl=5).acquire(blocking=False)
        finally:
            await aclient.aclose()

    asyncio.run(main())


def test_tls_checks_the_hostname(redis_binary: str, pki: Path) -> None:
    """A certificate from the trusted CA but for another name is refused, unless the hostname
    check is switched off (which shows the refusal was about the name)."""
    server, tls_port = _tls_server(redis_binary, pki, auth_clients=False, cert="misnamed")
    with server:
        strict = connect(_tls_config(pki, tls_port))
        try:
            with pytest.raises(ConnectionUnavailable, match=r"(?i)hostname|certificate|ssl"):
                Lock(strict, "name-check", ttl=5).acquire(blocking=False)
        finally:
            strict.close()
        lax = connect(_tls_config(pki, tls_port, tls_check_hostname=False))
        try:
            assert lax.ping()
        finally:
            lax.close()


def test_mutual_tls_needs_the_client_certificate(redis_binary: str, pki: Path) -> None:
    server, tls_port = _tls_server(redis_binary, pki, auth_clients=True)
    with server:
        anonymous = connect(_tls_config(pki, tls_port))
        try:
            with pytest.raises(ConnectionUnavailable):
                Lock(anonymous, "mtls", ttl=5).acquire(blocking=False)
        finally:
            anonymous.close()
        config = _tls_config(
            pki, tls_port, tls_cert_file=pki / "client.crt", tls_key_file=pki / "client.key"
        )
        client = connect(config)
        try:
            lock = Lock(client, "mtls", ttl=5)
            assert lock.acquire(blocking=False)
            lock.release()
        finally:
            client.close()

        async def main() -> None:
            aclient = aconnect(config)
            try:
                assert await aclient.ping()
            finally:
                await aclient.aclose()

        asyncio.run(main())


# -- ACL: keys confined to the prefix ------------------------------------------------------------
def test_an_acl_user_confined_to_the_prefix_runs_everything(fresh_server: RedisServer) -> None:
    """The server refuses (NOPERM) any key outside ``app:*``: a key escaping the prefix fails."""
    with fresh_server.client() as admin:
        admin.acl_setuser(
            "app",
            enabled=True,
            passwords=[f"+{SECRET}"],
            keys=["app:*"],
            channels=["*"],
            commands=["+@all", "-flushall", "-flushdb", "-keys", "-config"],
        )
    config = fresh_server.config(username="app", password=SECRET)
    client = connect(config)
    try:
        for name in HOSTILE:
            lock = Lock(client, name, ttl=5, prefix="app")
            assert lock.acquire(blocking=False), name
            token = lock.fencing_token
            assert token is not None
            other = Lock(client, name, ttl=5, prefix="app")
            assert not other.acquire(blocking=True, timeout=0.05)  # contended path: queue keys
            FencedStore(client, name, prefix="app").write(token, name)
            lock.extend(5)
            lock.release()
            cache = Cache(client, namespace=name, prefix="app", strict=True)
            cache.set(name, name, tags=[name.replace(",", ".").replace("=", "-")])
            assert cache.get(name) == name
            assert cache.get_or_set(name + "x" * 300, lambda n=name: n) == name  # hashed key
            cache.delete(name)
            cache.invalidate_tags(name.replace(",", ".").replace("=", "-"))
            cache.clear()
            redlock = Redlock([client], name, ttl=5, prefix="app")
            assert redlock.acquire(blocking=False)
            redlock.release()
        # the same user under another prefix is refused by the server: the ACL is really on
        with pytest.raises(AuthenticationFailed, match=r"NOPERM|permission"):
            Lock(client, "escape", ttl=5, prefix="other").acquire(blocking=False)
        with pytest.raises(AuthenticationFailed, match=r"NOPERM|permission"):
            Cache(client, namespace="x", prefix="other", strict=True).set("k", 1)
    finally:
        client.close()
    with fresh_server.client() as admin:
        keys = [k.decode() for k in admin.keys("*")]
    assert keys and all(k.startswith("app:") for k in keys), keys


# -- secrets -------------------------------------------------------------------------------------
def _exception_text(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc)), repr(exc)]
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts += [str(cur), repr(cur), repr(cur.args)]
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def _failures(config: RedisConfig) -> list[BaseException]:
    """Drive every public entry point against ``config`` (which fails); return what was raised."""
    out: list[BaseException] = []
    client = connect(config)
    try:
        for action in (
            lambda: Lock(client, "l", ttl=1).acquire(blocking=False),
            lambda: Lock(client, "l", ttl=1).acquire(timeout=0.2),
            lambda: Redlock([client], "l", ttl=1).acquire(blocking=False),
            lambda: FencedStore(client, "f").write(1, "v"),
            lambda: Cache(client, strict=True).get("k"),
            lambda: Cache(client).clear(),  # invalidations never fail open: raise
        ):
            try:
                action()
            except DistkitError as exc:
                out.append(exc)
        # fail-open paths log instead of raising; a refused credential raises (never fails open)
        cache = Cache(client)
        try:
            assert cache.get("k", "default") == "default"
            assert cache.get_or_set("k", lambda: "loaded") == "loaded"
        except AuthenticationFailed as exc:
            out.append(exc)
    finally:
        client.close()

    async def main() -> None:
        aclient = aconnect(config)
        try:
            try:
                await AsyncLock(aclient, "l", ttl=1).acquire(blocking=False)
            except DistkitError as exc:
                out.append(exc)
            try:
                assert await AsyncCache(aclient).get("k", "default") == "default"
            except AuthenticationFailed as exc:
                out.append(exc)
        finally:
            await aclient.aclose()

    asyncio.run(main())
    return out


def test_secrets_never_in_logs_errors_or_reprs(
    fresh_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    with fresh_server.client() as admin:
        admin.acl_setuser("svc", enabled=True, passwords=["+right-password-1"], keys=["*"])
        admin.acl_setuser("off", enabled=False, passwords=[f"+{SECRET}"], keys=["*"])
    caplog.set_level(logging.DEBUG)  # every logger: distkit's, redis-py's, asyncio's
    dead = free_port()
    fast = {"connect_timeout": 0.3, "socket_timeout": 0.3}
    configs = [
        RedisConfig(url=f"redis://svc:{SECRET}@127.0.0.1:{dead}/0", **fast),
        fresh_server.config(username="svc", password=SECRET, **fast),  # wrong password
        fresh_server.config(username="off", password=SECRET, **fast),  # disabled user
        # TLS spoken to a plain port: the handshake times out
        RedisConfig(host="127.0.0.1", port=fresh_server.port, password=SECRET, tls=True, **fast),
    ]
    errors: list[BaseException] = []
    for config in configs:
        assert SECRET not in repr(config) and SECRET not in str(config)
        assert SECRET not in config.describe()
        assert SECRET not in config.model_dump_json()
        found = _failures(config)
        assert found, config.describe()  # each config fails somewhere: the test is live
        errors += found
    assert any(isinstance(e, ConnectionUnavailable) for e in errors)
    assert any(isinstance(e, AuthenticationFailed) for e in errors)
    text = caplog.text + "\n".join(_exception_text(e) for e in errors)
    assert "failing open" in caplog.text  # the fail-open warnings were captured
    assert SECRET not in text
    # errors raised while *building* configs and clients
    for bad in (
        {"url": f"redis://u:{SECRET}@host:notaport/0"},
        {"url": f"http://u:{SECRET}@host/0"},
        {"password": SECRET, "port": 0},
        {"password": SECRET, "mode": "sentinel"},
    ):
        with pytest.raises(DistkitError) as info:
            RedisConfig(**bad)
        assert SECRET not in _exception_text(info.value)
    with pytest.raises(DistkitError) as info:
        RedlockConfig(masters=[f"redis://u:{SECRET}@h:1/0", f"redis://u:{SECRET}@h:1/0"])
    assert SECRET not in _exception_text(info.value)
    client = connect(fresh_server.config(password=SECRET))
    try:
        for obj in (client, Lock(client, "l"), Cache(client), FencedStore(client, "f")):
            assert SECRET not in repr(obj) and SECRET not in str(obj)
    finally:
        client.close()
    assert SECRET not in repr(PickleSerializer([SECRET.encode() * 2]))


# -- signed pickle -------------------------------------------------------------------------------
class _Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _live_payload(marker: Path) -> bytes:
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(payload)  # proves the payload is live: unpickling runs the command
    assert marker.exists()
    marker.unlink()
    return payload


def test_signed_pickle_refuses_truncated_and_downgraded_payloads(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    body = _live_payload(marker)
    ser = PickleSerializer([KEY_A])
    good = ser.dumps({"ok": 1})
    assert ser.loads(good) == {"ok": 1}
    for cut in range(len(good)):  # every truncation, signature included
        with pytest.raises(distcache.SerializationError):
            ser.loads(good[:cut])
    context = b"distcache.pickle.v1\x00"
    downgraded = {
        "unsigned": body,
        "md5": hmac.new(KEY_A, context + body, hashlib.md5).digest() + body,
        "sha1": hmac.new(KEY_A, context + body, hashlib.sha1).digest() + body,
        "sha256-truncated": hmac.new(KEY_A, context + body, hashlib.sha256).digest()[:16] + body,
        "no-domain-separation": hmac.new(KEY_A, body, hashlib.sha256).digest() + body,
        "plain-sha256": hashlib.sha256(body).digest() + body,
        "key-as-hash-prefix": hashlib.sha256(KEY_A + body).digest() + body,
        "wrong-key": PickleSerializer([KEY_B]).dumps(_Exploit(marker)),
        "signature-of-another-body": good[:32] + body,
    }
    for name, data in downgraded.items():
        with pytest.raises(distcache.SerializationError):
            ser.loads(data)
        assert not marker.exists(), name
    # a correctly signed payload does unpickle: the refusals above are not a blanket refusal
    signed = hmac.new(KEY_A, context + body, hashlib.sha256).digest() + body
    ser.loads(signed)
    assert marker.exists()


def test_signed_pickle_compares_in_constant_time_over_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(serializers_module.hmac, "compare_digest", counting)
    keys = [KEY_A, KEY_B, b"c" * 32]
    ser = PickleSerializer(keys)
    for data in (ser.dumps(1), PickleSerializer([keys[2]]).dumps(2), b"\x00" * 32 + b"x"):
        calls.clear()
        with contextlib.suppress(distcache.SerializationError):
            ser.loads(data)
        assert len(calls) == len(keys)  # every key is tried, matched or not
    # and no other comparison of the signature: ``loads`` uses no == / != / in on bytes
    source = inspect.getsource(PickleSerializer.loads)
    tree = ast.parse(source.strip().replace("\n    ", "\n"))
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert all(
        isinstance(op, (ast.NotEq, ast.Eq))
        and isinstance(n.left, ast.Call)
        and getattr(n.left.func, "id", "") == "len"
        for n in compares
        for op in n.ops
    ), ast.dump(tree)


def test_a_json_or_foreign_entry_is_never_unpickled_by_a_pickle_cache(
    r: redis.Redis, tmp_path: Path
) -> None:
    """A downgrade the other way: an entry marked JSON in a pickle cache is a miss."""
    metrics = CounterMetrics()
    json_cache = Cache(r, namespace="dg")
    pickle_cache = Cache(r, namespace="dg", serializer=PickleSerializer([KEY_A]), metrics=metrics)
    json_cache.set("k", {"a": 1})
    assert pickle_cache.get("k", "miss") == "miss"
    assert metrics.count(CacheEvent.DECODE_ERROR) == 1


def _plant_everywhere(r: redis.Redis, payload: bytes) -> list[str]:
    """Put ``payload`` under every key kind of a lock, a fenced value and a cache namespace."""
    keys = [
        "distkit:lock:{pl}",
        "distkit:lock:{pl}:fence",
        "distkit:lock:{pl}:rel",
        "distkit:fenced:{pl}",
        "distkit:cache:{pl}:epoch",
        "distkit:cache:{pl}:ns",
        "distkit:cache:{pl}:t:tag",
        "distkit:cache:{pl}:k:key",
        "distkit:cache:{pl}:h:" + hashlib.sha256(("long" * 60).encode()).hexdigest(),
    ]
    for key in keys:
        r.set(key, payload)
    return keys


def test_a_planted_pickle_under_any_distkit_key_never_runs(
    r: redis.Redis, tmp_path: Path, redis_server: RedisServer
) -> None:
    marker = tmp_path / "pwned"
    payload = _live_payload(marker)
    for variant in (payload, b"dc1:" + b"0" * 16 + b"jv0000" + payload):
        r.flushall()
        _plant_everywhere(r, variant)
        metrics = CounterMetrics()
        cache = Cache(r, namespace="pl", metrics=metrics)
        assert cache.get("key", "miss") == "miss"
        assert metrics.count(CacheEvent.DECODE_ERROR) >= 1  # counted, for the operator
        assert cache.get("long" * 60, "miss") == "miss"
        assert cache.get_many(["key", "long" * 60]) == {}
        f = cached(cache, key=lambda: "key")(lambda: "computed")
        assert f() == "computed"
        signed = Cache(r, namespace="pl", serializer=PickleSerializer([KEY_A]))
        assert signed.get("long" * 60, "miss") == "miss"
        for action in (
            lambda: Lock(r, "pl", ttl=1).acquire(blocking=False),
            lambda: Lock(r, "pl", ttl=1).release(),
            lambda: FencedStore(r, "pl").read(),
            lambda: FencedStore(r, "pl").write(1, "v"),
            lambda c=cache: c.invalidate_tags("tag"),
            cache.clear,
        ):
            with contextlib.suppress(DistkitError):  # a typed error is fine; running code is not
                action()

        async def main() -> None:
            client = redis_server.async_client()
            try:
                acache = AsyncCache(client, namespace="pl")
                assert await acache.get("key", "miss") in ("miss", "computed")
            finally:
                await client.aclose()

        asyncio.run(main())
        assert not marker.exists()


# -- Lua scripts are constants -------------------------------------------------------------------
def _module_constants(tree: ast.Module) -> set[str]:
    """Names bound at module level to an expression of string literals (and such names)."""
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if (
                    isinstance(target, ast.Name)
                    and target.id not in names
                    and _is_literal(node.value, names)
                ):
                    names.add(target.id)
                    changed = True
    return names


def _is_literal(node: ast.expr, constants: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name):
        return node.id in constants
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_literal(node.left, constants) and _is_literal(node.right, constants)
    return False


def test_every_script_source_is_a_string_literal_constant() -> None:
    """An AST scan: each ``Script(name, source)`` is built at module level from literals only."""
    scanned: set[str] = set()
    for package in (distkit, distlock, distcache):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            if "testing" in path.relative_to(root).parts:
                continue  # the test rig (redlock_clock builds skewed test-only scripts)
            tree = ast.parse(path.read_text(), str(path))
            constants = _module_constants(tree)
            top_level = {id(n.value) for n in tree.body if isinstance(n, ast.Assign)}
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Script"):
                    continue
                where = f"{path.name}:{node.lineno}"
                assert id(node) in top_level, f"{where}: Script() built outside module level"
                assert len(node.args) == 2 and not node.keywords, where
                assert _is_literal(node.args[0], constants), where
                assert _is_literal(node.args[1], constants), f"{where}: source is not a literal"
                if isinstance(node.args[0], ast.Constant):
                    scanned.add(node.args[0].value)
            text = path.read_text()
            if path.name not in ("_scripts.py", "_fanout.py"):  # only these send EVAL(SHA)
                assert '"EVAL' not in text and "'EVAL" not in text, path
            elif path.name == "_fanout.py":  # pipelined fan-out: sources from the registry
                assert '"EVAL", call.script.source' in text
    ours = {
        n
        for n in registered_scripts()
        if n.split(".")[0] in ("distkit", "distlock", "distcache")
        and "@" not in n  # test-only clock-skewed copies (distkit.testing.redlock_clock)
    }
    assert ours <= scanned  # every script the packages registered was scanned (tests add theirs)
    assert len(scanned) >= 8


def test_hostile_names_travel_only_as_keys_and_arguments(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = {s.source for s in registered_scripts().values()}
    shas = {s.sha for s in registered_scripts().values()}
    sent: list[tuple[Any, ...]] = []
    real = redis.Redis.execute_command

    def recording(self: redis.Redis, *args: Any, **options: Any) -> Any:
        sent.append(args)
        return real(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", recording)
    client = redis_server.client()
    try:
        client.script_flush()  # so the first call of each script goes through EVAL with source
        before = registered_scripts()
        for name in HOSTILE:
            lock = Lock(client, name, ttl=5)
            assert lock.acquire(blocking=False)
            token = lock.fencing_token
            assert token is not None
            assert not Lock(client, name, ttl=5).acquire(timeout=0.05)
            FencedStore(client, name).write(token, name)
            lock.release()
            cache = Cache(client, namespace=name, strict=True)
            cache.set(name, name, tags=["t"])
            assert cache.get_or_set(name + "!", lambda n=name: n) == name
            cache.invalidate_tags("t")
            assert cache.get(name) is None
            cache.clear()
        assert registered_scripts() == before  # no script was made up at run time
    finally:
        client.close()
    evals = [a for a in sent if a and str(a[0]).upper() in ("EVAL", "EVALSHA")]
    assert any(str(a[0]).upper() == "EVAL" for a in evals)  # sources were sent: checked below
    for args in evals:
        if str(args[0]).upper() == "EVAL":
            assert args[1] in sources
        else:
            assert args[1] in shas
    assert not [a for a in sent if a and str(a[0]).upper() in ("SCRIPT", "FUNCTION")][1:]


# -- the write-up --------------------------------------------------------------------------------
def test_security_doc_examples_run() -> None:
    """Every Python block of docs/security.md runs (they need no server)."""
    import re

    doc = Path(__file__).resolve().parent.parent / "docs" / "security.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/security.md[python block {i}]", "exec"), {})
    text = doc.read_text()
    for name in [n for n in globals() if n.startswith("test_")]:
        if name != "test_security_doc_examples_run":
            assert name in text, f"docs/security.md does not mention {name}"
