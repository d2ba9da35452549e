"""Every example of docs/operations.md runs, in order, against a real server.

``python`` blocks run in one namespace; each line of a ``bash`` block is a ``distkit`` command run
as a subprocess (``python -m distkit``), whose exit code must be the one its ``# exit N`` comment
states (0 without one); a ``text`` block is the output of the command just before it, compared
with owner ids and numbers masked.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from distkit.testing import RedisServer

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
_VARYING = re.compile(r"\b[0-9a-f]*\d[0-9a-f]*\b(\.\d+)?")


def _masked(text: str) -> list[str]:
    return [_VARYING.sub("#", line).rstrip() for line in text.strip().splitlines()]


def test_operations_doc_examples_run(redis_server: RedisServer) -> None:
    address = f"{redis_server.host}:{redis_server.port}"
    text = DOC.read_text().replace("localhost:6379", address)
    blocks = re.findall(r"```(python|bash|text)\n(.*?)```", text, flags=re.S)[1:]  # 1st: synopsis
    redis_server.client().flushall()
    scope: dict[str, Any] = {}
    last: subprocess.CompletedProcess[str] | None = None
    ran = 0
    for lang, body in blocks:
        if lang == "python":
            exec(compile(body, str(DOC), "exec"), scope)
            if "waiter" in scope:  # let the waiter queue before the lock commands look
                _wait_queued(redis_server)
        elif lang == "bash":
            for line in body.strip().splitlines():
                command, _, comment = line.partition("#")
                want = re.match(r"\s*exit (\d)", comment)
                argv = shlex.split(command)
                assert argv[0] == "distkit"
                last = subprocess.run([sys.executable, "-m", "distkit", *argv[1:]],
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                expected = int(want.group(1)) if want else 0
                assert last.returncode == expected, (line, last.stdout, last.stderr)
                assert "Traceback" not in last.stderr, line
                if "--json" in argv and last.returncode == 0:
                    json.loads(last.stdout)
                ran += 1
        else:
            assert last is not None
            assert _masked(last.stdout) == _masked(body), (last.stdout, body)
    assert ran >= 15
    scope["client"].close()


def _wait_queued(server: RedisServer) -> None:
    import time

    with server.client() as client:
        deadline = time.monotonic() + 10
        while not client.zcard("distkit:lock:{nightly-report}:queue"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
