"""A scaling policy for one model and tier: what the operator asks the autoscaler to do.

`Policy` mirrors the proto `ScalingPolicy` and converts
to and from it and to and from the JSON kept in Consul KV. Conversions are faithful: an unknown
tier or mode survives the conversion as a name (`"aggregated"`, `"unspecified"`, `"7"`) and is
refused by `validate()`, so every way in — RPC, KV, code — meets the same messages, and
`InvalidRequestError` becomes INVALID_ARGUMENT at the gRPC edge (`kvmesh/rpc/errors.py`).

Load mode sizes a tier so that each replica runs `replica_concurrency x target_utilization`
requests; SLA mode sizes prefill from the time to first token and decode from the inter-token
latency. See `decide.py` for how the numbers are used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from kvmesh import tiers
from kvmesh.api.v1 import autoscaler_pb2, common_pb2
from kvmesh.errors import InvalidRequestError
from kvmesh.tiers import DECODE, PREFILL, TIERS

__all__ = ["DECODE", "LOAD", "MODES", "PREFILL", "SLA", "TIERS", "Policy"]

LOAD = "load"
SLA = "sla"
MODES = (LOAD, SLA)

_MODE_TO_PROTO = {LOAD: autoscaler_pb2.SCALING_MODE_LOAD, SLA: autoscaler_pb2.SCALING_MODE_SLA}
# A model name becomes a path segment of a KV key and of an HTTP URL: no empty segments, no
# characters that end or escape a URL path.
_BAD_MODEL = re.compile(r"[\s?#%]|^/|/$|//")

DEFAULT_REPLICA_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class Policy:
    """How to size one (model, tier). Build freely; call `validate()` before trusting it."""

    model: str
    tier: str  # "prefill" | "decode"
    min_replicas: int = 1  # 0: scale to zero; the first request wakes the tier
    max_replicas: int = 8
    mode: str = LOAD  # "load" | "sla"
    target_utilization: float = 0.7  # load: the fraction of replica_concurrency to aim for
    target_ttft_s: float = 0.0  # sla, prefill: p90 time to first token over the window
    target_itl_s: float = 0.0  # sla, decode: mean inter-token latency over the window
    window_s: float = 30.0  # observations older than this are forgotten
    scale_down_delay_s: float = 60.0  # how long "fewer would do" must last before removing any
    max_step: int = 2  # replicas added or removed per decision
    replica_concurrency: int = DEFAULT_REPLICA_CONCURRENCY  # load: requests one replica takes

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first field that is wrong."""
        if not self.model:
            _fail("model must not be empty")
        if _BAD_MODEL.search(self.model):
            _fail(
                f"model {self.model!r} cannot name a policy: no whitespace, '?', '#', '%', "
                "and no empty path segments"
            )
        if self.tier not in TIERS:
            _fail(f"tier must be prefill or decode, not {self.tier!r}")
        if self.mode not in MODES:
            _fail(f"mode must be load or sla, not {self.mode!r}")
        if self.min_replicas < 0:
            _fail(f"min_replicas must be >= 0, not {self.min_replicas}")
        if self.max_replicas < 1:
            _fail(f"max_replicas must be >= 1, not {self.max_replicas}")
        if self.min_replicas > self.max_replicas:
            _fail(
                f"min_replicas ({self.min_replicas}) must not exceed "
                f"max_replicas ({self.max_replicas})"
            )
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            _fail(f"window_s must be a positive number of seconds, not {self.window_s}")
        if not (math.isfinite(self.scale_down_delay_s) and self.scale_down_delay_s >= 0):
            _fail(f"scale_down_delay_s must be >= 0 seconds, not {self.scale_down_delay_s}")
        if self.max_step < 1:
            _fail(f"max_step must be >= 1, not {self.max_step}")
        if self.replica_concurrency < 1:
            _fail(f"replica_concurrency must be >= 1, not {self.replica_concurrency}")
        if not 0 < self.target_utilization <= 1:
            _fail(f"target_utilization must be in (0, 1], not {self.target_utilization}")
        for name in ("target_ttft_s", "target_itl_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                _fail(f"{name} must be >= 0 seconds (0: unset), not {value}")
        if self.mode == SLA:
            needed = "target_ttft_s" if self.tier == PREFILL else "target_itl_s"
            if getattr(self, needed) <= 0:
                _fail(f"sla mode for the {self.tier} tier needs {needed} > 0")

    # -- proto -------------------------------------------------------------------------------------

    def to_proto(self) -> autoscaler_pb2.ScalingPolicy:
        """The wire form; validates first, since an unknown tier or mode has no enum value."""
        self.validate()
        message = autoscaler_pb2.ScalingPolicy(
            model=self.model,
            tier=tiers.to_proto(self.tier),
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            mode=_MODE_TO_PROTO[self.mode],
            target_utilization=self.target_utilization,
            target_ttft_s=self.target_ttft_s,
            target_itl_s=self.target_itl_s,
            window_s=self.window_s,
            scale_down_delay_s=self.scale_down_delay_s,
            max_step=self.max_step,
            replica_concurrency=self.replica_concurrency,
        )
        return message

    @classmethod
    def from_proto(cls, message: autoscaler_pb2.ScalingPolicy) -> Policy:
        """Field for field; proto zeros stay zeros (validate() judges them) except
        replica_concurrency, which clients that predate it leave at 0."""
        return cls(
            model=message.model,
            tier=tier_from_proto(message.tier),
            min_replicas=message.min_replicas,
            max_replicas=message.max_replicas,
            mode=_enum_name(autoscaler_pb2.ScalingMode, message.mode, "SCALING_MODE_"),
            target_utilization=message.target_utilization,
            target_ttft_s=message.target_ttft_s,
            target_itl_s=message.target_itl_s,
            window_s=message.window_s,
            scale_down_delay_s=message.scale_down_delay_s,
            max_step=message.max_step,
            replica_concurrency=message.replica_concurrency or DEFAULT_REPLICA_CONCURRENCY,
        )

    # -- JSON (Consul KV) --------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Policy:
        """Parse a stored policy. Missing fields take their defaults (older writers); unknown
        fields and wrong types are refused, so that a typo in a hand-written value is not
        silently ignored."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"a policy must be a JSON object: {e}") from e
        if not isinstance(data, dict):
            _fail(f"a policy must be a JSON object, not {type(data).__name__}")
        return cls(**_typed_fields(data))


def _typed_fields(data: Mapping[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(Policy)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _fail(f"unknown policy field(s): {', '.join(unknown)}")
    for required in ("model", "tier"):
        if required not in data:
            _fail(f"a policy needs {required}")
    typed: dict[str, Any] = {}
    for name, value in data.items():
        kind = str(fields[name].type)  # a string under `from __future__ import annotations`
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "str" and isinstance(value, str):
            typed[name] = value
        elif kind == "int" and is_number and math.isfinite(value) and value == int(value):
            typed[name] = int(value)  # 2 and 2.0 alike: JSON does not tell them apart
        elif kind == "float" and is_number:
            typed[name] = float(value)
        else:
            wanted = {"str": "a string", "int": "an integer"}.get(kind, "a number")
            _fail(f"{name} must be {wanted}, not {json.dumps(value)}")
    return typed


def tier_to_proto(tier: str) -> common_pb2.Tier.ValueType:
    """The proto enum of a scaled tier; `InvalidRequestError` for any other."""
    if tier not in TIERS:
        _fail(f"tier must be prefill or decode, not {tier!r}")
    return tiers.to_proto(tier)


def tier_from_proto(tier: common_pb2.Tier.ValueType) -> str:
    """'prefill' / 'decode', or the name of a tier the autoscaler does not scale (validate()
    refuses those)."""
    return tiers.from_proto(tier)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """'TIER_DECODE' -> 'decode'; a value this build does not know -> its number as text."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _fail(message: str) -> NoReturn:
    raise InvalidRequestError(message)
