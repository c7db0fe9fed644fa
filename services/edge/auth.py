"""API keys and per-key rate limits at the edge, as OpenAI's API answers them.

`--api-key-file F` holds one key per line: `KEY TENANT [rps=N] [tpm=N]` (`#` starts a comment).
A request to `/v1/...` must carry `Authorization: Bearer KEY`: without one, or with a key not in
the file, the answer is 401 with OpenAI's error body. The key's tenant salts the prefix cache
(`GenerateRequest.tenant`), so tenants never hit each other's cached blocks.

Rate limits are token buckets per key: requests per second (`rps`, burst of one second's worth)
and tokens per minute (`tpm`: prompt and completion tokens as the usage reports them, charged
when a request ends; a key in debt is refused until the bucket refills). Past a limit the
answer is 429 with `Retry-After` (seconds) and OpenAI's `rate_limit_exceeded` error.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.edge.errors import ApiError, StartupError


class AuthenticationError(ApiError):
    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message, status=401, type="invalid_request_error", code=code)


class RateLimitError(ApiError):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, status=429, type="requests", code="rate_limit_exceeded")
        self.retry_after_s = max(1, math.ceil(retry_after_s))


@dataclass(slots=True)
class Bucket:
    """A token bucket: `rate` per second, holding at most `capacity`; may go into debt."""

    rate: float
    capacity: float
    level: float = field(init=False)
    at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_s(self, amount: float, now: float) -> float:
        """0 if `amount` can be taken now, else the seconds until it can."""
        self._refill(now)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount


@dataclass(slots=True)
class ApiKey:
    tenant: str
    rps: float | None
    tpm: float | None
    requests: Bucket | None = None
    tokens: Bucket | None = None

    def __post_init__(self) -> None:
        if self.rps:
            self.requests = Bucket(self.rps, max(1.0, self.rps))
        if self.tpm:
            self.tokens = Bucket(self.tpm / 60.0, self.tpm)


class ApiKeys:
    """The keys of an `--api-key-file`, by the SHA-256 of the key (no key is kept in clear)."""

    def __init__(self, keys: dict[bytes, ApiKey]) -> None:
        self._keys = keys

    @classmethod
    def load(cls, path: Path, *, rps: float | None, tpm: float | None) -> ApiKeys:
        keys: dict[bytes, ApiKey] = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise StartupError(f"cannot read --api-key-file {path}: {e.strerror}") from e
        for number, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) < 2:
                raise StartupError(f"{path}:{number}: expected 'KEY TENANT [rps=N] [tpm=N]'")
            limits = {"rps": rps, "tpm": tpm}
            for option in words[2:]:
                name, sep, value = option.partition("=")
                try:
                    if not sep or name not in limits or float(value) <= 0:
                        raise ValueError
                    limits[name] = float(value)
                except ValueError:
                    raise StartupError(
                        f"{path}:{number}: {option!r} is not rps=N or tpm=N with N > 0"
                    ) from None
            digest = _digest(words[0])
            if digest in keys:
                raise StartupError(f"{path}:{number}: a key appears twice")
            keys[digest] = ApiKey(words[1], limits["rps"], limits["tpm"])
        if not keys:
            raise StartupError(f"--api-key-file {path} holds no key")
        return cls(keys)

    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key an `Authorization` header presents; AuthenticationError (401) otherwise."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        key = self._keys.get(_digest(presented.strip()))
        if key is None:
            raise AuthenticationError(
                f"Incorrect API key provided: {_redact(presented.strip())}.",
                code="invalid_api_key",
            )
        return key

    @staticmethod
    def admit(key: ApiKey, now: float | None = None) -> None:
        """Count one request against the key's limits; RateLimitError (429) past them."""
        now = time.monotonic() if now is None else now
        waits = []
        if key.requests is not None and (wait := key.requests.wait_s(1.0, now)) > 0:
            waits.append((wait, f"requests per second ({key.rps:g})"))
        if key.tokens is not None and (wait := key.tokens.wait_s(0.0, now)) > 0:
            waits.append((wait, f"tokens per minute ({key.tpm:g})"))
        if waits:
            wait, what = max(waits)
            raise RateLimitError(
                f"Rate limit reached for {what} of this API key. Please try again in "
                f"{math.ceil(wait)}s.",
                retry_after_s=wait,
            )
        if key.requests is not None:
            key.requests.take(1.0, now)

    @staticmethod
    def charge(key: ApiKey, tokens: int, now: float | None = None) -> None:
        """Count a finished request's tokens against the key's tokens per minute."""
        if key.tokens is not None and tokens > 0:
            key.tokens.take(float(tokens), time.monotonic() if now is None else now)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _redact(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)
