"""The embedded registry over HTTPS (`kvmesh registry --tls-dir`): kvmesh's client reaches it
through an `https://` address or `CONSUL_HTTP_SSL`, trusting the mesh's CA; a client that does
not trust the CA fails, and with `verify_incoming` a client without a certificate of the CA
fails its handshake."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.discovery import Discovery
from kvmesh.discovery.client import DiscoveryError
from kvmesh.discovery.registry import EmbeddedRegistry
from kvmesh.security import certs, tls
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    certs.init(directory)
    return directory


@pytest.fixture
def as_router(tls_dir: Path) -> Iterator[TlsIdentity]:
    """This process holds the router's identity, as a service started with --tls-dir does."""
    identity = TlsIdentity.load(tls_dir, Role.ROUTER)
    tls.use(identity)
    yield identity
    tls.use(None)


def registry_identity(tls_dir: Path) -> TlsIdentity:
    return TlsIdentity.load(tls_dir, Role.REGISTRY)


async def test_the_client_writes_and_reads_over_https(
    tls_dir: Path, as_router: TlsIdentity
) -> None:
    async with EmbeddedRegistry(port=0, tls=registry_identity(tls_dir)) as registry:
        assert registry.url().startswith("https://")
        async with Discovery(registry.url()) as discovery:
            assert await discovery.kv_put("kvmesh/x", b"over-tls")
            _, entry = await discovery.kv_get("kvmesh/x")
    assert entry is not None and entry.value == b"over-tls"


async def test_consul_http_ssl_turns_a_bare_address_into_https(
    tls_dir: Path, as_router: TlsIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with EmbeddedRegistry(port=0, tls=registry_identity(tls_dir)) as registry:
        async with Discovery(registry.address()) as plain:  # http:// to an HTTPS listener
            with pytest.raises(DiscoveryError):
                await plain.kv_get("kvmesh/x")
        monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
        async with Discovery(registry.address()) as discovery:
            assert discovery.address == registry.url()
            assert (await discovery.kv_get("kvmesh/x"))[1] is None


async def test_a_client_that_does_not_trust_the_ca_fails(tls_dir: Path) -> None:
    # No identity and no CONSUL_CACERT: the system's CAs, which did not sign the registry.
    registry = EmbeddedRegistry(port=0, tls=registry_identity(tls_dir))
    async with registry, Discovery(registry.url()) as discovery:
        with pytest.raises(DiscoveryError, match="unreachable"):
            await discovery.kv_get("kvmesh/x")


async def test_verify_incoming_needs_a_client_certificate_of_the_ca(
    tls_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = registry_identity(tls_dir)
    async with EmbeddedRegistry(port=0, tls=identity, verify_incoming=True) as registry:
        monkeypatch.setenv("CONSUL_CACERT", str(tls_dir / certs.CA_FILE))  # trusts, no cert
        async with Discovery(registry.url()) as anonymous:
            with pytest.raises(DiscoveryError):
                await anonymous.kv_get("kvmesh/x")
        monkeypatch.setenv("CONSUL_CLIENT_CERT", str(tls_dir / certs.cert_file(Role.ADMIN)))
        monkeypatch.setenv("CONSUL_CLIENT_KEY", str(tls_dir / certs.key_file(Role.ADMIN)))
        async with Discovery(registry.url()) as admin:
            assert (await admin.kv_get("kvmesh/x"))[1] is None
