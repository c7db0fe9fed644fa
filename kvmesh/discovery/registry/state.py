"""The registry's state: one `Datacenter` per name, each with its own index, catalog and KV.

Datacenters share nothing but the process: a write to dc2 takes dc2's next index and wakes only
dc2's blocking queries, as separate Consul clusters would.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvmesh.discovery.registry.catalog import Catalog
from kvmesh.discovery.registry.errors import UnknownDatacenterError
from kvmesh.discovery.registry.index import IndexCounter
from kvmesh.discovery.registry.kvstore import KvStore
from kvmesh.discovery.registry.records import Node

_DATACENTER_NAME = re.compile(r"^[a-z0-9_-]+$")  # what Consul accepts for `datacenter`


@dataclass(slots=True)
class Datacenter:
    name: str
    index: IndexCounter
    catalog: Catalog
    kv: KvStore

    @property
    def node(self) -> Node:
        return self.catalog.node

    @classmethod
    def create(cls, name: str, address: str) -> Datacenter:
        index = IndexCounter()
        node = Node(
            node_id=str(uuid.uuid4()),
            name=f"registry-{name}",
            address=address,
            datacenter=name,
            meta={"consul-network-segment": ""},
        )
        return cls(name, index, Catalog(node, index), KvStore(index))


def validate_datacenter_names(names: Sequence[str]) -> None:
    if not names:
        raise ValueError("the registry needs at least one datacenter")
    if len(set(names)) != len(names):
        raise ValueError(f"datacenter names repeat: {list(names)}")
    for name in names:
        if not _DATACENTER_NAME.match(name):
            raise ValueError(
                f"invalid datacenter name {name!r}: use lowercase letters, digits, - and _"
            )


class RegistryState:
    def __init__(self, datacenters: Sequence[str], address: str = "127.0.0.1") -> None:
        names = list(datacenters)
        validate_datacenter_names(names)
        self._datacenters = {name: Datacenter.create(name, address) for name in names}

    @property
    def names(self) -> list[str]:
        return list(self._datacenters)

    @property
    def primary(self) -> str:
        return next(iter(self._datacenters))

    def datacenter(self, name: str) -> Datacenter:
        dc = self._datacenters.get(name)
        if dc is None:
            raise UnknownDatacenterError(name)
        return dc

    def __iter__(self) -> Iterator[Datacenter]:
        return iter(self._datacenters.values())

    def close(self) -> None:
        """Release every blocking query."""
        for dc in self._datacenters.values():
            dc.index.close()
