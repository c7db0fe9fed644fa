"""MeshObserver: replicas and load over every datacenter, latency from router histograms, wake."""

from __future__ import annotations

import json

from kvmesh.api.v1 import worker_pb2
from kvmesh.discovery import KvEntry, ServiceInstance
from services.autoscaler.decide import LatencySample
from services.autoscaler.observe import MeshObserver, histogram_buckets, new_samples

NOW = 1000.0


class FakeDiscovery:
    def __init__(self, instances: dict[tuple[str, str], list[ServiceInstance]]) -> None:
        self.instances = instances  # (datacenter, service) -> passing instances
        self.kv: dict[str, bytes] = {}

    async def datacenters(self) -> list[str]:
        return sorted({dc for dc, _ in self.instances})

    async def healthy(
        self, service: str, *, datacenter: str | None = None
    ) -> tuple[int, list[ServiceInstance]]:
        return 1, self.instances.get((datacenter or "", service), [])

    async def kv_get(self, key: str) -> tuple[int, KvEntry | None]:
        value = self.kv.get(key)
        return 1, None if value is None else KvEntry(key, value, 1)


class FakeClients:
    def __init__(self, loads: dict[str, worker_pb2.LoadReport | None]) -> None:
        self._loads = loads

    async def loads(self, addresses: object) -> dict[str, worker_pb2.LoadReport | None]:
        return {a: self._loads.get(a) for a in addresses}  # type: ignore[attr-defined]

    async def close(self) -> None:
        pass


def _worker(n: int, tier: str, model: str, *, by_tag: bool = False) -> ServiceInstance:
    meta = {} if by_tag else {"model": model}
    tags = (f"model={model}", f"role={tier}") if by_tag else (f"role={tier}",)
    return ServiceInstance(f"w{n}", f"kvmesh-{tier}", "127.0.0.1", 9000 + n, tags, meta)


def _router(n: int, model: str, metrics_port: int) -> ServiceInstance:
    return ServiceInstance(
        f"r{n}", "kvmesh-router", "127.0.0.1", 8000 + n, (f"model={model}",),
        {"metrics_port": str(metrics_port)},
    )  # fmt: skip


def _observer(
    discovery: FakeDiscovery,
    loads: dict[str, worker_pb2.LoadReport | None] | None = None,
    metrics: dict[int, list[dict[str, float]]] | None = None,
    models: tuple[str, ...] = (),
) -> MeshObserver:
    pages = metrics or {}

    async def scrape(port: int, host: str) -> dict[str, float]:
        if not pages.get(port):
            raise ConnectionError("down")
        return pages[port].pop(0)

    return MeshObserver(
        discovery,  # type: ignore[arg-type]
        models=models,
        clients=FakeClients(loads or {}),  # type: ignore[arg-type]
        clock=lambda: NOW,
        scrape_metrics=scrape,
    )


def _histogram(metric: str, model: str, counts: dict[str, float]) -> dict[str, float]:
    return {f'{metric}_bucket{{le="{le}",model="{model}"}}': n for le, n in counts.items()}


async def test_replicas_and_load_are_summed_over_every_datacenter() -> None:
    discovery = FakeDiscovery(
        {
            ("us-east", "kvmesh-decode"): [_worker(1, "decode", "a"), _worker(3, "decode", "b")],
            ("eu-west", "kvmesh-decode"): [_worker(2, "decode", "a", by_tag=True)],
            ("eu-west", "kvmesh-prefill"): [_worker(4, "prefill", "a")],
        }
    )
    loads = {
        "127.0.0.1:9001": worker_pb2.LoadReport(num_running=3, num_waiting=1),
        "127.0.0.1:9002": None,  # did not answer this tick: left out
        "127.0.0.1:9003": worker_pb2.LoadReport(num_running=7),
    }
    observer = _observer(discovery, loads, models=("c",))
    seen = await observer.observe("a", "decode")
    assert (seen.ready_replicas, seen.in_flight, seen.queued) == (2, 3, 1)
    assert not seen.waiting_for_wake
    assert await observer.pairs() == {
        ("a", "decode"), ("b", "decode"), ("a", "prefill"), ("c", "decode"), ("c", "prefill"),
    }  # fmt: skip


async def test_a_fresh_wake_key_counts_only_while_the_tier_has_no_replicas() -> None:
    discovery = FakeDiscovery({("dc1", "kvmesh-decode"): []})
    observer = _observer(discovery)
    assert not (await observer.observe("a", "decode")).waiting_for_wake
    discovery.kv["kvmesh/autoscaler/wake/a/decode"] = json.dumps({"time": NOW - 3}).encode()
    assert (await observer.observe("a", "decode")).waiting_for_wake
    discovery.kv["kvmesh/autoscaler/wake/a/decode"] = json.dumps({"time": NOW - 60}).encode()
    assert not (await observer.observe("a", "decode")).waiting_for_wake  # stale
    discovery.kv["kvmesh/autoscaler/wake/a/decode"] = b"not json"
    assert not (await observer.observe("a", "decode")).waiting_for_wake
    discovery.kv["kvmesh/autoscaler/wake/a/decode"] = json.dumps({"time": NOW}).encode()
    discovery.instances[("dc1", "kvmesh-decode")] = [_worker(1, "decode", "a")]
    assert not (await observer.observe("a", "decode")).waiting_for_wake  # it has a replica


async def test_latency_samples_are_the_new_observations_of_each_router_histogram() -> None:
    discovery = FakeDiscovery(
        {
            ("dc1", "kvmesh-router"): [_router(1, "a", 7001), _router(2, "a", 7002)],
            ("dc1", "kvmesh-prefill"): [_worker(1, "prefill", "a")],
        }
    )
    ttft = "kvmesh_ttft_seconds"
    metrics = {
        7001: [
            _histogram(ttft, "a", {"0.1": 2, "0.5": 4, "+Inf": 4}),
            _histogram(ttft, "a", {"0.1": 2, "0.5": 7, "+Inf": 9}),
        ],
        7002: [],  # never answers: left out
    }
    observer = _observer(discovery, metrics=metrics)
    assert (await observer.observe("a", "prefill")).ttft == ()  # the first read is a baseline
    samples = (await observer.observe("a", "prefill")).ttft
    assert samples == (
        LatencySample(NOW, 0.5, 3),
        LatencySample(NOW, 0.5, 2),  # past the last bound: counted at it
    )


def test_histogram_buckets_pick_the_model_and_sort_by_bound() -> None:
    page = _histogram("m", "a", {"+Inf": 5, "0.5": 4, "0.1": 1}) | _histogram("m", "b", {"0.1": 9})
    page['m_count{model="a"}'] = 5
    assert histogram_buckets(page, "m", "a") == [(0.1, 1), (0.5, 4), (float("inf"), 5)]


def test_a_counter_that_went_backwards_counts_as_a_restart() -> None:
    before = [(0.1, 10.0), (float("inf"), 10.0)]
    after = [(0.1, 1.0), (float("inf"), 2.0)]
    assert new_samples(before, after, NOW) == [
        LatencySample(NOW, 0.1, 1),
        LatencySample(NOW, 0.1, 1),
    ]
