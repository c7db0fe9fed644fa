"""Decode steps captured as CUDA graphs, one per bucketed batch size.

A decode step of an 8B model is ~30 kernels per layer; launched one by one from Python they
cost more than the GPU's work at small batches. Captured once per batch-size bucket (1, 2, 4,
8, then multiples of 8 up to `max_num_seqs`), a step is one replay. The graphs read fixed
buffers (token ids, positions, KV slots, block tables, context lengths) that each step fills;
a batch is padded up to its bucket with rows that have no context and write no KV (slot -1),
which the kernels turn into zeros. Only all-decode steps replay; prefills run eagerly.

Replay runs exactly the kernels eager execution runs, on the same inputs: the logits are the
same bits (`tests/gpu/test_cuda_graphs.py` checks this).
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
import torch

from kvmesh.engine.attention.common import SequenceSlice
from kvmesh.engine.attention.triton_backend import TritonBackend
from kvmesh.engine.model import LlamaModel
from kvmesh.kv.cache import PagedKvCache

log = structlog.get_logger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (always included)."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return [*small, *range(8, max_batch, 8), max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKvCache,
        backend: TritonBackend,
        *,
        max_batch: int,
        max_model_len: int,
    ) -> None:
        self._model = model
        self._kv_cache = kv_cache
        self._backend = backend
        self._buckets = batch_buckets(max_batch)
        self._max_model_len = max_model_len
        self._block_size = kv_cache.layout.block_size
        device = model.device
        max_blocks = -(-max_model_len // self._block_size)
        # Rows: token ids, positions, KV slots, context lengths.
        self._inputs = torch.zeros((4, max_batch), dtype=torch.long, device=device)
        self._block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @property
    def max_batch(self) -> int:
        return self._buckets[-1]

    def can_run(self, slices: Sequence[SequenceSlice]) -> bool:
        return (
            bool(self._graphs)
            and len(slices) <= self.max_batch
            and all(s.is_decode for s in slices)
        )

    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        self._reset_padding(self.max_batch)
        for batch in reversed(self._buckets):
            self._forward(batch)  # compiles the kernels outside the capture
            torch.cuda.synchronize(self._model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(batch)
            self._graphs[batch] = (graph, logits)
        torch.cuda.synchronize(self._model.device)
        log.info("decode captured in CUDA graphs", buckets=self._buckets)

    def run(
        self, input_ids: list[int], positions: list[int], slices: Sequence[SequenceSlice]
    ) -> torch.Tensor:
        """Logits `[len(slices), vocab]` of one all-decode step, by graph replay."""
        bucket = self._fill(input_ids, positions, slices)
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits[: len(slices)]

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
        bucket = next(b for b in self._buckets if b >= batch)
        bs = self._block_size
        slots = [s.block_ids[(n := s.num_context_before) // bs] * bs + n % bs for s in slices]
        lens = [s.context_len for s in slices]
        pad = bucket - batch
        host = torch.tensor(
            [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, lens + [0] * pad],
            dtype=torch.long,
        )
        self._inputs[:, :bucket].copy_(host)
        width = max(-(-n // bs) for n in lens)
        tables = [list(s.block_ids[:width]) for s in slices]
        host_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        self._block_tables[:batch, :width].copy_(host_tables)
        return bucket

    def _forward(self, batch: int) -> torch.Tensor:
        ids, positions, slots, lens = self._inputs[:, :batch]
        meta = self._backend.decode_metadata(
            slots,
            self._block_tables[:batch],
            lens,
            max_context=self._max_model_len,
            num_kv_heads=self._model.config.num_kv_heads,
        )
        return self._model.forward(ids, positions, meta, self._kv_cache, None)

    def _reset_padding(self, batch: int) -> None:
        """Rows with no context that write nothing: what padding looks like at replay."""
        self._inputs.zero_()
        self._inputs[2, :batch] = -1
