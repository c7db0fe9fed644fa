"""The two worker tiers: one `Tier` enum, its names, and the proto enum `kvmesh.v1.Tier`."""

from __future__ import annotations

from enum import Enum

from kvmesh.api.v1 import common_pb2


class Tier(str, Enum):
    """A worker tier. Members are their names (`Tier.PREFILL == "prefill"`), in f-strings too."""

    PREFILL = "prefill"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)

    def to_proto(self) -> common_pb2.Tier.ValueType:
        return _TO_PROTO[self]


PREFILL = Tier.PREFILL
DECODE = Tier.DECODE
TIERS = tuple(Tier)

_TO_PROTO: dict[Tier, common_pb2.Tier.ValueType] = {
    Tier.PREFILL: common_pb2.TIER_PREFILL,
    Tier.DECODE: common_pb2.TIER_DECODE,
}


def to_proto(tier: str) -> common_pb2.Tier.ValueType:
    """'prefill' / 'decode' (or a `Tier`) -> the enum value; `ValueError` for any other name."""
    return Tier(tier).to_proto()


def from_proto(value: int) -> str:
    """The enum value -> 'prefill' / 'decode'; another value -> its enum name lowercased without
    the prefix ('unspecified'), or its number as text when this build does not know it, so
    that callers can refuse it by name."""
    try:
        return str(common_pb2.Tier.Name(value)).removeprefix("TIER_").lower()  # type: ignore[arg-type]
    except ValueError:
        return str(value)
