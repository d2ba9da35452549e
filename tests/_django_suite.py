"""Run Django's own cache tests (``tests/cache/tests.py`` of the Django sdist) in this process.

Usage: ``python tests/_django_suite.py DJANGO_TESTS_DIR REDIS_URL {distcache,redis} OUT.json``.

``distcache`` runs ``BaseCacheTests`` against ``distcache.contrib.django.DistCache``, configured
exactly as Django configures ``RedisCacheTests`` (``caches_setting_for_tests`` over the backend's
settings, without the ``cull`` caches); ``redis`` runs Django's own ``RedisCacheTests`` on the
same server, for the comparison. Writes ``{test name: "pass" | "fail" | "error" | "skip"}``.
"""

from __future__ import annotations

import json
import sys
import unittest
from typing import Any


def main(tests_dir: str, url: str, which: str, out: str) -> int:
    import django
    from django.conf import settings

    backend = (
        "distcache.contrib.django.DistCache"
        if which == "distcache"
        else "django.core.cache.backends.redis.RedisCache"
    )
    options = {"namespace": "djconf"} if which == "distcache" else {}
    sys.path.insert(0, tests_dir)
    settings.configure(
        SECRET_KEY="distkit conformance run: not a secret",
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        INSTALLED_APPS=["django.contrib.contenttypes", "cache"],
        CACHES={"default": {"BACKEND": backend, "LOCATION": url, "OPTIONS": options}},
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        MIDDLEWARE=[],
        ROOT_URLCONF=[],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
    )
    django.setup()
    import cache.tests as dj  # the sdist's module (tests_dir is on sys.path)
    from django.test import TestCase, override_settings
    from django.test.runner import DiscoverRunner

    if which == "distcache":

        @override_settings(
            CACHES=dj.caches_setting_for_tests(
                base=settings.CACHES["default"], exclude=dj.redis_excluded_caches
            )
        )
        class DistCacheTests(dj.BaseCacheTests, TestCase):  # type: ignore[misc,name-defined]
            pass

        case: Any = DistCacheTests
    else:
        case = dj.RedisCacheTests
    suite = unittest.TestLoader().loadTestsFromTestCase(case)
    names = [t.id().rsplit(".", 1)[1] for t in _tests(suite)]  # the run empties the suite
    runner = DiscoverRunner(verbosity=0, interactive=False)
    runner.setup_test_environment()
    old = runner.setup_databases()
    try:
        result = unittest.TextTestRunner(verbosity=1, stream=sys.stderr).run(suite)
    finally:
        runner.teardown_databases(old)
        runner.teardown_test_environment()
    outcome = dict.fromkeys(names, "pass")
    for kind, items in (
        ("fail", result.failures),
        ("error", result.errors),
        ("skip", result.skipped),
    ):
        for test, _ in items:
            name = getattr(test, "test_case", test).id().rsplit(".", 1)[1]
            outcome[name.split(" ")[0]] = kind
    with open(out, "w") as fh:
        json.dump(outcome, fh, indent=1, sort_keys=True)
    return 0


def _tests(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out += _tests(item)
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
