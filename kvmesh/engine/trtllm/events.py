"""TensorRT-LLM's KV cache events, rehashed into kvmesh's (`kvmesh.kv.hashing`).

kvmesh's routers index prompts by their own chained xxh3 hashes (root from the model id and the
cache salt); TensorRT-LLM names its blocks by hashes of its own. The router must see kvmesh's,
so each stored block is rehashed here from the event's token ids and its parent's kvmesh hash,
and a map TensorRT-LLM hash -> kvmesh hash is kept to follow children and removals:

    {"type": "stored", "parent_hash": P, "blocks": [{"block_hash": H, "tokens": [...]}, ...]}
        P None: kvmesh parent = root_hash(model_id, kv_dtype=...); else kvmesh parent = map[P]
        each block: kvmesh hash = hash_block(kvmesh parent, its token ids); map[H] = it
        -> BlockStored(the new kvmesh hashes, kvmesh parent or None for the root)
    {"type": "removed", "block_hashes": [H, ...]}  -> BlockRemoved(map.pop(H) for each known H)
    {"type": "created", ...}                        -> AllCleared (a new, empty cache)
    {"type": "updated", ...}                        -> nothing (priority / cache level only)

Blocks that cannot be rehashed are skipped, with their descendants, and counted in
`num_skipped_blocks`: a parent the map does not know (its event was dropped), a block that is not
full (`len(tokens) != block_size`), a token with a nonzero `token_extra_id` (multimodal or LoRA
content kvmesh's hashes do not cover). The router then indexes less than the engine holds: a
miss there is a computed prompt, never a wrong one.

The root carries no cache salt: TensorRT-LLM 1.0's events do not say which salt a block was
stored under, so salted prompts are not found in this worker's index (they route by load).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from kvmesh.kv.events import AllCleared, BlockRemoved, BlockStored, KvEvent, KvEventLog
from kvmesh.kv.hashing import BlockHash, hash_block, hash_blocks, root_hash


class EventMapper:
    """Turns TensorRT-LLM event dicts into kvmesh events, appended to `log`."""

    def __init__(self, model_id: str, kv_dtype: str, block_size: int, log: KvEventLog) -> None:
        self._root = root_hash(model_id, kv_dtype=kv_dtype)  # as the router hashes this worker
        self._block_size = block_size
        self._log = log
        self._by_trtllm: dict[int, BlockHash] = {}
        self._cached: Counter[BlockHash] = Counter()  # kvmesh hash -> TensorRT-LLM blocks
        self.num_skipped_blocks = 0

    def apply(self, event: Mapping[str, Any]) -> None:
        data = event.get("data") or {}
        kind = data.get("type")
        mapped: KvEvent | None = None
        if kind == "stored":
            mapped = self._stored(data.get("parent_hash"), data.get("blocks") or [])
        elif kind == "removed":
            mapped = self._removed(data.get("block_hashes") or [])
        elif kind == "created":
            self._by_trtllm.clear()
            self._cached.clear()
            mapped = AllCleared(self._log.last_event_id + 1)
        if mapped is not None:
            self._log.extend([mapped])

    def cached_hashes(self) -> list[BlockHash]:
        return list(self._cached)

    def num_cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: str) -> int:
        """Prompt tokens in blocks this worker's events say are cached (what the router sees)."""
        if cache_salt:
            return 0
        cached = 0
        for block_hash in hash_blocks(token_ids, self._block_size, self._root):
            if block_hash not in self._cached:
                break
            cached += self._block_size
        return cached

    def _stored(
        self, trtllm_parent: int | None, blocks: Sequence[Mapping[str, Any]]
    ) -> KvEvent | None:
        parent = self._root if trtllm_parent is None else self._by_trtllm.get(trtllm_parent)
        first_parent: BlockHash | None = None
        new: list[BlockHash] = []
        for i, block in enumerate(blocks):
            tokens = block.get("tokens") or []
            plain = all(not t.get("token_extra_id") for t in tokens)
            if parent is None or len(tokens) != self._block_size or not plain:
                self.num_skipped_blocks += len(blocks) - i
                break
            block_hash = hash_block(parent, [int(t["token_id"]) for t in tokens])
            trtllm_hash = int(block["block_hash"])
            if trtllm_hash not in self._by_trtllm:
                self._by_trtllm[trtllm_hash] = block_hash
                self._cached[block_hash] += 1
                if self._cached[block_hash] == 1:
                    if not new and parent != self._root:
                        first_parent = parent
                    new.append(block_hash)
            parent = block_hash
        if not new:
            return None
        return BlockStored(self._log.last_event_id + 1, tuple(new), first_parent)

    def _removed(self, trtllm_hashes: Sequence[int]) -> KvEvent | None:
        gone: list[BlockHash] = []
        for trtllm_hash in trtllm_hashes:
            block_hash = self._by_trtllm.pop(int(trtllm_hash), None)
            if block_hash is None:
                continue
            self._cached[block_hash] -= 1
            if self._cached[block_hash] == 0:
                del self._cached[block_hash]
                gone.append(block_hash)
        return BlockRemoved(self._log.last_event_id + 1, tuple(gone)) if gone else None
