"""The single-instance lock on a real 3-master Cluster: all of one name's keys share a slot."""

from __future__ import annotations

import asyncio
import threading
import time

from redis.crc import key_slot

from distkit import connect
from distkit.testing import RedisCluster
from distlock import AsyncLock, FencedStore, Lock


def test_lock_handoff_and_fencing_on_a_cluster(cluster: RedisCluster) -> None:
    client = connect(cluster.config())
    client.flushall()
    names = [f"cl-{i}" for i in range(12)]
    for name in names:
        holder = Lock(client, name, ttl=10)
        assert holder.acquire()
        token = holder.fencing_token
        waiter = Lock(connect(cluster.config()), name, ttl=10)
        got: list[bool] = []
        thread = threading.Thread(target=lambda w=waiter, g=got: g.append(w.acquire(timeout=10)))
        thread.start()
        while client.zcard(f"distkit:lock:{{{name}}}:queue") < 1:
            time.sleep(0.002)
        holder.release()
        thread.join(10)
        assert got == [True]
        assert waiter.fencing_token is not None
        assert token is not None
        assert waiter.fencing_token > token
        lease = f"distkit:lock:{{{name}}}"
        node = cluster.node_for_key(lease).client()
        keys = [k.decode() for k in node.keys(f"distkit:lock:?{name}?*")]
        assert f"{lease}:fence" in keys
        assert {key_slot(k.encode()) for k in keys} == {key_slot(lease.encode())}
        FencedStore(client, name).write(waiter.fencing_token, "x")
        waiter.release()
    assert len({cluster.node_for_key(f"distkit:lock:{{{n}}}").port for n in names}) > 1


def test_async_lock_on_a_cluster(cluster: RedisCluster) -> None:
    async def run() -> None:
        client = cluster.async_client()
        a = AsyncLock(client, "acl", ttl=10)
        b = AsyncLock(client, "acl", ttl=10)
        assert await a.acquire()
        assert not await b.acquire(blocking=False)
        waiting = asyncio.create_task(b.acquire(timeout=10))
        await asyncio.sleep(0.05)
        await a.release()
        assert await waiting
        await b.release()
        await client.aclose()

    asyncio.run(run())
