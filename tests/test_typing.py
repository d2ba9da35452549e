"""What a type checker sees of the public API (issue 15, item 11), checked by running mypy.

Two inputs, one mypy run: ``tests/typing/*.py`` (hand-written; ``# R: T`` marks the revealed type
of a line, ``# E: code`` an error mypy must report there, and no other line may have either), and
a snippet generated from ``CLIENT_TAKERS``: every constructor or static method that takes a
client, called with the right kind of client (clean) and with the wrong kind (``arg-type``).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distlock import AsyncLock, AsyncRedlock, Lock, Redlock

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = sorted((Path(__file__).parent / "typing").glob("*.py"))

# (call with {c} for the client argument, kind of client it takes, mypy's code for a wrong one)
CLIENT_TAKERS: list[tuple[str, str, str]] = [
    ("Lock({c}, 'name')", "sync", "arg-type"),
    ("AsyncLock({c}, 'name')", "async", "arg-type"),
    ("Lock.force_release({c}, 'name')", "sync", "arg-type"),
    ("await AsyncLock.force_release({c}, 'name')", "async", "arg-type"),
    ("Redlock([{c}], 'name')", "sync", "list-item"),
    ("AsyncRedlock([{c}], 'name')", "async", "list-item"),
    ("Semaphore({c}, 'name', 2)", "sync", "arg-type"),
    ("AsyncSemaphore({c}, 'name', 2)", "async", "arg-type"),
    ("Cache({c})", "sync", "arg-type"),
    ("AsyncCache({c})", "async", "arg-type"),
]

CLIENTS = {
    "sync": ["sync", "cluster", "connect('redis://localhost')"],
    "async": ["asyn", "acluster", "aconnect('redis://localhost')"],
}

HEADER = """\
import redis
import redis.asyncio

from distcache import AsyncCache, Cache
from distkit import aconnect, connect
from distlock import AsyncLock, AsyncRedlock, AsyncSemaphore, Lock, Redlock, Semaphore

sync = redis.Redis()
cluster = redis.RedisCluster()
asyn = redis.asyncio.Redis()
acluster = redis.asyncio.RedisCluster()


async def main() -> None:
"""


def _generated() -> str:
    lines = [HEADER]
    for template, kind, code in CLIENT_TAKERS:
        other = "async" if kind == "sync" else "sync"
        for client in CLIENTS[kind]:
            lines.append(f"    {template.format(c=client)}\n")
        for client in CLIENTS[other]:
            lines.append(f"    {template.format(c=client)}  # E: {code}\n")
    return "".join(lines)


def _expected(path: Path) -> dict[int, set[str]]:
    want: dict[int, set[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if "# R: " in line:
            want.setdefault(number, set()).add("R " + line.split("# R: ", 1)[1].strip())
        if "# E: " in line:
            want.setdefault(number, set()).add("E " + line.split("# E: ", 1)[1].strip())
    return want


_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


def _actual(output: str, cwd: Path) -> dict[Path, dict[int, set[str]]]:
    got: dict[Path, dict[int, set[str]]] = {}
    for raw in output.splitlines():
        match = _LINE.match(raw)
        if match is None:
            continue
        where = got.setdefault((cwd / match["path"]).resolve(), {})
        line, text = int(match["line"]), match["text"]
        if match["kind"] == "note" and text.startswith("Revealed type is "):
            where.setdefault(line, set()).add("R " + text[len("Revealed type is ") :].strip('"'))
        elif match["kind"] == "error":
            code = re.search(r"\[([a-z-]+)\]$", text)
            where.setdefault(line, set()).add("E " + (code[1] if code else text))
    return got


@pytest.fixture(scope="module")
def mypy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str, Path]:
    """One mypy (strict) run over the snippets and the generated client-kind snippet."""
    tmp = tmp_path_factory.mktemp("typing")
    generated = tmp / "client_kinds.py"
    generated.write_text(_generated())
    files = [*SNIPPETS, generated]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--hide-error-context",
            "--no-pretty",
            f"--cache-dir={tmp / 'cache'}",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return files, proc.stdout, tmp


def test_the_generated_snippet_covers_both_kinds_for_every_taker() -> None:
    """Every entry has a right-kind and a wrong-kind call (the generator cannot go empty)."""
    text = _generated()
    for template, _, _ in CLIENT_TAKERS:
        call = template.split("(")[0] + "("
        calls = [line for line in text.splitlines() if line.strip().startswith(call)]
        assert any("# E:" in line for line in calls), template
        assert any("# E:" not in line for line in calls), template


def test_mypy_reports_exactly_the_marked_lines(mypy_run: tuple[list[Path], str, Path]) -> None:
    """Wrong client kinds are errors, typed caches reveal their value type, nothing else."""
    files, output, cwd = mypy_run
    got = _actual(output, cwd)
    for path in files:
        assert got.get(path.resolve(), {}) == _expected(path), f"{path.name}:\n{output}"


def _signature(func: ast.FunctionDef) -> list[tuple[str, str | None, str | None]]:
    args = func.args
    positional = args.posonlyargs + args.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += args.defaults
    out = [
        (a.arg, ast.unparse(a.annotation) if a.annotation else None, ast.unparse(d) if d else None)
        for a, d in zip(positional, defaults, strict=True)
    ]
    out += [
        (a.arg, ast.unparse(a.annotation) if a.annotation else None, ast.unparse(d) if d else None)
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    return out


def _init_of(cls: type) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    found = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    ]
    assert len(found) == 1, f"{cls.__name__}: one __init__ expected"
    return found[0]


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"),
    [(Lock, AsyncLock), (Redlock, AsyncRedlock)],
    ids=lambda c: c.__name__,
)
def test_async_init_stubs_are_in_step_with_the_sync_init(sync_cls: type, async_cls: type) -> None:
    """The type-checking-only ``__init__`` of an async twin is the sync one but for the client."""
    assert async_cls.__init__ is sync_cls.__init__  # at run time: the very same function
    sync_sig, async_sig = _signature(_init_of(sync_cls)), _signature(_init_of(async_cls))
    assert [p for p in sync_sig if p[0] not in ("client", "clients")] == [
        p for p in async_sig if p[0] not in ("client", "clients")
    ]
    client = {p[0]: p[1] for p in async_sig}
    assert (client.get("client") or client.get("clients") or "").count("AsyncClient") == 1
