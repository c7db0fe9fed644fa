"""Request bodies -> validated definitions, read the way a Consul agent reads them.

Consul's decoder matches field names case-insensitively and also takes snake_case
("grpc_use_tls" for GRPCUseTLS); py-consul relies on both (it sends "name", "checks", "ttl").
Unknown fields are ignored, as Consul ignores them. A field of the wrong JSON type is refused
with Go's wording ("json: cannot unmarshal string into Go struct field ... of type int").
Durations are Go duration strings or numbers of nanoseconds.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvmesh.discovery.registry.durations import parse_duration
from kvmesh.discovery.registry.errors import BadRequestError, UnsupportedError
from kvmesh.discovery.registry.records import (
    CHECK_STATUSES,
    CheckDefinition,
    CheckStatus,
    ServiceDefinition,
    TaggedAddress,
)

# Each gRPC check is a call the registry makes: no client may ask for them faster than this.
MIN_CHECK_INTERVAL_NS = 50_000_000

_DECODE_FAILED = "Request decode failed: "
_UNSUPPORTED_CHECKS = {
    "http": "HTTP",
    "tcp": "TCP",
    "udp": "UDP",
    "script": "Script",
    "args": "Script",
    "scriptargs": "Script",
    "dockercontainerid": "Docker",
    "h2ping": "H2PING",
    "aliasservice": "Alias",
    "aliasnode": "Alias",
    "osservice": "OSService",
}
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_MAX_META_PAIRS = 64
_MAX_META_KEY = 128
_MAX_META_VALUE = 512


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise BadRequestError(_DECODE_FAILED + "EOF")
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included
        raise BadRequestError(f"{_DECODE_FAILED}{e}") from e


def _refuse_constant(name: str) -> object:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


def decode_service(body: bytes) -> ServiceDefinition:
    """PUT /v1/agent/service/register."""
    fields = _Fields(parse_json(body), "ServiceDefinition")
    name = fields.string("Name")
    if not name:
        raise BadRequestError("Missing service name")
    port = fields.integer("Port")
    if not 0 <= port <= 65535:
        raise BadRequestError(f"Invalid Port: {port} is not between 0 and 65535")
    if fields.string("Kind"):
        raise UnsupportedError(
            f"Invalid service: Kind {fields.string('Kind')!r} is not supported by the "
            "embedded registry"
        )
    for connect_field in ("Proxy", "Connect"):
        connect = fields.child(connect_field)
        if connect is not None and connect.is_set():
            raise UnsupportedError(
                f"Invalid service: {connect_field} (Connect) is not supported by the embedded "
                "registry"
            )
    meta = fields.string_map("Meta")
    _validate_meta(meta)
    passing, warning = _weights(fields.child("Weights"))
    return ServiceDefinition(
        service_id=fields.string("ID") or name,
        name=name,
        tags=fields.string_list("Tags"),
        address=fields.string("Address"),
        port=port,
        meta=meta,
        tagged_addresses=_tagged_addresses(fields.child("TaggedAddresses")),
        weight_passing=passing,
        weight_warning=warning,
        enable_tag_override=fields.boolean("EnableTagOverride"),
        checks=_service_checks(fields),
    )


def decode_check(body: bytes) -> CheckDefinition:
    """PUT /v1/agent/check/register."""
    fields = _Fields(parse_json(body), "CheckDefinition")
    return _check(fields)


def decode_check_update(body: bytes) -> tuple[CheckStatus, str]:
    """PUT /v1/agent/check/update/:check_id -> (status, output)."""
    fields = _Fields(parse_json(body), "checkUpdate")
    return check_status(fields.string("Status")), fields.string("Output")


def check_status(text: str) -> CheckStatus:
    for status in CHECK_STATUSES:
        if text == status:
            return status
    raise BadRequestError(f"Invalid check status: '{text}'")


def _service_checks(fields: _Fields) -> tuple[CheckDefinition, ...]:
    checks = []
    single = fields.child("Check")
    if single is not None and single.is_set():  # Consul skips an empty Check
        checks.append(_check(single))
    checks += [_check(c) for c in fields.object_list("Checks")]
    return tuple(checks)


def _check(fields: _Fields) -> CheckDefinition:
    for key, kind in _UNSUPPORTED_CHECKS.items():
        if fields.is_set(key):
            raise UnsupportedError(
                f"Invalid check: {kind} checks are not supported by the embedded registry "
                "(supported: TTL, GRPC)"
            )
    ttl = fields.duration("TTL")
    grpc = fields.string("GRPC")
    interval = fields.duration("Interval")
    if ttl > 0 and interval > 0:
        raise BadRequestError("Invalid check: Interval and TTL cannot both be specified")
    if grpc and interval <= 0:
        raise BadRequestError("Invalid check: Interval must be > 0 for gRPC checks")
    if grpc and interval < MIN_CHECK_INTERVAL_NS:
        raise BadRequestError(
            f"Invalid check: Interval must be at least {MIN_CHECK_INTERVAL_NS // 1_000_000}ms "
            "for gRPC checks"
        )
    if not grpc and ttl <= 0:
        raise BadRequestError("Invalid check: TTL must be > 0 for TTL checks")
    status_text = fields.string("Status")
    if status_text and status_text not in CHECK_STATUSES:
        raise BadRequestError("Status for checks must 'passing', 'warning', 'critical'")
    if fields.boolean("TLSSkipVerify"):
        raise UnsupportedError(
            "Invalid check: TLSSkipVerify is not supported by the embedded registry"
        )
    return CheckDefinition(
        check_id=fields.string("CheckID") or fields.string("ID"),
        name=fields.string("Name"),
        notes=fields.string("Notes"),
        status=check_status(status_text) if status_text else None,
        service_id=fields.string("ServiceID"),
        ttl_ns=ttl if not grpc else 0,
        grpc=grpc,
        grpc_use_tls=fields.boolean("GRPCUseTLS"),
        tls_server_name=fields.string("TLSServerName"),
        interval_ns=interval if grpc else 0,
        timeout_ns=max(fields.duration("Timeout"), 0) if grpc else 0,
        deregister_after_ns=max(fields.duration("DeregisterCriticalServiceAfter"), 0),
    )


def _weights(fields: _Fields | None) -> tuple[int, int]:
    if fields is None or not fields.is_set():
        return 1, 1
    passing, warning = fields.integer("Passing"), fields.integer("Warning")
    if passing < 1:
        raise BadRequestError("Invalid Weights: Passing must be greater than 0")
    if warning < 0:
        raise BadRequestError("Invalid Weights: Warning must be greater or equal than 0")
    return passing, warning


def _tagged_addresses(fields: _Fields | None) -> dict[str, TaggedAddress]:
    if fields is None:
        return {}
    tagged = {}
    for name in fields.names():
        address = fields.child(name)
        if address is not None:
            tagged[name] = TaggedAddress(address.string("Address"), address.integer("Port"))
    return tagged


def _validate_meta(meta: dict[str, str]) -> None:
    def invalid(reason: str) -> BadRequestError:
        return BadRequestError(f"Invalid Service Meta: {reason}")

    if len(meta) > _MAX_META_PAIRS:
        raise invalid(
            f"Service metadata cannot contain more than {_MAX_META_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        if not key:
            raise invalid("Key cannot be blank")
        if not _META_KEY.match(key):
            raise invalid("Key contains invalid characters")
        if len(key) > _MAX_META_KEY:
            raise invalid(f"Key is too long (limit: {_MAX_META_KEY} characters)")
        if key.startswith("consul-"):
            raise invalid("Key prefix 'consul-' is reserved for internal use")
        if len(value) > _MAX_META_VALUE:
            raise invalid(f"Value is too long (limit: {_MAX_META_VALUE} characters)")


def _normal(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def _fits_int64(value: float) -> bool:
    return -(2**63) <= value < 2**63


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class _Fields:
    """A JSON object whose fields are looked up as Consul's decoder matches them."""

    def __init__(self, raw: object, struct: str) -> None:
        if not isinstance(raw, dict):
            raise BadRequestError(
                f"{_DECODE_FAILED}json: cannot unmarshal {_json_type(raw)} into Go value of "
                f"type structs.{struct}"
            )
        self._struct = struct
        self._raw: dict[str, Any] = raw
        self._by_name = {_normal(k): v for k, v in raw.items()}

    def names(self) -> list[str]:
        return list(self._raw)

    def is_set(self, name: str | None = None) -> bool:
        """Whether field `name` (or, without a name, any field) holds a non-zero value."""
        if name is None:
            return any(v not in (None, "", 0, False, [], {}) for v in self._raw.values())
        return self._by_name.get(_normal(name)) not in (None, "", 0, False, [], {})

    def string(self, name: str) -> str:
        value = self._get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self._type_error(name, value, "string")
        return value

    def integer(self, name: str) -> int:
        value = self._get(name)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or not _fits_int64(value):
            raise self._type_error(name, value, "int")
        return value

    def boolean(self, name: str) -> bool:
        value = self._get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self._type_error(name, value, "bool")
        return value

    def duration(self, name: str) -> int:
        """Nanoseconds: a Go duration string, or a number of nanoseconds."""
        value = self._get(name)
        if value is None or value == "":
            return 0
        if isinstance(value, str):
            try:
                return parse_duration(value)
            except ValueError as e:
                raise BadRequestError(f"{_DECODE_FAILED}{e}") from e
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _fits_int64(value):
            raise self._type_error(name, value, "time.Duration")
        return int(value)

    def string_list(self, name: str) -> tuple[str, ...]:
        value = self._get(name)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._type_error(name, value, "[]string")
        return tuple(value)

    def string_map(self, name: str) -> dict[str, str]:
        value = self._get(name)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._type_error(name, value, "map[string]string")
        return dict(value)

    def child(self, name: str) -> _Fields | None:
        value = self._get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._type_error(name, value, name)
        return _Fields(value, f"{self._struct}.{name}")

    def object_list(self, name: str) -> list[_Fields]:
        value = self._get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self._type_error(name, value, f"[]{name}")
        return [_Fields(v, f"{self._struct}.{name}") for v in value]

    def _get(self, name: str) -> Any:
        return self._by_name.get(_normal(name))

    def _type_error(self, name: str, value: object, go_type: str) -> BadRequestError:
        shown = _json_type(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            shown = f"number {value}"
        return BadRequestError(
            f"{_DECODE_FAILED}json: cannot unmarshal {shown} into Go struct field "
            f"{self._struct}.{name} of type {go_type}"
        )
