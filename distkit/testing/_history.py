"""Operation histories recorded by several processes, and checkers for lock and cache properties.

A history is a list of :class:`Event` s. Each process records its own operations with a
:class:`HistoryRecorder`: ``invoke`` when an operation starts, then ``ok`` (it took effect),
``fail`` (it certainly did not) or ``info`` (outcome unknown, e.g. a timeout). Timestamps are
``time.monotonic_ns()``; on Linux ``CLOCK_MONOTONIC`` is system-wide, so the events of different
processes on one host can be compared and merged.

Each recorder appends JSON lines to its own file (``os.write`` on an ``O_APPEND`` descriptor: one
line per call, so a process killed with ``SIGKILL`` leaves whole lines only) or puts them on a
``multiprocessing`` queue. :func:`read_history` merges files, :func:`drain_queue` a queue.

Operations the checkers understand (other ops are kept and ignored):

``acquire``
    ``ok`` carries ``token`` (the fencing token) and, for a lease whose end the client knows,
    ``validity`` (seconds left, measured no earlier than the event's ``time``). Optional fields:
    ``lock`` (the lock name; histories of several locks are checked per name) and ``ttl``.
``release``
    ``invoke`` ends the holder's window; ``ok`` means the lease certainly ended.
``write``
    A write to a fenced resource, carrying ``token``: ``ok`` accepted, ``fail`` rejected as
    stale, ``info`` unknown. Optional: ``resource`` (checked per resource), ``value``.

Cache operations (``write``, ``fill``, ``invalidate`` / ``delete``, ``read``) are described in
:func:`check_cache`.

The checkers never raise on a bad history; they return a :class:`CheckResult` listing each
:class:`Violation` with a readable description.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "CheckResult",
    "Event",
    "EventType",
    "HistoryRecorder",
    "Violation",
    "check_cache",
    "check_fencing",
    "check_mutex",
    "check_orphans",
    "check_validity",
    "drain_queue",
    "read_history",
    "sort_events",
]

EventType = Literal["invoke", "ok", "fail", "info"]
_TYPES: frozenset[str] = frozenset(("invoke", "ok", "fail", "info"))
_CORE = frozenset(("process", "op", "type", "time", "token", "value", "seq"))
_R = TypeVar("_R", bound="HistoryRecorder")


class _Sink(Protocol):
    def put(self, obj: Any, /) -> None: ...


@dataclass(frozen=True)
class Event:
    """One recorded event.

    Attributes:
        process: who recorded it (a process or worker name).
        op: the operation (``acquire``, ``release``, ``write``, ...).
        type: ``invoke``, ``ok``, ``fail`` or ``info``.
        time: ``time.monotonic_ns()`` when it was recorded.
        token: a fencing token, when the operation has one.
        value: an operation's value (e.g. what was written).
        seq: the recorder's own sequence number (orders one process's events exactly).
        fields: any other fields (``validity``, ``lock``, ``resource``, ``error``, ...).
    """

    process: str
    op: str
    type: EventType
    time: int
    token: int | None = None
    value: Any = None
    seq: int = 0
    fields: Mapping[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name: the core attributes first, then ``fields``."""
        if name in _CORE:
            return getattr(self, name)
        return self.fields.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The event as one flat JSON-ready mapping (the format of a history line)."""
        out: dict[str, Any] = dict(self.fields)
        out.update(process=self.process, op=self.op, type=self.type, time=self.time, seq=self.seq)
        if self.token is not None:
            out["token"] = self.token
        if self.value is not None:
            out["value"] = self.value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Build an event from a flat mapping (a history line); unknown keys go to ``fields``.

        Raises:
            ValueError: a required key (process, op, type, time) is missing or invalid.
        """
        try:
            process, op, kind, when = data["process"], data["op"], data["type"], data["time"]
        except KeyError as exc:
            raise ValueError(f"history event without {exc.args[0]!r}: {dict(data)!r}") from None
        if kind not in _TYPES:
            raise ValueError(f"event type must be one of {sorted(_TYPES)}, got {kind!r}")
        if isinstance(when, bool) or not isinstance(when, int):
            raise ValueError(f"event time must be an int (monotonic ns), got {when!r}")
        token = data.get("token")
        if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
            raise ValueError(f"event token must be an int or None, got {token!r}")
        seq = data.get("seq", 0)
        extra = {k: v for k, v in data.items() if k not in _CORE}
        return cls(
            process=str(process),
            op=str(op),
            type=kind,
            time=when,
            token=token,
            value=data.get("value"),
            seq=int(seq),
            fields=extra,
        )

    def describe(self) -> str:
        """A short human-readable rendering, e.g. ``p1 acquire ok token=17 @12.345678s``."""
        parts = [self.process, self.op, self.type]
        if self.token is not None:
            parts.append(f"token={self.token}")
        if self.value is not None:
            parts.append(f"value={self.value!r}")
        parts.append(f"@{self.time / 1e9:.6f}s")
        return " ".join(parts)


class HistoryRecorder:
    """Records one process's events as JSON lines, to a file of its own or to a queue.

    Args:
        sink: a path (the file is appended to, created if needed; give each process its own)
            or an object with ``put`` (e.g. a ``multiprocessing`` queue; lines are put as str).
        process: the name recorded with every event (default ``"pid<pid>"``).
    """

    def __init__(self, sink: str | os.PathLike[str] | _Sink, process: str | None = None) -> None:
        self.process = process if process is not None else f"pid{os.getpid()}"
        self._seq = itertools.count(1)
        self._fd: int | None = None
        self._queue: _Sink | None = None
        if isinstance(sink, (str, os.PathLike)):
            self._fd = os.open(os.fspath(sink), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        elif callable(getattr(sink, "put", None)):
            self._queue = sink
        else:
            raise TypeError(f"sink must be a path or have put(), got {type(sink).__name__}")

    def record(
        self,
        op: str,
        type: EventType,
        *,
        token: int | None = None,
        value: Any = None,
        time_ns: int | None = None,
        **fields: Any,
    ) -> Event:
        """Record one event now (or at ``time_ns``) and return it.

        ``fields`` must be JSON-serialisable. Take ``time_ns`` *before* measuring anything that
        shrinks with time (e.g. read ``lock.validity`` after it), so the record stays
        conservative.

        Raises:
            ValueError: ``type`` is not one of invoke/ok/fail/info.
            RuntimeError: the recorder is closed.
        """
        if type not in _TYPES:
            raise ValueError(f"event type must be one of {sorted(_TYPES)}, got {type!r}")
        event = Event(
            process=self.process,
            op=op,
            type=type,
            time=time.monotonic_ns() if time_ns is None else time_ns,
            token=token,
            value=value,
            seq=next(self._seq),
            fields=fields,
        )
        line = json.dumps(event.to_dict(), separators=(",", ":"), default=str) + "\n"
        if self._queue is not None:
            self._queue.put(line)
        elif self._fd is not None:
            os.write(self._fd, line.encode("utf-8"))
        else:
            raise RuntimeError("the history recorder is closed")
        return event

    def invoke(self, op: str, **fields: Any) -> Event:
        """Record that ``op`` starts."""
        return self.record(op, "invoke", **fields)

    def ok(self, op: str, **fields: Any) -> Event:
        """Record that ``op`` took effect."""
        return self.record(op, "ok", **fields)

    def fail(self, op: str, **fields: Any) -> Event:
        """Record that ``op`` certainly did not take effect."""
        return self.record(op, "fail", **fields)

    def info(self, op: str, **fields: Any) -> Event:
        """Record that the outcome of ``op`` is unknown (it may or may not have taken effect)."""
        return self.record(op, "info", **fields)

    def close(self) -> None:
        """Close the file (idempotent); a queue is left to its owner."""
        fd, self._fd = self._fd, None
        self._queue = None
        if fd is not None:
            os.close(fd)

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_lines(lines: Iterable[str], origin: str) -> Iterator[Event]:
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{origin}:{number}: not a JSON line: {line[:80]!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{origin}:{number}: not a JSON object: {line[:80]!r}")
        yield Event.from_dict(data)


def sort_events(events: Iterable[Event | Mapping[str, Any]]) -> list[Event]:
    """Events (or mappings) as one history in time order (ties: by process, then ``seq``)."""
    out = [e if isinstance(e, Event) else Event.from_dict(e) for e in events]
    out.sort(key=lambda e: (e.time, e.process, e.seq))
    return out


def read_history(*paths: str | os.PathLike[str]) -> list[Event]:
    """Read and merge history files; a directory stands for every ``*.jsonl`` file in it.

    Raises:
        ValueError: a line is not a valid event.
    """
    files: list[Path] = []
    for path in paths:
        p = Path(path)
        files.extend(sorted(p.glob("*.jsonl")) if p.is_dir() else [p])
    events: list[Event] = []
    for file in files:
        with open(file, encoding="utf-8") as handle:
            events.extend(_parse_lines(handle, str(file)))
    return sort_events(events)


def drain_queue(queue: Any, *, timeout: float = 0.1) -> list[Event]:
    """Take every line currently on ``queue`` (a ``multiprocessing`` queue) as a history.

    Stops when the queue stays empty for ``timeout`` seconds.
    """
    import queue as queue_module

    lines: list[str] = []
    while True:
        try:
            lines.append(queue.get(timeout=timeout))
        except queue_module.Empty:
            break
    return sort_events(_parse_lines(lines, "queue"))


# -- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One way a history breaks a property.

    Attributes:
        kind: a short stable name (``overlap``, ``stale-write-accepted``, ...).
        description: what happened, in words, with processes, tokens and times.
        events: the events that show it.
    """

    kind: str
    description: str
    events: tuple[Event, ...] = ()

    def __str__(self) -> str:
        return f"[{self.kind}] {self.description}"


@dataclass(frozen=True)
class CheckResult:
    """What a checker found: the violations, plus counts of what it looked at.

    ``bool(result)`` is true when there is no violation.
    """

    checker: str
    violations: tuple[Violation, ...]
    stats: Mapping[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the history has no violation."""
        return not self.violations

    def count(self, kind: str) -> int:
        """How many violations of ``kind`` were found."""
        return sum(1 for v in self.violations if v.kind == kind)

    def summary(self, limit: int = 20) -> str:
        """A readable report: the counts, then up to ``limit`` violations."""
        counts = ", ".join(f"{k}={v}" for k, v in self.stats.items())
        head = f"{self.checker}: {len(self.violations)} violation(s)" + (
            f" ({counts})" if counts else ""
        )
        lines = [head, *(f"  - {v}" for v in self.violations[:limit])]
        if len(self.violations) > limit:
            lines.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.summary()


# -- pairing invocations with completions --------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """One operation of one process: its invocation (if recorded) and its completion."""

    process: str
    op: str
    invoke: Event | None
    done: Event | None

    @property
    def start(self) -> int:
        first = self.invoke if self.invoke is not None else self.done
        assert first is not None
        return first.time

    @property
    def end(self) -> int | None:
        return None if self.done is None else self.done.time

    @property
    def type(self) -> str:
        return "invoke" if self.done is None else self.done.type

    def get(self, name: str) -> Any:
        for event in (self.done, self.invoke):
            if event is not None:
                value = event.get(name)
                if value is not None:
                    return value
        return None


def _pair(history: Sequence[Event], ops: frozenset[str]) -> list[_Op]:
    """Pair each process's completions with its latest open invocation of the same op."""
    open_: dict[tuple[str, str], Event] = {}
    out: list[_Op] = []
    for event in history:
        if event.op not in ops:
            continue
        key = (event.process, event.op)
        if event.type == "invoke":
            pending = open_.pop(key, None)
            if pending is not None:  # invoked again without a completion: outcome unknown
                out.append(_Op(event.process, event.op, pending, None))
            open_[key] = event
        else:
            out.append(_Op(event.process, event.op, open_.pop(key, None), event))
    out.extend(_Op(e.process, e.op, e, None) for e in open_.values())
    out.sort(key=lambda o: (o.start, o.process))
    return out


def _t(ns: float) -> str:
    return "end of history" if math.isinf(ns) else f"{ns / 1e9:.6f}s"


# -- mutual exclusion -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hold:
    process: str
    lock: Any
    start: int
    end: float  # ns; inf when the history never shows the hold ending
    token: int | None
    acquired: Event
    ended_by: str


def _holds(history: Sequence[Event]) -> list[_Hold]:
    holds: list[_Hold] = []
    current: dict[tuple[str, Any], Event] = {}

    def close(key: tuple[str, Any], end: float, why: str) -> None:
        acquired = current.pop(key)
        validity = acquired.get("validity")
        if isinstance(validity, (int, float)) and not isinstance(validity, bool):
            limit = acquired.time + max(0.0, float(validity)) * 1e9
            if limit < end:
                end, why = limit, "validity ran out"
        holds.append(_Hold(key[0], key[1], acquired.time, end, acquired.token, acquired, why))

    for event in history:
        key = (event.process, event.get("lock"))
        if event.op == "acquire" and event.type == "ok":
            if key in current:  # a second grant without a release: the first one ends here
                close(key, event.time, "acquired again")
            current[key] = event
        elif event.op == "release" and event.type == "invoke" and key in current:
            close(key, event.time, "release invoked")
    for key in list(current):
        close(key, math.inf, "never released")
    return holds


def check_mutex(history: Iterable[Event | Mapping[str, Any]]) -> CheckResult:
    """Check that no two holders of one lock held it at the same time.

    A holder's window opens at its ``acquire`` ``ok`` event and closes at the earliest of: its
    next ``release`` ``invoke``, ``time + validity`` when the ``ok`` event carries ``validity``
    (the holder may act only within it), or the end of the history. Windows of the same lock
    name (field ``lock``) that overlap are violations of kind ``overlap``.
    """
    events = sort_events(history)
    holds = _holds(events)
    violations: list[Violation] = []
    by_lock: dict[Any, list[_Hold]] = {}
    for hold in holds:
        by_lock.setdefault(hold.lock, []).append(hold)
    for lock, group in by_lock.items():
        group.sort(key=lambda h: h.start)
        active: list[_Hold] = []
        for hold in group:
            active = [a for a in active if a.end > hold.start]
            if hold.end <= hold.start:  # validity 0: never held
                continue
            for other in active:
                where = "" if lock is None else f" of lock {lock!r}"
                violations.append(
                    Violation(
                        "overlap",
                        f"{hold.process} acquired{where} (token {hold.token}) at "
                        f"{_t(hold.start)} while {other.process} (token {other.token}) held it "
                        f"from {_t(other.start)} until {_t(other.end)} ({other.ended_by}): "
                        f"{(min(other.end, hold.end) - hold.start) / 1e6:.3f} ms of overlap",
                        (other.acquired, hold.acquired),
                    )
                )
            active.append(hold)
    return CheckResult(
        "mutex",
        tuple(violations),
        {"holds": len(holds), "locks": len(by_lock)},
    )


# -- fencing --------------------------------------------------------------------------------------


def _lease_ends(history: Sequence[Event], expiry_slack: float) -> list[tuple[Any, int, Event, str]]:
    """For each acquisition with a token: (lock, latest time its lease surely ended, event, how)."""
    out: list[tuple[Any, int, Event, str]] = []
    current: dict[tuple[str, Any], Event] = {}
    for event in history:
        key = (event.process, event.get("lock"))
        if event.op == "acquire" and event.type == "ok" and event.token is not None:
            current[key] = event
        elif event.op == "release" and event.type == "ok" and key in current:
            acquired = current.pop(key)
            out.append((key[1], event.time, acquired, "released"))
    for key, acquired in current.items():
        ttl = acquired.get("ttl")
        if isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
            end = acquired.time + round(float(ttl) * (1 + expiry_slack) * 1e9)
            out.append((key[1], end, acquired, "expired"))
    return out


def _prefix_max(items: list[tuple[float, int, Any]]) -> tuple[list[float], list[int]]:
    """Sort ``(time, token, tag)`` by time; return the times and the index of the running max."""
    items.sort(key=lambda item: item[0])
    times = [item[0] for item in items]
    best: list[int] = []
    for i, item in enumerate(items):
        best.append(i if not best or item[1] > items[best[-1]][1] else best[-1])
    return times, best


def _max_before(
    items: list[tuple[float, int, Any]], times: list[float], best: list[int], when: float
) -> tuple[float, int, Any] | None:
    """The item with the highest token among those strictly before ``when`` (or None)."""
    i = bisect.bisect_left(times, when)
    return None if i == 0 else items[best[i - 1]]


def check_fencing(
    history: Iterable[Event | Mapping[str, Any]], *, expiry_slack: float = 0.05
) -> CheckResult:
    """Check fencing tokens at the protected resource and across successive acquisitions.

    Writes (op ``write``) are ordered by real time: write B follows write A when B was invoked
    after A completed. Violations:

    - ``stale-write-accepted``: B was accepted with a token lower than A's accepted token
      (the tokens accepted by the resource went backwards).
    - ``token-reused``: two processes' writes were accepted with the same token (a token must
      belong to one acquisition).
    - ``unjustified-rejection``: B was rejected, yet no write with a higher token had been
      accepted (or had possibly been accepted) before B completed.
    - ``token-not-increasing``: acquisition B of a lock was invoked after acquisition A's lease
      had surely ended (A's release completed, or, when A never released, A's ``ttl`` times
      ``1 + expiry_slack`` passed since A's grant), but ``token(B) <= token(A)``.

    Writes of several resources are checked per ``resource`` field.
    """
    events = sort_events(history)
    violations: list[Violation] = []
    by_resource: dict[Any, list[_Op]] = {}
    for w in _pair(events, frozenset(("write",))):
        if w.get("token") is not None:
            by_resource.setdefault(w.get("resource"), []).append(w)
    accepted_total = rejected_total = 0
    for resource, group in by_resource.items():
        where = "" if resource is None else f" to {resource!r}"
        accepted = [w for w in group if w.type == "ok"]
        rejected = [w for w in group if w.type == "fail"]
        accepted_total += len(accepted)
        rejected_total += len(rejected)
        # Known-accepted tokens by completion time: the highest one completed before B began.
        done = [(float(w.end or 0), int(w.get("token")), w) for w in accepted]
        done_times, done_best = _prefix_max(done)
        for b in accepted:
            prior = _max_before(done, done_times, done_best, b.start)
            tb = int(b.get("token"))
            if prior is not None and prior[1] > tb:
                a: _Op = prior[2]
                violations.append(
                    Violation(
                        "stale-write-accepted",
                        f"write{where} by {b.process} with token {tb} (invoked at "
                        f"{_t(b.start)}) was accepted after a write by {a.process} with the "
                        f"higher token {prior[1]} had been accepted (at {_t(prior[0])})",
                        tuple(e for e in (a.done, b.invoke, b.done) if e is not None),
                    )
                )
        first_by_token: dict[int, _Op] = {}
        for w in sorted(accepted, key=lambda w: w.start):
            token = int(w.get("token"))
            first = first_by_token.setdefault(token, w)
            if first.process != w.process:
                violations.append(
                    Violation(
                        "token-reused",
                        f"writes{where} by {first.process} and by {w.process} were both "
                        f"accepted with token {token}: two holders had the same token",
                        tuple(e for e in (first.done, w.done) if e is not None),
                    )
                )
        # Writes that may have been accepted (ok, info, or never completed), by invocation time.
        maybe = [(float(w.start), int(w.get("token")), w) for w in group if w.type != "fail"]
        maybe_times, maybe_best = _prefix_max(maybe)
        for b in rejected:
            tb = int(b.get("token"))
            end = float(b.end if b.end is not None else b.start)
            prior = _max_before(maybe, maybe_times, maybe_best, end)
            if prior is None or prior[1] <= tb:
                violations.append(
                    Violation(
                        "unjustified-rejection",
                        f"write{where} by {b.process} with token {tb} was rejected at "
                        f"{_t(end)}, but no write with a higher token had been accepted "
                        "before it",
                        tuple(e for e in (b.invoke, b.done) if e is not None),
                    )
                )
    granted = [
        a
        for a in _pair(events, frozenset(("acquire",)))
        if a.type == "ok" and a.get("token") is not None
    ]
    ends_by_lock: dict[Any, list[tuple[float, int, Any]]] = {}
    for lock, end, acquired, how in _lease_ends(events, expiry_slack):
        assert acquired.token is not None
        ends_by_lock.setdefault(lock, []).append((float(end), acquired.token, (acquired, how)))
    indexes = {lock: _prefix_max(items) for lock, items in ends_by_lock.items()}
    for b in granted:
        lock = b.get("lock")
        if lock not in indexes:
            continue
        prior = _max_before(ends_by_lock[lock], *indexes[lock], b.start)
        tb = int(b.get("token"))
        if prior is None or prior[1] < tb:
            continue
        acquired, how = prior[2]
        where = "" if lock is None else f" of lock {lock!r}"
        violations.append(
            Violation(
                "token-not-increasing",
                f"acquisition{where} by {b.process} invoked at {_t(b.start)} got token "
                f"{tb}, not above token {acquired.token} of {acquired.process}'s "
                f"acquisition whose lease had {how} by {_t(prior[0])}",
                tuple(e for e in (acquired, b.invoke, b.done) if e is not None),
            )
        )
    return CheckResult(
        "fencing",
        tuple(violations),
        {
            "writes_accepted": accepted_total,
            "writes_rejected": rejected_total,
            "acquisitions": len(granted),
        },
    )


# -- leases observed on the server ----------------------------------------------------------------
#
# A coordinator samples the server's leases and records them as ``lease`` events (``info``):
# ``lock``, ``owner`` (the lease's owner id, None when the key is absent), ``pttl`` (ms) and
# ``sent`` (monotonic ns when the sample was requested; the event's ``time`` is when the answer
# arrived, so the server read the lease at some instant in between).


@dataclass(frozen=True)
class _Sample:
    lock: Any
    owner: str | None
    pttl: int
    sent: int
    received: int
    event: Event


def _samples(history: Sequence[Event]) -> list[_Sample]:
    out: list[_Sample] = []
    for event in history:
        if event.op != "lease":
            continue
        owner = event.get("owner")
        pttl = event.get("pttl")
        sent = event.get("sent")
        out.append(
            _Sample(
                event.get("lock"),
                None if owner is None else str(owner).rstrip("*"),
                int(pttl) if isinstance(pttl, int) and not isinstance(pttl, bool) else -2,
                int(sent) if isinstance(sent, int) and not isinstance(sent, bool) else event.time,
                event.time,
                event,
            )
        )
    return out


@dataclass(frozen=True)
class _Claim:
    """A lock operation of one process, during which a lease of ``owner`` is accounted for."""

    process: str
    lock: Any
    owner: str | None  # the exact owner id, when known
    prefix: str | None  # else: the owner-id prefix of the handle that made the attempt
    start: int
    end: float  # ns; inf while the history never shows the operation (or the hold) finishing
    what: str

    def covers(self, owner: str) -> bool:
        if self.owner is not None:
            return self.owner == owner
        return self.prefix is not None and owner.startswith(self.prefix)


def _ended(op: str, event: Event) -> str:
    error = event.get("error")
    return f"{op} {event.type}" + (f" {error}" if error else "")


_UNREACHABLE = "ConnectionUnavailable"


def _lock_claims(history: Sequence[Event]) -> list[_Claim]:
    """When each owner's lease may exist: from an acquire's invocation until its attempt finished
    (when it did not succeed) or until the holder's release / abandon finished (when it did)."""
    claims: list[_Claim] = []
    attempt: dict[tuple[str, Any], Event] = {}  # open acquire invocations
    # (invocation or ok, owner, lease ttl in seconds when recorded) per holder
    held: dict[tuple[str, Any], tuple[Event, str, float | None]] = {}
    for event in history:
        key = (event.process, event.get("lock"))
        if event.op == "acquire":
            if event.type == "invoke":
                attempt[key] = event
                continue
            start = attempt.pop(key, event)
            owner = event.get("owner")
            if event.type == "ok" and owner is not None:
                held[key] = (start, str(owner), _num(event.get("ttl")))
            else:
                claims.append(
                    _Claim(
                        event.process, key[1], None if owner is None else str(owner),
                        event.get("owner_prefix") or start.get("owner_prefix"),
                        start.time, event.time, _ended("acquire", event),
                    )
                )  # fmt: skip
        elif event.op in ("release", "abandon") and event.type != "invoke" and key in held:
            start, owner, ttl = held.pop(key)
            end: float = event.time
            if event.type == "info" and event.get("error") == _UNREACHABLE and ttl is not None:
                # The release could not reach the server (every retry failed): the lease can
                # only end with its TTL, as documented. At most one ttl after this release began:
                # every extend before it reset the lease to one ttl from then.
                end = max(end, event.time + ttl * 1e9)
            claims.append(
                _Claim(
                    event.process,
                    key[1],
                    owner,
                    None,
                    start.time,
                    end,
                    "hold (" + _ended(event.op, event) + ")",
                )
            )
    for key, start_event in attempt.items():
        claims.append(
            _Claim(
                key[0], key[1], start_event.get("owner"), start_event.get("owner_prefix"),
                start_event.time, math.inf, "acquire unfinished",
            )
        )  # fmt: skip
    for key, (start_event, owner, _) in held.items():
        claims.append(_Claim(key[0], key[1], owner, None, start_event.time, math.inf, "hold"))
    return claims


def check_orphans(
    history: Iterable[Event | Mapping[str, Any]], *, bound: float = 0.5
) -> CheckResult:
    """Check that no lease outlives, by more than ``bound`` seconds, every operation that could
    own it.

    Lock operations carry ``owner`` (the owner id: on ``acquire`` ``ok``, and on any event when
    known) or ``owner_prefix`` (the owner-id prefix of the handle, for attempts whose exact id is
    unknown). A lease of owner ``o`` is accounted for from the ``invoke`` of an acquire that could
    have been granted it until that attempt finished (``fail`` / ``info``), or, for a granted
    one, until the holder's ``release`` (or ``abandon``: the holder gave the handle up) finished
    — or, for a release that ended ``info`` with ``error="ConnectionUnavailable"`` (it could not
    reach the server at all; documented: the lease then ends with its TTL), until one ``ttl`` (the
    acquire's ``ok`` field) after it. ``lease`` samples (see above) of an owner that no such
    interval covers, taken more than ``bound`` after the last of them ended, are violations of
    kind ``orphaned-lease`` (one per lease): the server keeps a lease nobody holds and nobody
    will release, so every other client waits up to its TTL. Locks without samples are not
    checked.
    """
    events = sort_events(history)
    slack = bound * 1e9
    claims: dict[Any, list[_Claim]] = {}
    for claim in _lock_claims(events):
        claims.setdefault(claim.lock, []).append(claim)
    violations: list[Violation] = []
    reported: set[tuple[Any, str]] = set()
    checked = 0
    for sample in _samples(events):
        if sample.owner is None:
            continue
        checked += 1
        if (sample.lock, sample.owner) in reported:
            continue
        mine = [c for c in claims.get(sample.lock, ()) if c.covers(sample.owner)]
        if any(c.start <= sample.received and sample.sent <= c.end + slack for c in mine):
            continue
        reported.add((sample.lock, sample.owner))
        before = [c for c in mine if c.end < sample.sent]
        last = max(before, key=lambda c: c.end, default=None)
        if last is None:
            why = "no recorded operation could own it"
        else:
            why = (
                f"{last.process}'s {last.what} ended at {_t(last.end)}, "
                f"{(sample.sent - last.end) / 1e6:.1f} ms before"
            )
        violations.append(
            Violation(
                "orphaned-lease",
                f"lease of lock {sample.lock!r} owned by {sample.owner} still on the server at "
                f"{_t(sample.sent)} (pttl {sample.pttl} ms): {why} (bound {bound:g} s)",
                (sample.event,),
            )
        )
    return CheckResult("orphans", tuple(violations), {"samples": checked})


_CLAIM_OPS = frozenset(("acquire", "extend", "held"))


def check_validity(
    history: Iterable[Event | Mapping[str, Any]], *, tolerance: float = 0.005
) -> CheckResult:
    """Check that a holder's reported validity is never later than the lease's real end.

    A claim is an ``ok`` event of ``acquire``, ``extend`` or ``held`` (e.g. ``ensure_held()``
    passed) with ``owner`` and ``validity``: the holder believes its lease lasts until
    ``time + validity``. The claim stands until the same process's next ``extend`` or ``release``
    invocation (or ``abandon``) on that lock. A ``lease`` sample taken while it stands must show
    (violations of kind ``validity-late``):

    - the owner's lease with ``received + pttl >= time + validity - tolerance`` (the server's
      lease ends no earlier than the holder thinks), and
    - the lease present at all when it was read before ``time + validity - tolerance``.
    """
    events = sort_events(history)
    tol = tolerance * 1e9
    claims: list[tuple[Event, float]] = []  # (claim, when it stops standing)
    standing: dict[tuple[str, Any], list[int]] = {}
    for event in events:
        key = (event.process, event.get("lock"))
        if event.op in _CLAIM_OPS and event.type == "ok" and event.get("owner") is not None:
            if _num(event.get("validity")) is not None:
                standing.setdefault(key, []).append(len(claims))
                claims.append((event, math.inf))
        elif key in standing and (
            (event.op in ("extend", "release") and event.type == "invoke") or event.op == "abandon"
        ):
            for index in standing.pop(key):
                claims[index] = (claims[index][0], event.time)
    by_lock: dict[Any, list[_Sample]] = {}
    for sample in _samples(events):
        by_lock.setdefault(sample.lock, []).append(sample)
    violations: list[Violation] = []
    checked = 0
    for claim, until in claims:
        owner = str(claim.get("owner"))
        end = claim.time + max(0.0, float(claim.get("validity"))) * 1e9
        samples = by_lock.get(claim.get("lock"), [])
        i = bisect.bisect_left([s.sent for s in samples], claim.time)
        for sample in samples[i:]:
            if sample.received >= until or sample.received >= end - tol:
                break
            checked += 1
            if sample.owner == owner:
                real_end = sample.received + sample.pttl * 1e6
                if sample.pttl >= 0 and end - tol <= real_end:
                    continue
                what = f"the server's pttl was {sample.pttl} ms"
            else:
                real_end = sample.received
                what = "the lease was " + (
                    "gone" if sample.owner is None else f"held by {sample.owner}"
                )
            violations.append(
                Violation(
                    "validity-late",
                    f"{claim.process} ({claim.op}, owner {owner}) reported validity "
                    f"{claim.get('validity'):.3f} s at {_t(claim.time)} (until {_t(end)}), but "
                    f"at {_t(sample.sent)} {what}: {(end - real_end) / 1e6:.1f} ms late",
                    (claim, sample.event),
                )
            )
            break
    return CheckResult("validity", tuple(violations), {"claims": len(claims), "samples": checked})


# -- caches ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Put:
    """A value stored (or possibly stored) under one cache key."""

    op: _Op
    born: float  # ns: no later than this, the value existed (inf: unknown)
    landed: float  # ns: when it was surely in Redis (inf: unknown)


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _cache_key(op: _Op) -> tuple[Any, Any]:
    return op.get("namespace"), op.get("key")


def _tags_of(op: _Op) -> tuple[Any, ...]:
    tags = op.get("tags")
    return tuple(tags) if isinstance(tags, (list, tuple)) else ()


class _Invalidators:
    """Invalidations of one scope: is there one invoked after ``born`` that completed before
    ``before``? (sorted by invocation; suffix minima of completion times, O(log n) per query)"""

    def __init__(self, ops: list[tuple[float, float, _Op]]) -> None:
        ops.sort(key=lambda item: item[0])
        self.starts = [item[0] for item in ops]
        self.ops = ops
        self.best: list[int] = [0] * len(ops)
        for i in range(len(ops) - 1, -1, -1):
            nxt = self.best[i + 1] if i + 1 < len(ops) else None
            self.best[i] = i if nxt is None or ops[i][1] <= ops[nxt][1] else nxt

    def first_completed(self, born: float, before: float) -> _Op | None:
        i = bisect.bisect_right(self.starts, born)
        if i >= len(self.ops):
            return None
        _, end, op = self.ops[self.best[i]]
        return op if end < before else None


def check_cache(
    history: Iterable[Event | Mapping[str, Any]],
    *,
    bound: float = 0.0,
    near_bound: float | None = None,
    expiry_slack: float = 0.05,
) -> CheckResult:
    """Check that no cache read returned a value older than a completed invalidation.

    Operations (fields ``namespace`` - optional - and ``key`` name the entry):

    ``write``
        ``set``: ``value`` stored under ``key`` with optional ``tags`` and ``ttl`` (seconds).
        Its value counts as born when the write completed (``ok``); an unknown outcome never
        makes a read stale (it may have happened at any time).
    ``fill``
        A read-through's store of its loader's ``value``: ``ok`` stored, ``fail`` refused. Its
        value counts as born when the fill *began* (its loader may have read the source any time
        after): a fill that began before an invalidation must not be visible after it (C1).
    ``invalidate`` / ``delete``
        ``ok`` means it completed. Scope from the fields: ``tag`` (every entry with that tag),
        ``key`` (one entry), or neither (the whole ``namespace``). Failed or unknown ones are
        ignored.
    ``read``
        ``ok`` with ``value`` (a hit) or ``hit=False`` / no value (a miss, never a violation).
        ``tier="near"`` marks a read served by an in-process near cache.

    An explicit ``born`` field (monotonic ns) on a write or fill overrides the rule above.

    Violations:

    - ``stale-read``: a read invoked more than the bound after an invalidation of its entry (key,
      tag or namespace) completed returned a value born before that invalidation began.
    - ``overwritten-read``: the same, where the "invalidation" is a later write or accepted fill
      of the same key (a register must not go back in time).
    - ``phantom-read``: a read returned a value that no write or fill of that key carried.
    - ``expired-read``: a read invoked after ``ttl * (1 + expiry_slack)`` past the write's
      completion returned its value.

    Args:
        history: the events.
        bound: staleness allowed to every read, in seconds (``0``: none).
        near_bound: staleness allowed to reads with ``tier="near"`` (default: ``bound``) - the
            near cache's coherence bound (C6).
        expiry_slack: tolerance on TTLs (the server's expiry is not exact).
    """
    events = sort_events(history)
    violations: list[Violation] = []
    puts: dict[tuple[Any, Any], dict[Any, list[_Put]]] = {}
    overwrites: dict[tuple[Any, Any], list[tuple[float, float, _Op]]] = {}
    n_writes = 0
    for w in _pair(events, frozenset(("write", "fill"))):
        if w.type == "fail" or w.get("value") is None or w.get("key") is None:
            continue  # refused (nothing stored), or not a cache write (a fenced one)
        n_writes += 1
        explicit = _num(w.get("born"))
        if explicit is not None:
            born = explicit
        elif w.op == "fill":
            born = float(w.start)
        else:
            born = float(w.end) if w.type == "ok" and w.end is not None else math.inf
        landed = float(w.end) if w.type == "ok" and w.end is not None else math.inf
        value = _value_id(w.get("value"))
        puts.setdefault(_cache_key(w), {}).setdefault(value, []).append(_Put(w, born, landed))
        if w.type == "ok" and w.end is not None:
            overwrites.setdefault(_cache_key(w), []).append((float(w.start), float(w.end), w))
    scopes: dict[tuple[str, Any, Any], list[tuple[float, float, _Op]]] = {}
    n_invalidations = 0
    for inv in _pair(events, frozenset(("invalidate", "delete"))):
        if inv.type != "ok" or inv.end is None:
            continue
        n_invalidations += 1
        ns = inv.get("namespace")
        if inv.get("tag") is not None:
            scope: tuple[str, Any, Any] = ("tag", ns, inv.get("tag"))
        elif inv.get("key") is not None:
            scope = ("key", ns, inv.get("key"))
        else:
            scope = ("namespace", ns, None)
        scopes.setdefault(scope, []).append((float(inv.start), float(inv.end), inv))
    index = {scope: _Invalidators(ops) for scope, ops in scopes.items()}
    over_index = {key: _Invalidators(ops) for key, ops in overwrites.items()}
    n_reads = n_hits = 0
    for r in _pair(events, frozenset(("read",))):
        if r.type != "ok" or r.get("key") is None:
            continue
        n_reads += 1
        value = r.get("value")
        if value is None or r.get("hit") is False:
            continue
        n_hits += 1
        key = _cache_key(r)
        near = r.get("tier") == "near"
        allowed = near_bound if near and near_bound is not None else bound
        before = float(r.start) - allowed * 1e9
        where = f"key {key[1]!r}" + ("" if key[0] is None else f" of namespace {key[0]!r}")
        candidates = puts.get(key, {}).get(_value_id(value))
        if not candidates:
            violations.append(
                Violation(
                    "phantom-read",
                    f"{r.process} read {value!r} from {where} at {_t(r.start)}, a value no "
                    "write or fill of that key carried",
                    tuple(e for e in (r.invoke, r.done) if e is not None),
                )
            )
            continue
        put = max(candidates, key=lambda p: p.born)  # the most lenient reading
        checks: list[tuple[str, _Invalidators | None, str]] = [
            ("stale-read", index.get(("key", key[0], key[1])), "invalidation of the key"),
            ("stale-read", index.get(("namespace", key[0], None)), "clear of the namespace"),
            *(
                ("stale-read", index.get(("tag", key[0], tag)), f"invalidation of tag {tag!r}")
                for tag in _tags_of(put.op)
            ),
            ("overwritten-read", over_index.get(key), "later write of the key"),
        ]
        for kind, scope_index, what in checks:
            if scope_index is None:
                continue
            by = scope_index.first_completed(put.born, before)
            if by is None or (kind == "overwritten-read" and by is put.op):
                continue
            if kind == "overwritten-read" and _value_id(by.get("value")) == _value_id(value):
                continue
            tier = " (near cache)" if near else ""
            violations.append(
                Violation(
                    kind,
                    f"{r.process} read{tier} {value!r} from {where} at {_t(r.start)}, but the "
                    f"{what} by {by.process} (invoked {_t(by.start)}, completed "
                    f"{_t(by.end or 0)}) came after that value was born (at {_t(put.born)}, "
                    f"{put.op.op} by {put.op.process})"
                    + (f"; allowed staleness {allowed:g} s" if allowed else ""),
                    tuple(e for e in (put.op.done, by.invoke, by.done, r.done) if e is not None),
                )
            )
            break
        ttl = _num(put.op.get("ttl"))
        if ttl is not None and put.landed != math.inf:
            expires = put.landed + ttl * (1 + expiry_slack) * 1e9
            if r.start > expires + allowed * 1e9:
                violations.append(
                    Violation(
                        "expired-read",
                        f"{r.process} read {value!r} from {where} at {_t(r.start)}, after its "
                        f"ttl of {ttl:g} s (written by {put.op.process} at {_t(put.landed)})",
                        tuple(e for e in (put.op.done, r.done) if e is not None),
                    )
                )
    return CheckResult(
        "cache",
        tuple(violations),
        {
            "reads": n_reads,
            "hits": n_hits,
            "writes": n_writes,
            "invalidations": n_invalidations,
        },
    )


def _value_id(value: Any) -> Any:
    """A hashable identity for a recorded value (JSON values may be lists or dicts)."""
    try:
        hash(value)
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str)
    return value
