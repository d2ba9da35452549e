"""Local multi-process topologies: a Redis Cluster, and independent masters for Redlock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.crc import key_slot

from distkit.testing._server import _CLIENT_DEFAULTS, RedisServer

if TYPE_CHECKING:
    from distkit._config import RedisConfig, RedlockConfig

__all__ = ["IndependentMasters", "RedisCluster", "start_masters"]

SLOTS = 16384
_READY_TIMEOUT = 20.0
_ADDSLOTS_CHUNK = 1000

_C = TypeVar("_C", bound="RedisCluster")
_M = TypeVar("_M", bound="IndependentMasters")


def _slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Split the 16384 slots into ``masters`` contiguous, inclusive, near-equal ranges."""
    bounds = [i * SLOTS // masters for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _start_all(servers: list[RedisServer]) -> None:
    """Start servers in parallel; on any failure stop them all and re-raise."""
    try:
        for server in servers:
            server._spawn()
        for server in servers:
            server._wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise


class RedisCluster:
    """A local Redis Cluster of ``masters`` primaries (no replicas), slots spread evenly."""

    def __init__(self, *, masters: int = 3, binary: str | None = None) -> None:
        if not 1 <= masters <= SLOTS:
            raise ValueError(f"masters must be between 1 and {SLOTS}, got {masters}")
        self._binary = binary
        self._ranges = _slot_ranges(masters)
        self._moved: dict[int, RedisServer] = {}  # slots moved by migrate_slot
        self.nodes: list[RedisServer] = [
            RedisServer(binary=binary, cluster_enabled=True) for _ in range(masters)
        ]

    def __repr__(self) -> str:
        ports = ",".join(str(node.port) for node in self.nodes if node.running)
        return f"<RedisCluster masters={len(self.nodes)} ports={ports or '-'}>"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master."""
        return [node.address for node in self.nodes]

    @property
    def slot_ranges(self) -> list[tuple[int, int]]:
        """Inclusive slot range assigned to each node, in the order of :attr:`nodes`."""
        return list(self._ranges)

    def start(self: _C) -> _C:
        """Start the nodes, assign slots, join them and wait until the cluster is ``ok``."""
        _start_all(self.nodes)
        try:
            self._form()
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (idempotent)."""
        for node in self.nodes:
            node.stop()

    def __enter__(self: _C) -> _C:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def node_for_key(self, key: str | bytes) -> RedisServer:
        """The master that owns ``key``'s hash slot (as assigned by :meth:`start`, or moved
        by :meth:`migrate_slot`)."""
        return self.node_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def node_for_slot(self, slot: int) -> RedisServer:
        """The master that owns ``slot``."""
        if slot in self._moved:
            return self._moved[slot]
        for node, (first, last) in zip(self.nodes, self._ranges, strict=True):
            if first <= slot <= last:
                return node
        raise AssertionError(f"slot {slot} is not assigned")  # unreachable: ranges cover all

    def migrate_slot(
        self,
        slot: int,
        target: RedisServer,
        *,
        batch: int = 100,
        between: Callable[[], None] | None = None,
    ) -> int:
        """Move ``slot`` and its keys to master ``target`` while clients keep working.

        The resharding steps of ``redis-cli --cluster reshard``: ``SETSLOT IMPORTING`` on the
        target, ``SETSLOT MIGRATING`` on the source, ``MIGRATE`` the keys ``batch`` at a time
        (``between()`` runs after each batch, e.g. to widen the window), then ``SETSLOT NODE``
        on every master. Meanwhile clients get ``ASK`` / ``TRYAGAIN`` for the slot, then
        ``MOVED``. Returns the number of keys moved.
        """
        source = self.node_for_slot(slot)
        if source is target:
            return 0
        with source.client() as src, target.client() as dst:
            src_id = src.execute_command("CLUSTER", "MYID")
            dst_id = dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                host, port = target.address
                src.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                if between is not None:
                    between()
            for node in [target, source, *(n for n in self.nodes if n not in (source, target))]:
                with node.client() as conn:
                    conn.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        self._moved[slot] = target
        return moved

    def add_master(self) -> RedisServer:
        """Start one more master, join it to the cluster (no slots yet) and return it.

        Move slots onto it with :meth:`migrate_slot`. Waits until every node knows every other.
        """
        node = RedisServer(binary=self._binary, cluster_enabled=True).start()
        try:
            host, port = self.nodes[0].address
            with node.client() as conn:
                conn.execute_command("CLUSTER", "MEET", host, port)
            self.nodes.append(node)
            self._ranges.append((1, 0))  # an empty range: it owns no slot until one moves
            self._wait_until_ok()
        except BaseException:
            node.stop()
            raise
        return node

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A new sync cluster client (socket timeouts default to 5 s)."""
        # cast: redis.cluster.ClusterNode.__init__ is unannotated in some redis-py releases
        make_node = cast(
            "Callable[[str, int], redis.cluster.ClusterNode]", redis.cluster.ClusterNode
        )
        nodes = [make_node(host, port) for host, port in self.startup_nodes]
        return redis.RedisCluster(startup_nodes=nodes, **{**_CLIENT_DEFAULTS, **kwargs})

    def async_client(self, **kwargs: Any) -> redis.asyncio.RedisCluster:
        """A new asyncio cluster client (socket timeouts default to 5 s)."""
        nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in self.startup_nodes]
        return redis.asyncio.RedisCluster(startup_nodes=nodes, **{**_CLIENT_DEFAULTS, **kwargs})

    def config(self, **overrides: Any) -> RedisConfig:
        """A ``distkit`` ``RedisConfig`` with ``mode="cluster"`` listing every master."""
        from distkit._config import RedisConfig

        host, port = self.startup_nodes[0]
        fields: dict[str, Any] = {
            "host": host,
            "port": port,
            "mode": "cluster",
            "cluster_nodes": [f"{h}:{p}" for h, p in self.startup_nodes],
        }
        fields.update(overrides)
        return RedisConfig(**fields)

    # -- internals ----------------------------------------------------------------------------

    def _form(self) -> None:
        with self.nodes[0].client() as conn:
            version = str(conn.info("server")["redis_version"])
        use_range = tuple(int(part) for part in version.split(".")[:2]) >= (7, 0)
        first_host, first_port = self.nodes[0].address
        for epoch, (node, (first, last)) in enumerate(
            zip(self.nodes, self._ranges, strict=True), start=1
        ):
            with node.client() as conn:
                # Distinct config epochs up front, as `redis-cli --cluster create` does, so the
                # nodes need not resolve epoch collisions before they agree on slot owners.
                conn.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
                if use_range:
                    conn.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
                else:
                    for start in range(first, last + 1, _ADDSLOTS_CHUNK):
                        chunk = range(start, min(start + _ADDSLOTS_CHUNK, last + 1))
                        conn.execute_command("CLUSTER", "ADDSLOTS", *chunk)
        for node in self.nodes[1:]:
            with node.client() as conn:
                conn.execute_command("CLUSTER", "MEET", first_host, first_port)

    def _wait_until_ok(self, timeout: float = _READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while True:
            problems = list(self._problems())
            if not problems:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Redis Cluster on ports {[n.port for n in self.nodes]} not ready after "
                    f"{timeout:g} s: " + "; ".join(problems)
                )
            time.sleep(0.05)

    def _problems(self) -> Iterator[str]:
        expected = len(self.nodes)
        for node in self.nodes:
            try:
                with node.client(socket_timeout=1.0) as conn:
                    info = conn.execute_command("CLUSTER", "INFO")
                    table = conn.execute_command("CLUSTER", "NODES")
            except redis.RedisError as exc:
                yield f"{node.port}: {exc}"
                continue
            info_text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in info_text.splitlines() if ":" in line)
            if fields.get("cluster_state") != "ok":
                yield f"{node.port}: cluster_state={fields.get('cluster_state')}"
            known = int(fields.get("cluster_known_nodes", "0"))
            if known != expected:
                yield f"{node.port}: knows {known}/{expected} nodes"
            table_text = table.decode() if isinstance(table, bytes) else str(table)
            if "handshake" in table_text or "disconnected" in table_text:
                yield f"{node.port}: links not yet established"


class IndependentMasters:
    """``n`` unrelated standalone Redis servers, e.g. the masters of a Redlock."""

    def __init__(self, n: int = 3, *, binary: str | None = None, persistence: bool = False) -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.servers: list[RedisServer] = [
            RedisServer(binary=binary, persistence=persistence) for _ in range(n)
        ]

    def __repr__(self) -> str:
        return f"<IndependentMasters n={len(self.servers)}>"

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[RedisServer]:
        return iter(self.servers)

    def start(self: _M) -> _M:
        """Start every server (in parallel) and wait until each answers PING."""
        _start_all(self.servers)
        return self

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        for server in self.servers:
            server.stop()

    def __enter__(self: _M) -> _M:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        """``redis://`` URL of every server."""
        return [server.url for server in self.servers]

    def clients(self, **kwargs: Any) -> list[redis.Redis]:
        """One new sync client per server."""
        return [server.client(**kwargs) for server in self.servers]

    def async_clients(self, **kwargs: Any) -> list[redis.asyncio.Redis]:
        """One new asyncio client per server."""
        return [server.async_client(**kwargs) for server in self.servers]

    def configs(self, **overrides: Any) -> list[RedisConfig]:
        """One standalone ``RedisConfig`` per server."""
        return [server.config(**overrides) for server in self.servers]

    def redlock_config(self, **overrides: Any) -> RedlockConfig:
        """A ``distkit`` ``RedlockConfig`` whose masters are these servers."""
        from distkit._config import RedlockConfig

        return RedlockConfig(masters=tuple(self.configs(**overrides)))


def start_masters(n: int = 3, *, binary: str | None = None) -> IndependentMasters:
    """Start ``n`` independent masters and return them (stop them with ``.stop()``)."""
    return IndependentMasters(n, binary=binary).start()
