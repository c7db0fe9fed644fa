"""Where one request goes: its prompt's block hashes, a decode worker, and maybe a prefill worker.

The decode worker is chosen first, by overlap too: conditional disaggregation asks how many
prompt tokens the chosen decode worker would still have to compute — when fewer than
`disagg_min_tokens` (a short prompt, or one mostly cached there), it prefills them itself;
otherwise a prefill worker is chosen and the KV moves to the decode worker, which reads only the
blocks it lacks. Only prefill workers whose KV layout the decode worker can read are candidates
(`WorkerPool.incompatibility`); when there are prefill workers but none of them pairs with the
chosen decode worker, the request goes aggregated and the prefill tier's decision counts the
reason `no_compatible_prefill`. Block hashes use the decode worker's block size. Retries and
migrations choose again among the workers not yet tried.
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


@dataclass(slots=True)
class Plan:
    hashes: list[BlockHash]
    block_size: int
    prompt_tokens: int
    decode: Decision
    prefill: Decision | None  # None: aggregated (the decode worker prefills)


class Planner:
    def __init__(self, pool: WorkerPool, router: Router, *, disagg_min_tokens: int) -> None:
        self._pool = pool
        self._router = router
        self._disagg_min_tokens = disagg_min_tokens
        self._roots: dict[str, BlockHash] = {}

    @property
    def policy(self) -> str:
        return self._router.config.policy

    def plan(self, prompt: Sequence[int], *, salt: str = "", record: bool = True) -> Plan:
        """Choose the decode worker and, when disaggregating, the prefill worker. `salt`: the
        request's cache salt (tenant isolation), folded into its block hashes as workers do.

        `record=False` (ExplainRoute) changes nothing: no metrics, no approximate entries.
        """
        decode_workers = self._pool.candidates("decode")
        infos = [w.info for w in decode_workers if w.info is not None]
        if not infos:
            raise UnavailableError("no decode worker is available")
        block_size = infos[0].block_size
        hashes = hash_blocks(prompt, block_size, self._root(infos[0].model, salt))
        decision = self._choose("decode", hashes, len(prompt), block_size, decode_workers, record)
        plan = Plan(hashes, block_size, len(prompt), decision, None)
        decode = decision.chosen
        assert decode is not None
        decode_info = decode.worker.info
        assert decode_info is not None
        if decode_info.block_size != block_size:  # decode workers differ: hash as this one does
            plan.block_size = decode_info.block_size
            plan.hashes = hash_blocks(prompt, plan.block_size, self._root(decode_info.model, salt))
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
        plan.prefill = self._choose(
            "prefill", plan.hashes, len(prompt), plan.block_size, prefill_workers, record
        )
        return plan

    def again(self, plan: Plan, tier: str, exclude: Iterable[str]) -> Decision:
        """Choose another worker of `tier` (a retry or a migration), avoiding `exclude`; a
        prefill worker must pair with the planned decode worker."""
        decode = plan.decode.chosen
        paired_with = decode.worker if tier == "prefill" and decode is not None else None
        workers = self._pool.candidates(tier, exclude=exclude, paired_with=paired_with)
        return self._choose(tier, plan.hashes, plan.prompt_tokens, plan.block_size, workers, True)

    def _choose(
        self,
        tier: str,
        hashes: list[BlockHash],
        prompt_tokens: int,
        block_size: int,
        workers: Sequence[Worker],
        record: bool,
    ) -> Decision:
        started = time.perf_counter()
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

    def _root(self, model: str, salt: str) -> BlockHash:
        if salt:  # one per tenant and salt: not worth keeping
            return root_hash(model, salt=salt)
        root = self._roots.get(model)
        if root is None:
            root = self._roots[model] = root_hash(model)
        return root
