"""ACLs for the embedded registry, with Consul's semantics for the part kvmesh uses.

`kvmesh registry --acl-bootstrap-token-file F` turns them on with F's token as the bootstrap
(management) token, as `consul acl bootstrap` gives one. From then on (Consul's
`default_policy = "deny"` for writes):

- every write (PUT, POST, DELETE: registering and deregistering services and checks, TTL
  updates, KV writes) needs that token, or the answer is 403 "Permission denied";
- reads (catalog, health, KV reads, blocking queries) are open, unless `--acl-read-requires-
  token`, when they need it too.

The token is read as Consul reads it: the `X-Consul-Token` header, `Authorization: Bearer`,
or the `?token=` query parameter. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from kvmesh.discovery.registry.errors import RegistryError

TOKEN_HEADER = "X-Consul-Token"
_WRITES = frozenset({"PUT", "POST", "DELETE", "PATCH"})


class PermissionDeniedError(RegistryError):
    status = 403


@dataclass(frozen=True, slots=True)
class AclConfig:
    token: str  # the bootstrap token: every right
    reads_need_token: bool = False

    @classmethod
    def from_file(cls, path: Path, *, reads_need_token: bool = False) -> AclConfig:
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"the ACL bootstrap token file {path} is empty")
        return cls(token, reads_need_token)

    def check(self, request: web.Request) -> None:
        """Raise PermissionDeniedError (403) unless the request may do what it asks."""
        needed = request.method in _WRITES or self.reads_need_token
        if needed and not hmac.compare_digest(_token_of(request).encode(), self.token.encode()):
            raise PermissionDeniedError("Permission denied")


def _token_of(request: web.Request) -> str:
    token = request.headers.get(TOKEN_HEADER, "")
    if not token:
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        token = bearer if scheme.lower() == "bearer" else ""
    return token or request.query.get("token", "")
