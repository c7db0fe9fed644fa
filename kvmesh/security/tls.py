"""A process's TLS identity, the credentials built from it, and the caller's role on a call.

A service loads its identity once (`--tls-dir DIR`, or `KVMESH_TLS_DIR`) and sets it for the
process (`use`); from then on `RpcServer` listens with mutual TLS (a client without a
certificate from the same CA fails its handshake) and `open_channel` presents the identity's
certificate and verifies the server's. Channels verify the name `kvmesh` that every kvmesh
certificate carries, not the host name: who the peer is, is its role, read by authorization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvmesh.errors import InvalidRequestError
from kvmesh.security import certs
from kvmesh.security.roles import Role, parse_spiffe_id

TLS_DIR_ENV = "KVMESH_TLS_DIR"


@dataclass(frozen=True, slots=True)
class TlsIdentity:
    role: Role
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    directory: Path

    @classmethod
    def load(cls, directory: str | Path, role: Role) -> TlsIdentity:
        """The CA and `role`'s certificate and key from a `kvmesh certs init` directory."""
        directory = Path(directory)
        paths = [
            directory / certs.CA_FILE,
            directory / certs.cert_file(role),
            directory / certs.key_file(role),
        ]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise InvalidRequestError(
                f"TLS directory {directory} lacks {', '.join(missing)} "
                "(create it with `kvmesh certs init --dir DIR`)"
            )
        ca, cert, key = (p.read_bytes() for p in paths)
        identity = certs.identity_of(cert)
        if identity is None or parse_spiffe_id(identity)[1] is not role:
            raise InvalidRequestError(f"{paths[1]} does not carry the {role.value} identity")
        return cls(role, ca, cert, key, directory)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", certs.TARGET_NAME)]


_identity: TlsIdentity | None = None


def use(identity: TlsIdentity | None) -> None:
    """Set (or clear) this process's identity: servers and channels opened after it use it."""
    global _identity
    _identity = identity


def current() -> TlsIdentity | None:
    return _identity


def configure(directory: str | None, role: Role) -> TlsIdentity | None:
    """Load and use `role`'s identity from `directory` (else `$KVMESH_TLS_DIR`); None: plaintext."""
    directory = directory or os.environ.get(TLS_DIR_ENV) or None
    identity = TlsIdentity.load(directory, role) if directory else None
    use(identity)
    return identity


def peer_role(context: Any) -> Role | None:
    """The caller's role, from the client certificate of a mutual-TLS call; None without one."""
    auth = context.auth_context() or {}
    spiffe = auth.get("peer_spiffe_id") or []
    uri = spiffe[0].decode() if spiffe else None
    if uri is None and auth.get("x509_pem_cert"):
        uri = certs.identity_of(auth["x509_pem_cert"][0])
    if uri is None:
        return None
    try:
        return parse_spiffe_id(uri)[1]
    except InvalidRequestError:
        return None
