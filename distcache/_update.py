"""Conditional updates of one entry: ``add``, ``incr`` (``combine``), ``touch``, ``ttl_of`` and
``delete_many``.

Each is a protocol over ``CacheCore`` (no I/O), written as a compare-and-set on the existing
``WRITE`` script: read the key (``read_entry``: entry, epoch and write mark), decide, then write
with the read's bytes as the baseline, so the write lands only if the key is still what was read;
otherwise read again. Every write replaces the key's write mark, exactly as ``set`` does, so a
read-through fill that read the key before it is refused (C1)::

    A: get_or_set(k): read -> empty, mark m0 ... loader ............................ WRITE
    B:                     add(k, v): read -> empty; WRITE(baseline empty) -> mark m1
    WRITE(A, mark m0): the mark is m1 -> refused; B's value stays

A refused write (another writer got in between) is retried after a fresh read (and a short
random pause that grows with each lost round); a write whose
reply was lost and that the driver retried is recognised by its own write mark.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from distkit import CacheError
from distkit._protocol import Command, Eval, Protocol, Sleep
from distkit._units import MAX_SECONDS

from ._core import CacheCore, Entry, _baseline, _metadata, _ms
from ._scripts import DELETE_MANY, WRITE

__all__ = ["ATTEMPTS", "add", "combine", "delete_many", "incr", "touch", "ttl_of"]

# Compare-and-set rounds before giving up: each lost round means another writer's write landed.
ATTEMPTS = 32
_LONGEST_MS = (MAX_SECONDS + 24 * 3600) * 1000  # the longest ttl, plus a day of clock skew


def _backoff(attempt: int) -> Protocol[None]:
    """After a lost round: a short random pause, growing, so contenders stop colliding."""
    if attempt:
        yield Sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))


def _live(core: CacheCore, found: Any) -> Entry | None:
    """``found`` if it is an entry within its logical life, else ``None``.

    An entry whose expiry is further away than the longest time to live a writer records (plus
    a day of clock skew) is not distcache's (a planted ``computed_at`` or ``ttl``): counted as a
    decode error and treated as absent, never written back with an absurd ``PX``.
    """
    if found.__class__ is not Entry:
        return None
    left = found.expires_ms - core.now_ms()
    if left <= 0:
        return None
    if left > _LONGEST_MS:
        core._corrupt(found.raw, found.epoch, f"an expiry {left:.0f} ms away")
        return None
    return found


def _tags_of(raw: bytes) -> tuple[bytes, tuple[str, ...], int] | None:
    """The flags, tag names and payload start of an entry's bytes (already decoded once)."""
    parsed = _metadata(raw)
    if parsed is None:
        return None
    start, _, tags = parsed
    return raw[20:22], tuple(name for name, _ in tags), start


def _updatable(
    core: CacheCore, found: Entry | None
) -> tuple[Entry, bytes, tuple[str, ...], int] | None:
    """``found`` with its flags, tag names and payload start; ``None`` (a miss) if there is no live
    entry or its metadata are not distcache's format (counted as a decode error)."""
    if found is None:
        return None
    meta = _tags_of(found.raw)
    if meta is None:
        core._corrupt(found.raw, found.epoch, "malformed metadata")
        return None
    return (found, *meta)


def _put(
    core: CacheCore,
    rkey: str,
    baseline: str,
    flags: bytes,
    payload: bytes,
    ttl_ms: int,
    tag_names: tuple[str, ...],
    epoch: bytes | None = None,
) -> Protocol[bool]:
    """WRITE one entry if the key still holds what was read (``baseline``); ``True`` if written."""
    base = core.base_of(rkey)
    mark = secrets.token_hex(8)
    mkey = core.mark_key(rkey)
    keys = [base + ":epoch", base + ":ns", *(base + ":t:" + t for t in tag_names), rkey, mkey]
    # the epoch the read saw: the WRITE refuses if an invalidation landed since (a foreign,
    # non-digit epoch: no check, as a plain set)
    seen = epoch.decode() if epoch is not None and epoch.isdigit() else ""
    args: list[Any] = [seen, ttl_ms, core.grace_ms, len(tag_names), *tag_names]
    args += (mark, 2 * core.guard_ms, 0, baseline, "*", flags, 0, payload)
    codes = yield Eval(WRITE, keys, args)
    if int(codes[0]) == 1:
        return True
    # refused: another writer got in, or the driver retried a write whose reply was lost
    return bool((yield Command(("GET", mkey))) == mark.encode())


def add(
    core: CacheCore,
    rkey: str,
    payload: bytes,
    ttl_ms: int,
    tag_names: tuple[str, ...],
    type_: Any,
) -> Protocol[bool]:
    """Store ``payload`` under ``rkey`` unless a live entry is there; ``True`` if stored."""
    flags = core.serializer.id + b"v"
    for attempt in range(ATTEMPTS):
        yield from _backoff(attempt)
        found = yield from core.read_entry(rkey, type_, quiet=True)
        if _live(core, found) is not None:
            return False
        miss = found.miss() if found.__class__ is Entry else found
        if (
            yield from _put(
                core, rkey, miss.baseline, flags, payload, ttl_ms, tag_names, miss.epoch
            )
        ):
            return True
    raise CacheError(f"cache {core.namespace!r}: add() lost {ATTEMPTS} races in a row")


def incr(core: CacheCore, rkey: str, delta: int, type_: Any) -> Protocol[int]:
    """Add ``delta`` to the int stored under ``rkey``, keeping its expiry and tags.

    Raises ``KeyError`` if no live entry is there, ``TypeError`` if it is not an int.
    """
    key = core.logical_key(rkey)

    def add(value: Any) -> int:
        if type(value) is not int:
            raise TypeError(f"cache key {key!r:.80} holds a {type(value).__name__}, not an int")
        return value + delta

    return int((yield from combine(core, rkey, add, type_, "incr")))


def combine(
    core: CacheCore, rkey: str, fn: Callable[[Any], Any], type_: Any, what: str = "combine"
) -> Protocol[Any]:
    """Replace the live value under ``rkey`` by ``fn(value)``, keeping its expiry and tags (a
    compare-and-set: ``fn`` runs again on a fresh read if another write got in); the new value.

    Raises ``KeyError`` if no live entry is there, and whatever ``fn`` raises.
    """
    key = core.logical_key(rkey)
    for attempt in range(ATTEMPTS):
        yield from _backoff(attempt)
        got = _updatable(core, _live(core, (yield from core.read_entry(rkey, type_, quiet=True))))
        if got is None:
            raise KeyError(key)
        found, flags, tag_names, _ = got
        new = fn(found.value)
        left = _ms((found.expires_ms - core.now_ms()) / 1000)
        payload = core.encode(key, new, type_)
        if (
            yield from _put(
                core, rkey, _baseline(found.raw), flags, payload, left, tag_names, found.epoch
            )
        ):
            return new
    raise CacheError(f"cache {core.namespace!r}: {what}() lost {ATTEMPTS} races in a row")


def touch(core: CacheCore, rkey: str, ttl_ms: int, type_: Any) -> Protocol[bool]:
    """Give the live entry under ``rkey`` a new time to live; ``False`` if there is none."""
    for attempt in range(ATTEMPTS):
        yield from _backoff(attempt)
        got = _updatable(core, _live(core, (yield from core.read_entry(rkey, type_, quiet=True))))
        if got is None:
            return False
        found, flags, tag_names, start = got
        payload = found.raw[start:]
        if (
            yield from _put(
                core, rkey, _baseline(found.raw), flags, payload, ttl_ms, tag_names, found.epoch
            )
        ):
            return True
    raise CacheError(f"cache {core.namespace!r}: touch() lost {ATTEMPTS} races in a row")


def ttl_of(core: CacheCore, rkey: str, type_: Any) -> Protocol[float | None]:
    """Seconds left in the logical life of the entry under ``rkey``; ``None`` if none is live."""
    found = _live(core, (yield from core.read_entry(rkey, type_, quiet=True)))
    if found is None:
        return None
    return max(0.0, (found.expires_ms - core.now_ms()) / 1000)


def delete_many(core: CacheCore, rkeys: Iterable[str]) -> Protocol[int]:
    """Replace each entry by a tombstone and a new write mark, as ``delete`` does for one (one
    script per shard); returns how many held an entry."""
    rkeys = list(dict.fromkeys(rkeys))
    total = 0
    for _, group in core._groups(rkeys):
        keys: list[str] = []
        args: list[Any] = [core.fill_timeout_ms, 2 * core.guard_ms]
        for i in group:
            keys += (rkeys[i], core.mark_key(rkeys[i]))
            args += (b"dc1~" + secrets.token_hex(8).encode(), secrets.token_hex(8))
        total += int((yield Eval(DELETE_MANY, keys, args)))
    return total
