"""The router records TTFT (by the tier that computed the prompt), ITL and E2E as a request's
tokens arrive; a resumed request records neither TTFT nor E2E (they began elsewhere)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from kvmesh.api.v1 import common_pb2
from kvmesh.sampling import SamplingParams
from services.router.stream import PREFILL, RequestStream

UNSET, STOP = common_pb2.FINISH_REASON_UNSPECIFIED, common_pb2.FINISH_REASON_STOP


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0


def stream(model: str) -> RequestStream:
    sampling = SamplingParams(max_tokens=8)
    return RequestStream("r", [1, 2], sampling, None, return_token_ids=True, model=model)


def test_ttft_itl_and_e2e_are_recorded_per_model_and_tier() -> None:
    request = stream("latency-a")
    request.first_tier = PREFILL
    request.add([5], [], UNSET, "")  # the prefill worker's first token
    request.add([6, 7, 8], [], UNSET, "")  # a decode message of three tokens: three gaps
    request.add([9], [], STOP, "")
    assert count("kvmesh_ttft_seconds", model="latency-a", tier="prefill") == 1
    assert count("kvmesh_ttft_seconds", model="latency-a", tier="decode") == 0
    assert count("kvmesh_itl_seconds", model="latency-a") == 4
    assert count("kvmesh_e2e_seconds", model="latency-a") == 1


def test_a_locally_prefilled_request_counts_its_ttft_under_decode() -> None:
    request = stream("latency-b")
    request.add([5, 6], [], STOP, "")
    assert count("kvmesh_ttft_seconds", model="latency-b", tier="decode") == 1
    assert count("kvmesh_itl_seconds", model="latency-b") == 0  # the first message has no gap
    assert count("kvmesh_e2e_seconds", model="latency-b") == 1


def test_a_resumed_request_records_only_its_gaps() -> None:
    request = stream("latency-c")
    request.resume([5, 6])
    request.add([7], [], UNSET, "")
    request.add([8], [], STOP, "")
    assert count("kvmesh_ttft_seconds", model="latency-c", tier="decode") == 0
    assert count("kvmesh_e2e_seconds", model="latency-c") == 0
    assert count("kvmesh_itl_seconds", model="latency-c") == 1
