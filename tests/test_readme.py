"""Every Python example in README.md runs, in order, against a real redis-server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distkit.testing import IndependentMasters, RedisServer

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_two_setup_commands_near_the_top() -> None:
    head = README.read_text()[:2500]
    assert "python3 -m benchmarks" in head
    assert "scripts/test" in head


def test_readme_python_examples_run(
    redis_server: RedisServer, masters: IndependentMasters, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_server.client().flushall()
    for block in _blocks("bash"):
        for name, value in re.findall(r"^export (\w+)=(\S+)$", block, flags=re.M):
            monkeypatch.setenv(name, value)
    namespace: dict[str, object] = {"__name__": "readme"}
    examples = _blocks("python")
    assert len(examples) >= 5
    for i, block in enumerate(examples):
        code = block.replace("redis://localhost:6379/0", redis_server.url)
        for port, server in zip((7001, 7002, 7003), masters.servers, strict=False):
            code = code.replace(f"redis://localhost:{port}/0", server.url)
        exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
    assert redis_server.client().keys("distkit:lock:*")  # the examples really used Redis
