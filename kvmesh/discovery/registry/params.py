"""Query parameters, read with Consul's rules.

Blocking queries: `index` is an unsigned integer (0: do not block); `wait` is a Go duration,
5 minutes when absent or zero, at most 10 minutes (longer values are cut to 10 minutes), plus
up to wait/16 of random jitter so that many watchers do not return together. A negative,
unparseable or absurd (over a day) wait is refused rather than silently cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from multidict import MultiMapping

from kvmesh.discovery.registry.durations import HOUR, MINUTE, SECOND, parse_duration
from kvmesh.discovery.registry.errors import BadRequestError

DEFAULT_WAIT_NS = 5 * MINUTE
MAX_WAIT_NS = 10 * MINUTE
ABSURD_WAIT_NS = 24 * HOUR
JITTER_FRACTION = 16
_UINT64_MAX = 2**64 - 1
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")

Query = MultiMapping[str]


@dataclass(frozen=True, slots=True)
class BlockingOptions:
    index: int  # 0: answer at once
    wait_s: float  # jitter included


def blocking_options(query: Query) -> BlockingOptions:
    wait_ns = DEFAULT_WAIT_NS
    wait_text = query.get("wait", "")
    if wait_text:
        try:
            wait_ns = parse_duration(wait_text)
        except ValueError as e:
            raise BadRequestError("Invalid wait time") from e
        if wait_ns < 0 or wait_ns > ABSURD_WAIT_NS:
            raise BadRequestError("Invalid wait time")
        wait_ns = min(wait_ns, MAX_WAIT_NS) or DEFAULT_WAIT_NS
    index = 0
    index_text = query.get("index", "")
    if index_text:
        parsed = _uint(index_text)
        if parsed is None:
            raise BadRequestError("Invalid index")
        index = parsed
    wait_s = wait_ns / SECOND
    return BlockingOptions(index, wait_s + random.uniform(0, wait_s / JITTER_FRACTION))


def flag(query: Query, name: str) -> bool:
    """A boolean parameter: absent is false, present without a value is true (Go's ParseBool)."""
    if name not in query:
        return False
    value = query.get(name, "")
    if value == "" or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequestError(f"Invalid value for ?{name}")


def present(query: Query, name: str) -> bool:
    """Consul reads `recurse`, `keys`, `raw` by presence alone (`?recurse=false` recurses)."""
    return name in query


def uint(query: Query, name: str) -> int | None:
    """An unsigned 64-bit parameter, or None when absent."""
    if name not in query:
        return None
    value = _uint(query.get(name, ""))
    if value is None:
        raise BadRequestError(f"Invalid {name}: {query.get(name)!r} is not an unsigned integer")
    return value


def _uint(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= _UINT64_MAX else None
