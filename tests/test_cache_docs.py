"""Every Python example in docs/cache.md runs, in order, against a real redis-server."""

from __future__ import annotations

import re
from pathlib import Path

from distkit.testing import RedisServer

DOC = Path(__file__).resolve().parent.parent / "docs" / "cache.md"


def test_cache_doc_examples_run(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.flushall()
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "cache_doc"}
    for i, block in enumerate(blocks):
        code = block.replace("redis://localhost:6379/0", redis_server.url)
        exec(compile(code, f"docs/cache.md[python block {i}]", "exec"), namespace)
    assert client.keys("distkit:cache:*")  # the examples really used Redis
    client.close()


def test_the_usage_section_comes_first() -> None:
    head = DOC.read_text()[:600]
    assert "## Caches" in head and "```python" in head
