"""The Redlock protocol over N independent masters, written once and free of I/O.

It reuses the single-instance scripts on every master (``ACQUIRE`` with no queue, ``RELEASE``,
``EXTEND``) and adds the quorum and validity arithmetic of the Redis distributed-locks page::

    quorum   = N // 2 + 1
    drift    = ttl * drift_factor + 2 ms
    validity = ttl - elapsed - drift          (elapsed on a monotonic clock; <= 0: not held)

Fencing across masters: each master issues max(TIME_us, last + 1) in the grant script and the
client takes the maximum over the masters that granted. With ``fencing="quorum"`` (the default)
that maximum is also written back (a max-register) and ``acquire`` succeeds only once a quorum of
masters acknowledged the write *while still holding this acquisition's lease*: a later holder's
majority contains one of them, where its grant can only run after that lease ended, so after the
write. No clock assumption remains (docs/redlock.md has the argument and a timeline).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

from distkit import (
    ConfigError,
    ConnectionUnavailable,
    DistkitError,
    ForeignDataError,
    LockNotOwned,
    Script,
)
from distkit._protocol import TIMED_OUT, Cleanup, Eval, FanOut, Protocol, Sleep
from distkit._units import seconds

from ._core import Clock, LockCore, Seconds
from ._scripts import ACQUIRE, EXTEND, PEEK, RELEASE

__all__ = ["Fencing", "RedlockCore"]

Fencing = Literal["clock", "quorum"]

# KEYS: lease, fence;  ARGV: owner, token, retention_ms
# Raises the fence's last token to at least `token` (a max-register); returns 1 when `owner` still
# holds the lease here (only such a write counts towards the quorum), 0 otherwise.
FENCE_HELD = Script(
    "distlock.redlock_fence_held",
    """
local last = tonumber(redis.call('GET', KEYS[2]))
if not last or tonumber(ARGV[2]) > last then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or holder == ARGV[1] .. '*' then return 1 end
return 0
""",
)


def _granted(outcome: Any) -> bool:
    return isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == 1


def _ok(outcome: Any) -> bool:
    return outcome is not TIMED_OUT and not isinstance(outcome, BaseException)


def _fatal(outcomes: Sequence[Any]) -> list[DistkitError]:
    """The errors that a retry cannot cure (all but ``ConnectionUnavailable``), in node order."""
    return [
        o
        for o in outcomes
        if isinstance(o, DistkitError) and not isinstance(o, ConnectionUnavailable)
    ]


class RedlockCore(LockCore):
    """State and protocol steps of one Redlock handle over ``masters`` independent servers."""

    __slots__ = (
        "_lease_ttl",
        "_release_calls",
        "drift",
        "drift_factor",
        "fencing",
        "masters",
        "node_timeout",
        "quorum",
        "retry_count",
        "retry_delay",
    )

    def __init__(
        self,
        name: str,
        *,
        masters: int,
        ttl: Seconds,
        prefix: str,
        clock: Clock,
        fence_retention: Seconds,
        retry_count: int | None,
        retry_delay: Seconds,
        drift_factor: float,
        node_timeout: Seconds | None,
        fencing: Fencing,
    ) -> None:
        super().__init__(name, ttl=ttl, prefix=prefix, clock=clock, fence_retention=fence_retention)
        if masters < 1:
            raise ConfigError("Redlock needs at least one master (three or more for safety)")
        self.masters = masters
        self.quorum = masters // 2 + 1
        if retry_count is not None and (
            isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0
        ):
            raise ConfigError(f"retry_count must be None or an int >= 0, got {retry_count!r}")
        self.retry_count = retry_count
        self.retry_delay = seconds(retry_delay, field="retry_delay")
        if (
            isinstance(drift_factor, bool)
            or not isinstance(drift_factor, (int, float))
            or not 0 <= drift_factor < 0.5
        ):
            raise ConfigError(f"drift_factor must be a number in [0, 0.5), got {drift_factor!r}")
        self.drift_factor = float(drift_factor)
        self.drift = self.ttl * self.drift_factor + 0.002
        # ttl / 50, at least 5 ms, at most 0.5 s, and always below ttl / 2 (ttl / 4 at most):
        # the default is valid for every ttl accepted.
        default_timeout = min(0.5, max(0.005, self.ttl / 50), self.ttl / 4)
        self.node_timeout = (
            default_timeout if node_timeout is None else seconds(node_timeout, field="node_timeout")
        )
        if self.node_timeout * 2 >= self.ttl:
            raise ConfigError(
                f"node_timeout ({self.node_timeout}s) must be much smaller than ttl ({self.ttl}s)"
            )
        if fencing not in ("clock", "quorum"):
            raise ConfigError(f"fencing must be 'clock' or 'quorum', got {fencing!r}")
        self.fencing: Fencing = fencing
        # self._unreleased (LockCore): here the owner of any acquisition this handle stopped
        # believing in whose leases were not released yet (clear() remembers it).
        # The longest lease this handle ever asked for (ttl, or a longer extend): no lease of
        # its stands longer on any master, so a release trying that long has tried enough.
        self._lease_ttl = self.ttl
        # The last owner's release, per master: built once for the abandon and the release.
        self._release_calls: tuple[str, list[Eval]] | None = None

    def _foreign(self, outcome: Any) -> Any:
        """A master's refusal by a lease without an expiry (planted, not distlock's): an error
        no retry cures, as on a single instance, instead of a refusal retried for ever."""
        if isinstance(outcome, list) and len(outcome) == 2 and outcome[0] == 0:
            try:
                self._refused(outcome[0], outcome[1])
            except ForeignDataError as exc:
                return exc
        return outcome

    def _each(self, call: Eval) -> list[Eval]:
        """One copy of ``call`` per master (a test build skews each master's clock here)."""
        return [call] * self.masters

    def _reseed(self) -> None:
        """In a forked child: nothing held and nothing left to release (the leases are the
        parent's; releasing them from the child would let two processes hold the lock)."""
        super()._reseed()
        self._unreleased = None
        self._release_calls = None

    def clear(self) -> None:
        """Forget the current acquisition; remember its owner until its leases are released."""
        if self.owner is not None:
            self._unreleased = self.owner
        super().clear()

    def _release_calls_of(self, owner: str) -> list[Eval]:
        known = self._release_calls
        if known is not None and known[0] == owner:
            return known[1]
        call = Eval(
            RELEASE, self._release_keys(self.wake_prefix + owner), (owner, self.retention_ms, 1)
        )
        calls = self._each(call)
        if type(self)._each is RedlockCore._each:  # a test build may skew clocks in between
            self._release_calls = (owner, calls)
        return calls

    def _acquire(self, blocking: bool, timeout: float | None, max_block: float) -> Protocol[bool]:
        """Take a quorum of leases within validity; retry after a random delay when blocking.

        Run by ``LockCore.acquire``: one acquire at a time per handle, none while held.
        """
        deadline = None if timeout is None else self.clock() + timeout
        stale = self._unreleased
        if stale is not None:
            # A lost acquisition's leases may still stand on some masters: free them first.
            # Sent, not waited for: the replies are read before the next request on each node.
            yield FanOut(
                self._release_calls_of(stale),
                self.node_timeout,
                reach_all=True,
                wait=False,
                late=self._lease_ttl,
            )
            self._unreleased = None
        attempt = 0
        while True:
            owner = self.new_owner()
            wake_key = self.wake_prefix + owner
            keys = (self.lease_key, self.fence_key, self.queue_key, self.qexp_key, wake_key)
            grant = Eval(ACQUIRE, keys, (owner, self.ttl_ms, self.retention_ms, 0))
            undo = self._release_calls_of(owner)
            started = self.clock()
            try:
                outcomes = yield FanOut(
                    self._each(grant), self.node_timeout, undo, self.quorum, _granted
                )
                outcomes = [self._foreign(o) for o in outcomes]
                tokens = [int(o[1]) for o in outcomes if _granted(o)]
                validity = self.ttl - (self.clock() - started) - self.drift
                if len(tokens) >= self.quorum and validity > 0:
                    token = max(tokens)
                    if self.fencing == "quorum":
                        register = Eval(
                            FENCE_HELD,
                            (self.lease_key, self.fence_key),
                            (owner, token, self.retention_ms),
                        )
                        acks = yield FanOut(
                            self._each(register),
                            self.node_timeout,
                            quorum=self.quorum,
                            granted=lambda o: o == 1,
                        )
                        written = sum(1 for o in acks if o == 1)
                        validity = self.ttl - (self.clock() - started) - self.drift
                        if written < self.quorum:
                            validity = 0.0
                    if validity > 0:
                        self.owner = owner
                        self.token = token
                        self.expires_at = started + self.ttl - self.drift
                        return True
                # Errors no retry cures (wrong password, foreign data...) on so many masters
                # that no quorum can form: released below, then the first one is raised.
                fatal = _fatal(outcomes)
                if self.masters - len(fatal) < self.quorum:
                    raise fatal[0]
                # Not held: release everywhere, on the masters that refused or timed out too.
                # Not waited for (the timeout bound): each node reads the reply before its next
                # request, and the release is ordered after the grant on that connection.
                yield FanOut(
                    undo, self.node_timeout, reach_all=True, wait=False, late=self._lease_ttl
                )
            except GeneratorExit:
                raise
            except BaseException:
                if self.owner is None:
                    yield Cleanup(
                        FanOut(undo, self.node_timeout, reach_all=True, late=self._lease_ttl)
                    )
                raise
            attempt += 1
            if not blocking or (self.retry_count is not None and attempt > self.retry_count):
                return False
            delay = random.uniform(self.retry_delay / 2, self.retry_delay)
            if deadline is not None:
                remaining = deadline - self.clock()
                if remaining <= delay:  # no attempt starts at the deadline: it would overrun it
                    if remaining > 0:
                        yield Sleep(remaining)
                    return False
            yield Sleep(delay)

    def release(self) -> Protocol[None]:
        """Release on every master, also after renewal lost the lock; see docs/redlock.md.

        The release goes to every master (suspended ones too); a master that does not answer in
        time gets it by ``EVAL`` right behind, so one whose script cache was flushed or
        restarted still releases when the request lands. Late or failed answers are not a loss.

        Raises:
            LockNotOwned: the handle holds nothing; its lock was lost (the leases that remained
                are released all the same); more than ``N - quorum`` masters answered that they
                no longer held this lease; or the local validity had run out before the release
                and fewer than a quorum of masters confirmed it.
        """
        owner = self.owner
        lost = owner is None
        left = self.remaining()
        if owner is None:
            owner = self._unreleased
            if owner is None:
                raise LockNotOwned(f"lock {self.name!r} is not held by this handle", name=self.name)
        try:
            outcomes = yield FanOut(
                self._release_calls_of(owner),
                self.node_timeout,
                reach_all=True,
                late=self._lease_ttl,
            )
        finally:
            self.clear()
            self._unreleased = None
        released = sum(1 for o in outcomes if o in (1, 2))
        refused = sum(1 for o in outcomes if o == 0)
        if lost:
            raise LockNotOwned(
                f"lock {self.name!r} was lost before release (renewal failed); the leases still "
                f"standing on {released} of {self.masters} masters were released",
                name=self.name,
            )
        if released >= self.quorum:
            return
        if self.masters - refused < self.quorum:
            raise LockNotOwned(
                f"lock {self.name!r}: {refused} of {self.masters} masters answered at release that "
                f"they no longer held it (quorum {self.quorum}): the lease had lapsed",
                name=self.name,
            )
        if left <= 0:
            raise LockNotOwned(
                f"lock {self.name!r}: its validity had run out before release and only {released} "
                f"of {self.masters} masters confirmed the release (quorum {self.quorum})",
                name=self.name,
            )
        # Held until now (validity left, no quorum of refusals); the masters that did not answer
        # in time release when the request lands, or their lease expires.

    def extend(self, ttl: Seconds | None) -> Protocol[None]:
        """Reset the lease on every master; succeeds only with a quorum within validity.

        Raises:
            LockNotOwned: the handle holds nothing, a quorum of masters answered that it does not
                hold the lease, or the local validity ran out (the lock is then lost).
            ConnectionUnavailable: too few masters answered in time but the lock may still be
                held and its validity has not run out: the handle keeps it (retry, or release).
        """
        owner = self.owner
        if owner is None:
            raise LockNotOwned(f"lock {self.name!r} is not held by this handle", name=self.name)
        new_ttl = self.ttl if ttl is None else seconds(ttl, field="ttl")
        self._lease_ttl = max(self._lease_ttl, new_ttl)
        started = self.clock()
        call = Eval(EXTEND, (self.lease_key,), (owner, max(1, round(new_ttl * 1000))))
        outcomes = yield FanOut(
            self._each(call), self.node_timeout, quorum=self.quorum, granted=lambda o: o == 1
        )
        extended = sum(1 for o in outcomes if o == 1)
        refused = sum(1 for o in outcomes if o == 0)
        drift = new_ttl * self.drift_factor + 0.002
        validity = new_ttl - (self.clock() - started) - drift
        if extended >= self.quorum and validity > 0:
            if self.owner == owner:
                self.expires_at = started + new_ttl - drift
            return
        if self.owner != owner:
            raise LockNotOwned(f"lock {self.name!r} was released meanwhile", name=self.name)
        if self.masters - refused < self.quorum or self.remaining() <= 0:
            self.clear()
            raise LockNotOwned(
                f"lock {self.name!r}: only {extended} of {self.masters} masters extended "
                f"({refused} no longer held it; quorum {self.quorum})",
                name=self.name,
            )
        # Timeouts or errors, not refusals: the lock may still be held and the old validity
        # stands. Not a loss; the renewer retries until the validity runs out.
        raise ConnectionUnavailable(
            f"lock {self.name!r}: only {extended} of {self.masters} masters extended in time "
            f"(quorum {self.quorum}); still held for {self.remaining():.3f}s by the old lease"
        )

    def _peek(self, owner: str, column: int) -> Protocol[bool]:
        """Whether a quorum of masters answers yes in ``column`` of PEEK's reply (0: a lease
        stands, 1: it is ``owner``'s); raise when too few masters answered to tell."""
        call = Eval(PEEK, (self.lease_key,), (owner,))
        outcomes = yield FanOut(self._each(call), self.node_timeout)
        replies = [o for o in outcomes if _ok(o)]
        yes = sum(1 for r in replies if r[column] == 1)
        if yes >= self.quorum:
            return True
        if len(replies) - yes > self.masters - self.quorum:  # a quorum of "yes" is impossible
            return False
        fatal = _fatal(outcomes)
        if fatal:
            raise fatal[0]
        raise ConnectionUnavailable(
            f"{self.kind} {self.name!r}: only {len(replies)} of {self.masters} masters answered "
            f"in time ({yes} yes; quorum {self.quorum}): cannot tell"
        )

    def locked(self) -> Protocol[bool]:
        """Whether a quorum of masters holds a lease for this name now.

        Raises:
            ConnectionUnavailable: too few masters answered to decide either way.
        """
        return (yield from self._peek(self.owner or "-", 0))

    def owned(self) -> Protocol[bool]:
        """Whether a quorum of masters holds this handle's lease now (``False`` at once, with no
        I/O, when the handle holds nothing).

        Raises:
            ConnectionUnavailable: too few masters answered to decide either way.
        """
        if self.owner is None:
            return False
        return (yield from self._peek(self.owner, 1))
