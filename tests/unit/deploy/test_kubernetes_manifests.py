"""deploy/kubernetes: the example manifests fit what the code expects of them.

No cluster runs here, so these tests check shape, not behaviour: worker Deployment names and
labels against the actuator's own functions, selectors, ports and probes, the Role against the
API calls the actuator makes, and every container's args against its service's real parser.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from kvmesh.worker.runtime import add_worker_arguments, config_from_arguments
from services.autoscaler import main as autoscaler_main
from services.controlplane import kubernetes
from services.controlplane import main as controlplane_main
from services.edge import args as edge_args
from services.router import args as router_args

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = ROOT / "deploy" / "kubernetes"
ACTUATOR_SOURCE = ROOT / "services" / "controlplane" / "kubernetes.py"

WORKER_TIERS = ("prefill", "decode")
# The model id a worker registers for its `--model` spec (kvmesh/engine/loader.py, `resolve`):
# the control plane names and labels Deployments by model id, not by spec.
MODEL_IDS = {"smollm2": "SmolLM2-135M-Instruct"}

# Every Kubernetes API call in services/controlplane/kubernetes.py, as client method ->
# (API group, resource, verb). `test_the_call_list_is_the_actuators` keeps this in step with the
# source; the Role must grant exactly these.
ACTUATOR_CALLS = {
    "read_namespaced_deployment": ("apps", "deployments", "get"),  # _deployment
    "list_namespaced_deployment": ("apps", "deployments", "list"),  # _replicas_in_use
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),  # _scale_replicas
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),  # _set_scale
    "list_namespaced_pod": ("", "pods", "list"),  # _pods
    "patch_namespaced_pod": ("", "pods", "patch"),  # _mark_drained
}

# What the kubelet would put in downward-API and Secret env vars.
FIELD_VALUES = {
    "metadata.name": "kvmesh-pod-0",
    "status.podIP": "10.1.2.3",
    "status.hostIP": "10.1.0.1",
}
SECRET_VALUE = "token-from-the-secret"
CONSUL_ADDRESS = f"{FIELD_VALUES['status.hostIP']}:8500"
ENV_READ_AT_PARSE = ("CONSUL_HTTP_ADDR", "KVMESH_ADMIN_TOKEN", "KVMESH_ROUTER")
NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}


def _load() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents


DOCUMENTS = _load()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in DOCUMENTS if doc["kind"] == kind]


def _one(kind: str) -> dict[str, Any]:
    found = _of_kind(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _module(container: dict[str, Any]) -> str:
    """The `python -m` module a container runs."""
    command = container["command"]
    assert command[:2] == ["python", "-m"], f"{container['name']}: runs {command}"
    return command[2]


def _is_worker(deployment: dict[str, Any]) -> bool:
    return any(
        _module(c) in {f"services.{t}" for t in WORKER_TIERS} for c in _containers(deployment)
    )


DEPLOYMENTS = _of_kind("Deployment")
WORKERS = [d for d in DEPLOYMENTS if _is_worker(d)]
CONTAINERS = [(d, c) for d in DEPLOYMENTS for c in _containers(d)]
GRPC_CONTAINERS = [(d, c) for d, c in CONTAINERS if _module(c) != "services.edge"]


def _name(doc: dict[str, Any]) -> str:
    return doc["metadata"]["name"]


def _ids(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[str]:
    return [f"{_name(d)}/{c['name']}" for d, c in pairs]


def _port(container: dict[str, Any], name: str) -> int:
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"{container['name']}: no container port named {name!r}"
    return ports[name]


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, others left as written."""

    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return env.get(match[1], match[0])

    return re.sub(r"\$\$|\$\((\w+)\)", replace, text)


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would build it, in order."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[var["name"]] = SECRET_VALUE
        else:
            env[var["name"]] = _expand(var["value"], env)
    return env


def _parse_worker(tier: str, argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(prog=f"python -m services.{tier}")
    add_worker_arguments(parser)
    return config_from_arguments(tier, parser.parse_args(argv))


PARSERS: dict[str, Callable[[list[str], Mapping[str, str]], Any]] = {
    "services.prefill": lambda argv, env: _parse_worker("prefill", argv),
    "services.decode": lambda argv, env: _parse_worker("decode", argv),
    "services.router": lambda argv, env: router_args.parse(argv)[0],
    "services.edge": lambda argv, env: edge_args.parse_args(argv, env),
    "services.autoscaler": lambda argv, env: autoscaler_main.parse(argv)[0],
    "services.controlplane": lambda argv, env: controlplane_main.parse(argv)[0],
}


def _parse(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's config from the container's args and env, through its real parser."""
    env = _env(container)
    argv = [_expand(str(arg), env) for arg in container.get("args", [])]
    unexpanded = [arg for arg in argv if "$(" in arg]
    assert not unexpanded, f"{container['name']}: no env var for {unexpanded}"
    for name in ENV_READ_AT_PARSE:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    module = _module(container)
    assert module in PARSERS, f"{container['name']}: no parser known for {module}"
    try:
        return PARSERS[module](argv, env)
    except SystemExit:
        pytest.fail(f"{module} rejected the args of container {container['name']}: {argv}")


def _api_calls() -> set[str]:
    """The methods kubernetes.py calls on its `AppsV1Api` and `CoreV1Api` clients."""
    calls = set()
    for node in ast.walk(ast.parse(ACTUATOR_SOURCE.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if isinstance(owner, ast.Attribute) and owner.attr in {"_apps", "_core"}:
            calls.add(node.func.attr)
    return calls


def _grants(role: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    for rule in role["rules"]:
        assert "resourceNames" not in rule, "resourceNames would stop list from working"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    yield group, resource, verb


def test_the_manifests_hold_the_objects_the_readme_lists() -> None:
    kinds = sorted(doc["kind"] for doc in DOCUMENTS)
    assert kinds.count("Deployment") == 6  # prefill, decode, router, edge, autoscaler, control
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Service"} <= set(kinds)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda doc: f"{doc['kind']}/{_name(doc)}")
def test_document_is_a_valid_object_of_its_kind(document: dict[str, Any]) -> None:
    """Through the client's typed models and back: a misspelled or misplaced field is dropped,
    a value of the wrong type raises."""
    with client.ApiClient() as api:
        model = api.deserialize(json.dumps(document), f"V1{document['kind']}", "application/json")
        assert api.sanitize_for_serialization(model) == document


def test_every_namespaced_object_is_in_the_namespace() -> None:
    namespace = _name(_one("Namespace"))
    for doc in DOCUMENTS:
        if doc["kind"] in NAMESPACED_KINDS:
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']} {_name(doc)}"


def test_there_is_one_worker_deployment_per_tier_of_the_model() -> None:
    tiers = sorted(_module(c).removeprefix("services.") for d in WORKERS for c in _containers(d))
    assert tiers == sorted(WORKER_TIERS)


@pytest.mark.parametrize("deployment", WORKERS, ids=_name)
def test_worker_deployment_is_named_and_labelled_as_the_actuator_looks_it_up(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = _containers(deployment)
    config = _parse(container, monkeypatch)
    model_id = MODEL_IDS[config.engine.model]
    assert _name(deployment) == kubernetes.deployment_name(model_id, config.tier)
    assert deployment["metadata"]["labels"] == kubernetes.deployment_labels(model_id, config.tier)


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_selector_matches_the_pod_template(deployment: dict[str, Any]) -> None:
    selector = deployment["spec"]["selector"]
    assert set(selector) == {"matchLabels"}, "the actuator's selector check reads matchLabels"
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"]
    assert selector["matchLabels"].items() <= template_labels.items()


def test_only_worker_deployments_count_against_capacity() -> None:
    """The actuator sums the replicas of every Deployment labelled part-of=kvmesh."""
    counted = [
        _name(d)
        for d in DEPLOYMENTS
        if d["metadata"].get("labels", {}).get(kubernetes.PART_OF_LABEL) == "kvmesh"
    ]
    assert sorted(counted) == sorted(_name(d) for d in WORKERS)


@pytest.mark.parametrize("deployment", WORKERS, ids=_name)
def test_worker_is_ready_only_while_its_grpc_health_says_serving(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = _containers(deployment)
    grpc_port = _port(container, kubernetes.GRPC_PORT_NAME)
    assert _parse(container, monkeypatch).port == grpc_port
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    # A drained worker is NOT_SERVING on purpose; a liveness probe on it would restart it.
    assert "grpc" not in container.get("livenessProbe", {})


@pytest.mark.parametrize("deployment", WORKERS, ids=_name)
def test_worker_registers_its_pod_ip_and_pod_name(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The actuator falls back to the pod name as worker id, and reads the pod IP."""
    (container,) = _containers(deployment)
    config = _parse(container, monkeypatch)
    assert config.worker_id == FIELD_VALUES["metadata.name"]
    assert config.host == FIELD_VALUES["status.podIP"]


@pytest.mark.parametrize("deployment", WORKERS, ids=_name)
def test_worker_grace_fits_in_the_pods_termination_grace(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (container,) = _containers(deployment)
    config = _parse(container, monkeypatch)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.grace_s


@pytest.mark.parametrize("deployment", WORKERS, ids=_name)
def test_worker_asks_for_a_gpu(deployment: dict[str, Any]) -> None:
    (container,) = _containers(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_the_call_list_is_the_actuators() -> None:
    assert _api_calls() == set(ACTUATOR_CALLS)


def test_role_grants_exactly_what_the_actuator_calls() -> None:
    grants = list(_grants(_one("Role")))
    assert len(grants) == len(set(grants)), "a grant is repeated"
    assert set(grants) == set(ACTUATOR_CALLS.values())


def test_role_is_bound_to_the_service_account_the_control_plane_runs_as() -> None:
    role, binding, account = _one("Role"), _one("RoleBinding"), _one("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": _name(role),
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": _name(account),
            "namespace": role["metadata"]["namespace"],
        }
    ]
    pods_with_api_access = {
        _name(d): d["spec"]["template"]["spec"].get("serviceAccountName")
        for d in DEPLOYMENTS
        if d["spec"]["template"]["spec"].get("automountServiceAccountToken", True)
    }
    assert pods_with_api_access == {"kvmesh-controlplane": _name(account)}


def test_control_plane_scales_the_namespace_of_the_role_and_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (deployment,) = [d for d in DEPLOYMENTS if _name(d) == "kvmesh-controlplane"]
    config = _parse(_containers(deployment)[0], monkeypatch)
    assert config.actuator == "kubernetes"
    assert config.namespace == _one("Role")["metadata"]["namespace"]
    assert {w["metadata"]["namespace"] for w in WORKERS} == {config.namespace}
    assert config.capacity >= sum(w["spec"]["replicas"] for w in WORKERS)


@pytest.mark.parametrize(("deployment", "container"), CONTAINERS, ids=_ids(CONTAINERS))
def test_container_args_are_flags_its_service_takes(
    deployment: dict[str, Any], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _parse(container, monkeypatch)
    assert config.registry == CONSUL_ADDRESS


@pytest.mark.parametrize(("deployment", "container"), GRPC_CONTAINERS, ids=_ids(GRPC_CONTAINERS))
def test_grpc_service_binds_the_pod_ip_on_the_port_it_exposes_and_probes(
    deployment: dict[str, Any], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _parse(container, monkeypatch)
    grpc_port = _port(container, "grpc")
    assert (config.host, config.port) == (FIELD_VALUES["status.podIP"], grpc_port)
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": ""}


@pytest.mark.parametrize("name", ["kvmesh-autoscaler", "kvmesh-controlplane"])
def test_admin_token_comes_from_the_secret(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (deployment,) = [d for d in DEPLOYMENTS if _name(d) == name]
    (container,) = _containers(deployment)
    assert _parse(container, monkeypatch).admin_token == SECRET_VALUE
    assert not any("token" in str(arg) for arg in container["args"]), "a token in args is visible"


@pytest.mark.parametrize("service", _of_kind("Service"), ids=_name)
def test_service_selects_one_deployment_and_targets_a_named_port(service: dict[str, Any]) -> None:
    selector = service["spec"]["selector"].items()
    selected = [
        d for d in DEPLOYMENTS if selector <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(selected) == 1, f"{_name(service)} selects {[_name(d) for d in selected]}"
    (container,) = _containers(selected[0])
    for port in service["spec"]["ports"]:
        assert _port(container, port["targetPort"]) == port["port"]


def test_edge_sends_requests_to_the_router_service(monkeypatch: pytest.MonkeyPatch) -> None:
    (edge,) = [d for d in DEPLOYMENTS if _name(d) == "kvmesh-edge"]
    (container,) = _containers(edge)
    config = _parse(container, monkeypatch)
    router = next(s for s in _of_kind("Service") if _name(s) == "kvmesh-router")
    assert config.router == f"{_name(router)}:{router['spec']['ports'][0]['port']}"
    assert config.port == _port(container, "http") == 8000
