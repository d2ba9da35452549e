"""The ``distkit`` command line: look at and repair the state of locks and caches in a Redis.

::

    distkit [--url URL] [--json] ping
    distkit lock list [PATTERN] | lock inspect NAME | lock release NAME --force [--yes]
    distkit cache stats NS | cache clear NS | cache invalidate NS TAG... | cache get NS KEY [--raw]

The ``lock`` and ``cache`` subcommands live in ``distlock._cli`` and ``distcache._cli`` (this
package never imports them): they are found through the ``distkit.cli`` entry points, or
``DISTKIT_CLI_PLUGINS``, or by module name when neither exists (a source checkout).

The target comes from ``--url`` (any ``RedisConfig`` URL, TLS and ACL users included), else from
``DISTKIT_*`` variables (``RedisConfig.from_env``). Keys are found with ``SCAN`` (bounded counts,
every master of a Cluster), never ``KEYS``. Exit codes: 0 ok, 1 not found, 2 usage, 3 connection
or authentication, 4 listed, but some entries were unreadable (``lock list``: a key of another
type).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from ._errors import AuthenticationFailed, ConnectionUnavailable, DistkitError, translating

__all__ = ["COMMANDS", "UNREADABLE", "NotFound", "Usage", "main", "masters", "scan"]

OK, NOT_FOUND, USAGE, UNREACHABLE, UNREADABLE = 0, 1, 2, 3, 4


class Usage(Exception):
    """A usage error found after parsing (exit 2)."""


class NotFound(Exception):
    """The named lock, namespace or key does not exist (exit 1)."""


_Usage, _NotFound = Usage, NotFound


def _client(args: argparse.Namespace) -> Any:
    from ._config import RedisConfig
    from ._connection import connect

    config = RedisConfig.from_url(args.url) if args.url else RedisConfig.from_env()
    return config, connect(config)


def masters(client: Any) -> list[Any]:
    """One client per master: the client itself, or one per primary of a Cluster."""
    nodes = getattr(client, "get_primaries", None)
    if nodes is None:
        return [client]
    return [client.get_redis_connection(node) for node in nodes()]


def scan(client: Any, match: str, *, count: int = 500, limit: int = 100_000) -> Iterator[bytes]:
    """Keys matching ``match`` on every master, by ``SCAN`` (at most ``limit`` keys in all)."""
    seen = 0
    for node in masters(client):
        cursor = 0
        while True:
            cursor, keys = node.scan(cursor=cursor, match=match, count=count)
            for key in keys:
                seen += 1
                if seen > limit:
                    return
                yield key
            if cursor == 0:
                break


# -- ping ------------------------------------------------------------------------------------
def _ping(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    rtts = []
    for _ in range(5):
        start = time.perf_counter()
        client.ping()
        rtts.append(time.perf_counter() - start)
    node = masters(client)[0]
    info = node.info()
    version = str(info.get("redis_version", "?"))
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    try:
        policy = str(node.config_get("maxmemory-policy").get("maxmemory-policy", "?"))
        maxmemory = int(node.config_get("maxmemory").get("maxmemory", 0))
    except DistkitError:
        raise
    except Exception:  # CONFIG may be renamed or denied (managed Redis): say so, go on
        policy, maxmemory = "unknown (CONFIG GET refused)", -1
    warnings = []
    if maxmemory != 0 and policy.startswith(("allkeys-", "volatile-")):
        warnings.append(
            f"maxmemory-policy {policy} can evict distkit's keys under memory pressure: "
            + (
                "allkeys-* evicts lock leases, fences and cache epochs"
                if policy.startswith("allkeys-")
                else "volatile-* evicts lock leases and queues (they have TTLs)"
            )
            + "; use noeviction for a Redis that holds locks (docs/operations.md)"
        )
    mode = config.mode
    if mode == "standalone" and info.get("redis_mode") == "cluster":
        mode = "cluster (connected as standalone)"
    return {
        "target": config.describe(),
        "latency_p50_ms": round(statistics.median(rtts) * 1000, 3),
        "version": version,
        "mode": mode,
        "masters": len(masters(client)),
        "replicas": int(info.get("connected_slaves", 0)),
        "capabilities": {
            "client_tracking": major >= 6,  # the near cache
            "script_effects_replication": major >= 5,  # always on from Redis 5
            "wait": True,  # wait_for_replicas
        },
        "maxmemory": maxmemory,
        "maxmemory_policy": policy,
        "warnings": warnings,
    }


def _print_ping(out: TextIO, data: dict[str, Any]) -> None:
    print(f"{data['target']}: PONG in {data['latency_p50_ms']} ms (p50 of 5)", file=out)
    print(f"  redis {data['version']}, {data['mode']}, {data['masters']} master(s), "
          f"{data['replicas']} replica(s)", file=out)  # fmt: skip
    caps = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in data["capabilities"].items())
    print(f"  capabilities: {caps}", file=out)
    print(f"  maxmemory-policy: {data['maxmemory_policy']}", file=out)
    for warning in data["warnings"]:
        print(f"  WARNING: {warning}", file=out)


# -- the parser --------------------------------------------------------------------------------
Command = Callable[[argparse.Namespace, Any, Any], dict[str, Any]]
Printer = Callable[[TextIO, dict[str, Any]], None]
COMMANDS: dict[str, tuple[Command, Printer]] = {"ping": (_ping, _print_ping)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distkit",
        description="Inspect and repair distkit's locks and caches in a Redis.",
        epilog="exit codes: 0 ok, 1 not found, 2 usage, 3 connection or authentication, "
        "4 some listed entries were unreadable",
    )
    parser.add_argument("--url", help="a RedisConfig URL (default: DISTKIT_* variables)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--prefix", default="distkit", help="key prefix (default: distkit)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ping", help="latency, version, mode, capabilities, eviction policy")
    for extend in _EXTENSIONS or _plugins():
        extend(sub)
    return parser


_EXTENSIONS: list[Callable[[Any], None]] = []
# Used when no ``distkit.cli`` entry point is registered (a source checkout run with PYTHONPATH):
# the subcommands of the packages shipped in this distribution, imported by name at run time so
# that ``distkit`` itself never imports ``distlock`` or ``distcache`` (the design's layering).
_DEFAULT_PLUGINS = ("distlock._cli:register", "distcache._cli:register")


def _plugins() -> list[Callable[[Any], None]]:
    """The ``register`` hooks: ``DISTKIT_CLI_PLUGINS`` (comma-separated ``module:function``),
    else the ``distkit.cli`` entry points, else the packages shipped with distkit."""
    from importlib.metadata import entry_points

    listed = os.environ.get("DISTKIT_CLI_PLUGINS")
    if listed is not None:
        specs = [s.strip() for s in listed.split(",") if s.strip()]
    else:
        specs = sorted({ep.value for ep in entry_points(group="distkit.cli")})
        specs = specs or list(_DEFAULT_PLUGINS)
    hooks = []
    for spec in specs:
        module, _, attr = spec.partition(":")
        try:
            hooks.append(getattr(importlib.import_module(module), attr or "register"))
        except (ImportError, AttributeError) as exc:
            print(f"warning: CLI plugin {spec!r} not loaded: {exc}", file=sys.stderr)
    return hooks


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; return its exit code."""
    out = out or sys.stdout
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and USAGE
    key = args.command if args.command in COMMANDS else f"{args.command} {args.action}"
    run, show = COMMANDS[key]
    client = None
    try:
        with translating("distkit"):
            config, client = _client(args)
            data = run(args, config, client)
    except (AuthenticationFailed, ConnectionUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UNREACHABLE
    except _NotFound as exc:
        print(f"not found: {exc}", file=sys.stderr)
        return NOT_FOUND
    except (_Usage, DistkitError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    finally:
        if client is not None:
            client.close()
    code = int(data.pop("exit", NOT_FOUND if data.get("found") is False else OK))
    try:
        if args.json:
            json.dump(data, out, indent=2, sort_keys=True, default=str)
            out.write("\n")
        else:
            show(out, data)
        out.flush()
    except BrokenPipeError:  # `distkit ... | head`: the reader left; not an error of ours
        sys.stderr.close()
    return code
