"""Between the wire (kvmesh.v1 messages) and the engine's records, in one place."""

from __future__ import annotations

import time
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from kvmesh.api.v1 import common_pb2, worker_pb2
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams, TokenLogprob
from kvmesh.types import FinishReason, KvExport, LoadSnapshot

DEFAULT_MAX_TOKENS = 256

_FINISH_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def sampling_from_proto(
    message: common_pb2.SamplingParams, *, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> SamplingParams:
    """Unset optional fields take the server's defaults (OpenAI's: temperature 1, top_p 1)."""
    if message.HasField("seed") and message.seed >= 2**63:
        raise InvalidRequestError("seed must be below 2**63")
    return SamplingParams(
        max_tokens=message.max_tokens if message.HasField("max_tokens") else default_max_tokens,
        temperature=message.temperature if message.HasField("temperature") else 1.0,
        top_p=message.top_p if message.HasField("top_p") else 1.0,
        top_k=message.top_k if message.HasField("top_k") else 0,
        seed=message.seed if message.HasField("seed") else None,
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
    )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    message = common_pb2.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def finish_to_proto(reason: FinishReason | None) -> common_pb2.FinishReason.ValueType:
    return _FINISH_TO_PROTO[reason]


def finish_from_proto(reason: common_pb2.FinishReason.ValueType) -> FinishReason | None:
    return _FINISH_FROM_PROTO.get(reason)


def stop_reason_to_proto(reason: str | int | None) -> str:
    return "" if reason is None else str(reason)


def logprobs_to_proto(logprobs: Sequence[TokenLogprob]) -> list[common_pb2.TokenLogprob]:
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def handle_to_export(handle: common_pb2.KvHandle) -> KvExport:
    return KvExport(
        request_id=handle.request_id,
        block_ids=tuple(handle.block_ids),
        num_tokens=handle.num_tokens,
        block_size=handle.block_size,
        layout_fingerprint=handle.layout_fingerprint,
        opaque=handle.engine_state,
    )


def timestamp(seconds_from_now: float = 0.0) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return stamp


def load_to_proto(load: LoadSnapshot) -> worker_pb2.LoadReport:
    return worker_pb2.LoadReport(
        time=timestamp(),
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_tokens_in_flight=load.num_tokens_in_flight,
        num_prefill_tokens_pending=load.num_prefill_tokens_pending,
        num_blocks_used=load.num_blocks_used,
        num_blocks_total=load.num_blocks_total,
        num_blocks_pinned=load.num_blocks_pinned,
        step_seconds=load.step_seconds,
    )
