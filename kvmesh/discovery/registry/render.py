"""Records -> the JSON objects Consul answers with (PascalCase, Consul's field names and types)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from kvmesh.discovery.registry.catalog import ServiceEntry
from kvmesh.discovery.registry.durations import format_duration
from kvmesh.discovery.registry.records import Check, KvEntry, Node, Service, ServiceDefinition

Json = dict[str, Any]

# The Consul version whose HTTP API the registry follows; Config.VersionMetadata says it is us.
CONSUL_API_VERSION = "1.21.0"
VERSION_METADATA = "kvmesh-embedded"
SERF_LAN_PORT = 8301


def node(n: Node, index: int) -> Json:
    return {
        "ID": n.node_id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": _node_tagged_addresses(n),
        "Meta": dict(n.meta),
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def node_service(service: Service) -> Json:
    """A service as health/service and catalog/node show it (Consul's NodeService)."""
    d = service.definition
    body: Json = {
        "ID": d.service_id,
        "Service": d.name,
        "Tags": list(d.tags),
        "Address": d.address,
        "Meta": dict(d.meta),
        "Port": d.port,
        "Weights": _weights(d),
        "EnableTagOverride": d.enable_tag_override,
        "Proxy": _empty_proxy(),
        "Connect": {},
        "PeerName": "",
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    }
    if d.tagged_addresses:
        body["TaggedAddresses"] = _service_tagged_addresses(d)
    return body


def agent_service(service: Service, datacenter: str, *, with_hash: bool = False) -> Json:
    """A service as agent/services shows it (Consul's AgentService)."""
    d = service.definition
    body: Json = {
        "ID": d.service_id,
        "Service": d.name,
        "Tags": list(d.tags),
        "Meta": dict(d.meta),
        "Port": d.port,
        "Address": d.address,
        "Weights": _weights(d),
        "EnableTagOverride": d.enable_tag_override,
        "Datacenter": datacenter,
    }
    if d.tagged_addresses:
        body["TaggedAddresses"] = _service_tagged_addresses(d)
    if with_hash:
        digest = hashlib.blake2b(repr(d).encode(), digest_size=8).hexdigest()
        body["ContentHash"] = digest
    return body


def catalog_service(n: Node, service: Service) -> Json:
    """A service as catalog/service shows it (Consul's ServiceNode)."""
    d = service.definition
    return {
        "ID": n.node_id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": _node_tagged_addresses(n),
        "NodeMeta": dict(n.meta),
        "ServiceKind": "",
        "ServiceID": d.service_id,
        "ServiceName": d.name,
        "ServiceTags": list(d.tags),
        "ServiceAddress": d.address,
        "ServiceTaggedAddresses": _service_tagged_addresses(d),
        "ServiceWeights": _weights(d),
        "ServiceMeta": dict(d.meta),
        "ServicePort": d.port,
        "ServiceSocketPath": "",
        "ServiceEnableTagOverride": d.enable_tag_override,
        "ServiceProxy": _empty_proxy(),
        "ServiceConnect": {},
        "CreateIndex": service.create_index,
        "ModifyIndex": service.modify_index,
    }


def check(c: Check, node_name: str) -> Json:
    """Consul's HealthCheck."""
    d = c.definition
    return {
        "Node": node_name,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": list(c.service_tags),
        "Type": c.kind,
        "Interval": format_duration(d.interval_ns) if d and d.interval_ns else "",
        "Timeout": format_duration(d.timeout_ns) if d and d.timeout_ns else "",
        "ExposedPort": 0,
        "Definition": _check_definition(c),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    }


def service_entry(entry: ServiceEntry, node_index: int) -> Json:
    """One element of health/service."""
    return {
        "Node": node(entry.node, node_index),
        "Service": node_service(entry.service),
        "Checks": [check(c, entry.node.name) for c in entry.checks],
    }


def kv_entry(entry: KvEntry) -> Json:
    value = base64.b64encode(entry.value).decode() if entry.value is not None else None
    return {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": value,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }


def member(n: Node) -> Json:
    """This agent as a Serf LAN member."""
    return {
        "Name": n.name,
        "Addr": n.address,
        "Port": SERF_LAN_PORT,
        "Tags": {
            "build": f"{CONSUL_API_VERSION}+{VERSION_METADATA}",
            "dc": n.datacenter,
            "id": n.node_id,
            "role": "consul",
            "port": "8300",
            "segment": "",
            "vsn": "2",
            "vsn_min": "2",
            "vsn_max": "3",
        },
        "Status": 1,  # alive
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


def agent_self(n: Node, primary_datacenter: str) -> Json:
    return {
        "Config": {
            "Datacenter": n.datacenter,
            "PrimaryDatacenter": primary_datacenter,
            "NodeName": n.name,
            "NodeID": n.node_id,
            "Server": True,
            "Revision": "",
            "Version": CONSUL_API_VERSION,
            "VersionPrerelease": "",
            "VersionMetadata": VERSION_METADATA,
            "BuildDate": "",
        },
        "DebugConfig": {},
        "Coord": None,
        "Member": member(n),
        "Stats": {},
        "Meta": dict(n.meta),
    }


def _weights(d: ServiceDefinition) -> Json:
    return {"Passing": d.weight_passing, "Warning": d.weight_warning}


def _empty_proxy() -> Json:
    return {"Mode": "", "MeshGateway": {}, "Expose": {}}


def _node_tagged_addresses(n: Node) -> dict[str, str]:
    return {"lan": n.address, "lan_ipv4": n.address, "wan": n.address, "wan_ipv4": n.address}


def _service_tagged_addresses(d: ServiceDefinition) -> Json:
    return {name: {"Address": a.address, "Port": a.port} for name, a in d.tagged_addresses.items()}


def _check_definition(c: Check) -> Json:
    d = c.definition
    if d is None:
        return {}
    body: Json = {}
    if d.grpc:
        body |= {"GRPC": d.grpc, "GRPCUseTLS": d.grpc_use_tls}
        body["Interval"] = format_duration(d.interval_ns)
        if d.timeout_ns:
            body["Timeout"] = format_duration(d.timeout_ns)
    else:
        body["TTL"] = format_duration(d.ttl_ns)
    if d.deregister_after_ns:
        body["DeregisterCriticalServiceAfter"] = format_duration(d.deregister_after_ns)
    return body
