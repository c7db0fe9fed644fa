"""The TensorRT-LLM engine (`--engine trtllm`): kvmesh's engine protocol over TensorRT-LLM's
Python LLM API; TensorRT-LLM's cache transceiver moves the KV (`TransferMode.ENGINE`).

NOT YET RUN AGAINST THE REAL LIBRARY. It is written against TensorRT-LLM 1.0's documented LLM
API and checked against a fake that follows it (tests/contract/trtllm_fake); docs/engines.md
lists what to verify on the first real run. Sources (signatures only; no code copied; what was
actually read were the docs site's current pages and the repository's stored sources: the 1.0.0
URLs below follow the site's versioned layout and were not opened, checklist item 1):

- LLM API reference, https://nvidia.github.io/TensorRT-LLM/1.0.0/llm-api/reference.html:
  `LLM(model, backend, kv_cache_config, cache_transceiver_config, ...)`,
  `LLM.generate_async(inputs, sampling_params, streaming, disaggregated_params)`,
  `LLM.get_kv_cache_events_async(timeout)`, `LLM.get_stats_async(timeout)`, `KvCacheConfig`
  (`enable_block_reuse`, `event_buffer_max_size`, `free_gpu_memory_fraction`, `max_tokens`,
  `tokens_per_block`), `CacheTransceiverConfig` (`backend`: DEFAULT | UCX | NIXL | MPI,
  `max_tokens_in_buffer`), `RequestOutput` / `CompletionOutput` (`token_ids`, `finished`,
  `finish_reason`, `stop_reason`, `disaggregated_params`, `abort()`).
- Disaggregated serving, https://nvidia.github.io/TensorRT-LLM/1.0.0/features/disagg-serving.html,
  and `tensorrt_llm/disaggregated_params.py` (`DisaggregatedParams(request_type=
  "context_only" | "generation_only", first_gen_tokens, ctx_request_id, opaque_state,
  draft_tokens)`).
- KV cache events, https://nvidia.github.io/TensorRT-LLM/1.0.0/examples/llm_inference_kv_events.html,
  and `tensorrt_llm/_utils.py` `KVCacheEventSerializer` (event dicts: `event_id`, `data` of
  type created | stored {parent_hash, blocks: [{block_hash, tokens: [{token_id,
  token_extra_id}], cache_level, priority}]} | removed {block_hashes} | updated, `window_size`).
- Iteration stats (`trtllm-serve` /metrics docs): `iter`, `iterLatencyMS`, `numActiveRequests`,
  `numQueuedRequests`, `kvCacheStats` {maxNumBlocks, freeNumBlocks, usedNumBlocks,
  tokensPerBlock, reusedBlocks, missedBlocks}; only with `enable_iter_perf_stats=True`.

How kvmesh's calls map:

    generate(request)        generate_async(prompt ids, SamplingParams, streaming=True)
    prefill(request)         generate_async(..., max_tokens=1, DisaggregatedParams(
                             request_type="context_only")); its first token; the result's
                             DisaggregatedParams as JSON in KvExport.opaque (`state`)
    reserve_import(...)      generate_async(..., DisaggregatedParams(request_type=
                             "generation_only", first_gen_tokens, ctx_request_id, opaque_state,
                             draft_tokens), streaming=True), awaited to its first output: the
                             transceiver has moved the KV (else TransferError: computed locally)
    generate_imported(...)   the rest of that stream, first_gen_tokens left out
    abort / release_export   RequestOutput.abort()
    kv_events                get_kv_cache_events_async, rehashed to kvmesh's hashes (`events`)
    load() / stats()         get_stats_async's latest iteration, plus kvmesh's own counts

Errors: the library's ValueError / TypeError at submission -> InvalidRequestError
(INVALID_ARGUMENT); more requests than `--max-num-seqs` + `--max-num-waiting` ->
OverloadedError (RESOURCE_EXHAUSTED); a request the library fails -> EngineError (INTERNAL);
aborted or cancelled -> the stream ends with FinishReason.ABORT; no tensorrt_llm ->
`library.TrtllmMissingError`, one line at worker start.

Options (`--engine-arg KEY=VALUE`, `options.TrtllmOptions`): `backend` (pytorch),
`cache_transceiver_backend` (UCX), `max_tokens_in_buffer`, `free_gpu_memory_fraction` (else
`--gpu-memory-fraction`), `event_buffer_max_size` (16384), `tensor_parallel_size` (1),
`events_timeout_s` (1), `vocab_size`.

Importing this package imports no tensorrt_llm: building a `TrtllmEngine` does.
"""

from kvmesh.engine.trtllm.engine import TrtllmEngine

__all__ = ["TrtllmEngine"]
