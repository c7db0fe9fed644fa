"""`kvmesh registry --data-dir`: what it acknowledged survives a `kill -9` and a restart.

A real registry process on 127.0.0.1: KV writes (cordons, policies, pins, desired counts),
deletes, a service with a TTL check that passes, a check that fails; SIGKILL; the same command
again. The KV store, the registrations and the check statuses are back, and no index went
backwards.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx
import pytest

from kvmesh.discovery.registry.journal import LOG, SNAPSHOT, Journal
from kvmesh.process import Child, start_child, stop_child, wait_ready


async def registry(tmp_path: Path, data_dir: Path) -> tuple[Child, str]:
    argv = [sys.executable, "-m", "kvmesh.cli", "registry", "--port", "0",
            "--data-dir", str(data_dir)]  # fmt: skip
    child = await start_child("registry", argv, tmp_path / "logs")
    await wait_ready(child, "kvmesh registry:", 60)
    return child, child.ready_line.split()[-1]


SERVICE = {
    "ID": "decode-1",
    "Name": "kvmesh-decode",
    "Address": "127.0.0.1",
    "Port": 7001,
    "Tags": ["model=m"],
    "Meta": {"worker_id": "decode-1"},
    "Check": {"CheckID": "decode-1:ttl", "Name": "ttl", "TTL": "30s"},
}
OTHER = {"ID": "prefill-1", "Name": "kvmesh-prefill", "Port": 7002,
         "Check": {"CheckID": "prefill-1:ttl", "Name": "ttl", "TTL": "30s"}}  # fmt: skip


async def test_acknowledged_state_survives_kill_9(tmp_path: Path) -> None:
    data = tmp_path / "data"
    child, url = await registry(tmp_path, data)
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            for key, value in {
                "kvmesh/controlplane/cordon/dc1": "1",
                "kvmesh/autoscaler/policy/m/decode": json.dumps({"min": 1, "max": 4}),
                "kvmesh/controlplane/pins/m": "dc1",
                "kvmesh/autoscaler/desired/m/decode": "3",
                "kvmesh/doomed/a": "x",
            }.items():
                assert (await http.put(f"/v1/kv/{key}", content=value)).json() is True
            await http.delete("/v1/kv/kvmesh/doomed/a")
            assert (await http.put("/v1/agent/service/register", json=SERVICE)).status_code == 200
            assert (await http.put("/v1/agent/service/register", json=OTHER)).status_code == 200
            await http.put("/v1/agent/check/pass/decode-1:ttl")
            await http.put("/v1/agent/check/fail/prefill-1:ttl?note=down")
            before_kv = (await http.get("/v1/kv/kvmesh/?recurse")).json()
            index_before = int((await http.get("/v1/kv/kvmesh/?recurse")).headers["X-Consul-Index"])
    finally:
        child.process.send_signal(signal.SIGKILL)
        await stop_child(child, 0)
    assert (data / LOG).stat().st_size > 0  # the writes are in the log, not only the snapshot

    child, url = await registry(tmp_path, data)
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            after = await http.get("/v1/kv/kvmesh/?recurse")
            passing = (await http.get("/v1/health/service/kvmesh-decode?passing")).json()
            critical = (await http.get("/v1/health/state/critical")).json()
            services = (await http.get("/v1/agent/services")).json()
    finally:
        await stop_child(child, 5)
    assert after.json() == before_kv  # values, flags and indexes
    assert "kvmesh/doomed/a" not in {e["Key"] for e in after.json()}
    assert int(after.headers["X-Consul-Index"]) >= index_before
    assert [e["Service"]["ID"] for e in passing] == ["decode-1"]
    assert passing[0]["Service"]["Meta"] == {"worker_id": "decode-1"}
    assert {c["CheckID"] for c in critical} == {"prefill-1:ttl"}
    assert set(services) == {"decode-1", "prefill-1"}


def test_a_torn_last_record_is_dropped_and_a_torn_middle_one_is_an_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append({"dc": "dc1", "t": "index", "value": 3})
    journal.close()
    with (tmp_path / LOG).open("a") as f:
        f.write('{"dc": "dc1", "t": "kv_p')  # a crash in the middle of an append
    assert list(Journal(tmp_path).replay()) == [{"dc": "dc1", "t": "index", "value": 3}]
    (tmp_path / SNAPSHOT).write_text('{"broken\n{"dc": "dc1", "t": "index", "value": 1}\n')
    with pytest.raises(ValueError, match="is not a journal record"):
        list(Journal(tmp_path).replay())
