"""The Python examples of docs/integrations.md run, in order, against a real redis-server.

Each framework section runs in a subprocess of its own (Django's settings are process-wide)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distkit.testing import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrations.md"


def section(title: str) -> str:
    """The text of the ``## title`` section."""
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def run_blocks(text: str, url: str, tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    script = tmp_path / "blocks.py"
    script.write_text(
        "import json, sys\n"
        f"blocks = json.loads({json.dumps(json.dumps(blocks))})\n"
        "namespace = {'__name__': 'integrations_doc'}\n"
        "for i, block in enumerate(blocks):\n"
        f"    block = block.replace('redis://localhost:6379/0', {url!r})\n"
        "    exec(compile(block, f'docs/integrations.md[python block {i}]', 'exec'), namespace)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_django_section_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    pytest.importorskip("django")
    client = redis_server.client()
    client.flushall()
    run_blocks(section("Django"), redis_server.url, tmp_path)
    assert client.keys("distkit:cache:{shop}:*")  # the examples really used Redis
    client.close()


def test_starlette_section_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    client = redis_server.client()
    client.flushall()
    run_blocks(section("Starlette and FastAPI"), redis_server.url, tmp_path)
    assert client.keys("distkit:cache:{items}:*")  # the examples really used Redis
    assert client.keys("distkit:cache:{pages}:*")
    client.close()


def test_the_django_conformance_figures_match_the_test() -> None:
    text = section("Django")
    assert "passes 51 of the 54 `BaseCacheTests`" in text
    from tests import test_django_conformance as conf

    assert len(conf.NOT_APPLICABLE) == 3
    assert len(conf.REDIS_CLIENT_ONLY) == 8


def test_celery_section_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    pytest.importorskip("celery")
    client = redis_server.client()
    client.flushall()
    run_blocks(section("Celery"), redis_server.url, tmp_path)
    assert client.exists("distkit:lock:{invoice:42}:fence")  # the examples really took locks
    assert client.exists("distkit:lock:{invoice:8}:fence")  # ... in the worker too
    client.close()


def test_lock_migration_section_runs(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client()
    client.flushall()
    run_blocks(
        section("Locks: migrating from redis-py and python-redis-lock"), redis_server.url, tmp_path
    )
    assert client.exists("distkit:lock:{report}:fence")
    client.close()
