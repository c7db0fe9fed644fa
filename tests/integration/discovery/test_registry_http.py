"""The embedded registry over real HTTP on 127.0.0.1: Consul's shapes, blocking queries, checks
(TTL, gRPC against a real gRPC server), reaping, KV, several datacenters, and bad input."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
from typing import Any

import aiohttp
import pytest

from kvmesh.discovery.registry import EmbeddedRegistry
from tests.integration.discovery.conftest import Agent, HealthServer, Reply, elapsed

REGISTER = "/v1/agent/service/register"
WEB: dict[str, Any] = {
    "ID": "web-1",
    "Name": "web",
    "Tags": ["model=smollm2", "role=prefill"],
    "Address": "127.0.0.1",
    "Port": 9000,
    "Meta": {"block_size": "16"},
    "Check": {"CheckID": "service:web-1", "Name": "web health", "TTL": "10s"},
}


def _entries(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.text
    body: list[dict[str, Any]] = reply.json()
    return body


async def _register_passing(agent: Agent, body: dict[str, Any] = WEB) -> None:
    assert (await agent.put(REGISTER, body)).status == 200
    check_id = body["Check"].get("CheckID", f"service:{body['ID']}")
    assert (await agent.put(f"/v1/agent/check/pass/{check_id}")).status == 200


# -- shapes --------------------------------------------------------------------------------------


async def test_health_service_answers_with_consul_shapes_and_headers(agent: Agent) -> None:
    await _register_passing(agent)
    reply = await agent.get("/v1/health/service/web", passing="")
    assert reply.headers["X-Consul-KnownLeader"] == "true"
    assert reply.headers["X-Consul-LastContact"] == "0"
    assert reply.index >= 1
    [entry] = _entries(reply)
    assert entry["Node"]["Node"] == "registry-dc1"
    assert entry["Node"]["Datacenter"] == "dc1"
    assert entry["Node"]["Address"] == "127.0.0.1"
    service = entry["Service"]
    assert {k: service[k] for k in ("ID", "Service", "Tags", "Address", "Port", "Meta")} == {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["model=smollm2", "role=prefill"],
        "Address": "127.0.0.1",
        "Port": 9000,
        "Meta": {"block_size": "16"},
    }
    assert service["Weights"] == {"Passing": 1, "Warning": 1}
    checks = {c["CheckID"]: c for c in entry["Checks"]}
    assert checks["serfHealth"]["Status"] == "passing"
    own = checks["service:web-1"]
    assert (own["Name"], own["Status"], own["Type"]) == ("web health", "passing", "ttl")
    assert (own["ServiceID"], own["ServiceName"]) == ("web-1", "web")
    assert own["ModifyIndex"] <= reply.index


async def test_agent_endpoints_list_what_was_registered(agent: Agent) -> None:
    await _register_passing(agent)
    services = (await agent.get("/v1/agent/services")).json()
    assert list(services) == ["web-1"]  # not the server's own "consul" service
    assert services["web-1"]["Datacenter"] == "dc1"
    assert services["web-1"]["Port"] == 9000
    checks = (await agent.get("/v1/agent/checks")).json()
    assert list(checks) == ["service:web-1"]
    assert checks["service:web-1"]["Definition"]["TTL"] == "10s"
    one = (await agent.get("/v1/agent/service/web-1")).json()
    assert one["ID"] == "web-1" and one["ContentHash"]
    me = (await agent.get("/v1/agent/self")).json()
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["NodeName"] == "registry-dc1"
    assert me["Member"]["Name"] == "registry-dc1"
    assert (await agent.put("/v1/agent/service/deregister/web-1")).status == 200
    assert (await agent.get("/v1/agent/services")).json() == {}
    assert (await agent.get("/v1/agent/checks")).json() == {}


async def test_catalog_and_status_endpoints(agent: Agent) -> None:
    await _register_passing(agent)
    services = await agent.get("/v1/catalog/services")
    assert services.json() == {"consul": [], "web": ["model=smollm2", "role=prefill"]}
    [instance] = (await agent.get("/v1/catalog/service/web", tag="role=prefill")).json()
    assert (instance["ServiceID"], instance["ServicePort"], instance["Node"]) == (
        "web-1",
        9000,
        "registry-dc1",
    )
    assert (await agent.get("/v1/catalog/service/web", tag="role=decode")).json() == []
    [node] = (await agent.get("/v1/catalog/nodes")).json()
    assert (node["Node"], node["Datacenter"]) == ("registry-dc1", "dc1")
    assert (await agent.get("/v1/catalog/datacenters")).json() == ["dc1", "dc2"]
    assert (await agent.get("/v1/status/leader")).json() == "127.0.0.1:8300"
    assert (await agent.get("/v1/status/peers")).json() == ["127.0.0.1:8300"]
    checks = (await agent.get("/v1/health/checks/web")).json()
    assert [c["CheckID"] for c in checks] == ["service:web-1"]
    passing = (await agent.get("/v1/health/state/passing")).json()
    assert {c["CheckID"] for c in passing} == {"serfHealth", "service:web-1"}
    assert (await agent.get("/v1/health/state/critical")).json() == []


async def test_health_service_filters_by_passing_and_every_tag(agent: Agent) -> None:
    assert (await agent.put(REGISTER, WEB)).status == 200  # critical until it passes
    assert _entries(await agent.get("/v1/health/service/web", passing="")) == []
    assert len(_entries(await agent.get("/v1/health/service/web"))) == 1
    assert (await agent.put("/v1/agent/check/warn/service:web-1", note="slow")).status == 200
    assert _entries(await agent.get("/v1/health/service/web", passing="1")) == []
    assert (await agent.put("/v1/agent/check/pass/service:web-1")).status == 200
    both = [("tag", "model=smollm2"), ("tag", "role=prefill"), ("passing", "")]
    assert len(_entries(await agent.call("GET", "/v1/health/service/web", params=both))) == 1
    other = [("tag", "model=smollm2"), ("tag", "role=decode")]
    assert _entries(await agent.call("GET", "/v1/health/service/web", params=other)) == []


async def test_check_update_sets_status_and_output(agent: Agent) -> None:
    assert (await agent.put(REGISTER, WEB)).status == 200
    update = {"Status": "warning", "Output": "queue is long"}
    assert (await agent.put("/v1/agent/check/update/service:web-1", update)).status == 200
    check = (await agent.get("/v1/agent/checks")).json()["service:web-1"]
    assert (check["Status"], check["Output"]) == ("warning", "queue is long")
    assert (await agent.put("/v1/agent/check/fail/service:web-1", note="down")).status == 200
    check = (await agent.get("/v1/agent/checks")).json()["service:web-1"]
    assert (check["Status"], check["Output"]) == ("critical", "down")


# -- blocking queries ----------------------------------------------------------------------------


async def test_a_blocking_query_returns_when_its_service_changes(agent: Agent) -> None:
    assert (await agent.put(REGISTER, WEB)).status == 200
    first = await agent.get("/v1/health/service/web", passing="")
    assert _entries(first) == []
    blocked = asyncio.create_task(
        agent.get("/v1/health/service/web", passing="", index=first.index, wait="20s")
    )
    assert (await agent.get("/v1/status/leader")).status == 200  # the query is in by now
    assert not blocked.done()
    assert (await agent.put("/v1/agent/check/pass/service:web-1")).status == 200
    reply, took = await elapsed(blocked)
    assert took < 5
    assert reply.index > first.index
    assert [e["Service"]["ID"] for e in _entries(reply)] == ["web-1"]


async def test_a_blocking_query_times_out_with_the_same_index(agent: Agent) -> None:
    await _register_passing(agent)
    first = await agent.get("/v1/health/service/web")
    blocked = asyncio.create_task(agent.get("/v1/health/service/web", index=first.index, wait="1s"))
    # Changes elsewhere wake the waiter, which must go back to waiting.
    assert (await agent.call("PUT", "/v1/kv/unrelated", data=b"x")).status == 200
    assert (await agent.put(REGISTER, {"Name": "other", "Check": {"TTL": "5s"}})).status == 200
    reply, took = await elapsed(blocked)
    assert 0.9 <= took < 1 + 1 / 16 + 1.0
    assert reply.index == first.index
    assert len(_entries(reply)) == 1


async def test_an_index_ahead_of_the_query_returns_at_once(agent: Agent) -> None:
    first = await agent.get("/v1/health/service/web")
    reply, took = await elapsed(
        agent.get("/v1/health/service/web", index=first.index + 1000, wait="10s")
    )
    assert took < 2
    assert reply.index == first.index


async def test_the_index_only_moves_forward(agent: Agent) -> None:
    seen = [(await agent.get("/v1/health/service/web")).index]
    await _register_passing(agent)
    seen.append((await agent.get("/v1/health/service/web")).index)
    assert (await agent.put("/v1/agent/service/deregister/web-1")).status == 200
    seen.append((await agent.get("/v1/health/service/web")).index)
    assert (await agent.call("PUT", "/v1/kv/x", data=b"1")).status == 200
    seen.append((await agent.get("/v1/health/service/web")).index)
    assert seen[0] >= 1
    assert seen[0] < seen[1] < seen[2] == seen[3]


# -- checks the registry runs --------------------------------------------------------------------


async def test_a_ttl_check_expires_and_the_instance_leaves_passing_watchers(agent: Agent) -> None:
    body = dict(WEB, Check={"CheckID": "service:web-1", "TTL": "500ms"})
    await _register_passing(agent, body)
    assert len(_entries(await agent.get("/v1/health/service/web", passing=""))) == 1
    _, took = await elapsed(
        agent.until("/v1/health/service/web", lambda r: r.json() == [], passing="")
    )
    assert took < 3
    check = (await agent.get("/v1/agent/checks")).json()["service:web-1"]
    assert (check["Status"], check["Output"]) == ("critical", "TTL expired")


async def test_a_service_critical_too_long_is_deregistered(agent: Agent) -> None:
    check = {"CheckID": "service:web-1", "TTL": "1s", "DeregisterCriticalServiceAfter": "500ms"}
    await _register_passing(agent, dict(WEB, Check=check))
    # The process "dies": no more passes. Watchers of all instances see it go within 3 s.
    _, took = await elapsed(
        agent.until("/v1/health/service/web", lambda r: r.json() == [], timeout_s=5)
    )
    assert took < 3
    assert (await agent.get("/v1/agent/services")).json() == {}
    assert "web" not in (await agent.get("/v1/catalog/services")).json()


async def test_a_grpc_check_follows_the_serving_status(
    agent: Agent, health_server: HealthServer
) -> None:
    await health_server.set("kvmesh.v1.Worker", True)
    body = {
        "ID": "worker-1",
        "Name": "worker",
        "Port": 1,
        "Check": {
            "GRPC": f"{health_server.address}/kvmesh.v1.Worker",
            "Interval": "100ms",
            "Timeout": "2s",
        },
    }
    assert (await agent.put(REGISTER, body)).status == 200
    path = "/v1/health/service/worker"
    await agent.until(path, lambda r: len(r.json()) == 1, passing="")
    check = (await agent.get("/v1/agent/checks")).json()["service:worker-1"]
    assert check["Type"] == "grpc"
    assert check["Interval"] == "100ms"
    assert check["Output"] == f"gRPC check {health_server.address}: success"

    await health_server.set("kvmesh.v1.Worker", False)
    await agent.until(path, lambda r: r.json() == [], passing="")
    check = (await agent.get("/v1/agent/checks")).json()["service:worker-1"]
    assert check["Status"] == "critical"
    assert "NOT_SERVING" in check["Output"]

    await health_server.set("kvmesh.v1.Worker", True)
    await agent.until(path, lambda r: len(r.json()) == 1, passing="")


async def test_a_grpc_check_of_the_whole_server(agent: Agent, health_server: HealthServer) -> None:
    await health_server.set("", True)
    check = {"GRPC": health_server.address, "Interval": "100ms"}
    assert (await agent.put(REGISTER, {"Name": "whole", "Check": check})).status == 200
    await agent.until("/v1/health/service/whole", lambda r: len(r.json()) == 1, passing="")


async def test_an_unreachable_grpc_target_is_critical_with_the_error(agent: Agent) -> None:
    check = {"GRPC": "127.0.0.1:1", "Interval": "100ms", "Timeout": "1s"}
    assert (await agent.put(REGISTER, {"Name": "gone", "Check": check})).status == 200
    reply = await agent.until(
        "/v1/health/checks/gone", lambda r: r.json()[0]["Output"] != "", timeout_s=5
    )
    [state] = reply.json()
    assert state["Status"] == "critical"
    assert state["Output"].startswith("rpc error: code = Unavailable")


async def test_a_grpc_check_faster_than_50ms_is_refused(agent: Agent) -> None:
    check = {"GRPC": "127.0.0.1:1", "Interval": "10ms"}
    reply = await agent.put(REGISTER, {"Name": "hammer", "Check": check})
    assert reply.status == 400
    assert "at least 50ms" in reply.text


# -- KV ------------------------------------------------------------------------------------------


async def test_kv_put_get_cas_and_flags(agent: Agent) -> None:
    assert (await agent.call("PUT", "/v1/kv/cfg/a", data=b"hello")).json() is True
    reply = await agent.get("/v1/kv/cfg/a")
    [entry] = reply.json()
    assert entry["Key"] == "cfg/a"
    assert base64.b64decode(entry["Value"]) == b"hello"
    assert (entry["Flags"], entry["LockIndex"]) == (0, 0)
    assert entry["CreateIndex"] == entry["ModifyIndex"] == reply.index

    assert (await agent.call("PUT", "/v1/kv/cfg/a", params={"cas": "0"}, data=b"x")).json() is False
    stale = {"cas": str(entry["ModifyIndex"] + 100)}
    assert (await agent.call("PUT", "/v1/kv/cfg/a", params=stale, data=b"x")).json() is False
    fresh = {"cas": str(entry["ModifyIndex"]), "flags": "7"}
    assert (await agent.call("PUT", "/v1/kv/cfg/a", params=fresh, data=b"v2")).json() is True
    [updated] = (await agent.get("/v1/kv/cfg/a")).json()
    assert (updated["Flags"], updated["CreateIndex"]) == (7, entry["CreateIndex"])
    assert updated["ModifyIndex"] > entry["ModifyIndex"]

    raw = await agent.get("/v1/kv/cfg/a", raw="")
    assert (raw.status, raw.text) == (200, "v2")

    missing = await agent.get("/v1/kv/cfg/missing")
    assert (missing.status, missing.text) == (404, "")
    assert missing.index >= 1

    assert (await agent.call("PUT", "/v1/kv/empty")).json() is True
    [empty] = (await agent.get("/v1/kv/empty")).json()
    assert empty["Value"] is None


async def test_kv_recurse_keys_and_delete(agent: Agent) -> None:
    for key in ("cfg/a", "cfg/b/c", "cfg/b/d", "other"):
        assert (await agent.call("PUT", f"/v1/kv/{key}", data=key.encode())).status == 200
    listed = (await agent.get("/v1/kv/cfg/", recurse="")).json()
    assert [e["Key"] for e in listed] == ["cfg/a", "cfg/b/c", "cfg/b/d"]
    assert (await agent.get("/v1/kv/cfg/", keys="")).json() == ["cfg/a", "cfg/b/c", "cfg/b/d"]
    assert (await agent.get("/v1/kv/cfg/", keys="", separator="/")).json() == ["cfg/a", "cfg/b/"]
    assert (await agent.get("/v1/kv/", keys="", separator="/")).json() == ["cfg/", "other"]
    assert (await agent.get("/v1/kv/nothing/", keys="")).status == 404

    [entry] = (await agent.get("/v1/kv/cfg/a")).json()
    wrong = {"cas": str(entry["ModifyIndex"] + 1)}
    assert (await agent.call("DELETE", "/v1/kv/cfg/a", params=wrong)).json() is False
    right = {"cas": str(entry["ModifyIndex"])}
    assert (await agent.call("DELETE", "/v1/kv/cfg/a", params=right)).json() is True
    assert (await agent.call("DELETE", "/v1/kv/cfg/b", params={"recurse": ""})).json() is True
    assert (await agent.get("/v1/kv/cfg/", recurse="")).status == 404
    assert (await agent.get("/v1/kv/other")).status == 200


async def test_kv_a_leading_slash_is_dropped(agent: Agent) -> None:
    assert (await agent.call("PUT", "/v1/kv//slashed", data=b"1")).json() is True
    [entry] = (await agent.get("/v1/kv/slashed")).json()
    assert entry["Key"] == "slashed"


async def test_kv_blocking_get_returns_on_change(agent: Agent) -> None:
    assert (await agent.call("PUT", "/v1/kv/cfg/a", data=b"1")).status == 200
    first = await agent.get("/v1/kv/cfg/a")
    blocked = asyncio.create_task(agent.get("/v1/kv/cfg/a", index=first.index, wait="20s"))
    assert (await agent.get("/v1/status/leader")).status == 200
    assert (await agent.call("PUT", "/v1/kv/cfg/a", data=b"2")).status == 200
    reply, took = await elapsed(blocked)
    assert took < 5
    [entry] = reply.json()
    assert base64.b64decode(entry["Value"]) == b"2"
    assert reply.index > first.index


async def test_kv_blocking_recurse_returns_when_a_key_is_deleted(agent: Agent) -> None:
    for key in ("p/a", "p/b"):
        assert (await agent.call("PUT", f"/v1/kv/{key}", data=b"1")).status == 200
    first = await agent.get("/v1/kv/p/", recurse="")
    blocked = asyncio.create_task(agent.get("/v1/kv/p/", recurse="", index=first.index, wait="20s"))
    assert (await agent.get("/v1/status/leader")).status == 200
    assert (await agent.call("DELETE", "/v1/kv/p/b")).json() is True
    reply, took = await elapsed(blocked)
    assert took < 5
    assert reply.index > first.index
    assert [e["Key"] for e in reply.json()] == ["p/a"]


# -- datacenters ---------------------------------------------------------------------------------


async def test_each_datacenter_has_its_own_agent_and_catalog(
    agent: Agent, agent_dc2: Agent
) -> None:
    await _register_passing(agent_dc2)
    assert _entries(await agent.get("/v1/health/service/web")) == []
    [entry] = _entries(await agent.get("/v1/health/service/web", dc="dc2"))
    assert entry["Node"]["Datacenter"] == "dc2"
    assert entry["Node"]["Node"] == "registry-dc2"
    assert (await agent_dc2.get("/v1/agent/self")).json()["Config"]["Datacenter"] == "dc2"
    assert (await agent_dc2.get("/v1/catalog/datacenters")).json() == ["dc2", "dc1"]
    assert list((await agent_dc2.get("/v1/agent/services")).json()) == ["web-1"]
    assert (await agent.get("/v1/agent/services")).json() == {}


async def test_kv_is_per_datacenter(agent: Agent, agent_dc2: Agent) -> None:
    put = await agent.call("PUT", "/v1/kv/policy", params={"dc": "dc2"}, data=b"dc2 value")
    assert put.json() is True
    assert (await agent.get("/v1/kv/policy")).status == 404
    [entry] = (await agent_dc2.get("/v1/kv/policy")).json()
    assert base64.b64decode(entry["Value"]) == b"dc2 value"


async def test_an_unknown_datacenter_has_no_path(agent: Agent) -> None:
    for path in ("/v1/health/service/web", "/v1/kv/x", "/v1/catalog/services"):
        reply = await agent.get(path, dc="dc9")
        assert (reply.status, reply.text) == (500, "No path to datacenter")


# -- bad input -----------------------------------------------------------------------------------

_BAD_INPUT: list[tuple[str, str, dict[str, str], bytes | None, int, str]] = [
    ("PUT", REGISTER, {}, b"{nope", 400, "Request decode failed: "),
    ("PUT", REGISTER, {}, b"", 400, "Request decode failed: EOF"),
    ("PUT", REGISTER, {}, b"[]", 400, "Request decode failed: json: cannot unmarshal array"),
    ("PUT", REGISTER, {}, b'{"Name": "w", "Port": "80"}', 400, "cannot unmarshal string"),
    ("PUT", REGISTER, {}, b'{"Name": "w", "Tags": "a"}', 400, "of type []string"),
    ("PUT", REGISTER, {}, b'{"Port": 80}', 400, "Missing service name"),
    ("PUT", REGISTER, {}, b'{"Name": "w", "Port": 99999}', 400, "Invalid Port"),
    (
        "PUT",
        REGISTER,
        {},
        b'{"Name": "w", "Check": {"HTTP": "http://x", "Interval": "1s"}}',
        400,
        "HTTP checks are not supported by the embedded registry",
    ),
    (
        "PUT",
        REGISTER,
        {},
        b'{"Name": "w", "Checks": [{"TCP": "h:1", "Interval": "1s"}]}',
        400,
        "TCP checks are not supported by the embedded registry",
    ),
    ("PUT", REGISTER, {}, b'{"Name": "w", "Check": {"TTL": "soon"}}', 400, "invalid duration"),
    ("PUT", REGISTER, {}, b'{"Name": "w", "Check": {"GRPC": "h:1"}}', 400, "Interval must be"),
    (
        "PUT",
        REGISTER,
        {},
        b'{"Name": "w", "Check": {"TTL": "1s", "Status": "fine"}}',
        400,
        "Status for checks must",
    ),
    ("PUT", REGISTER, {"replace-existing-checks": "perhaps"}, b'{"Name": "w"}', 400, "Invalid"),
    ("PUT", "/v1/agent/check/pass/nope", {}, None, 404, 'Unknown check ID "nope"'),
    ("PUT", "/v1/agent/check/update/nope", {}, b'{"Status": "passing"}', 404, "Unknown check"),
    ("PUT", "/v1/agent/service/deregister/nope", {}, None, 404, 'Unknown service ID "nope"'),
    ("GET", "/v1/health/service/web", {"wait": "-1s"}, None, 400, "Invalid wait time"),
    ("GET", "/v1/health/service/web", {"wait": "soon"}, None, 400, "Invalid wait time"),
    ("GET", "/v1/health/service/web", {"wait": "48h"}, None, 400, "Invalid wait time"),
    ("GET", "/v1/health/service/web", {"wait": "99999999999h"}, None, 400, "Invalid wait time"),
    ("GET", "/v1/health/service/web", {"index": "-1"}, None, 400, "Invalid index"),
    ("GET", "/v1/health/service/web", {"index": "1.5"}, None, 400, "Invalid index"),
    ("GET", "/v1/health/service/web", {"index": "9" * 30}, None, 400, "Invalid index"),
    ("GET", "/v1/health/service/web", {"passing": "maybe"}, None, 400, "Invalid value"),
    ("GET", "/v1/health/service/web", {"filter": "Service.Port == 1"}, None, 400, "not supported"),
    ("GET", "/v1/health/state/sideways", {}, None, 400, "Invalid check state"),
    ("GET", "/v1/kv/x", {"index": "abc"}, None, 400, "Invalid index"),
    ("PUT", "/v1/kv/" + "k" * 513, {}, b"x", 400, "Key too long"),
    ("PUT", "/v1/kv/", {}, b"x", 400, "Missing key name"),
    ("PUT", "/v1/kv/big", {}, b"x" * (512 * 1024 + 1), 413, "Value exceeds 524288 byte limit"),
    ("PUT", "/v1/kv/x", {"cas": "abc"}, b"x", 400, "Invalid cas"),
    ("PUT", "/v1/kv/x", {"flags": "-1"}, b"x", 400, "Invalid flags"),
    ("PUT", "/v1/kv/x", {"acquire": "session"}, b"x", 400, "not supported"),
    ("DELETE", "/v1/kv/x", {"cas": "1.0"}, None, 400, "Invalid cas"),
    ("GET", "/v1/agent/service/register", {}, None, 404, "unknown service ID"),
    ("DELETE", "/v1/agent/services", {}, None, 405, "method DELETE not allowed"),
    ("GET", "/v1/not/an/endpoint", {}, None, 404, "404 page not found"),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "data", "status", "message"),
    _BAD_INPUT,
    ids=[f"{m} {p[:40]} {q}" for m, p, q, *_ in _BAD_INPUT],
)
async def test_bad_input_gets_a_4xx_and_the_registry_keeps_serving(
    agent: Agent,
    method: str,
    path: str,
    params: dict[str, str],
    data: bytes | None,
    status: int,
    message: str,
) -> None:
    await _register_passing(agent)
    reply = await agent.call(method, path, params=params, data=data)
    assert reply.status == status, reply.text
    assert message in reply.text
    assert not reply.text.lstrip().startswith("{")  # plain text, as Consul writes errors
    # Nothing was half-applied, and the registry still answers.
    [entry] = _entries(await agent.get("/v1/health/service/web", passing=""))
    assert entry["Service"]["ID"] == "web-1"


async def test_stop_releases_blocked_queries(session: aiohttp.ClientSession) -> None:
    registry = EmbeddedRegistry(port=0)
    await registry.start()
    agent = Agent(session, registry.address())
    first = await agent.get("/v1/kv/k")
    blocked = asyncio.create_task(agent.get("/v1/kv/k", index=first.index, wait="5m"))
    assert (await agent.get("/v1/status/leader")).status == 200
    _, took = await elapsed(registry.stop())
    assert took < 5
    reply = await asyncio.wait_for(blocked, 5)
    assert reply.status == 404  # answered with what it had


async def test_run_registry_prints_its_agents_and_stops_on_sigterm(
    session: aiohttp.ClientSession,
) -> None:
    script = (
        "import asyncio\n"
        "from kvmesh.telemetry.logging import configure_logging\n"
        "from kvmesh.discovery.registry import run_registry\n"
        "configure_logging('WARNING')\n"
        "asyncio.run(run_registry(['dc1', 'dc2'], '127.0.0.1', 0))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        addresses = {}
        for _ in range(2):
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode().strip()
            prefix, datacenter, url = line.rsplit(" ", 2)
            assert prefix == "kvmesh registry:"
            addresses[datacenter] = url.removeprefix("http://")
        assert list(addresses) == ["dc1", "dc2"]
        me = await Agent(session, addresses["dc2"]).get("/v1/agent/self")
        assert me.json()["Config"]["Datacenter"] == "dc2"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
