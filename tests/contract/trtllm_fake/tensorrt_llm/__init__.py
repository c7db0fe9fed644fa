"""A FAKE `tensorrt_llm` for kvmesh's contract tests: NOT NVIDIA's library.

It follows the documented Python LLM API of TensorRT-LLM 1.0 (the surface kvmesh's trtllm
engine uses, nothing more) so that `kvmesh.engine.trtllm` can be tested where no GPU is:

- https://nvidia.github.io/TensorRT-LLM/1.0.0/llm-api/reference.html: `LLM(model, backend,
  tensor_parallel_size, max_batch_size, max_num_tokens, max_seq_len, enable_iter_perf_stats,
  kv_cache_config, cache_transceiver_config)`, `LLM.generate_async(inputs, sampling_params,
  streaming, disaggregated_params)` returning a `RequestOutput` (async-iterable; `outputs[0]`
  a `CompletionOutput` with cumulative `token_ids`, `finish_reason` in stop | length | timeout |
  cancelled, `stop_reason`, `disaggregated_params`; `finished`; `abort()`),
  `get_kv_cache_events_async(timeout)`, `get_stats_async(timeout)`, `shutdown()`;
  `KvCacheConfig`, `CacheTransceiverConfig(backend=DEFAULT | UCX | NIXL | MPI,
  max_tokens_in_buffer)`, `SamplingParams`.
- https://nvidia.github.io/TensorRT-LLM/1.0.0/features/disagg-serving.html and
  tensorrt_llm/disaggregated_params.py: `DisaggregatedParams(request_type, first_gen_tokens,
  ctx_request_id, opaque_state, draft_tokens)`; a context-only result carries the params a
  generation-only request elsewhere needs; a generation-only request whose KV cannot be
  received fails (its result raises `tensorrt_llm.executor.utils.RequestError`).
- tensorrt_llm/_utils.py `KVCacheEventSerializer` and the KV-events example: event dicts
  {event_id, data: created | stored {parent_hash, blocks[{block_hash, tokens[{token_id,
  token_extra_id}], cache_level, priority}]} | removed {block_hashes}, window_size}.
- trtllm-serve's /metrics docs: iteration stats {iter, iterLatencyMS, numActiveRequests,
  numQueuedRequests, maxNumActiveRequests, kvCacheStats{maxNumBlocks, freeNumBlocks,
  usedNumBlocks, tokensPerBlock, reusedBlocks, missedBlocks, ...}, inflightBatchingStats{...}}.

What it computes: a toy model (next token = previous token + 1, modulo the vocabulary), a
prefix cache with TensorRT-LLM-style hashes of its own (not kvmesh's), and a cache transceiver
that really moves "KV" between processes: a context-only request writes its prompt's state to a
file under this LLM's endpoint directory and names it in `opaque_state`; a generation-only
request in any process on the machine reads and consumes that file, and cannot continue without
it. Knobs for tests (environment): TRTLLM_FAKE_RECORD (a JSON-lines file each generation-only
request is appended to), TRTLLM_FAKE_FAIL_ON_TOKEN (a prompt holding this token id fails
mid-stream, as an executor error would), TRTLLM_FAKE_STEP_S (seconds per step, 0.002).
"""

from tensorrt_llm._engine import LLM, SamplingParams
from tensorrt_llm.disaggregated_params import DisaggregatedParams

__version__ = "1.0.0+kvmesh.fake"

__all__ = ["LLM", "DisaggregatedParams", "SamplingParams"]
