"""``distkit lock ...``: list, inspect and force-release locks (registered into ``distkit``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from distkit import KeySpace, ServerError
from distkit._cli import COMMANDS, UNREADABLE, NotFound, Usage, scan
from distkit._errors import translating
from distkit._keys import validate_name
from distkit._protocol import SyncDriver

from ._core import force_release, retry_policy

__all__ = ["register"]

_MAX_LIST = 1000  # locks inspected by one ``lock list`` (bounded work)
# A queue entry's arrival (server TIME, ms) before this (2000-01-01) or after now is not one
# distlock wrote: its age is shown as unknown.
_EARLIEST_ARRIVAL_MS = 946_684_800_000


def register(sub: Any) -> None:
    """Add the ``lock`` subcommands to ``distkit``'s parser."""
    lock = sub.add_parser("lock", help="list, inspect and force-release locks")
    actions = lock.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the locks whose name matches PATTERN (SCAN)")
    listing.add_argument("pattern", nargs="?", default="*", help="a SCAN glob (default: *)")
    inspect = actions.add_parser("inspect", help="holder, TTL, queue and last fencing token")
    inspect.add_argument("name")
    for p in (listing, inspect):
        p.add_argument(
            "--master",
            action="append",
            default=[],
            metavar="URL",
            help="a Redlock master (repeat): report per master instead of --url",
        )
    release = actions.add_parser("release", help="free a stuck lock (hands it to the next waiter)")
    release.add_argument("name")
    release.add_argument("--force", action="store_true", help="required: this breaks mutual "
                         "exclusion with a holder that is still running")  # fmt: skip
    release.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    COMMANDS["lock list"] = (_list, _print_list)
    COMMANDS["lock inspect"] = (_inspect, _print_inspect)
    COMMANDS["lock release"] = (_release, _print_release)


def _text(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8", "backslashreplace")


def _safe(text: Any) -> str:
    """``text`` for a terminal: characters that are not printable (escape sequences, control
    characters, bidi overrides) as Python escapes (``\\x1b``); key names and owner ids are
    whatever someone with write access to Redis planted."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))


def _age(score: float, now_ms: int) -> float | None:
    """Seconds since a queue entry's arrival; ``None`` when the arrival is not plausible."""
    if not _EARLIEST_ARRIVAL_MS <= score <= now_ms:  # also false for nan; inf is out of range
        return None
    return round((now_ms - score) / 1000, 3)


def state(client: Any, prefix: str, name: str) -> dict[str, Any]:
    """What Redis holds for lock ``name``: holder, TTL, queue and last fencing token."""
    keys = KeySpace(prefix)
    lease = keys.key("lock", name)
    holder = client.get(lease)
    ttl_ms = client.pttl(lease)
    fence = client.get(keys.key("lock", name, "fence"))
    queue_key = keys.key("lock", name, "queue")
    waiters = int(client.zcard(queue_key))
    oldest = client.zrange(queue_key, 0, 0, withscores=True)
    now_s, now_us = client.time()
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    owner = _text(holder)
    return {
        "name": name,
        "held": holder is not None,
        "holder": owner.rstrip("*") if owner else None,
        "ttl_seconds": round(ttl_ms / 1000, 3) if ttl_ms >= 0 else None,
        "waiters": waiters,
        "oldest_waiter_age_seconds": _age(float(oldest[0][1]), now_ms) if oldest else None,
        "last_fencing_token": _token(_text(fence)),
        "found": holder is not None or fence is not None or waiters > 0,
    }


def _token(text: str | None) -> int | str | None:
    return int(text) if text is not None and text.isdigit() else text


def _readable_state(client: Any, prefix: str, name: str) -> dict[str, Any]:
    """``state``, or ``{"name", "unreadable": reason}`` when a key holds data of another type
    or shape (a connection failure still ends the command)."""
    try:
        with translating(f"lock {name!r}"):
            return state(client, prefix, name)
    except ServerError as exc:  # ForeignDataError (WRONGTYPE) included
        return {"name": name, "unreadable": str(exc), "found": True}


def _targets(args: argparse.Namespace, client: Any) -> list[tuple[str, Any, bool]]:
    if not args.master:
        return [("", client, False)]
    from distkit._config import RedisConfig
    from distkit._connection import connect

    out = []
    for url in args.master:
        config = RedisConfig.from_url(url)
        out.append((config.describe(), connect(config), True))
    return out


def _inspect(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    name = _name(args.name)
    if not args.master:
        found = state(client, args.prefix, name)
        if not found["found"]:
            raise NotFound(f"lock {name!r}: no lease, queue or fence under prefix {args.prefix!r}")
        return found
    masters = {}
    for where, node, owned in _targets(args, client):
        try:
            masters[where] = state(node, args.prefix, name)
        finally:
            if owned:
                node.close()
    if not any(m["found"] for m in masters.values()):
        raise NotFound(f"lock {name!r}: not on any of the {len(masters)} master(s)")
    quorum = len(masters) // 2 + 1
    holders = [m["holder"] for m in masters.values() if m["held"]]
    top = max(set(holders), key=holders.count) if holders else None
    return {
        "name": name,
        "held": top is not None and holders.count(top) >= quorum,
        "holder": top,
        "quorum": quorum,
        "masters": masters,
        "found": True,
    }


def _name(name: str) -> str:
    try:
        return validate_name(name, what="lock name")
    except Exception as exc:
        raise Usage(str(exc)) from None


def _list(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    reports: dict[str, dict[str, Any]] = {}
    for where, node, owned in _targets(args, client):
        try:
            start = f"{args.prefix}:lock:{{"
            names = set()
            for key in scan(node, start + args.pattern + "}*"):
                text = _text(key) or ""
                end = text.find("}", len(start))
                if end > 0:
                    names.add(text[len(start) : end])
                if len(names) >= _MAX_LIST:
                    break
            for name in sorted(names):
                found = _readable_state(node, args.prefix, name)
                if where:
                    reports.setdefault(name, {"name": name, "masters": {}})["masters"][where] = (
                        found
                    )
                else:
                    reports[name] = found
        finally:
            if owned:
                node.close()
    data: dict[str, Any] = {
        "locks": [reports[n] for n in sorted(reports)],
        "truncated": len(reports) >= _MAX_LIST,
    }
    entries = [one for r in reports.values() for one in r.get("masters", {"": r}).values()]
    if any("unreadable" in one for one in entries):
        data["exit"] = UNREADABLE
    return data


def _release(args: argparse.Namespace, config: Any, client: Any) -> dict[str, Any]:
    name = _name(args.name)
    if not args.force:
        raise Usage("lock release frees a lock whoever holds it: pass --force (and --yes)")
    before = state(client, args.prefix, name)
    if not args.yes:
        print(
            f"Free lock {name!r} (holder {_safe(before['holder'] or 'none')}, "
            f"{before['waiters']} waiter(s))? [y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            return {"name": name, "released": False, "aborted": True, "exit": 1}
    driver = SyncDriver(client, retry_policy(None, client), f"lock {name!r}")
    reply = driver.run(force_release(name, prefix=args.prefix, fence_retention=3600.0))
    code = int(reply[0])
    return {
        "name": name,
        "released": code > 0,
        "was_held_by": _text(reply[1]) if code > 0 else None,
        "handed_to": _text(reply[2]) if code == 2 else None,
        "last_fencing_token": before["last_fencing_token"],
        "found": code > 0,
    }


def _line(data: dict[str, Any]) -> str:
    if "unreadable" in data:
        return f"unreadable ({_safe(data['unreadable'])})"
    holder = _safe(data["holder"])
    head = f"held by {holder}, {data['ttl_seconds']} s left" if data["held"] else "free"
    age = data["oldest_waiter_age_seconds"]
    waiting = f", {data['waiters']} waiting " + (
        f"(oldest {age} s)" if age is not None else "(oldest age unknown)"
    )
    token = _safe(data["last_fencing_token"])
    return f"{head}{waiting if data['waiters'] else ''}, last token {token}"


def _print_inspect(out: TextIO, data: dict[str, Any]) -> None:
    if "masters" not in data:
        print(f"lock {data['name']!r}: {_line(data)}", file=out)
        return
    verdict = f"held by {_safe(data['holder'])}" if data["held"] else "not held by a quorum"
    print(f"lock {data['name']!r} (Redlock, quorum {data['quorum']}): {verdict}", file=out)
    for where, one in data["masters"].items():
        print(f"  {_safe(where)}: {_line(one)}", file=out)


def _print_list(out: TextIO, data: dict[str, Any]) -> None:
    for one in data["locks"]:
        if "masters" in one:
            _print_inspect(out, {**one, "held": False, "holder": None, "quorum": "?"})
        else:
            print(f"{_safe(one['name'])}: {_line(one)}", file=out)
    if not data["locks"]:
        print("no locks", file=out)
    if data["truncated"]:
        print(f"(stopped after {_MAX_LIST} locks; narrow PATTERN)", file=out)


def _print_release(out: TextIO, data: dict[str, Any]) -> None:
    name = data["name"]
    if data.get("aborted"):
        print(f"lock {name!r}: aborted, nothing released", file=out)
    elif not data["released"]:
        print(f"lock {name!r} was not held: nothing to release", file=out)
    elif data["handed_to"]:
        print(f"lock {name!r}: freed from {_safe(data['was_held_by'])} and handed to the next "
              f"waiter {_safe(data['handed_to'])}; the fence is kept", file=out)  # fmt: skip
    else:
        holder = _safe(data["was_held_by"])
        print(f"lock {name!r}: freed from {holder}; the fence is kept", file=out)
