"""One datacenter's KV store, with Consul's check-and-set rules and per-query indexes.

A blocking KV query waits on the index of what it reads: the key's ModifyIndex, or the
highest ModifyIndex under a prefix. Deleted keys leave a tombstone holding the index of their
deletion so that a prefix's index never goes backwards when one of its keys disappears.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmesh.discovery.registry import journal
from kvmesh.discovery.registry.errors import BadRequestError, ValueTooLargeError
from kvmesh.discovery.registry.index import IndexCounter
from kvmesh.discovery.registry.records import KvEntry

Record = journal.Record

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 512 * 1024  # Consul's default kv_max_value_size
MAX_FLAGS = 2**64 - 1


def validate_key(key: str, *, allow_empty: bool) -> None:
    if not key and not allow_empty:
        raise BadRequestError("Missing key name")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadRequestError(f"Key too long: {len(key.encode())} bytes, limit {MAX_KEY_BYTES}")


def validate_value(size: int) -> None:
    if size > MAX_VALUE_BYTES:
        raise ValueTooLargeError(f"Value exceeds {MAX_VALUE_BYTES} byte limit")


class KvStore:
    def __init__(self, index: IndexCounter) -> None:
        self._index = index
        self._entries: dict[str, KvEntry] = {}
        self._tombstones: dict[str, int] = {}
        self._table_index = 0  # the last index at which any key changed
        self.journal: Callable[[Record], None] | None = None  # durable writes (`--data-dir`)

    # -- reads -------------------------------------------------------------------------------------

    def get(self, key: str) -> KvEntry | None:
        return self._entries.get(key)

    def entries(self, prefix: str) -> list[KvEntry]:
        """Entries whose key starts with `prefix`, in key order."""
        return [self._entries[k] for k in sorted(self._entries) if k.startswith(prefix)]

    def keys(self, prefix: str, separator: str = "") -> list[str]:
        """Keys under `prefix`; with `separator`, each cut after its first separator past it."""
        found: list[str] = []
        for key in sorted(self._entries):
            if not key.startswith(prefix):
                continue
            if separator:
                cut = key.find(separator, len(prefix))
                if cut >= 0:
                    key = key[: cut + len(separator)]
            if not found or found[-1] != key:
                found.append(key)
        return found

    def key_index(self, key: str) -> int:
        entry = self._entries.get(key)
        return max(1, entry.modify_index if entry is not None else self._table_index)

    def prefix_index(self, prefix: str) -> int:
        latest = max(
            (e.modify_index for k, e in self._entries.items() if k.startswith(prefix)), default=0
        )
        latest = max(
            latest, max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0)
        )
        return max(1, latest or self._table_index)

    # -- writes ------------------------------------------------------------------------------------

    def put(self, key: str, value: bytes | None, *, flags: int = 0, cas: int | None = None) -> bool:
        """Write `key`. With `cas`: 0 creates only; N updates only if ModifyIndex is N."""
        validate_key(key, allow_empty=False)
        validate_value(len(value or b""))
        if not 0 <= flags <= MAX_FLAGS:
            raise BadRequestError(f"Invalid flags: {flags}")
        existing = self._entries.get(key)
        if cas is not None:
            current = existing.modify_index if existing is not None else 0
            if cas != current:
                return False
        index = self._bump()
        created = existing.create_index if existing is not None else index
        entry = KvEntry(key, value or None, flags, created, index)
        self._entries[key] = entry
        self._tombstones.pop(key, None)
        if self.journal is not None:
            self.journal(journal.kv_record(entry))
        return True

    def delete(self, key: str, *, cas: int | None = None) -> bool:
        """Delete `key`. With `cas`, only if its ModifyIndex is `cas` (a missing key: true)."""
        validate_key(key, allow_empty=False)
        existing = self._entries.get(key)
        if existing is None:
            return True
        if cas is not None and cas != existing.modify_index:
            return False
        self._remove([key])
        return True

    def delete_tree(self, prefix: str) -> None:
        validate_key(prefix, allow_empty=True)
        doomed = [k for k in self._entries if k.startswith(prefix)]
        if doomed:
            self._remove(doomed)

    def _remove(self, keys: list[str]) -> None:
        index = self._bump()
        for key in keys:
            del self._entries[key]
            self._tombstones[key] = index
        if self.journal is not None:
            self.journal({"t": "kv_del", "keys": keys, "index": index})

    # -- durability --------------------------------------------------------------------------------

    def restore(self, record: Record) -> None:
        """Apply a `kv_put` or `kv_del` journal record with the indexes it carries."""
        if record["t"] == "kv_put":
            entry = journal.kv_entry(record)
            self._entries[entry.key] = entry
            self._tombstones.pop(entry.key, None)
            self._table_index = max(self._table_index, entry.modify_index)
        elif record["t"] == "kv_del":
            for key in record["keys"]:
                self._entries.pop(key, None)
                self._tombstones[key] = record["index"]
            self._table_index = max(self._table_index, record["index"])

    def records(self) -> list[Record]:
        return [journal.kv_record(self._entries[k]) for k in sorted(self._entries)]

    def _bump(self) -> int:
        self._table_index = self._index.bump()
        return self._table_index
