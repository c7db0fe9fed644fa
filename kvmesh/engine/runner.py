"""The torch engine's executor: turns a scheduled step into model inputs, runs the forward pass
(replaying a CUDA graph for decode steps where it can), and samples.

On a GPU it launches a step and returns before the step has run (`launch`), so the core can
schedule the next step meanwhile (async scheduling); nothing on the launch path waits for the
device: inputs go up through pinned memory, samples come back the same way.

A chunk with draft tokens (speculative decoding, synchronous scheduling only) runs like a prefill
chunk that starts at the sequence's last token, eagerly (decode graphs take one token per
sequence), with logits at each of its positions; `kvmesh.engine.verify` then decides what it
emits, and the step is read at once."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from kvmesh.engine.attention import AttentionBackend
from kvmesh.engine.attention.common import SequenceSlice
from kvmesh.engine.executor import Sampled
from kvmesh.engine.model import LlamaModel
from kvmesh.engine.sampling import DeviceSample, SamplerRow, make_generator
from kvmesh.engine.scheduler import ScheduledChunk
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.uploads import upload
from kvmesh.engine.verify import VerifyRow, verify
from kvmesh.errors import InvalidRequestError
from kvmesh.kv.cache import PagedKvCache
from kvmesh.sampling import SamplingParams
from kvmesh.types import KvExport

if TYPE_CHECKING:
    from kvmesh.engine.cuda_graphs import DecodeGraphs, PrefillGraphs


class RunnerStep:
    """A launched step: its samples on their way to the host (see `StepHandle`)."""

    def __init__(
        self, sampling: list[Sequence], samples: DeviceSample | None, device: torch.device
    ) -> None:
        self._sampling = sampling
        self._samples = samples
        self._event: torch.cuda.Event | None = None
        if samples is None and device.type == "cuda":
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._event.record()

    def result(self) -> list[Sampled]:
        if self._samples is None:
            self.fence()
            return []
        tokens, logprobs = self._samples.read()
        return [
            Sampled(seq, token, logprob)
            for seq, token, logprob in zip(self._sampling, tokens, logprobs, strict=True)
        ]

    def fence(self) -> None:
        if self._samples is not None:
            self._samples.wait()
        elif self._event is not None:
            self._event.synchronize()


class VerifiedStep:
    """A step with drafts, already read: verifying them needed their logits on the host."""

    def __init__(self, sampled: list[Sampled]) -> None:
        self._sampled = sampled

    def result(self) -> list[Sampled]:
        return self._sampled

    def fence(self) -> None:
        pass


class ModelRunner:
    verifies_drafts = True  # runs chunks with draft tokens (`ScheduledChunk.draft_token_ids`)

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKvCache,
        *,
        cuda_graphs: bool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attention: AttentionBackend = model.attention
        self.device = model.device
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.launches_ahead = self.device.type == "cuda"
        # The last launch's samples on the device, and each sampling sequence's row in them.
        self._last: tuple[torch.Tensor, dict[Sequence, int]] | None = None
        if cuda_graphs and self.device.type == "cuda" and self.attention.name == "triton":
            from kvmesh.engine.attention.triton_backend import TritonBackend
            from kvmesh.engine.cuda_graphs import (
                PREFILL_GRAPH_MAX_TOKENS,
                DecodeGraphs,
                PrefillGraphs,
            )

            assert isinstance(self.attention, TritonBackend)
            self.graphs = DecodeGraphs(
                model,
                kv_cache,
                self.attention,
                max_batch=max_num_seqs,
                max_model_len=max_model_len,
            )
            self.prefill_graphs = PrefillGraphs(
                model,
                kv_cache,
                max_tokens=min(PREFILL_GRAPH_MAX_TOKENS, max_num_batched_tokens),
                max_model_len=max_model_len,
            )

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.graphs is not None

    def make_sampler(self, params: SamplingParams) -> SamplerRow:
        return SamplerRow(params, make_generator(params, self.device))

    def warm_up(self) -> None:
        if self.graphs is not None and self.prefill_graphs is not None:
            pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run at once
            self.prefill_graphs.capture(pool)  # the larger activations first
            self.graphs.capture(pool)

    def execute(self, chunks: list[ScheduledChunk]) -> list[Sampled]:
        """Compute the chunks' tokens; sample for sequences whose tokens are all computed."""
        return self.launch(chunks).result()

    def launch(self, chunks: list[ScheduledChunk]) -> RunnerStep | VerifiedStep:
        """Queue the step on the device and return; `result()` waits for its samples.

        A sequence's PENDING input token is the previous launch's sample for it, copied on the
        device into this step's input ids. A step with drafts is run and read before returning.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        logits_indices: list[int] = []
        sampling: list[Sequence] = []
        verify_rows: list[VerifyRow] = []  # each sampling sequence's logits rows and drafts
        pending_rows: list[int] = []  # rows of the flat batch whose token is still on the device
        pending_src: list[int] = []  # their rows in the previous launch's samples
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed_tokens
            end = start + chunk.num_tokens
            drafts = chunk.draft_token_ids
            if drafts:
                assert end == seq.num_tokens + len(drafts), "drafts follow the last token"
                input_ids += seq.token_ids[start:]
                input_ids += drafts
            elif end > seq.num_resolved_tokens:
                assert self._last is not None and end - start == 1, "a pending token decodes alone"
                pending_rows.append(len(input_ids))
                pending_src.append(self._last[1][seq])
                input_ids.append(0)
            else:
                input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slices.append(SequenceSlice(chunk.num_tokens, start, seq.block_ids))
            if end >= seq.num_tokens:
                verify_rows.append(VerifyRow(seq.sampler, len(logits_indices), drafts))
                logits_indices += range(len(input_ids) - len(drafts) - 1, len(input_ids))
                sampling.append(seq)
        verifying = any(r.drafts for r in verify_rows)

        def resolve_pending(ids: torch.Tensor) -> None:
            if pending_rows:
                assert self._last is not None
                src = upload(pending_src, torch.long, self.device)
                ids.index_copy_(
                    0,
                    upload(pending_rows, torch.long, self.device),
                    self._last[0].index_select(0, src),
                )

        if self.graphs is not None and self.graphs.can_run(slices):
            # every row samples
            logits = self.graphs.run(input_ids, positions, slices, resolve_pending)
        elif (
            self.prefill_graphs is not None
            and not verifying  # its graphs give the last position's logits only
            and self.prefill_graphs.can_run(slices)
        ):
            assert not pending_rows  # a pending token is only ever a decode row's input
            logits = self.prefill_graphs.run(input_ids, positions, slices[0])
        else:
            meta = self.attention.build(slices, self.kv_cache.layout.block_size, self.device)
            ids = upload(input_ids, torch.long, self.device)
            resolve_pending(ids)
            logits = self.model.forward(
                ids,
                upload(positions, torch.long, self.device),
                meta,
                self.kv_cache,
                upload(logits_indices, torch.long, self.device),
            )
        if not sampling:
            self._last = None
            return RunnerStep([], None, self.device)
        if verifying:
            self._last = None  # async scheduling is off with drafts: nothing reads it
            return VerifiedStep(self._verify(logits, sampling, verify_rows))
        samples = DeviceSample(logits, [seq.sampler for seq in sampling])
        self._last = (samples.tokens, {seq: row for row, seq in enumerate(sampling)})
        return RunnerStep(sampling, samples, self.device)

    def _verify(
        self, logits: torch.Tensor, sampling: list[Sequence], rows: list[VerifyRow]
    ) -> list[Sampled]:
        """Each sampling sequence's emitted tokens (see `verify`), with their logprobs, in
        order: a sequence's accepted drafts then its next token."""
        emitted = verify(logits, rows)
        index = [
            r.first + j for r, tokens in zip(rows, emitted, strict=True) for j in range(len(tokens))
        ]
        flat = [t for tokens in emitted for t in tokens]
        samplers = [r.sampler for r, tokens in zip(rows, emitted, strict=True) for _ in tokens]
        owners = [seq for seq, tokens in zip(sampling, emitted, strict=True) for _ in tokens]
        samples = DeviceSample(
            logits.index_select(0, upload(index, torch.long, self.device)),
            samplers,
            tokens=upload(flat, torch.long, self.device),
        )
        tokens, logprobs = samples.read()
        return [
            Sampled(seq, token, logprob)
            for seq, token, logprob in zip(owners, tokens, logprobs, strict=True)
        ]

    def export_state(self, export: KvExport) -> bytes:
        raise InvalidRequestError("the torch engine's KV moves through the mesh (NIXL)")

    async def receive_kv(self, export: KvExport, block_ids: Seq[int]) -> None:
        raise InvalidRequestError("the torch engine's KV moves through the mesh (NIXL)")
