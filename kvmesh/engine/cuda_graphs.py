"""Steps captured as CUDA graphs: decode steps by batch size, single-prompt prefills by length.

A decode step of an 8B model is ~30 kernels per layer; launched one by one from Python they
cost more than the GPU's work at small batches. Captured once per batch-size bucket (1, 2, 4,
8, then multiples of 8 up to `max_num_seqs`), a step is one replay. The graphs read fixed
buffers (token ids, positions, KV slots, block tables, context lengths) that each step fills;
a batch is padded up to its bucket with rows that have no context and write no KV (slot -1),
which the kernels turn into zeros.

A step that is one prompt (or one chunk of one) of up to `PREFILL_GRAPH_MAX_TOKENS` tokens,
over a cached prefix or not, replays a prefill graph captured for its length rounded up
(16, 32, then multiples of 64). At that size launching ~10 kernels per layer from Python
(Triton's launcher is the slow part) takes about as long as the GPU's work, so the graph
saves most of the step's host time: what a prompt that hits the prefix cache is left with.
Padding rows have no queries in the attention kernel and write no KV; only the last real
token's logits are computed. Longer prompts and mixed batches run eagerly, where the GPU's
work hides the launches.

Replay runs exactly the kernels eager execution runs, on the same inputs: the logits are the
same bits (`tests/gpu/test_cuda_engine.py` checks this).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import structlog
import torch

from kvmesh.engine.attention.common import SequenceSlice, slot_list
from kvmesh.engine.attention.paged_backend import PrefillRows
from kvmesh.engine.attention.triton_backend import TritonBackend, TritonMetadata
from kvmesh.engine.model import LlamaModel
from kvmesh.engine.uploads import upload_into
from kvmesh.kv.cache import PagedKvCache

log = structlog.get_logger(__name__)

PREFILL_GRAPH_MAX_TOKENS = 512


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (always included)."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return [*small, *range(8, max_batch, 8), max_batch]


def prefill_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, 192, ... up to max_tokens (always included)."""
    small = [n for n in (16, 32) if n < max_tokens]
    return [*small, *range(64, max_tokens, 64), max_tokens]


class _Graphs:
    """Graphs of one kind of step, one per size bucket, over buffers each step fills."""

    kind = ""

    def __init__(self, model: LlamaModel, kv_cache: PagedKvCache, buckets: list[int]) -> None:
        self._model = model
        self._kv_cache = kv_cache
        self._buckets = buckets
        self._block_size = kv_cache.layout.block_size
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_size(self) -> int:
        return self._buckets[-1]

    def capture(self, pool: Any) -> None:
        """Capture every bucket, largest first, in the memory pool all graphs share."""
        self._reset_padding(self.max_size)
        for size in reversed(self._buckets):
            self._forward(size)  # compiles the kernels outside the capture
            torch.cuda.synchronize(self._model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize(self._model.device)
        log.info(f"{self.kind} captured in CUDA graphs", buckets=self._buckets)

    def _bucket(self, size: int) -> int:
        return next(b for b in self._buckets if b >= size)

    def _replay(self, bucket: int) -> torch.Tensor:
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def _reset_padding(self, size: int) -> None:
        raise NotImplementedError


class DecodeGraphs(_Graphs):
    kind = "decode"

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKvCache,
        backend: TritonBackend,
        *,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        super().__init__(model, kv_cache, batch_buckets(max_batch))
        self._backend = backend
        self._max_model_len = max_model_len
        device = model.device
        max_blocks = -(-max_model_len // self._block_size)
        # Rows: token ids, positions, KV slots, context lengths.
        self._inputs = torch.zeros((4, max_batch), dtype=torch.long, device=device)
        self._block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)

    @property
    def max_batch(self) -> int:
        return self.max_size

    def can_run(self, slices: Sequence[SequenceSlice]) -> bool:
        return (
            bool(self._graphs)
            and len(slices) <= self.max_batch
            and all(s.is_decode for s in slices)
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slices: Sequence[SequenceSlice],
        fix_ids: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Logits `[len(slices), vocab]` of one all-decode step, by graph replay. `fix_ids`
        may write token ids still on the device into the step's id buffer before it replays."""
        bucket = self._fill(input_ids, positions, slices)
        if fix_ids is not None:
            fix_ids(self._inputs[0, : len(slices)])
        return self._replay(bucket)[: len(slices)]

    def eager(
        self, input_ids: list[int], positions: list[int], slices: Sequence[SequenceSlice]
    ) -> torch.Tensor:
        """The same step run eagerly on the same buffers (what a replay must equal)."""
        bucket = self._fill(input_ids, positions, slices)
        return self._forward(bucket)[: len(slices)]

    def _fill(
        self, input_ids: list[int], positions: list[int], slices: Sequence[SequenceSlice]
    ) -> int:
        """Write the step into the graphs' buffers, padded to its bucket; the bucket."""
        batch = len(slices)
        bucket = self._bucket(batch)
        bs = self._block_size
        slots = slot_list(slices, bs)
        lens = [s.context_len for s in slices]
        pad = bucket - batch
        rows = [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, lens + [0] * pad]
        upload_into(self._inputs[:, :bucket], rows)
        width = max(-(-n // bs) for n in lens)
        tables = [list(s.block_ids[:width]) for s in slices]
        padded = [t + [0] * (width - len(t)) for t in tables]
        upload_into(self._block_tables[:batch, :width], padded)
        return bucket

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots, lens = self._inputs[:, :size]
        meta = self._backend.decode_metadata(
            slots,
            self._block_tables[:size],
            lens,
            max_context=self._max_model_len,
            num_kv_heads=self._model.config.num_kv_heads,
        )
        return self._model.forward(ids, positions, meta, self._kv_cache, None)

    def _reset_padding(self, size: int) -> None:
        """Rows with no context that write nothing: what padding looks like at replay."""
        self._inputs.zero_()
        self._inputs[2, :size] = -1


class PrefillGraphs(_Graphs):
    kind = "prefill"

    def __init__(
        self, model: LlamaModel, kv_cache: PagedKvCache, *, max_tokens: int, max_model_len: int
    ) -> None:
        super().__init__(model, kv_cache, prefill_buckets(max_tokens))
        device = model.device
        max_blocks = -(-max_model_len // self._block_size)
        # Rows: token ids, positions, KV slots.
        self._inputs = torch.zeros((3, max_tokens), dtype=torch.long, device=device)
        # cu_seqlens_q (0, tokens), then the context length.
        self._segment = torch.zeros(3, dtype=torch.int32, device=device)
        self._logits_index = torch.zeros(1, dtype=torch.long, device=device)
        self._block_table = torch.zeros((1, max_blocks), dtype=torch.int32, device=device)

    def can_run(self, slices: Sequence[SequenceSlice]) -> bool:
        return (
            bool(self._graphs)
            and len(slices) == 1
            and not slices[0].is_decode
            and slices[0].num_query <= self.max_size
        )

    def run(self, input_ids: list[int], positions: list[int], s: SequenceSlice) -> torch.Tensor:
        """Logits `[1, vocab]` of the segment's last token, by graph replay."""
        return self._replay(self._fill(input_ids, positions, s))

    def eager(self, input_ids: list[int], positions: list[int], s: SequenceSlice) -> torch.Tensor:
        """The same step run eagerly on the same buffers (what a replay must equal)."""
        return self._forward(self._fill(input_ids, positions, s))

    def _fill(self, input_ids: list[int], positions: list[int], s: SequenceSlice) -> int:
        n = s.num_query
        bucket = self._bucket(n)
        bs, pad = self._block_size, bucket - n
        slots = slot_list([s], bs)
        upload_into(
            self._inputs[:, :bucket],
            [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad],
        )
        upload_into(self._segment, [0, n, s.context_len])
        upload_into(self._logits_index, [n - 1])
        width = -(-s.context_len // bs)
        upload_into(self._block_table[:, :width], [list(s.block_ids[:width])])
        return bucket

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions, slots = self._inputs[:, :size]
        meta = TritonMetadata(
            slot_mapping=slots,
            decode=None,
            prefill=PrefillRows(
                token_indices=None,
                block_tables=self._block_table,
                cu_seqlens_q=self._segment[:2],
                context_lens=self._segment[2:3],
                max_query_len=size,
                fresh=[],  # the paged kernel, for a prompt with a cached prefix or without
            ),
        )
        return self._model.forward(ids, positions, meta, self._kv_cache, self._logits_index)

    def _reset_padding(self, size: int) -> None:
        """A one-token segment with no context: the rest is padding that writes nothing."""
        self._inputs.zero_()
        self._inputs[2, :size] = -1
        self._segment.copy_(torch.tensor([0, 1, 1], dtype=torch.int32))
        self._logits_index.zero_()
