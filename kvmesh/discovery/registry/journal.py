"""The registry's durable state on disk: a snapshot plus an append-only log (`--data-dir`).

Both files hold the same JSON records, one per line; replaying the snapshot, then the log,
rebuilds the state. Every write the registry acknowledges is appended to the log and fsync'd
before its HTTP answer leaves (so a `kill -9` loses nothing acknowledged). At start, and each
time the log passes `compact_after` records, the state is written as a new snapshot (to a
temporary file, fsync'd, renamed over the old one) and the log is emptied.

What is durable, as a Consul agent keeps it in its data directory: the KV store, the agent's
service and check registrations, and each check's last status (a restored TTL check's clock
restarts at the restart: its owner has a whole TTL to pass it again), and each datacenter's
index, so indexes never go backwards. Blocking queries and probes are not.

Records (`dc` names the datacenter):
    {"t": "kv_put", "key", "value" (base64 or null), "flags", "create", "modify"}
    {"t": "kv_del", "keys", "index"}
    {"t": "svc", "def": ServiceDefinition, "replace": bool}    {"t": "svc_del", "id"}
    {"t": "chk", "def": CheckDefinition}                       {"t": "chk_del", "id"}
    {"t": "status", "id", "status", "output"}                  {"t": "index", "value"}
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import structlog

from kvmesh.discovery.registry.records import (
    CheckDefinition,
    KvEntry,
    ServiceDefinition,
    TaggedAddress,
)

log = structlog.get_logger(__name__)

Record = dict[str, Any]
SNAPSHOT, LOG = "snapshot.jsonl", "log.jsonl"


class Journal:
    def __init__(self, directory: Path, *, compact_after: int = 10_000) -> None:
        self.directory = directory
        self.compact_after = compact_after
        directory.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] | None = None
        self._appended = 0

    def replay(self) -> Iterator[Record]:
        """The snapshot's records, then the log's. A torn last line (a crash mid-append, never
        acknowledged) is dropped."""
        for name in (SNAPSHOT, LOG):
            path = self.directory / name
            if not path.exists():
                continue
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):
                        log.warning("dropping a torn last record", file=str(path))
                        continue
                    raise ValueError(f"{path}:{number} is not a journal record") from None

    def append(self, record: Record) -> None:
        """Write one record and fsync it: when this returns, it survives a crash."""
        if self._log is None:
            self._log = (self.directory / LOG).open("a")
        self._log.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self._appended += 1

    @property
    def wants_compaction(self) -> bool:
        return self._appended >= self.compact_after

    def compact(self, records: Iterable[Record]) -> None:
        """Make `records` (the whole state) the snapshot, and empty the log."""
        temporary = self.directory / (SNAPSHOT + ".tmp")
        with temporary.open("w") as f:
            for record in records:
                f.write(json.dumps(record, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.directory / SNAPSHOT)
        if self._log is not None:
            self._log.close()
        self._log = (self.directory / LOG).open("w")  # truncated
        os.fsync(self._log.fileno())
        _fsync_directory(self.directory)
        self._appended = 0

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- records <-> definitions ---------------------------------------------------------------------


def kv_record(entry: KvEntry) -> Record:
    value = base64.b64encode(entry.value).decode() if entry.value is not None else None
    return {
        "t": "kv_put",
        "key": entry.key,
        "value": value,
        "flags": entry.flags,
        "create": entry.create_index,
        "modify": entry.modify_index,
    }


def kv_entry(record: Record) -> KvEntry:
    value = base64.b64decode(record["value"]) if record["value"] is not None else None
    return KvEntry(record["key"], value, record["flags"], record["create"], record["modify"])


def service_dict(definition: ServiceDefinition) -> Record:
    return dataclasses.asdict(definition)


def service_definition(data: Record) -> ServiceDefinition:
    return ServiceDefinition(
        **{
            **data,
            "tags": tuple(data["tags"]),
            "tagged_addresses": {
                k: TaggedAddress(**v) for k, v in data["tagged_addresses"].items()
            },
            "checks": tuple(check_definition(c) for c in data["checks"]),
        }
    )


def check_dict(definition: CheckDefinition) -> Record:
    return dataclasses.asdict(definition)


def check_definition(data: Record) -> CheckDefinition:
    return CheckDefinition(**data)
