"""Turns a scheduled step into model inputs, runs the forward pass, and samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.engine.attention import SequenceSlice, build_metadata
from kvmesh.engine.model import LlamaModel
from kvmesh.engine.sampling import TokenLogprob, sample
from kvmesh.engine.scheduler import ScheduledChunk
from kvmesh.engine.sequence import Sequence
from kvmesh.kv.cache import PagedKvCache


@dataclass(slots=True)
class Sampled:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKvCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.device

    def run(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
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
        meta = build_metadata(slices, self.kv_cache.layout.block_size, self.device)
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
