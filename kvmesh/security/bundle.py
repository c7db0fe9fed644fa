"""Everything `kvmesh up --secure` needs, in one directory (made once, then reused):

    ca.pem, <role>.pem, <role>-key.pem   certificates (`kvmesh certs init`)
    acl-token                            the registry's ACL bootstrap token
    admin-token                          the autoscaler's and control plane's admin token
    api-keys.txt                         the edge's API keys: one, for the tenant "default"

Secrets are random (`secrets.token_urlsafe`) and their files are 0600.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmesh.security import certs


@dataclass(frozen=True, slots=True)
class SecureBundle:
    directory: Path
    acl_token_file: Path
    admin_token: str
    api_keys_file: Path
    api_key: str  # the first key of api-keys.txt, for the banner's examples

    @property
    def ca(self) -> Path:
        return self.directory / certs.CA_FILE


def prepare(directory: Path) -> SecureBundle:
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / certs.CA_FILE).exists():
        certs.init(directory)
    acl = _secret_file(directory / "acl-token", lambda: secrets.token_urlsafe(24))
    admin = _secret_file(directory / "admin-token", lambda: secrets.token_urlsafe(24))
    keys = _secret_file(
        directory / "api-keys.txt",
        lambda: f"sk-kvmesh-{secrets.token_urlsafe(24)} default",
    )
    first = next(line.split()[0] for line in keys.read_text().splitlines() if line.strip())
    return SecureBundle(directory, acl, admin.read_text().strip(), keys, first)


def _secret_file(path: Path, make: Callable[[], str]) -> Path:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(make() + "\n")
    return path
