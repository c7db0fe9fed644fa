"""`kvmesh certs init`'s files, the identities they carry, and the authorization table."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from kvmesh.api.v1 import (
    autoscaler_pb2,
    controlplane_pb2,
    generation_pb2,
    worker_pb2,
)
from kvmesh.errors import AuthorizationError, InvalidRequestError
from kvmesh.security import authz, certs
from kvmesh.security.roles import Role, parse_spiffe_id, spiffe_id
from kvmesh.security.tls import TlsIdentity


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    certs.init(directory, cluster="east", hosts=("10.1.2.3", "gpu-7.internal"))
    return directory


def test_init_writes_a_ca_and_a_certificate_per_role(tls_dir: Path) -> None:
    ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in Role:
        cert = x509.load_pem_x509_certificate((tls_dir / f"{role.value}.pem").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://kvmesh/east/{role.value}"
        ]
        assert {"kvmesh", "localhost", "gpu-7.internal"} <= set(
            sans.get_values_for_type(x509.DNSName)
        )
        assert certs.identity_of((tls_dir / f"{role.value}.pem").read_bytes()) == spiffe_id(
            "east", role
        )
        key_mode = stat.S_IMODE((tls_dir / f"{role.value}-key.pem").stat().st_mode)
        assert key_mode == 0o600


def test_init_refuses_to_replace_a_ca_unless_forced(tls_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="exists; pass --force"):
        certs.init(tls_dir)
    certs.init(tmp_path, roles=[Role.ADMIN])
    before = (tmp_path / "ca.pem").read_bytes()
    certs.init(tmp_path, roles=[Role.ADMIN], force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


def test_spiffe_ids_parse_back_and_bad_ones_are_refused() -> None:
    assert parse_spiffe_id(spiffe_id("c1", Role.DECODE)) == ("c1", Role.DECODE)
    for bad in ("spiffe://other/c1/decode", "spiffe://kvmesh/c1/wizard", "spiffe://kvmesh//edge"):
        with pytest.raises(InvalidRequestError):
            parse_spiffe_id(bad)
    with pytest.raises(InvalidRequestError, match="one non-empty path segment"):
        spiffe_id("a/b", Role.EDGE)


def test_an_identity_loads_only_with_all_its_files_and_its_own_role(
    tls_dir: Path, tmp_path: Path
) -> None:
    identity = TlsIdentity.load(tls_dir, Role.ROUTER)
    assert identity.role is Role.ROUTER
    with pytest.raises(InvalidRequestError, match=r"lacks .*router\.pem"):
        TlsIdentity.load(tmp_path, Role.ROUTER)
    (tmp_path / "ca.pem").write_bytes((tls_dir / "ca.pem").read_bytes())
    (tmp_path / "router.pem").write_bytes((tls_dir / "edge.pem").read_bytes())  # wrong role
    (tmp_path / "router-key.pem").write_bytes((tls_dir / "edge-key.pem").read_bytes())
    with pytest.raises(InvalidRequestError, match="does not carry the router identity"):
        TlsIdentity.load(tmp_path, Role.ROUTER)


def test_every_kvmesh_rpc_is_in_the_authorization_table() -> None:
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (generation_pb2, worker_pb2, autoscaler_pb2, controlplane_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == set(authz.POLICY)


@pytest.mark.parametrize(
    ("method", "caller", "needed"),
    [
        ("/kvmesh.v1.Decode/Decode", Role.EDGE, "router"),
        ("/kvmesh.v1.Prefill/Prefill", Role.DECODE, "router"),
        ("/kvmesh.v1.KvTransfer/GetAgentMetadata", Role.ROUTER, "decode"),
        ("/kvmesh.v1.Worker/Drain", Role.ROUTER, "admin or controlplane"),
        ("/kvmesh.v1.ControlPlane/Scale", Role.AUTOSCALER, "admin"),
        ("/kvmesh.v1.Generation/Generate", None, "admin or edge"),
    ],
)
def test_a_wrong_role_is_refused_naming_the_role_needed(
    method: str, caller: Role | None, needed: str
) -> None:
    with pytest.raises(AuthorizationError, match=f"needs the {needed} role"):
        authz.authorize(method, caller)


def test_right_roles_health_and_reflection_pass_and_unknown_methods_do_not() -> None:
    authz.authorize("/kvmesh.v1.Decode/Decode", Role.ROUTER)
    authz.authorize("/kvmesh.v1.KvTransfer/GetAgentMetadata", Role.DECODE)
    authz.authorize("/kvmesh.v1.Worker/Drain", Role.CONTROLPLANE)
    authz.authorize("/grpc.health.v1.Health/Check", None)
    authz.authorize("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None)
    with pytest.raises(AuthorizationError, match="not in the authorization table"):
        authz.authorize("/kvmesh.v1.Worker/SelfDestruct", Role.ADMIN)
