"""Where a registry client connects and how, from the address and Consul's variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.discovery.client import RegistryEndpoint
from kvmesh.security import certs, tls
from kvmesh.security.roles import Role
from kvmesh.security.tls import TlsIdentity

CONSUL_VARIABLES = (
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONSUL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_a_bare_address_is_http() -> None:
    endpoint = RegistryEndpoint.parse("10.0.0.5:8500")
    assert (endpoint.scheme, endpoint.host, endpoint.port, endpoint.cert) == (
        "http",
        "10.0.0.5",
        8500,
        None,
    )
    assert RegistryEndpoint.parse(None).host_port == "127.0.0.1:8500"


def test_the_scheme_comes_from_the_address_or_consul_http_ssl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert RegistryEndpoint.parse("https://reg:8501").url == "https://reg:8501"
    assert RegistryEndpoint.parse("http://reg:8500/").url == "http://reg:8500"
    monkeypatch.setenv("CONSUL_HTTP_SSL", "true")
    assert RegistryEndpoint.parse("reg:8501").scheme == "https"
    assert RegistryEndpoint.parse("http://reg:8500").scheme == "http"  # explicit wins
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "[::1]:8501")
    assert RegistryEndpoint.parse(None).url == "https://[::1]:8501"


@pytest.mark.parametrize("address", ["ftp://reg:1", "reg", "reg:port", "https://reg"])
def test_a_malformed_address_says_what_is_wrong(address: str) -> None:
    with pytest.raises(ValueError, match="registry address"):
        RegistryEndpoint.parse(address)


def test_https_trusts_the_identitys_ca_and_presents_its_certificate(tmp_path: Path) -> None:
    certs.init(tmp_path)
    tls.use(TlsIdentity.load(tmp_path, Role.DECODE))
    try:
        endpoint = RegistryEndpoint.parse("https://reg:8501")
        plain = RegistryEndpoint.parse("reg:8500")
    finally:
        tls.use(None)
    assert endpoint.verify == str(tmp_path / certs.CA_FILE)
    assert endpoint.cert == (str(tmp_path / "decode.pem"), str(tmp_path / "decode-key.pem"))
    assert plain.cert is None  # nothing to present over plain HTTP


def test_consuls_variables_override_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_CACERT", "/etc/ca.pem")
    monkeypatch.setenv("CONSUL_CLIENT_CERT", "/etc/me.pem")
    monkeypatch.setenv("CONSUL_CLIENT_KEY", "/etc/me-key.pem")
    endpoint = RegistryEndpoint.parse("https://reg:8501")
    assert (endpoint.verify, endpoint.cert) == ("/etc/ca.pem", ("/etc/me.pem", "/etc/me-key.pem"))
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    assert RegistryEndpoint.parse("https://reg:8501").verify is False
