"""The `Autoscaler` RPCs: read and change policies, list recent decisions with their reasons.

Policies go through `PolicyStore` (Consul KV), so a change made here reaches the tick loop of
every autoscaler on its next tick, exactly like one made with `consul kv put`. Bad input raises
`InvalidRequestError` naming the field (INVALID_ARGUMENT at the edge); a registry that cannot be
reached is UNAVAILABLE, which clients may retry. Authentication is the server's business
(`TokenAuthenticator`), not this class's.
"""

from __future__ import annotations

from typing import Any

from kvmesh.api.v1 import autoscaler_pb2, autoscaler_pb2_grpc
from kvmesh.discovery import DiscoveryError
from kvmesh.errors import InvalidRequestError
from kvmesh.rpc.errors import UnavailableError
from services.autoscaler.loop import DecisionLog
from services.autoscaler.policy import Policy, tier_from_proto
from services.autoscaler.store import PolicyStore


class AutoscalerServicer(autoscaler_pb2_grpc.AutoscalerServicer):
    def __init__(self, store: PolicyStore, decisions: DecisionLog) -> None:
        self._store = store
        self._decisions = decisions

    async def GetPolicy(
        self, request: autoscaler_pb2.GetPolicyRequest, context: Any
    ) -> autoscaler_pb2.ScalingPolicy:
        """The stored policy, or the default one: every valid (model, tier) has a policy."""
        tier = tier_from_proto(request.tier)
        Policy(model=request.model, tier=tier).validate()  # empty model, unknown tier
        try:
            policy = await self._store.get(request.model, tier)
        except DiscoveryError as e:
            raise UnavailableError(f"the policy store is unavailable: {e}") from e
        return policy.to_proto()

    async def SetPolicy(
        self, request: autoscaler_pb2.SetPolicyRequest, context: Any
    ) -> autoscaler_pb2.ScalingPolicy:
        """Validate, store, and echo the policy as stored (replica_concurrency 0 -> default)."""
        if not request.HasField("policy"):
            raise InvalidRequestError("policy is required")
        policy = Policy.from_proto(request.policy)
        policy.validate()
        try:
            await self._store.put(policy)
        except DiscoveryError as e:
            raise UnavailableError(f"the policy store is unavailable: {e}") from e
        return policy.to_proto()

    async def ListDecisions(
        self, request: autoscaler_pb2.ListDecisionsRequest, context: Any
    ) -> autoscaler_pb2.ListDecisionsResponse:
        """Newest first; `limit` 0 means 50, and at most 1000 are returned."""
        decisions = self._decisions.recent(request.model, request.limit)
        return autoscaler_pb2.ListDecisionsResponse(decisions=[d.to_proto() for d in decisions])
