"""Django's own cache test suite (``BaseCacheTests``) against ``DistCache``, on a real server.

The Django sdist matching the installed Django is downloaded once (``pip download``) into
``$XDG_CACHE_HOME/distkit/django-sdist`` (``~/.cache`` by default) and its ``tests/cache``
package extracted. ``tests/_django_suite.py`` then runs, in a subprocess each (Django settings
are process-wide), ``BaseCacheTests`` with ``DistCache`` configured exactly as Django configures
its ``RedisCacheTests``, and Django's own ``RedisCacheTests`` on the same server. Every
``BaseCacheTests`` test that Django's ``RedisCache`` passes must pass against ``DistCache``.

Without Django this skips; with Django installed and ``DISTKIT_REQUIRE_REDIS=1`` (or ``CI``), a
failed download fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from distkit.testing import RedisServer

django = pytest.importorskip("django")

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "_django_suite.py"
# BaseCacheTests that neither backend runs: the cull tests need MAX_ENTRIES, which Redis
# backends do not implement (Django excludes the "cull" caches for RedisCache; they skip).
NOT_APPLICABLE = {"test_cull", "test_zero_cull", "test_cull_delete_when_store_empty"}
# RedisCacheTests' own tests of Django's client class (pools, get_client, its serializer):
# they test RedisCacheClient's internals, not the cache API.
REDIS_CLIENT_ONLY = {
    "test_cache_client_class",
    "test_get_backend_timeout_method",
    "test_get_client",
    "test_get_connection_pool",
    "test_get_connection_pool_index",
    "test_incr_write_connection",
    "test_redis_pool_options",
    "test_serializer_dumps",
}


def _required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "DISTKIT_REQUIRE_REDIS", ""
    ) not in ("", "0")


def django_tests_dir() -> Path:
    """``tests/`` of the Django sdist matching the installed Django, with ``cache/`` in it."""
    version = django.__version__
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    where = home / "distkit" / "django-sdist" / version
    tests = where / "tests"
    if (tests / "cache" / "tests.py").exists():
        return tests
    where.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["-d", str(where), f"django=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    sdists = sorted(where.glob("*.tar.gz"))
    if done.returncode != 0 or not sdists:
        message = f"cannot download the Django {version} sdist: {done.stderr[-500:]}"
        if _required():
            pytest.fail(message)
        pytest.skip(message)
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/tests/cache/" in m.name and m.isfile()]
        for member in members:
            member.name = "tests/cache/" + member.name.split("/tests/cache/", 1)[1]
        if hasattr(tarfile, "data_filter"):  # 3.10.12+ / 3.11.4+: refuse odd members
            tar.extractall(where, members=members, filter="data")
        else:  # pragma: no cover - older patch releases; the names were rewritten above
            tar.extractall(where, members=members)
    return tests


def run_suite(tests: Path, url: str, which: str, tmp_path: Path) -> dict[str, str]:
    out = tmp_path / f"{which}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(RUNNER), str(tests), url, which, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert out.exists(), done.stderr[-3000:]
    outcome: dict[str, str] = json.loads(out.read_text())
    return outcome


def test_django_base_cache_tests_pass_against_distcache(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    tests = django_tests_dir()
    redis_server.client().flushall()
    ours = run_suite(tests, redis_server.url, "distcache", tmp_path)
    theirs = run_suite(tests, redis_server.url, "redis", tmp_path)

    base = set(ours)
    assert len(base) >= 50, ours  # the whole BaseCacheTests ran, not an empty suite
    assert base <= set(theirs), "the RedisCache run must cover every BaseCacheTests test"
    assert set(theirs) - base == REDIS_CLIENT_ONLY
    failed = {name: kind for name, kind in ours.items() if kind in ("fail", "error")}
    assert not failed, failed
    assert {name for name, kind in ours.items() if kind == "skip"} == NOT_APPLICABLE
    redis_passes = {n for n in base if theirs[n] == "pass"}
    our_passes = {n for n, kind in ours.items() if kind == "pass"}
    assert redis_passes <= our_passes
    assert len(our_passes) == len(redis_passes) == len(base) - len(NOT_APPLICABLE)
