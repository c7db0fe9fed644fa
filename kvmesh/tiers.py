"""The two worker tiers, by name and as the proto enum `kvmesh.v1.Tier`: one mapping for all."""

from __future__ import annotations

from kvmesh.api.v1 import common_pb2

PREFILL = "prefill"
DECODE = "decode"
TIERS = (PREFILL, DECODE)

_TO_PROTO: dict[str, common_pb2.Tier.ValueType] = {
    PREFILL: common_pb2.TIER_PREFILL,
    DECODE: common_pb2.TIER_DECODE,
}


def to_proto(tier: str) -> common_pb2.Tier.ValueType:
    """'prefill' / 'decode' -> the enum value; `KeyError` for any other name."""
    return _TO_PROTO[tier]


def from_proto(value: int) -> str:
    """The enum value -> 'prefill' / 'decode'; another value -> its enum name lowercased without
    the prefix ('unspecified'), or its number as text when this build does not know it, so
    that callers can refuse it by name."""
    try:
        return str(common_pb2.Tier.Name(value)).removeprefix("TIER_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(value)
