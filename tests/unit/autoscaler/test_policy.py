"""Policies: each bad field is refused with a message naming it; proto and JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import grpc
import pytest

from kvmesh.api.v1 import autoscaler_pb2, common_pb2
from kvmesh.errors import InvalidRequestError
from kvmesh.rpc.errors import status_of
from services.autoscaler.policy import Policy, tier_from_proto, tier_to_proto

SLA_PREFILL = Policy(
    model="org/SmolLM2-135M",
    tier="prefill",
    min_replicas=0,
    max_replicas=12,
    mode="sla",
    target_ttft_s=0.25,
    window_s=15.5,
    scale_down_delay_s=90.0,
    max_step=3,
    replica_concurrency=16,
)


def test_defaults_are_a_valid_load_policy() -> None:
    policy = Policy(model="m", tier="decode")
    policy.validate()
    assert (policy.mode, policy.min_replicas, policy.max_replicas) == ("load", 1, 8)
    assert (policy.target_utilization, policy.replica_concurrency) == (0.7, 8)
    assert (policy.window_s, policy.scale_down_delay_s, policy.max_step) == (30.0, 60.0, 2)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": ""}, "model must not be empty"),
        ({"model": "a b"}, "model 'a b' cannot name a policy"),
        ({"model": "org//m"}, "model 'org//m' cannot name a policy"),
        ({"tier": "aggregated"}, "tier must be prefill or decode, not 'aggregated'"),
        ({"mode": "cpu"}, "mode must be load or sla, not 'cpu'"),
        ({"min_replicas": -1}, "min_replicas must be >= 0, not -1"),
        ({"max_replicas": 0, "min_replicas": 0}, "max_replicas must be >= 1, not 0"),
        (
            {"min_replicas": 5, "max_replicas": 3},
            "min_replicas (5) must not exceed max_replicas (3)",
        ),
        ({"window_s": -1.0}, "window_s must be a positive number of seconds, not -1.0"),
        ({"window_s": 0.0}, "window_s must be a positive number of seconds, not 0.0"),
        ({"window_s": float("nan")}, "window_s must be a positive number of seconds, not nan"),
        ({"scale_down_delay_s": -5.0}, "scale_down_delay_s must be >= 0 seconds, not -5.0"),
        ({"max_step": 0}, "max_step must be >= 1, not 0"),
        ({"replica_concurrency": 0}, "replica_concurrency must be >= 1, not 0"),
        ({"target_utilization": 0.0}, "target_utilization must be in (0, 1], not 0.0"),
        ({"target_utilization": 1.5}, "target_utilization must be in (0, 1], not 1.5"),
        ({"target_ttft_s": -0.1}, "target_ttft_s must be >= 0 seconds (0: unset), not -0.1"),
        ({"target_itl_s": float("inf")}, "target_itl_s must be >= 0 seconds (0: unset), not inf"),
        ({"mode": "sla"}, "sla mode for the decode tier needs target_itl_s > 0"),
        (
            {"mode": "sla", "tier": "prefill"},
            "sla mode for the prefill tier needs target_ttft_s > 0",
        ),
        ({"mode": "sla", "target_ttft_s": 0.5}, "sla mode for the decode tier needs target_itl_s"),
    ],
)
def test_each_bad_field_is_refused_by_name(changes: dict[str, Any], message: str) -> None:
    policy = dataclasses.replace(Policy(model="m", tier="decode"), **changes)
    with pytest.raises(InvalidRequestError, match="^" + re.escape(message)) as caught:
        policy.validate()
    assert status_of(caught.value) == grpc.StatusCode.INVALID_ARGUMENT


def test_limits_themselves_are_accepted() -> None:
    edges = Policy(
        model="m", tier="prefill", min_replicas=0, max_replicas=1, target_utilization=1.0,
        scale_down_delay_s=0.0,
    )  # fmt: skip
    edges.validate()
    SLA_PREFILL.validate()


def test_proto_round_trip() -> None:
    message = SLA_PREFILL.to_proto()
    assert message.tier == common_pb2.TIER_PREFILL
    assert message.mode == autoscaler_pb2.SCALING_MODE_SLA
    assert (message.min_replicas, message.max_replicas, message.max_step) == (0, 12, 3)
    back = Policy.from_proto(autoscaler_pb2.ScalingPolicy.FromString(message.SerializeToString()))
    if "replica_concurrency" in message.DESCRIPTOR.fields_by_name:
        assert back == SLA_PREFILL
    else:  # the field is not on the wire yet: it comes back as the default
        assert back == dataclasses.replace(SLA_PREFILL, replica_concurrency=8)


@pytest.mark.parametrize(
    ("tier", "mode", "message"),
    [
        (common_pb2.TIER_AGGREGATED, autoscaler_pb2.SCALING_MODE_LOAD, "not 'aggregated'"),
        (common_pb2.TIER_UNSPECIFIED, autoscaler_pb2.SCALING_MODE_LOAD, "not 'unspecified'"),
        (7, autoscaler_pb2.SCALING_MODE_LOAD, "tier must be prefill or decode, not '7'"),
        (common_pb2.TIER_DECODE, autoscaler_pb2.SCALING_MODE_UNSPECIFIED, "not 'unspecified'"),
        (common_pb2.TIER_DECODE, 9, "mode must be load or sla, not '9'"),
    ],
)
def test_unknown_enum_values_from_the_wire_are_refused(tier: Any, mode: Any, message: str) -> None:
    wire = autoscaler_pb2.ScalingPolicy(
        model="m", tier=tier, mode=mode, max_replicas=2, target_utilization=0.5, window_s=10,
        max_step=1,
    )  # fmt: skip
    policy = Policy.from_proto(autoscaler_pb2.ScalingPolicy.FromString(wire.SerializeToString()))
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        policy.validate()
    with pytest.raises(InvalidRequestError):
        policy.to_proto()


def test_proto_zeros_are_judged_not_filled_in() -> None:
    """An unset window on the wire is a zero window: refused, not silently defaulted."""
    bare = autoscaler_pb2.ScalingPolicy(
        model="m", tier=common_pb2.TIER_DECODE, mode=autoscaler_pb2.SCALING_MODE_LOAD,
        max_replicas=4, target_utilization=0.5, max_step=1,
    )  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"^window_s"):
        Policy.from_proto(bare).validate()


def test_tier_conversions() -> None:
    assert tier_to_proto("decode") == common_pb2.TIER_DECODE
    assert tier_from_proto(common_pb2.TIER_PREFILL) == "prefill"
    with pytest.raises(InvalidRequestError, match="not 'aggregated'"):
        tier_to_proto("aggregated")


def test_json_round_trip() -> None:
    text = SLA_PREFILL.to_json()
    assert json.loads(text)["model"] == "org/SmolLM2-135M"
    assert Policy.from_json(text) == SLA_PREFILL
    assert Policy.from_json(text.encode()) == SLA_PREFILL


def test_json_missing_fields_take_defaults_and_integers_read_as_numbers() -> None:
    policy = Policy.from_json('{"model": "m", "tier": "decode", "window_s": 10, "max_step": 3.0}')
    assert policy == Policy(model="m", tier="decode", window_s=10.0, max_step=3)
    assert isinstance(policy.window_s, float)
    assert isinstance(policy.max_step, int)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "a policy must be a JSON object: "),
        ("[1, 2]", "a policy must be a JSON object, not list"),
        ('{"tier": "decode"}', "a policy needs model"),
        ('{"model": "m"}', "a policy needs tier"),
        (
            '{"model": "m", "tier": "decode", "max_replica": 4}',
            "unknown policy field(s): max_replica",
        ),
        (
            '{"model": "m", "tier": "decode", "max_step": 1.5}',
            "max_step must be an integer, not 1.5",
        ),
        (
            '{"model": "m", "tier": "decode", "max_step": true}',
            "max_step must be an integer, not true",
        ),
        (
            '{"model": "m", "tier": "decode", "window_s": "30"}',
            'window_s must be a number, not "30"',
        ),
        ('{"model": 3, "tier": "decode"}', "model must be a string, not 3"),
        ('{"model": "m", "tier": "decode", "max_step": Infinity}', "max_step must be an integer"),
    ],
)
def test_bad_json_is_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match="^" + re.escape(message)):
        Policy.from_json(text)


def test_json_with_an_unknown_tier_parses_and_is_refused_by_validate() -> None:
    policy = Policy.from_json('{"model": "m", "tier": "embed"}')
    with pytest.raises(InvalidRequestError, match="not 'embed'"):
        policy.validate()
