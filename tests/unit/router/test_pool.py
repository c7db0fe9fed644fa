"""The worker pool follows discovery: joins, leaves (with their index entries), and filters."""

from __future__ import annotations

from typing import Any

from kvmesh.discovery import ServiceInstance
from services.router.pool import WorkerPool


def instance(worker_id: str, port: int) -> ServiceInstance:
    # Port 9 (discard): nothing answers, so the load and event watchers just keep retrying.
    return ServiceInstance(f"svc-{worker_id}", "kvmesh-decode", "127.0.0.1", port,
                           meta={"worker_id": worker_id})  # fmt: skip


async def test_only_listed_workers_join_and_leavers_lose_their_entries() -> None:
    discovery: Any = None  # _reconcile is driven by hand here
    pool = WorkerPool(discovery, only_workers=["a", "b"])
    await pool._reconcile("decode", [instance("a", 9), instance("b", 9), instance("c", 9)])
    assert sorted(pool._workers["decode"]) == ["a", "b"]
    pool.index.reset("a", [], last_event_id=0)  # as its follower would, once connected
    await pool._reconcile("decode", [instance("b", 9)])
    assert sorted(pool._workers["decode"]) == ["b"]
    assert "a" not in pool.index.workers()
    remaining = pool._workers["decode"]["b"]
    await pool.stop()
    assert remaining.watcher is not None and remaining.watcher.done()
    assert remaining.kv_follower is not None and remaining.kv_follower.done()
