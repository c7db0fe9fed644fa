"""The torch engine's executor: turns a scheduled step into model inputs, runs the forward pass
(replaying a CUDA graph for decode steps where it can), and samples."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from kvmesh.engine.attention import AttentionBackend
from kvmesh.engine.attention.common import SequenceSlice
from kvmesh.engine.executor import Sampled
from kvmesh.engine.model import LlamaModel
from kvmesh.engine.sampling import SamplerRow, make_generator, sample
from kvmesh.engine.scheduler import ScheduledChunk
from kvmesh.engine.sequence import Sequence
from kvmesh.errors import InvalidRequestError
from kvmesh.kv.cache import PagedKvCache
from kvmesh.sampling import SamplingParams
from kvmesh.types import KvExport


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKvCache,
        *,
        cuda_graphs: bool,
        max_num_seqs: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attention: AttentionBackend = model.attention
        self.device = model.device
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda" and self.attention.name == "triton":
            from kvmesh.engine.attention.triton_backend import TritonBackend
            from kvmesh.engine.cuda_graphs import DecodeGraphs

            assert isinstance(self.attention, TritonBackend)
            self.graphs = DecodeGraphs(
                model,
                kv_cache,
                self.attention,
                max_batch=max_num_seqs,
                max_model_len=max_model_len,
            )

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None

    def make_sampler(self, params: SamplingParams) -> SamplerRow:
        return SamplerRow(params, make_generator(params, self.device))

    def warm_up(self) -> None:
        if self.graphs is not None:
            self.graphs.capture()

    def execute(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
        """Compute the chunks' tokens; sample for sequences whose tokens are all computed."""
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        logits_indices: list[int] = []
        sampling: list[Sequence] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slices.append(SequenceSlice(chunk.num_tokens, start, seq.block_ids))
            if end == seq.num_tokens:
                logits_indices.append(len(input_ids) - 1)
                sampling.append(seq)
        if self.graphs is not None and self.graphs.can_run(slices):
            logits = self.graphs.run(input_ids, positions, slices)  # every row samples
        else:
            meta = self.attention.build(slices, self.kv_cache.layout.block_size, self.device)
            logits = self.model.forward(
                torch.tensor(input_ids, dtype=torch.long, device=self.device),
                torch.tensor(positions, dtype=torch.long, device=self.device),
                meta,
                self.kv_cache,
                torch.tensor(logits_indices, dtype=torch.long, device=self.device),
            )
        if not sampling:
            return []
        tokens, logprobs = sample(logits, [seq.sampler for seq in sampling])
        return [
            Sampled(seq, token, logprob)
            for seq, token, logprob in zip(sampling, tokens, logprobs, strict=True)
        ]

    def export_state(self, export: KvExport) -> bytes:
        raise InvalidRequestError("the torch engine's KV moves through the mesh (NIXL)")

    async def receive_kv(self, export: KvExport, block_ids: Seq[int]) -> None:
        raise InvalidRequestError("the torch engine's KV moves through the mesh (NIXL)")
