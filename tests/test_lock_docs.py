"""Every Python example of docs/locks.md, docs/fencing.md and docs/redlock.md runs (issue 15.16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distkit import connect
from distkit.testing import IndependentMasters, RedisServer

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


@pytest.mark.parametrize("name", ["locks.md", "fencing.md", "redlock.md"])
def test_the_examples_run(
    name: str, redis_server: RedisServer, masters: IndependentMasters
) -> None:
    blocks = _blocks(name)
    assert blocks, f"docs/{name} has no Python example"
    client = connect(redis_server.config())
    namespace: dict[str, object] = {"__name__": "docs", "client": client}
    for i, block in enumerate(blocks):
        code = block
        for host, server in zip(("a", "b", "c"), masters.servers, strict=False):
            code = code.replace(f"redis://{host}:6379", server.url)
        exec(compile(code, f"docs/{name}[python block {i}]", "exec"), namespace)
    client.close()


def test_the_key_layout_is_documented_as_stored() -> None:
    text = (DOCS / "locks.md").read_text()
    assert "`P:lock:{N}:rel`" in text and ":fence" in text
    assert "fence is a hash" not in text.lower()
