"""`kvmesh certs init`: a certificate authority and one certificate per role.

Keys are ECDSA P-256. Each role's certificate is valid for both ends of a connection (server
and client authentication) and carries:

- its identity as a URI SAN, `spiffe://kvmesh/<cluster>/<role>`, which authorization reads;
- the DNS name `kvmesh` (`TARGET_NAME`), which every channel verifies in place of a host name
  (services find each other by address through the registry: the identity is what matters),
  and `localhost`, 127.0.0.1 and any `hosts` given, for tools that check host names.

Files in DIR: `ca.pem`, `ca-key.pem`, `<role>.pem`, `<role>-key.pem`; keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvmesh.errors import InvalidRequestError
from kvmesh.security.roles import Role, spiffe_id

TARGET_NAME = "kvmesh"
CA_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"


def cert_file(role: Role) -> str:
    return f"{role.value}.pem"


def key_file(role: Role) -> str:
    return f"{role.value}-key.pem"


def init(
    directory: Path,
    *,
    cluster: str = "local",
    roles: Iterable[Role] = tuple(Role),
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> list[Path]:
    """Write a CA and the roles' certificates into `directory`; the paths written."""
    if days < 1:
        raise InvalidRequestError("days must be at least 1")
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / CA_FILE).exists() and not force:
        raise InvalidRequestError(f"{directory / CA_FILE} exists; pass --force to replace it")
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvmesh CA ({cluster})")])
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    written = [_write_cert(directory / CA_FILE, ca), _write_key(directory / CA_KEY_FILE, ca_key)]
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_id(cluster, role)),
            x509.DNSName(TARGET_NAME),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        names += [_host_name(h) for h in hosts]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvmesh {role.value}")])
        cert = (
            _builder(subject, ca_name, key.public_key(), now, days)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        written += [
            _write_cert(directory / cert_file(role), cert),
            _write_key(directory / key_file(role), key),
        ]
    return written


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    return path


def identity_of(cert_pem: bytes) -> str | None:
    """The SPIFFE URI SAN of a PEM certificate, if it has one."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)]
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None
