"""What the redis-server spent on a segment: CPU (INFO cpu) and Lua time (INFO commandstats)."""

from __future__ import annotations

from dataclasses import dataclass

import redis

__all__ = ["ServerUsage"]

# Script commands: their time includes the commands they call (which commandstats also counts
# on their own lines, so summing every line would count script work twice).
_SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


@dataclass(frozen=True)
class ServerUsage:
    """The server's CPU seconds (user + sys) and its Lua scripts' microseconds, so far."""

    cpu_s: float
    script_us: float

    @classmethod
    def read(cls, admin: redis.Redis) -> ServerUsage | None:
        """Read both counters; ``None`` where INFO is unsupported (fakeredis)."""
        try:
            cpu = admin.info("cpu")
            stats = admin.info("commandstats")
            lines = [stats.get(f"cmdstat_{name}") for name in _SCRIPTS]
            script_us = sum(float(line["usec"]) for line in lines if isinstance(line, dict))
            return cls(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), script_us)
        except (redis.RedisError, KeyError, ValueError, TypeError):
            return None

    def per_op_us(self, later: ServerUsage | None, ops: int) -> tuple[float, float] | None:
        """(CPU µs, Lua µs) per operation between this reading and ``later``."""
        if later is None or ops <= 0:
            return None
        return (
            (later.cpu_s - self.cpu_s) / ops * 1e6,
            (later.script_us - self.script_us) / ops,
        )
