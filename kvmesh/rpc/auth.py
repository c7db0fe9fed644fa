"""The auth hook: a bearer token guarding the methods that need one (admin RPCs)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

import structlog

from kvmesh.errors import AuthenticationError

AUTHORIZATION_KEY = "authorization"


class TokenAuthenticator:
    """Methods whose full name starts with one of `prefixes` need `authorization: Bearer TOKEN`."""

    def __init__(self, token: str, prefixes: Sequence[str]) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._token = token.encode()
        self._prefixes = tuple(prefixes)

    def authenticate(self, method: str, metadata: Mapping[str, str]) -> None:
        if not method.startswith(self._prefixes):
            return
        scheme, _, presented = metadata.get(AUTHORIZATION_KEY, "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise AuthenticationError(f"{method} needs 'authorization: Bearer <admin token>'")
        if not hmac.compare_digest(presented.encode(), self._token):
            raise AuthenticationError("the admin token is not valid")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


def admin_authenticator(token: str | None, service: str) -> TokenAuthenticator | None:
    """Every method of `service` (a full name, `kvmesh.v1.ControlPlane`) behind `token`; None,
    with a warning, when there is no token (development only: the RPCs are then open)."""
    if token:
        return TokenAuthenticator(token, [f"/{service}/"])
    structlog.get_logger(__name__).warning(
        "no admin token: the RPCs are open to anyone who can connect", service=service
    )
    return None
