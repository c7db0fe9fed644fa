"""Where one request goes: its prompt's block hashes, a decode worker, and maybe a prefill worker.

The decode worker is chosen first, by overlap too: conditional disaggregation asks how many
prompt tokens the chosen decode worker would still have to compute — when fewer than
`disagg_min_tokens` (a short prompt, or one mostly cached there), it prefills them itself;
otherwise a prefill worker is chosen and the KV moves to the decode worker, which reads only the
blocks it lacks. Only prefill workers whose KV layout the decode worker can read are candidates
(`WorkerPool.incompatibility`); when there are prefill workers but none of them pairs with the
chosen decode worker, the request goes aggregated and the prefill tier's decision counts the
reason `no_compatible_prefill`. Each tier's candidates are scored by hashes as its workers
compute them: their block size and KV dtype (`kvmesh.kv.hashing.root_hash`), which may differ
between the tiers (decode converts on import). Retries and migrations choose again among the
workers not yet tried.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import structlog

from kvmesh.kv.hashing import BlockHash, hash_blocks, root_hash
from kvmesh.rpc.errors import UnavailableError
from kvmesh.telemetry import metrics
from services.router.policy import Decision, Router
from services.router.pool import Worker, WorkerPool

log = structlog.get_logger(__name__)

NO_COMPATIBLE_PREFILL = "no_compatible_prefill"  # a decision reason: aggregated for this reason


@dataclass(frozen=True, slots=True)
class Hashed:
    """A prompt's block hashes as one kind of worker computes them."""

    hashes: list[BlockHash]
    block_size: int


@dataclass(slots=True)
class Plan:
    decode_hashes: Hashed
    prompt_tokens: int
    decode: Decision
    prefill: Decision | None  # None: aggregated (the decode worker prefills)
    prefill_hashes: Hashed | None = None

    @property
    def hashes(self) -> list[BlockHash]:
        return self.decode_hashes.hashes


class Planner:
    def __init__(self, pool: WorkerPool, router: Router, *, disagg_min_tokens: int) -> None:
        self._pool = pool
        self._router = router
        self._disagg_min_tokens = disagg_min_tokens
        self._roots: dict[tuple[str, str], BlockHash] = {}

    @property
    def policy(self) -> str:
        return self._router.config.policy

    def plan(self, prompt: Sequence[int], *, salt: str = "", record: bool = True) -> Plan:
        """Choose the decode worker and, when disaggregating, the prefill worker. `salt`: the
        request's cache salt (tenant isolation), folded into its block hashes as workers do.

        `record=False` (ExplainRoute) changes nothing: no metrics, no approximate entries.
        """
        decode_workers = self._pool.candidates("decode")
        if not any(w.info is not None for w in decode_workers):
            raise UnavailableError("no decode worker is available")
        first = next(w for w in decode_workers if w.info is not None)
        hashed = self._hash(prompt, first, salt)
        decision = self._choose("decode", hashed, len(prompt), decode_workers, record)
        decode = decision.chosen
        assert decode is not None
        plan = Plan(self._hash(prompt, decode.worker, salt), len(prompt), decision, None)
        if decode.new_tokens < self._disagg_min_tokens or not self._pool.candidates("prefill"):
            return plan
        prefill_workers = self._pool.candidates("prefill", paired_with=decode.worker)
        if not prefill_workers:
            if record:
                metrics.ROUTER_DECISIONS.labels("prefill", self.policy, NO_COMPATIBLE_PREFILL).inc()
                log.debug(
                    "aggregated: no prefill worker pairs with the decode worker",
                    decode_worker=decode.worker.worker_id,
                )
            return plan
        plan.prefill_hashes = self._hash(prompt, prefill_workers[0], salt)
        plan.prefill = self._choose(
            "prefill", plan.prefill_hashes, len(prompt), prefill_workers, record
        )
        return plan

    def again(self, plan: Plan, tier: str, exclude: Iterable[str]) -> Decision:
        """Choose another worker of `tier` (a retry or a migration), avoiding `exclude`; a
        prefill worker must pair with the planned decode worker."""
        decode = plan.decode.chosen
        paired_with = decode.worker if tier == "prefill" and decode is not None else None
        workers = self._pool.candidates(tier, exclude=exclude, paired_with=paired_with)
        hashed = plan.decode_hashes
        if tier == "prefill" and plan.prefill_hashes is not None:
            hashed = plan.prefill_hashes
        return self._choose(tier, hashed, plan.prompt_tokens, workers, True)

    def _choose(
        self,
        tier: str,
        hashed: Hashed,
        prompt_tokens: int,
        workers: Sequence[Worker],
        record: bool,
    ) -> Decision:
        started = time.perf_counter()
        hashes, block_size = hashed.hashes, hashed.block_size
        decision = self._router.choose(tier, workers, hashes, prompt_tokens, block_size)
        if not record:
            return decision
        index = self._router.index
        metrics.ROUTER_DECISION_SECONDS.labels(tier).observe(time.perf_counter() - started)
        chosen = decision.chosen
        if chosen is None:
            return decision
        index.routed(chosen.worker.worker_id, hashes)
        metrics.ROUTER_DECISIONS.labels(tier, decision.policy, decision.reason).inc()
        metrics.ROUTER_PREFIX_BLOCKS.labels(tier, "prompt").inc(len(hashes))
        metrics.ROUTER_PREFIX_BLOCKS.labels(tier, "hit").inc(chosen.cached_blocks)
        metrics.ROUTER_KV_INDEX_ENTRIES.set(index.num_entries)
        metrics.ROUTER_KV_INDEX_BLOCKS.set(index.num_blocks)
        log.debug(
            "route",
            tier=tier,
            worker_id=chosen.worker.worker_id,
            reason=decision.reason,
            candidates=decision.summary(),
        )
        return decision

    def _hash(self, prompt: Sequence[int], worker: Worker, salt: str) -> Hashed:
        """The prompt's hashes as `worker` computes them (its model, block size, KV dtype)."""
        info = worker.info
        assert info is not None
        root = self._root(info.model, worker.meta.get("kv_dtype", ""), salt)
        return Hashed(hash_blocks(prompt, info.block_size, root), info.block_size)

    def _root(self, model: str, kv_dtype: str, salt: str) -> BlockHash:
        if salt:  # one per tenant and salt: not worth keeping
            return root_hash(model, salt=salt, kv_dtype=kv_dtype)
        root = self._roots.get((model, kv_dtype))
        if root is None:
            root = self._roots[(model, kv_dtype)] = root_hash(model, kv_dtype=kv_dtype)
        return root
