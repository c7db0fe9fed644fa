"""Identities, mutual TLS and authorization (issue 12; docs/security.md).

- `roles`: the roles a kvmesh process plays, and their SPIFFE-style identities
  `spiffe://kvmesh/<cluster>/<role>`.
- `certs`: `kvmesh certs init`: a CA and one certificate per role (the `cryptography` library).
- `tls`: a process's identity loaded from a TLS directory; the credentials every gRPC server
  and channel uses once it is set; the caller's role read from the peer's certificate.
- `authz`: who may call which RPC, in one table, enforced on every call.

Everything here is torch-free.
"""
