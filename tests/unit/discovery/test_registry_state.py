"""The embedded registry's state without HTTP: catalog, checks, KV, indexes, parsing.

Time is passed in explicitly (`now=`), so TTL expiry and reaping are tested without waiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from multidict import MultiDict

from kvmesh.discovery.registry import (
    BadRequestError,
    NotFoundError,
    UnknownDatacenterError,
    UnsupportedError,
    ValueTooLargeError,
)
from kvmesh.discovery.registry.catalog import CONSUL_SERVICE, SERF_CHECK_ID, Catalog
from kvmesh.discovery.registry.decode import decode_check_update, decode_service
from kvmesh.discovery.registry.durations import (
    MILLISECOND,
    MINUTE,
    SECOND,
    format_duration,
    parse_duration,
)
from kvmesh.discovery.registry.index import IndexCounter
from kvmesh.discovery.registry.kvstore import MAX_VALUE_BYTES, KvStore
from kvmesh.discovery.registry.params import blocking_options, flag, uint
from kvmesh.discovery.registry.records import CheckDefinition, Node, ServiceDefinition
from kvmesh.discovery.registry.state import RegistryState


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def _catalog() -> Catalog:
    return Catalog(Node("id-1", "registry-dc1", "127.0.0.1", "dc1"), IndexCounter())


def _ttl_service(
    service_id: str = "web-1", *, ttl_s: float = 1.0, deregister_after_s: float = 0.0
) -> ServiceDefinition:
    check = CheckDefinition(
        ttl_ns=int(ttl_s * SECOND), deregister_after_ns=int(deregister_after_s * SECOND)
    )
    return ServiceDefinition(service_id, "web", tags=("Primary",), port=9000, checks=(check,))


# -- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("10s", 10 * SECOND),
        ("1m30s", 90 * SECOND),
        ("500ms", 500 * MILLISECOND),
        ("1.5h", 90 * MINUTE),
        (".5s", SECOND // 2),
        ("-2s", -2 * SECOND),
        ("3us", 3_000),
        ("3\u00b5s", 3_000),
        ("7ns", 7),
    ],
)
def test_go_durations_parse(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "1.2.3s", "-", "1s2", "9999999999999h"])
def test_malformed_go_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_duration(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (90 * SECOND, "1m30s"),
        (60 * MINUTE, "1h0m0s"),
        (1500 * MILLISECOND, "1.5s"),
        (500 * MILLISECOND, "500ms"),
        (10 * SECOND, "10s"),
        (1500, "1.5\u00b5s"),
    ],
)
def test_durations_print_as_go_prints_them(ns: int, text: str) -> None:
    assert format_duration(ns) == text


# -- query parameters ----------------------------------------------------------------------------


def test_wait_defaults_to_five_minutes_and_is_clamped_to_ten_with_jitter() -> None:
    default = blocking_options(MultiDict())
    assert default.index == 0
    assert 300 <= default.wait_s <= 300 * (1 + 1 / 16)
    clamped = blocking_options(MultiDict(wait="20m", index="7"))
    assert clamped.index == 7
    assert 600 <= clamped.wait_s <= 600 * (1 + 1 / 16)
    short = blocking_options(MultiDict(wait="1s"))
    assert 1 <= short.wait_s <= 1 + 1 / 16


@pytest.mark.parametrize("wait", ["-1s", "banana", "10", "25h", "9999999999999h"])
def test_bad_waits_are_refused(wait: str) -> None:
    with pytest.raises(BadRequestError, match="Invalid wait time"):
        blocking_options(MultiDict(wait=wait))


@pytest.mark.parametrize("index", ["-1", "abc", "1.5", str(2**64), " 1"])
def test_bad_indexes_are_refused(index: str) -> None:
    with pytest.raises(BadRequestError, match="Invalid index"):
        blocking_options(MultiDict(index=index))


def test_boolean_and_unsigned_parameters() -> None:
    assert flag(MultiDict(passing=""), "passing")
    assert flag(MultiDict(passing="1"), "passing")
    assert not flag(MultiDict(passing="false"), "passing")
    assert not flag(MultiDict(), "passing")
    with pytest.raises(BadRequestError, match=r"Invalid value for \?passing"):
        flag(MultiDict(passing="maybe"), "passing")
    assert uint(MultiDict(cas="0"), "cas") == 0
    assert uint(MultiDict(), "cas") is None
    with pytest.raises(BadRequestError, match="Invalid cas"):
        uint(MultiDict(cas="-3"), "cas")


# -- request bodies ------------------------------------------------------------------------------


def test_service_body_is_read_case_insensitively_and_in_snake_case() -> None:
    # What py-consul sends: lowercase names, snake_case check fields.
    body = _body(
        name="web",
        id="web-1",
        port=9000,
        tags=["a"],
        meta={"Role": "prefill"},
        checks=[
            {"ttl": "10s", "DeregisterCriticalServiceAfter": "1m"},
            {"grpc": "127.0.0.1:9000/svc", "interval": "2s", "grpc_use_tls": False},
        ],
        unknown_field=True,
    )
    definition = decode_service(body)
    assert definition.service_id == "web-1"
    assert definition.meta == {"Role": "prefill"}  # user keys keep their case
    ttl, grpc = definition.checks
    assert (ttl.kind, ttl.ttl_ns, ttl.deregister_after_ns) == ("ttl", 10 * SECOND, MINUTE)
    assert (grpc.kind, grpc.grpc, grpc.interval_ns) == ("grpc", "127.0.0.1:9000/svc", 2 * SECOND)


def test_service_id_defaults_to_name_and_durations_may_be_nanoseconds() -> None:
    definition = decode_service(_body(Name="web", Check={"TTL": 2 * SECOND}))
    assert definition.service_id == "web"
    assert definition.checks[0].ttl_ns == 2 * SECOND


def test_an_empty_check_is_ignored_as_consul_does() -> None:
    assert decode_service(_body(Name="web", Check={})).checks == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Request decode failed: "),
        (b"", "Request decode failed: EOF"),
        (b"[1, 2]", "cannot unmarshal array into Go value of type structs.ServiceDefinition"),
        (b'{"Name": "web", "Port": NaN}', "Request decode failed"),
        (_body(Port=1), "Missing service name"),
        (_body(Name="web", Port="80"), "cannot unmarshal string into Go struct field"),
        (_body(Name="web", Port=80.5), "cannot unmarshal number 80.5"),
        (_body(Name="web", Port=True), "cannot unmarshal bool"),
        (_body(Name="web", Port=70000), "Invalid Port"),
        (_body(Name="web", Tags="a"), "of type []string"),
        (_body(Name="web", Meta={"a": 1}), "of type map[string]string"),
        (_body(Name="web", Meta={"bad key": "x"}), "Invalid Service Meta"),
        (_body(Name="web", Meta={"consul-x": "x"}), "reserved"),
        (_body(Name="web", Check={"TTL": "banana"}), 'time: invalid duration "banana"'),
        (_body(Name="web", Check={"TTL": "1s", "Interval": "1s"}), "cannot both be specified"),
        (_body(Name="web", Check={"GRPC": "127.0.0.1:1"}), "Interval must be > 0"),
        (_body(Name="web", Check={"Notes": "x"}), "TTL must be > 0"),
        (_body(Name="web", Check={"TTL": "1s", "Status": "sleepy"}), "Status for checks must"),
        (_body(Name="web", Checks=[{}]), "TTL must be > 0"),
        (_body(Name="web", Checks={"TTL": "1s"}), "of type []Checks"),
        (_body(Name="web", Weights={"Passing": 0, "Warning": 1}), "Invalid Weights"),
    ],
)
def test_bad_service_bodies_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(BadRequestError) as raised:
        decode_service(body)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("check", "kind"),
    [
        ({"http": "http://x", "interval": "1s"}, "HTTP"),
        ({"TCP": "127.0.0.1:1", "Interval": "1s"}, "TCP"),
        ({"args": ["true"], "interval": "1s"}, "Script"),
        ({"docker_container_id": "c", "shell": "sh", "interval": "1s"}, "Docker"),
        ({"AliasService": "db"}, "Alias"),
    ],
)
def test_unsupported_check_types_say_so(check: dict[str, object], kind: str) -> None:
    with pytest.raises(UnsupportedError) as raised:
        decode_service(_body(Name="web", Check=check))
    assert str(raised.value) == (
        f"Invalid check: {kind} checks are not supported by the embedded registry "
        "(supported: TTL, GRPC)"
    )


def test_check_update_body() -> None:
    assert decode_check_update(_body(Status="warning", Output="slow")) == ("warning", "slow")
    with pytest.raises(BadRequestError, match="Invalid check status: 'meh'"):
        decode_check_update(_body(Status="meh"))


# -- catalog and checks --------------------------------------------------------------------------


def test_a_fresh_catalog_holds_the_consul_service_and_a_passing_serf_check() -> None:
    catalog = _catalog()
    assert [s.name for s in catalog.services(CONSUL_SERVICE)] == [CONSUL_SERVICE]
    assert catalog.agent_services() == []
    assert catalog.agent_checks() == []
    [entry] = catalog.service_entries(CONSUL_SERVICE, passing_only=True)
    assert [c.check_id for c in entry.checks] == [SERF_CHECK_ID]
    with pytest.raises(BadRequestError, match="reserved"):
        catalog.register_service(ServiceDefinition("x", CONSUL_SERVICE), now=0.0)


def test_a_ttl_check_starts_critical_passes_and_expires() -> None:
    catalog = _catalog()
    catalog.register_service(_ttl_service(ttl_s=1.0), now=100.0)
    [check] = catalog.agent_checks()
    assert (check.check_id, check.name, check.status) == (
        "service:web-1",
        "Service 'web' check",
        "critical",
    )
    assert catalog.service_entries("web", passing_only=True) == []

    catalog.update_ttl("service:web-1", "passing", "ok", now=100.5)
    assert [e.service.service_id for e in catalog.service_entries("web", passing_only=True)] == [
        "web-1"
    ]
    assert catalog.expire(now=101.4) == pytest.approx(101.5)  # not yet: TTL restarted at 100.5
    assert check.status == "passing"

    catalog.expire(now=101.5)
    assert (check.status, check.output) == ("critical", "TTL expired")
    assert catalog.service_entries("web", passing_only=True) == []
    assert catalog.expire(now=500.0) is None  # an expired TTL waits for the next update


def test_an_explicit_initial_status_is_kept() -> None:
    catalog = _catalog()
    check = CheckDefinition(ttl_ns=SECOND, status="passing")
    catalog.register_service(ServiceDefinition("web-1", "web", checks=(check,)), now=0.0)
    assert catalog.agent_check("service:web-1").status == "passing"


def test_a_service_critical_for_too_long_is_deregistered() -> None:
    catalog = _catalog()
    catalog.register_service(_ttl_service(ttl_s=1.0, deregister_after_s=2.0), now=0.0)
    catalog.update_ttl("service:web-1", "passing", "", now=0.0)
    assert catalog.expire(now=1.0) == pytest.approx(3.0)  # critical at 1.0, reaped at 3.0
    assert catalog.agent_check("service:web-1").status == "critical"
    catalog.expire(now=2.9)
    assert [s.service_id for s in catalog.agent_services()] == ["web-1"]
    catalog.expire(now=3.0)
    assert catalog.agent_services() == []
    assert catalog.agent_checks() == []


def test_passing_again_stops_the_reaper() -> None:
    catalog = _catalog()
    catalog.register_service(_ttl_service(ttl_s=10.0, deregister_after_s=2.0), now=0.0)
    catalog.update_ttl("service:web-1", "passing", "", now=1.0)
    catalog.expire(now=5.0)
    assert [s.service_id for s in catalog.agent_services()] == ["web-1"]


def test_every_status_change_takes_an_index_and_nothing_else_does() -> None:
    catalog = _catalog()
    catalog.register_service(_ttl_service(), now=0.0)
    registered = catalog.name_index("web")
    catalog.update_ttl("service:web-1", "critical", "", now=0.1)  # no change
    catalog.update_ttl("service:web-1", "critical", "new output", now=0.2)  # output only
    assert catalog.name_index("web") == registered
    catalog.register_service(_ttl_service(), now=0.3)  # the same definition again
    assert catalog.name_index("web") == registered
    catalog.update_ttl("service:web-1", "warning", "", now=0.4)
    assert catalog.name_index("web") > registered
    check = catalog.agent_check("service:web-1")
    assert check.modify_index == catalog.name_index("web") == catalog.checks_index


def test_re_registering_keeps_the_check_status() -> None:
    catalog = _catalog()
    catalog.register_service(_ttl_service(), now=0.0)
    catalog.update_ttl("service:web-1", "passing", "", now=0.0)
    changed = dataclasses.replace(_ttl_service(), port=9001)
    catalog.register_service(changed, now=0.5)
    assert catalog.agent_check("service:web-1").status == "passing"
    [entry] = catalog.service_entries("web", passing_only=True)
    assert entry.service.definition.port == 9001


def test_replace_existing_checks_drops_the_checks_left_out() -> None:
    catalog = _catalog()
    two = ServiceDefinition(
        "web-1", "web", checks=(CheckDefinition(ttl_ns=SECOND), CheckDefinition(ttl_ns=SECOND))
    )
    catalog.register_service(two, now=0.0)
    assert [c.check_id for c in catalog.agent_checks()] == ["service:web-1:1", "service:web-1:2"]
    one = ServiceDefinition("web-1", "web", checks=(CheckDefinition("only", ttl_ns=SECOND),))
    catalog.register_service(one, now=0.0)
    assert len(catalog.agent_checks()) == 3  # Consul keeps the others by default
    catalog.register_service(one, now=0.0, replace_existing_checks=True)
    assert [c.check_id for c in catalog.agent_checks()] == ["only"]


def test_unknown_ids_and_non_ttl_updates_are_refused() -> None:
    catalog = _catalog()
    with pytest.raises(NotFoundError, match='Unknown service ID "nope"'):
        catalog.deregister_service("nope")
    with pytest.raises(NotFoundError, match='Unknown check ID "nope"'):
        catalog.update_ttl("nope", "passing", "", now=0.0)
    with pytest.raises(NotFoundError):
        catalog.update_ttl(SERF_CHECK_ID, "critical", "", now=0.0)
    grpc = CheckDefinition(grpc="127.0.0.1:1", interval_ns=SECOND)
    catalog.register_service(ServiceDefinition("g", "g", checks=(grpc,)), now=0.0)
    with pytest.raises(BadRequestError, match="does not have associated TTL"):
        catalog.update_ttl("service:g", "passing", "", now=0.0)


def test_a_replaced_check_ignores_its_old_probe() -> None:
    catalog = _catalog()
    grpc = CheckDefinition(grpc="127.0.0.1:1", interval_ns=SECOND)
    catalog.register_service(ServiceDefinition("g", "g", checks=(grpc,)), now=0.0)
    [old] = catalog.grpc_checks()
    other = CheckDefinition(grpc="127.0.0.1:2", interval_ns=SECOND)
    catalog.register_service(ServiceDefinition("g", "g", checks=(other,)), now=0.0)
    catalog.record_probe(old, "passing", "stale", now=0.1)
    assert catalog.agent_check("service:g").status == "critical"
    [new] = catalog.grpc_checks()
    catalog.record_probe(new, "passing", "fresh", now=0.2)
    assert catalog.agent_check("service:g").output == "fresh"


def test_tags_filter_case_insensitively_and_must_all_match() -> None:
    catalog = _catalog()
    catalog.register_service(
        ServiceDefinition("a", "web", tags=("model=x", "Role=prefill")), now=0.0
    )
    catalog.register_service(ServiceDefinition("b", "web", tags=("model=x",)), now=0.0)
    assert [s.service_id for s in catalog.services("web", ("MODEL=x",))] == ["a", "b"]
    assert [s.service_id for s in catalog.services("web", ("model=x", "role=prefill"))] == ["a"]
    assert catalog.service_tags()["web"] == ["model=x", "Role=prefill"]


def test_a_service_index_never_goes_backwards() -> None:
    catalog = _catalog()
    unknown = catalog.name_index("web")
    assert unknown >= 1
    catalog.register_service(_ttl_service(), now=0.0)
    registered = catalog.name_index("web")
    catalog.deregister_service("web-1")
    deregistered = catalog.name_index("web")
    catalog.register_service(ServiceDefinition("other", "other"), now=0.0)
    assert unknown < registered < deregistered == catalog.name_index("web")


# -- KV ------------------------------------------------------------------------------------------


def test_kv_check_and_set() -> None:
    kv = KvStore(IndexCounter())
    assert kv.put("cfg/a", b"1", cas=0)
    assert not kv.put("cfg/a", b"2", cas=0)  # cas=0 creates only
    entry = kv.get("cfg/a")
    assert entry is not None and entry.value == b"1"
    assert not kv.put("cfg/a", b"2", cas=entry.modify_index + 1)
    assert kv.put("cfg/a", b"2", cas=entry.modify_index, flags=42)
    updated = kv.get("cfg/a")
    assert updated is not None
    assert (updated.value, updated.flags, updated.create_index) == (b"2", 42, entry.create_index)
    assert updated.modify_index > entry.modify_index
    assert not kv.delete("cfg/a", cas=entry.modify_index)
    assert kv.delete("cfg/a", cas=updated.modify_index)
    assert kv.get("cfg/a") is None
    assert kv.delete("cfg/a", cas=5)  # nothing to delete: true, as in Consul


def test_kv_empty_values_are_null() -> None:
    kv = KvStore(IndexCounter())
    kv.put("k", b"")
    entry = kv.get("k")
    assert entry is not None and entry.value is None


def test_kv_listing_keys_and_separators() -> None:
    kv = KvStore(IndexCounter())
    for key in ("a/b/c", "a/b/d", "a/e", "b"):
        kv.put(key, b"x")
    assert [e.key for e in kv.entries("a/")] == ["a/b/c", "a/b/d", "a/e"]
    assert kv.keys("") == ["a/b/c", "a/b/d", "a/e", "b"]
    assert kv.keys("", "/") == ["a/", "b"]
    assert kv.keys("a/", "/") == ["a/b/", "a/e"]
    kv.delete_tree("a/b/")
    assert kv.keys("") == ["a/e", "b"]


def test_kv_prefix_index_moves_forward_when_a_key_is_deleted() -> None:
    kv = KvStore(IndexCounter())
    kv.put("p/a", b"1")
    kv.put("p/b", b"2")
    kv.put("other", b"3")
    before = kv.prefix_index("p/")
    kv.delete("p/b")
    after = kv.prefix_index("p/")
    assert after > before
    kv.put("other", b"4")
    assert kv.prefix_index("p/") == after  # an unrelated key does not move it
    assert kv.key_index("missing") >= after  # a missing key watches the whole table


def test_kv_limits() -> None:
    kv = KvStore(IndexCounter())
    with pytest.raises(BadRequestError, match="Missing key name"):
        kv.put("", b"x")
    with pytest.raises(BadRequestError, match="Key too long"):
        kv.put("k" * 513, b"x")
    kv.put("k" * 512, b"x")
    with pytest.raises(ValueTooLargeError, match="Value exceeds 524288 byte limit"):
        kv.put("big", b"x" * (MAX_VALUE_BYTES + 1))
    kv.put("big", b"x" * MAX_VALUE_BYTES)


# -- datacenters and blocking --------------------------------------------------------------------


def test_datacenters_are_separate() -> None:
    state = RegistryState(["dc1", "dc2"])
    dc1, dc2 = state.datacenter("dc1"), state.datacenter("dc2")
    dc2.kv.put("k", b"x")
    assert dc1.kv.get("k") is None
    assert dc2.index.value > dc1.index.value
    assert dc2.node.datacenter == "dc2"
    with pytest.raises(UnknownDatacenterError, match="No path to datacenter"):
        state.datacenter("dc3")
    with pytest.raises(ValueError, match="repeat"):
        RegistryState(["dc1", "dc1"])
    with pytest.raises(ValueError, match="invalid datacenter name"):
        RegistryState(["DC 1"])


async def test_a_blocked_wait_returns_when_its_index_moves() -> None:
    counter = IndexCounter()
    watched = {"index": counter.bump()}
    waiter = asyncio.create_task(counter.wait_past(watched["index"], lambda: watched["index"], 30))
    counter.bump()  # an unrelated change wakes the waiter, which goes back to waiting
    await asyncio.sleep(0)  # let it run once (scheduling, not timing)
    assert not waiter.done()
    watched["index"] = counter.bump()
    await asyncio.wait_for(waiter, 5)


async def test_a_wait_times_out_or_returns_at_once_for_another_index() -> None:
    counter = IndexCounter()
    index = counter.bump()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await counter.wait_past(index, lambda: index, 0.05)
    assert loop.time() - started >= 0.05
    started = loop.time()
    await counter.wait_past(index + 10, lambda: index, 30)  # ahead of ours: a reset
    assert loop.time() - started < 1


async def test_close_releases_every_waiter() -> None:
    counter = IndexCounter()
    index = counter.bump()
    waiter = asyncio.create_task(counter.wait_past(index, lambda: index, 30))
    await asyncio.sleep(0)
    counter.close()
    await asyncio.wait_for(waiter, 5)
