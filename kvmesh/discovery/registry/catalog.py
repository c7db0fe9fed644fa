"""One datacenter's catalog: its node, the services registered with its agent, and their checks.

The agent and the catalog are one thing here (there is no anti-entropy to wait for). What the
agent sees is the catalog minus what a Consul server adds on its own: the `consul` service and
the node's `serfHealth` check, both always present and passing.

Index bookkeeping follows Consul's state store: a change takes one new index, and records it
on what a blocking query could be watching — the service's name (health/catalog service
queries), the list of services (catalog/services) and the list of checks (health/state).
Output-only changes of a check are stored without a new index: Consul defers them too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from kvmesh.discovery.registry import journal
from kvmesh.discovery.registry.errors import BadRequestError, NotFoundError
from kvmesh.discovery.registry.index import IndexCounter
from kvmesh.discovery.registry.records import (
    CRITICAL,
    PASSING,
    Check,
    CheckDefinition,
    CheckStatus,
    Node,
    Service,
    ServiceDefinition,
)

log = structlog.get_logger(__name__)

Record = journal.Record

CONSUL_SERVICE = "consul"
SERF_CHECK_ID = "serfHealth"
CONSUL_SERVER_PORT = 8300
MAX_OUTPUT_BYTES = 4096  # Consul's check output buffer


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One instance as /v1/health/service answers it: node, service, and the checks on both."""

    node: Node
    service: Service
    checks: tuple[Check, ...]

    @property
    def is_passing(self) -> bool:
        return all(c.status == PASSING for c in self.checks)


class Catalog:
    def __init__(self, node: Node, index: IndexCounter) -> None:
        self.node = node
        self._index = index
        self._services: dict[str, Service] = {}
        self._checks: dict[str, Check] = {}
        self.journal: Callable[[Record], None] | None = None  # durable writes (`--data-dir`)
        self._name_index: dict[str, int] = {}  # service name -> last change touching it
        self.node_index = index.bump()
        self.services_index = self.node_index  # which services exist, and their tags
        self.checks_index = self.node_index  # any check added, removed or changed status
        consul = ServiceDefinition(CONSUL_SERVICE, CONSUL_SERVICE, port=CONSUL_SERVER_PORT)
        self._services[CONSUL_SERVICE] = Service(consul, self.node_index, self.node_index)
        self._name_index[CONSUL_SERVICE] = self.node_index
        self._checks[SERF_CHECK_ID] = Check(
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            definition=None,
            status=PASSING,
            output="Agent alive and reachable",
            service_id="",
            service_name="",
            service_tags=(),
            create_index=self.node_index,
            modify_index=self.node_index,
        )

    # -- agent writes ------------------------------------------------------------------------------

    def register_service(
        self, definition: ServiceDefinition, now: float, *, replace_existing_checks: bool = False
    ) -> None:
        """Add or update a service and its checks; a no-op re-registration takes no index."""
        if CONSUL_SERVICE in (definition.name, definition.service_id):
            raise BadRequestError(f'Invalid service: "{CONSUL_SERVICE}" is reserved')
        sid = definition.service_id
        existing = self._services.get(sid)
        bare = dataclasses.replace(definition, checks=())
        service_changed = existing is None or existing.definition != bare
        wanted = _complete_checks(definition)
        wanted_ids = {c.check_id for c in wanted}
        changed_checks = [c for c in wanted if not self._is_current(c, definition)]
        stale = [
            cid
            for cid, c in self._checks.items()
            if replace_existing_checks and c.service_id == sid and cid not in wanted_ids
        ]
        if not (service_changed or changed_checks or stale):
            return
        index = self._index.bump()
        if service_changed:
            create = existing.create_index if existing is not None else index
            self._services[sid] = Service(bare, create, index)
            self.services_index = index
            self._name_index[definition.name] = index
            if existing is not None:
                self._name_index[existing.name] = index
        for cid in stale:
            self._drop_check(cid, index)
        for cid, check in self._checks.items():  # checks kept from an earlier registration
            if service_changed and check.service_id == sid and cid not in wanted_ids:
                check.service_name, check.service_tags = definition.name, definition.tags
                self._touch(check, index)
        for check_def in changed_checks:
            self._put_check(check_def, definition, index, now)
        log.info("service registered", service_id=sid, service=definition.name, index=index)
        self._journal(
            {
                "t": "svc",
                "def": journal.service_dict(definition),
                "replace": replace_existing_checks,
            }
        )

    def deregister_service(self, service_id: str) -> None:
        service = self._services.get(service_id)
        if service is None or service_id == CONSUL_SERVICE:
            raise NotFoundError(
                f"Unknown service ID {_quote(service_id)}. "
                "Ensure that the service ID is passed, not the service name."
            )
        index = self._index.bump()
        del self._services[service_id]
        for cid in [cid for cid, c in self._checks.items() if c.service_id == service_id]:
            self._drop_check(cid, index)
        self.services_index = index
        self._name_index[service.name] = index
        log.info("service deregistered", service_id=service_id, index=index)
        self._journal({"t": "svc_del", "id": service_id})

    def register_check(self, definition: CheckDefinition, now: float) -> None:
        """/v1/agent/check/register: a check on its own, on the node or on a service."""
        if not definition.name:
            raise BadRequestError("Missing check name")
        owner = None
        if definition.service_id:
            owner = self._services.get(definition.service_id)
            if owner is None or definition.service_id == CONSUL_SERVICE:
                raise BadRequestError(f"ServiceID {_quote(definition.service_id)} does not exist")
        complete = dataclasses.replace(definition, check_id=definition.check_id or definition.name)
        owner_def = owner.definition if owner is not None else None
        if self._is_current(complete, owner_def):
            return
        self._put_check(complete, owner_def, self._index.bump(), now)
        self._journal({"t": "chk", "def": journal.check_dict(complete)})

    def deregister_check(self, check_id: str) -> None:
        self.agent_check(check_id)
        self._drop_check(check_id, self._index.bump())
        self._journal({"t": "chk_del", "id": check_id})

    def update_ttl(self, check_id: str, status: CheckStatus, output: str, now: float) -> None:
        """pass / warn / fail / update: set a TTL check's status and restart its TTL."""
        check = self.agent_check(check_id)
        if check.definition is None or check.definition.kind != "ttl":
            raise BadRequestError(f"CheckID {_quote(check_id)} does not have associated TTL")
        check.ttl_deadline = now + check.definition.ttl_ns / 1e9
        self._set_status(check, status, output, now)

    def record_probe(self, check: Check, status: CheckStatus, output: str, now: float) -> None:
        """A probe's result, if `check` is still the registered one (not replaced meanwhile)."""
        if self._checks.get(check.check_id) is check:
            self._set_status(check, status, output, now)

    def expire(self, now: float) -> float | None:
        """Fail TTL checks whose TTL passed and reap services critical for too long.

        Returns when this should run next (monotonic time), or None if nothing is pending.
        """
        next_due: float | None = None
        for check in list(self._checks.values()):
            if check.ttl_deadline is None:
                continue
            if check.ttl_deadline <= now:
                check.ttl_deadline = None
                self._set_status(check, CRITICAL, "TTL expired", now)
            else:
                next_due = _earliest(next_due, check.ttl_deadline)
        for check in list(self._checks.values()):
            due = _reap_time(check)
            if due is None or self._checks.get(check.check_id) is not check:
                continue
            if due <= now:
                log.info(
                    "deregistering a service critical for too long",
                    service_id=check.service_id,
                    check_id=check.check_id,
                )
                self.deregister_service(check.service_id)
            else:
                next_due = _earliest(next_due, due)
        return next_due

    # -- durability --------------------------------------------------------------------------------

    def _journal(self, record: Record) -> None:
        if self.journal is not None:
            self.journal(record)

    def restore(self, record: Record, now: float) -> None:
        """Apply one journal record (`journal.py`), as the write that made it did."""
        kind = record["t"]
        if kind == "svc":
            definition = journal.service_definition(record["def"])
            self.register_service(definition, now, replace_existing_checks=record["replace"])
        elif kind == "svc_del" and record["id"] in self._services:
            self.deregister_service(record["id"])
        elif kind == "chk":
            self.register_check(journal.check_definition(record["def"]), now)
        elif kind == "chk_del" and record["id"] in self._checks:
            self.deregister_check(record["id"])
        elif kind == "status" and record["id"] in self._checks:
            self._set_status(self._checks[record["id"]], record["status"], record["output"], now)

    def records(self) -> list[Record]:
        """The journal records that rebuild the registrations and check statuses."""
        found: list[Record] = []
        for service in self.agent_services():
            checks = tuple(
                c.definition
                for c in self._checks.values()
                if c.service_id == service.service_id and c.definition is not None
            )
            definition = dataclasses.replace(service.definition, checks=checks)
            found.append({"t": "svc", "def": journal.service_dict(definition), "replace": True})
        for check in self._checks.values():
            if check.definition is not None and not check.service_id:
                found.append({"t": "chk", "def": journal.check_dict(check.definition)})
        for check in self._checks.values():
            if check.definition is not None:
                found.append(
                    {
                        "t": "status",
                        "id": check.check_id,
                        "status": check.status,
                        "output": check.output,
                    }
                )
        return found

    # -- reads -------------------------------------------------------------------------------------

    def agent_services(self) -> list[Service]:
        return [s for sid, s in sorted(self._services.items()) if sid != CONSUL_SERVICE]

    def all_services(self) -> list[Service]:
        return [s for _, s in sorted(self._services.items())]

    def agent_service(self, service_id: str) -> Service:
        service = self._services.get(service_id)
        if service is None or service_id == CONSUL_SERVICE:
            raise NotFoundError(f"unknown service ID: {service_id}")
        return service

    def agent_checks(self) -> list[Check]:
        return [c for cid, c in sorted(self._checks.items()) if cid != SERF_CHECK_ID]

    def agent_check(self, check_id: str) -> Check:
        check = self._checks.get(check_id)
        if check is None or check_id == SERF_CHECK_ID:
            raise NotFoundError(
                f"Unknown check ID {_quote(check_id)}. "
                "Ensure that the check ID is passed, not the check name."
            )
        return check

    def grpc_checks(self) -> list[Check]:
        return [c for c in self._checks.values() if c.kind == "grpc"]

    def services(self, name: str, tags: tuple[str, ...] = ()) -> list[Service]:
        """Instances of service `name` carrying every tag in `tags` (case-insensitive)."""
        wanted = {t.lower() for t in tags}
        return [
            s
            for _, s in sorted(self._services.items())
            if s.name == name and wanted <= {t.lower() for t in s.definition.tags}
        ]

    def service_entries(
        self, name: str, tags: tuple[str, ...] = (), *, passing_only: bool = False
    ) -> list[ServiceEntry]:
        node_checks = tuple(c for c in self._checks.values() if not c.service_id)
        entries = []
        for service in self.services(name, tags):
            own = tuple(c for c in self._checks.values() if c.service_id == service.service_id)
            entries.append(ServiceEntry(self.node, service, node_checks + own))
        return [e for e in entries if e.is_passing] if passing_only else entries

    def service_tags(self) -> dict[str, list[str]]:
        """Every service name with the union of its instances' tags (catalog/services)."""
        tags: dict[str, list[str]] = {}
        for _, service in sorted(self._services.items()):
            known = tags.setdefault(service.name, [])
            known += [t for t in service.definition.tags if t not in known]
        return dict(sorted(tags.items()))

    def checks_of_service(self, name: str) -> list[Check]:
        return [c for _, c in sorted(self._checks.items()) if c.service_name == name]

    def checks_in_state(self, state: str) -> list[Check]:
        """Checks with status `state`, or all of them for "any"."""
        return [c for _, c in sorted(self._checks.items()) if state in ("any", c.status)]

    def all_checks(self) -> list[Check]:
        return [c for _, c in sorted(self._checks.items())]

    def name_index(self, name: str) -> int:
        """The index of the last change to service `name` (its instances or their checks)."""
        return self._name_index.get(name, self.services_index)

    # -- internals ---------------------------------------------------------------------------------

    def _is_current(self, definition: CheckDefinition, owner: ServiceDefinition | None) -> bool:
        check = self._checks.get(definition.check_id)
        return (
            check is not None
            and check.definition == definition
            and check.service_id == (owner.service_id if owner else "")
            and check.service_name == (owner.name if owner else "")
            and check.service_tags == (owner.tags if owner else ())
        )

    def _put_check(
        self,
        definition: CheckDefinition,
        owner: ServiceDefinition | None,
        index: int,
        now: float,
    ) -> None:
        previous = self._checks.get(definition.check_id)
        status: CheckStatus = definition.status or CRITICAL
        output = ""
        critical_since = now if status == CRITICAL else None
        if previous is not None:
            # As a Consul agent does, a re-registered check carries over its status and output:
            # re-registering must not flap a healthy instance to critical (nor restart the
            # clock of one on its way to being reaped).
            status, output, critical_since = (
                previous.status,
                previous.output,
                previous.critical_since,
            )
        check = Check(
            check_id=definition.check_id,
            name=definition.name,
            definition=definition,
            status=status,
            output=output,
            service_id=owner.service_id if owner else "",
            service_name=owner.name if owner else "",
            service_tags=owner.tags if owner else (),
            create_index=previous.create_index if previous is not None else index,
            modify_index=index,
            ttl_deadline=now + definition.ttl_ns / 1e9 if definition.kind == "ttl" else None,
            critical_since=critical_since,
        )
        self._checks[check.check_id] = check
        self._touch(check, index)
        if previous is not None and previous.service_name != check.service_name:
            self._touch(previous, index)

    def _drop_check(self, check_id: str, index: int) -> None:
        check = self._checks.pop(check_id)
        self._touch(check, index)

    def _set_status(self, check: Check, status: CheckStatus, output: str, now: float) -> None:
        check.output = _truncate(output)
        if check.status == status:
            return
        index = self._index.bump()
        log.info(
            "check status changed",
            check_id=check.check_id,
            service_id=check.service_id,
            status=status,
            was=check.status,
            index=index,
        )
        check.status = status
        check.modify_index = index
        check.critical_since = now if status == CRITICAL else None
        self._touch(check, index)
        self._journal({"t": "status", "id": check.check_id, "status": status, "output": output})

    def _touch(self, check: Check, index: int) -> None:
        self.checks_index = index
        if check.service_name:
            self._name_index[check.service_name] = index
        else:  # a node check is part of every service entry on the node
            for name in {s.name for s in self._services.values()}:
                self._name_index[name] = index


def _complete_checks(service: ServiceDefinition) -> list[CheckDefinition]:
    """Fill in check ids and names the way a Consul agent does for a service's checks."""
    many = len(service.checks) > 1
    completed = []
    for i, check in enumerate(service.checks, start=1):
        default_id = f"service:{service.service_id}" + (f":{i}" if many else "")
        completed.append(
            dataclasses.replace(
                check,
                check_id=check.check_id or default_id,
                name=check.name or f"Service '{service.name}' check",
                service_id=service.service_id,
            )
        )
    return completed


def _reap_time(check: Check) -> float | None:
    if (
        check.definition is None
        or not check.definition.deregister_after_ns
        or not check.service_id
        or check.critical_since is None
    ):
        return None
    return check.critical_since + check.definition.deregister_after_ns / 1e9


def _earliest(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _truncate(output: str) -> str:
    raw = output.encode()
    if len(raw) <= MAX_OUTPUT_BYTES:
        return output
    head = raw[:MAX_OUTPUT_BYTES].decode(errors="ignore")
    return f"{head} ... (captured {MAX_OUTPUT_BYTES} of {len(raw)} bytes)"


def _quote(text: str) -> str:
    """Like Go's %q, which Consul's messages use."""
    return json.dumps(text, ensure_ascii=False)
