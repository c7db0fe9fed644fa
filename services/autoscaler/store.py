"""Scaling policies in Consul KV, so that operators change them at run time.

One key per (model, tier): `kvmesh/autoscaler/policies/<model>/<tier>` holding the policy's JSON
(`Policy.to_json`). A model name may contain "/" (`org/name`); the tier is always the last
segment. An absent key means the default policy, so a fresh cluster scales without setup and
deleting a key reverts to the default.

Values can be written by hand (`consul kv put`), so reading one is checked as strictly as an RPC:
`get` raises `StoredPolicyError` for a bad one and `watch` logs and skips it, keeping whatever
the caller had.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import structlog

from kvmesh.discovery import Discovery, KvEntry
from kvmesh.discovery.keys import POLICY_PREFIX
from kvmesh.errors import InvalidRequestError
from services.autoscaler.policy import Policy

log = structlog.get_logger(__name__)


class StoredPolicyError(Exception):
    """A value under the policy prefix is not a valid policy for its key."""


class PolicyStore:
    """Get, put and watch policies through a discovery client (Consul or the embedded registry).

    Registry failures surface as `kvmesh.discovery.DiscoveryError`, except in `watch`, which
    retries like every discovery watch.
    """

    def __init__(
        self,
        discovery: Discovery,
        *,
        datacenter: str | None = None,
        prefix: str = POLICY_PREFIX,
    ) -> None:
        self._discovery = discovery
        self._datacenter = datacenter
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"

    def key(self, model: str, tier: str) -> str:
        return f"{self._prefix}{model}/{tier}"

    async def get(self, model: str, tier: str) -> Policy:
        """The stored policy, or the default one when none is stored."""
        default = Policy(model=model, tier=tier)
        default.validate()  # an unknown tier or unusable model name is the caller's mistake
        _, entry = await self._discovery.kv_get(self.key(model, tier), datacenter=self._datacenter)
        return default if entry is None else self._decode(entry)

    async def put(self, policy: Policy, *, cas: int | None = None) -> bool:
        """Validate, then store. With `cas`, only if the key's ModifyIndex still equals it
        (0: only if absent); returns whether it was written."""
        policy.validate()
        written = await self._discovery.kv_put(
            self.key(policy.model, policy.tier),
            policy.to_json(),
            cas=cas,
            datacenter=self._datacenter,
        )
        if written:
            log.info("autoscaler policy stored", model=policy.model, tier=policy.tier)
        return written

    async def delete(self, model: str, tier: str) -> bool:
        """Forget the stored policy: the (model, tier) goes back to the default."""
        return await self._discovery.kv_delete(self.key(model, tier), datacenter=self._datacenter)

    async def policies(self) -> list[Policy]:
        """Every valid stored policy, in key order; bad values are logged and left out."""
        _, entries = await self._discovery.kv_list(self._prefix, datacenter=self._datacenter)
        policies: list[Policy] = []
        for entry in sorted(entries, key=lambda e: e.key):
            try:
                policies.append(self._decode(entry))
            except StoredPolicyError as e:
                log.warning("autoscaler policy ignored", key=entry.key, error=str(e))
        return policies

    async def watch(self, *, wait_s: float = 30.0) -> AsyncGenerator[Policy, None]:
        """Yield every stored policy now, then each policy that changes (blocking queries).

        A deleted key yields the default policy of its (model, tier); a bad value is logged and
        skipped. Never ends on its own; registry failures are retried.
        """
        seen: dict[str, int] = {}  # key -> ModifyIndex already yielded (or skipped)
        async for entries in self._discovery.kv_watch(
            self._prefix, datacenter=self._datacenter, wait_s=wait_s
        ):
            present = {e.key: e for e in entries}
            for key in sorted(present):
                entry = present[key]
                if seen.get(key) == entry.modify_index:
                    continue
                seen[key] = entry.modify_index
                try:
                    policy = self._decode(entry)
                except StoredPolicyError as e:
                    log.warning("autoscaler policy ignored", key=key, error=str(e))
                    continue
                yield policy
            for key in sorted(set(seen) - set(present)):
                del seen[key]
                reverted = self._default_for(key)
                if reverted is not None:
                    log.info("autoscaler policy deleted; default applies", key=key)
                    yield reverted

    # -- internals ---------------------------------------------------------------------------------

    def _split(self, key: str) -> tuple[str, str]:
        model, _, tier = key.removeprefix(self._prefix).rpartition("/")
        return model, tier

    def _decode(self, entry: KvEntry) -> Policy:
        model, tier = self._split(entry.key)
        try:
            policy = Policy.from_json(entry.value)
            policy.validate()
        except InvalidRequestError as e:
            raise StoredPolicyError(f"{entry.key}: {e}") from e
        if (policy.model, policy.tier) != (model, tier):
            raise StoredPolicyError(
                f"{entry.key}: holds the policy of {policy.model}/{policy.tier}, not of its key"
            )
        return policy

    def _default_for(self, key: str) -> Policy | None:
        policy = Policy(*self._split(key))
        try:
            policy.validate()
        except InvalidRequestError:
            return None  # not a policy key (nothing valid was ever yielded for it)
        return policy
