"""``distkit cache ...``: stats, clear, invalidate and get (registered into ``distkit``)."""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from typing import Any, TextIO

from distkit._cli import COMMANDS, NotFound, Usage, scan

from ._cache import Cache
from ._core import MAGIC, TOMBSTONE, _metadata, shard_count

__all__ = ["register"]

_SAMPLE = 200  # entries sized with MEMORY USAGE per shard; the rest are estimated


def register(sub: Any) -> None:
    """Add the ``cache`` subcommands to ``distkit``'s parser."""
    cache = sub.add_parser("cache", help="stats, clear, invalidate tags, read an entry")
    actions = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    stats = actions.add_parser("stats", help="entries, bytes, epoch and tag records per shard")
    clear = actions.add_parser("clear", help="make every entry of NS a miss (O(1))")
    inval = actions.add_parser("invalidate", help="make every entry tagged TAG a miss")
    get = actions.add_parser("get", help="one entry, decoded (or --raw)")
    for p in (stats, clear, inval, get):
        p.add_argument("namespace", metavar="NS")
        p.add_argument(
            "--shards", type=int, default=None, help="the cache's shards= (default: found by SCAN)"
        )
    inval.add_argument("tags", nargs="+", metavar="TAG")
    get.add_argument("key", metavar="KEY")
    get.add_argument("--raw", action="store_true", help="the stored bytes, undecoded")
    COMMANDS["cache stats"] = (_stats, _print_stats)
    COMMANDS["cache clear"] = (_clear, _print_done)
    COMMANDS["cache invalidate"] = (_invalidate, _print_done)
    COMMANDS["cache get"] = (_get, _print_get)


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")


def _keys(client: Any, prefix: str, ns: str, suffix: str = "*") -> dict[str, list[str]]:
    """The keys of namespace ``ns`` ending in ``suffix`` (a glob), by shard prefix
    ``P:cache[.N]:{ns[.i]}`` (SCAN on every master)."""
    glob, head = (re.sub(r"([*?\[\]\\])", r"\\\1", s) for s in (ns, prefix))
    own = re.compile(re.escape(prefix) + r":cache(\.\d+)?:\{" + re.escape(ns) + r"(\.\d+)?\}:")
    found: dict[str, list[str]] = defaultdict(list)
    for pattern in (f"{head}:cache:{{{glob}}}:", f"{head}:cache.*:{{{glob}.*}}:"):
        pattern += suffix
        for key in scan(client, pattern):
            text = _text(key)
            match = own.match(text)
            if match and bool(match.group(1)) == bool(match.group(2)):
                found[text[: match.end() - 1]].append(text)
    return found


def _cache(args: argparse.Namespace, client: Any) -> Cache:
    shards = args.shards
    if shards is None:
        counts = set()
        for base in _keys(client, args.prefix, args.namespace, "epoch"):
            head = base.split(":{", 1)[0]
            counts.add(int(head.rsplit(".", 1)[1]) if "." in head.rsplit(":", 1)[1] else 1)
        if len(counts) > 1:
            raise Usage(f"namespace {args.namespace!r} has keys for shards={sorted(counts)}: "
                        "pass --shards")  # fmt: skip
        shards = counts.pop() if counts else shard_count(None, client)
    try:
        return Cache(client, namespace=args.namespace, prefix=args.prefix, shards=shards,
                     breaker=False)  # fmt: skip
    except Exception as exc:
        raise Usage(str(exc)) from None


def _stats(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    groups = _keys(client, args.prefix, args.namespace)
    if not groups:
        raise NotFound(f"cache namespace {args.namespace!r}: no keys under {args.prefix!r}")
    shards = {}
    for base, keys in sorted(groups.items()):
        entries = [k for k in keys if k[len(base) + 1 :].startswith(("k:", "h:"))]
        tags = [k for k in keys if k[len(base) + 1 :].startswith("t:")]
        sample = entries[:_SAMPLE]
        sized = [client.memory_usage(k) or 0 for k in sample]
        per = sum(sized) / len(sized) if sized else 0
        epoch = client.get(base + ":epoch")
        shards[base] = {
            "entries": len(entries),
            "bytes": round(per * len(entries)),
            "bytes_sampled": len(sample),
            "tag_records": len(tags),
            "epoch": _text(epoch) if epoch is not None else None,
        }
    return {
        "namespace": args.namespace,
        "entries": sum(s["entries"] for s in shards.values()),
        "bytes": sum(s["bytes"] for s in shards.values()),
        "tag_records": sum(s["tag_records"] for s in shards.values()),
        "shards": shards,
    }


def _clear(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    _cache(args, client).clear()
    return {"namespace": args.namespace, "cleared": True}


def _invalidate(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    _cache(args, client).invalidate_tags(*args.tags)  # a bad tag: ConfigError, exit 2
    return {"namespace": args.namespace, "invalidated_tags": list(args.tags)}


def _get(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    cache = _cache(args, client)
    core = cache._core
    try:
        rkey = core.entry_key(args.key)
    except Exception as exc:
        raise Usage(str(exc)) from None
    raw = client.get(rkey)
    out: dict[str, Any] = {"namespace": args.namespace, "key": args.key, "redis_key": rkey}
    if raw is None:
        raise NotFound(f"cache {args.namespace!r}: no entry for key {args.key!r}")
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    if args.raw:
        return {**out, "raw": raw.decode("utf-8", "backslashreplace"), "found": True}
    if raw[:4] == TOMBSTONE:
        return {**out, "state": "deleted (a tombstone)", "found": False}
    problem = None
    parsed = _metadata(raw) if raw[:4] == MAGIC else None
    if parsed is None:
        problem = "not a distcache entry (corrupt or written by something else)"
    elif raw[20:21] != core.serializer.id:
        problem = f"written by serializer {_text(raw[20:21])!r}, not the default one"
    else:
        try:
            core._loads(raw[parsed[0] :], None)
        except Exception as exc:
            problem = f"its payload does not decode: {type(exc).__name__}: {exc}"[:300]
    if problem is not None:
        return {**out, "state": "corrupt", "reason": problem, "found": False}
    missing = object()
    value = cache.get(args.key, missing)
    if value is missing:
        return {**out, "state": "invalidated or expired", "found": False}
    tags = [name for name, _ in parsed[2]] if parsed else []
    return {**out, "state": "valid", "value": value, "tags": tags, "found": True}


def _print_stats(out: TextIO, data: dict[str, Any]) -> None:
    print(f"cache {data['namespace']!r}: {data['entries']} entries, about {data['bytes']} bytes, "
          f"{data['tag_records']} tag records", file=out)  # fmt: skip
    for base, one in data["shards"].items():
        print(f"  {base}: {one['entries']} entries, ~{one['bytes']} bytes "
              f"({one['bytes_sampled']} sampled), {one['tag_records']} tag records, "
              f"epoch {one['epoch']}", file=out)  # fmt: skip


def _print_done(out: TextIO, data: dict[str, Any]) -> None:
    if "invalidated_tags" in data:
        tags = ", ".join(data["invalidated_tags"])
        print(f"cache {data['namespace']!r}: entries tagged {tags} are now misses", file=out)
    else:
        print(f"cache {data['namespace']!r}: cleared (every entry is now a miss)", file=out)


def _print_get(out: TextIO, data: dict[str, Any]) -> None:
    where = f"cache {data['namespace']!r} key {data['key']!r}"
    if "raw" in data:
        print(data["raw"], file=out)
    elif data["found"]:
        print(f"{where}: {data['value']!r}" + (f" (tags: {', '.join(data['tags'])})"
              if data["tags"] else ""), file=out)  # fmt: skip
    else:
        print(f"{where}: {data['state']}" + (f": {data['reason']}" if "reason" in data else ""),
              file=out)  # fmt: skip
