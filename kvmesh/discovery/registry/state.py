"""The registry's state: one `Datacenter` per name, each with its own index, catalog and KV.

Datacenters share nothing but the process: a write to dc2 takes dc2's next index and wakes only
dc2's blocking queries, as separate Consul clusters would.
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog

from kvmesh.discovery.registry.catalog import Catalog
from kvmesh.discovery.registry.errors import UnknownDatacenterError
from kvmesh.discovery.registry.index import IndexCounter
from kvmesh.discovery.registry.journal import Journal, Record
from kvmesh.discovery.registry.kvstore import KvStore
from kvmesh.discovery.registry.records import Node

log = structlog.get_logger(__name__)

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
    def __init__(
        self,
        datacenters: Sequence[str],
        address: str = "127.0.0.1",
        *,
        journal: Journal | None = None,
    ) -> None:
        """With a `journal` the state is first rebuilt from it, then every write goes to it
        (fsync'd before the write returns), and it is compacted into a new snapshot."""
        names = list(datacenters)
        validate_datacenter_names(names)
        self._datacenters = {name: Datacenter.create(name, address) for name in names}
        self._journal = journal
        if journal is not None:
            self._restore(journal)
            for dc in self._datacenters.values():
                dc.kv.journal = dc.catalog.journal = functools.partial(self._write, dc)
            journal.compact(self.records())

    def _restore(self, journal: Journal) -> None:
        now = time.monotonic()
        restored = 0
        latest: dict[str, int] = {}
        for record in journal.replay():
            dc = self._datacenters.get(record.get("dc", ""))
            if dc is None:
                continue  # a datacenter this registry no longer serves
            kind = record["t"]
            if kind in ("kv_put", "kv_del"):
                dc.kv.restore(record)
            elif kind != "index":
                dc.catalog.restore(record, now)
            seen = (
                record["value"]
                if kind == "index"
                else max(record.get("index", 0), record.get("modify", 0))
            )
            latest[dc.name] = max(latest.get(dc.name, 0), seen)
            restored += 1
        for name, value in latest.items():  # indexes never go backwards across a restart
            index = self._datacenters[name].index
            index.value = max(index.value, value)
        log.info("registry state restored", records=restored, data_dir=str(journal.directory))

    def _write(self, dc: Datacenter, record: Record) -> None:
        assert self._journal is not None
        self._journal.append({"dc": dc.name, "index": dc.index.value, **record})
        if self._journal.wants_compaction:
            self._journal.compact(self.records())

    def records(self) -> list[Record]:
        """Journal records that rebuild the whole durable state."""
        found: list[Record] = []
        for dc in self._datacenters.values():
            tagged = [{"t": "index", "value": dc.index.value}, *dc.kv.records()]
            tagged += dc.catalog.records()
            found += [{"dc": dc.name, **record} for record in tagged]
        return found

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
        """Release every blocking query; close the journal."""
        for dc in self._datacenters.values():
            dc.index.close()
        if self._journal is not None:
            self._journal.close()
