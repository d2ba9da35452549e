"""Every example of docs/topology.md runs, in order, against the four real topologies.

Addresses in the page (``localhost:6379``, sentinels ``localhost:2637x``, Cluster
``localhost:700x``, Redlock masters ``localhost:710x``) are replaced by the rig's; each ``bash``
block's exports replace the previous block's, and apply to the Python blocks that follow it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from distkit.testing import IndependentMasters, RedisCluster, RedisSentinelGroup, RedisServer

DOC = Path(__file__).resolve().parent.parent / "docs" / "topology.md"


def _addresses(
    server: RedisServer,
    group: RedisSentinelGroup,
    cluster: RedisCluster,
    masters: IndependentMasters,
) -> dict[str, str]:
    def at(address: tuple[str, int]) -> str:
        return f"{address[0]}:{address[1]}"

    out = {"localhost:6379": at(server.address)}
    for port, address in zip((26379, 26380, 26381), group.sentinel_addresses, strict=True):
        out[f"localhost:{port}"] = at(address)
    for port, address in zip((7000, 7001, 7002), cluster.startup_nodes, strict=True):
        out[f"localhost:{port}"] = at(address)
    for port, master in zip((7101, 7102, 7103), masters.servers, strict=False):
        out[f"localhost:{port}"] = at(master.address)
    return out


def _substitute(text: str, addresses: dict[str, str]) -> str:
    return re.sub(r"localhost:\d+", lambda m: addresses.get(m.group(0), m.group(0)), text)


def test_topology_doc_examples_run(
    redis_server: RedisServer,
    cluster: RedisCluster,
    masters: IndependentMasters,
    redis_binary: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("DISTKIT_")]:
        if name != "DISTKIT_REDIS_SERVER":
            monkeypatch.delenv(name)
    redis_server.client().flushall()
    cluster.client().flushall()
    with RedisSentinelGroup(service="mymaster", binary=redis_binary) as group:
        addresses = _addresses(redis_server, group, cluster, masters)
        blocks = re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(), flags=re.S)
        assert sum(lang == "python" for lang, _ in blocks) >= 8
        assert sum(lang == "bash" for lang, _ in blocks) == 4
        namespace: dict[str, object] = {"__name__": "topology_doc"}
        exported: list[str] = []
        for i, (lang, block) in enumerate(blocks):
            code = _substitute(block, addresses)
            if lang == "bash":
                for name in exported:
                    monkeypatch.delenv(name)
                exported = []
                for name, value in re.findall(r"^export (\w+)=(\S+)$", code, flags=re.M):
                    monkeypatch.setenv(name, value)
                    exported.append(name)
                assert exported, f"bash block {i} exports nothing"
                continue
            exec(compile(code, f"docs/topology.md[block {i}]", "exec"), namespace)

        # the examples really reached each topology
        assert redis_server.client().exists("distkit:lock:{nightly-report}:fence")
        with group.master.client() as conn:
            assert conn.exists("distkit:lock:{payments}:fence")
        assert cluster.client().exists("distkit:lock:{invoice-7}:fence")
        assert sum(bool(c.exists("distkit:lock:{ledger}:fence")) for c in masters.clients()) >= 2


def test_the_page_is_linked_from_readme_and_fencing() -> None:
    root = DOC.parent.parent
    assert "docs/topology.md" in (root / "README.md").read_text()
    assert "topology.md" in (root / "docs" / "fencing.md").read_text()
