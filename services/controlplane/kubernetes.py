"""`KubernetesActuator`: one cluster is one namespace, one (model, tier) is one Deployment.

The actuator scales Deployments; it never creates them. They come from manifests (or a Helm
chart), one per (model, tier), named `deployment_name(model, tier)` and labelled

    app.kubernetes.io/part-of: kvmesh
    kvmesh.io/model: <model_label(model)>   # e.g. huggingfacetb-smollm2-135m-instruct
    kvmesh.io/tier: <tier>                  # prefill | decode

`replicas` lists the Deployment's pods (through its own selector), `add` raises the replica count
of its `scale` subresource, and `remove` marks the named pods with a low
`controller.kubernetes.io/pod-deletion-cost` before lowering the count, so that the ReplicaSet
deletes those pods first. The ReplicaSet ranks pods that are not Ready before any deletion cost,
so a worker's readiness probe should be its gRPC health check: a drained worker is then not
Ready, and a starting pod cannot be taken in its place. The cluster's `capacity` bounds the sum
of `spec.replicas` over every kvmesh Deployment in the namespace.

The client library is synchronous; every call runs in a thread (`asyncio.to_thread`) with a
request timeout. Kubernetes errors become `ActuatorError`, with the status, the API server's own
message and, for 403, the RBAC that is missing. The actuator's service account needs:

    apiVersion: rbac.authorization.k8s.io/v1
    kind: Role
    metadata: {name: kvmesh-controlplane, namespace: <namespace>}
    rules:
      - apiGroups: ["apps"]
        resources: ["deployments"]
        verbs: ["get", "list"]
      - apiGroups: ["apps"]
        resources: ["deployments/scale"]
        verbs: ["get", "patch"]
      - apiGroups: [""]
        resources: ["pods"]
        verbs: ["list", "patch"]

bound to it with a RoleBinding in the same namespace.

Tested only against a fake API server that replays recorded response shapes
(`tests/integration/controlplane/test_kubernetes_actuator.py`), never against a live cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from services.controlplane.actuator import ActuatorError, Replica

PART_OF_LABEL = "app.kubernetes.io/part-of"
MODEL_LABEL = "kvmesh.io/model"
TIER_LABEL = "kvmesh.io/tier"
WORKER_ID_ANNOTATION = "kvmesh.io/worker-id"
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAINED_DELETION_COST = "-1000"  # below the default 0: among pods ranked alike, these go first
GRPC_PORT_NAME = "grpc"
DEFAULT_GRPC_PORT = 50051

_MAX_NAME = 63  # a DNS-1123 label, and the longest label value
_HASH_LEN = 8
_MERGE_PATCH = "application/merge-patch+json"
_RBAC = (
    "get and list on deployments, get and patch on deployments/scale, list and patch on pods "
    "(the Role in the docstring of services/controlplane/kubernetes.py)"
)

T = TypeVar("T")


def _sanitize(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def model_label(model: str) -> str:
    """The `kvmesh.io/model` label value: `model` lowercased, every run of characters outside
    [a-z0-9-] made one "-"; cut, with a hash of the full name appended, past 63 characters."""
    sanitized = _sanitize(model)
    if sanitized and len(sanitized) <= _MAX_NAME:
        return sanitized
    head = sanitized[: _MAX_NAME - _HASH_LEN - 1].rstrip("-")
    return f"{head}-{_digest(model)}" if head else _digest(model)


def deployment_name(model: str, tier: str) -> str:
    """`kvmesh-<sanitized model>-<tier>`, a valid DNS-1123 label. Past 63 characters the model
    part is cut and a hash of the full model name goes before the tier, so that two long names
    with one prefix stay apart."""
    sanitized, tier_part = _sanitize(model), _sanitize(tier)
    name = f"kvmesh-{sanitized}-{tier_part}"
    if sanitized and len(name) <= _MAX_NAME:
        return name
    room = _MAX_NAME - len(f"kvmesh--{'x' * _HASH_LEN}-{tier_part}")
    head = sanitized[: max(room, 0)].rstrip("-")
    return "-".join(part for part in ("kvmesh", head, _digest(model), tier_part) if part)


def deployment_labels(model: str, tier: str) -> dict[str, str]:
    """The labels the Deployment of (model, tier) must carry."""
    return {PART_OF_LABEL: "kvmesh", MODEL_LABEL: model_label(model), TIER_LABEL: _sanitize(tier)}


class KubernetesActuator:
    """Scales the kvmesh Deployments of one namespace (one cluster).

    With no `api_client`, credentials come from the pod's service account, else from the
    kubeconfig (`~/.kube/config` or `$KUBECONFIG`); that client is closed by `close`. A given
    `api_client` stays the caller's.
    """

    def __init__(
        self,
        cluster: str,
        *,
        namespace: str,
        capacity: int,
        api_client: client.ApiClient | None = None,
        request_timeout_s: float = 30.0,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        self._cluster = cluster
        self._namespace = namespace
        self._capacity = capacity
        self._timeout = request_timeout_s
        self._owns_client = api_client is None
        self._api = api_client if api_client is not None else _connect(cluster)
        self._apps = client.AppsV1Api(self._api)
        self._core = client.CoreV1Api(self._api)

    @property
    def cluster(self) -> str:
        return self._cluster

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def namespace(self) -> str:
        return self._namespace

    async def replicas(self, model: str, tier: str) -> list[Replica]:
        """The Deployment's pods, terminating ones left out, by pod name."""
        pods = await self._pods(await self._deployment(model, tier))
        replicas = [_replica(pod, model, tier) for pod in pods if not _is_terminating(pod)]
        return sorted(replicas, key=lambda replica: replica.name)

    async def add(self, model: str, tier: str, count: int) -> list[Replica]:
        """Raise the Deployment's replica count by `count`, if the cluster has room.

        Pods get their names from the ReplicaSet later, so the replicas returned are placeholders
        named `<deployment>-pending-<slot>`, not pods: `replicas` shows the real ones, and
        `remove` does not accept these names.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        if count == 0:
            return []
        name = deployment_name(model, tier)
        await self._deployment(model, tier)  # present and labelled, so counted in `in_use`
        current = await self._scale_replicas(model, tier)
        in_use = await self._replicas_in_use()
        if in_use + count > self._capacity:
            raise ActuatorError(
                f"cluster {self._cluster!r} cannot add {count} {tier} replica(s) of {model}: "
                f"kvmesh Deployments in namespace {self._namespace!r} already ask for {in_use} "
                f"of its {self._capacity} replicas"
            )
        await self._set_scale(model, tier, current + count)
        return [
            Replica(worker_id="", model=model, tier=tier, name=f"{name}-pending-{slot}")
            for slot in range(current, current + count)
        ]

    async def remove(self, model: str, tier: str, names: Sequence[str]) -> None:
        """Delete these (drained) pods by scaling down with them marked to go first.

        Every name must be a pod of the Deployment, else nothing is changed. A pod that is
        already terminating is left alone and not counted, so that calling again after a
        failure does not scale down twice.
        """
        if not names:
            return
        deployment = await self._deployment(model, tier)
        pods = {pod.metadata.name: pod for pod in await self._pods(deployment) if pod.metadata}
        unknown = [pod_name for pod_name in names if pod_name not in pods]
        if unknown:
            raise ActuatorError(
                f"cluster {self._cluster!r} cannot remove {', '.join(unknown)}: not a pod of "
                f"Deployment {self._where(deployment_name(model, tier))}; nothing was changed"
            )
        live = [name for name in dict.fromkeys(names) if not _is_terminating(pods[name])]
        if not live:
            return
        for pod_name in live:
            await self._mark_drained(pod_name)
        current = await self._scale_replicas(model, tier)
        await self._set_scale(model, tier, max(current - len(live), 0))

    async def close(self) -> None:
        if self._owns_client:
            await asyncio.to_thread(self._api.close)

    async def _deployment(self, model: str, tier: str) -> client.V1Deployment:
        name = deployment_name(model, tier)
        deployment = await self._call(
            f"reading Deployment {self._where(name)}",
            lambda: self._apps.read_namespaced_deployment(
                name, self._namespace, _request_timeout=self._timeout
            ),
            missing=self._missing(name, model, tier),
        )
        labels = (deployment.metadata.labels if deployment.metadata else None) or {}
        expected = deployment_labels(model, tier)
        if any(labels.get(key) != value for key, value in expected.items()):
            wanted = ", ".join(f"{key}={value}" for key, value in expected.items())
            raise ActuatorError(
                f"cluster {self._cluster!r}: Deployment {self._where(name)} lacks the labels "
                f"{wanted}; without them it is not counted against the cluster's capacity. "
                "Add them to its manifest"
            )
        return deployment

    async def _pods(self, deployment: client.V1Deployment) -> list[client.V1Pod]:
        name = (deployment.metadata.name if deployment.metadata else None) or ""
        selector = _selector(deployment.spec.selector) if deployment.spec else ""
        if not selector:
            raise ActuatorError(
                f"cluster {self._cluster!r}: Deployment {self._where(name)} has an empty "
                "selector; refusing to treat every pod of the namespace as its replicas"
            )
        pods = await self._call(
            f"listing the pods of Deployment {self._where(name)}",
            lambda: self._core.list_namespaced_pod(
                self._namespace, label_selector=selector, _request_timeout=self._timeout
            ),
        )
        return list(pods.items)

    async def _scale_replicas(self, model: str, tier: str) -> int:
        name = deployment_name(model, tier)
        scale = await self._call(
            f"reading the scale of Deployment {self._where(name)}",
            lambda: self._apps.read_namespaced_deployment_scale(
                name, self._namespace, _request_timeout=self._timeout
            ),
            missing=self._missing(name, model, tier),
        )
        return (scale.spec.replicas if scale.spec else None) or 0

    async def _set_scale(self, model: str, tier: str, replicas: int) -> None:
        name = deployment_name(model, tier)
        await self._call(
            f"scaling Deployment {self._where(name)} to {replicas}",
            lambda: self._apps.patch_namespaced_deployment_scale(
                name,
                self._namespace,
                {"spec": {"replicas": replicas}},
                _content_type=_MERGE_PATCH,
                _request_timeout=self._timeout,
            ),
            missing=self._missing(name, model, tier),
        )

    async def _replicas_in_use(self) -> int:
        deployments = await self._call(
            f"listing the kvmesh Deployments of namespace {self._namespace!r}",
            lambda: self._apps.list_namespaced_deployment(
                self._namespace,
                label_selector=f"{PART_OF_LABEL}=kvmesh",
                _request_timeout=self._timeout,
            ),
        )
        return sum(_desired_replicas(item) for item in deployments.items)

    async def _mark_drained(self, pod_name: str) -> None:
        body = {"metadata": {"annotations": {DELETION_COST_ANNOTATION: DRAINED_DELETION_COST}}}
        await self._call(
            f"setting the deletion cost of pod {self._where(pod_name)}",
            lambda: self._core.patch_namespaced_pod(
                pod_name,
                self._namespace,
                body,
                _content_type=_MERGE_PATCH,
                _request_timeout=self._timeout,
            ),
        )

    async def _call(self, doing: str, request: Callable[[], T], *, missing: str = "") -> T:
        """Run one blocking client call in a thread; its errors become `ActuatorError`."""
        try:
            return await asyncio.to_thread(request)
        except ApiException as e:
            if e.status == 404 and missing:
                raise ActuatorError(missing) from e
            raise ActuatorError(self._explain(doing, e)) from e
        except urllib3.exceptions.HTTPError as e:
            raise ActuatorError(
                f"cluster {self._cluster!r}: {doing} failed: the Kubernetes API at "
                f"{self._api.configuration.host} did not answer ({e})"
            ) from e

    def _explain(self, doing: str, error: ApiException) -> str:
        said = _server_message(error)
        sentence = f"cluster {self._cluster!r}: {doing} failed with {error.status} {error.reason}"
        if said:
            sentence += f" ({said})"
        if error.status == 401:
            return sentence + "; the API server did not accept the credentials"
        if error.status == 403:
            return (
                sentence + f"; the control plane's service account needs RBAC in namespace "
                f"{self._namespace!r}: {_RBAC}"
            )
        return sentence

    def _missing(self, name: str, model: str, tier: str) -> str:
        labels = ", ".join(
            f"{key}={value}" for key, value in deployment_labels(model, tier).items()
        )
        return (
            f"cluster {self._cluster!r}: no Deployment {name!r} in namespace "
            f"{self._namespace!r}; the actuator scales Deployments but does not create them: "
            f"apply one (a manifest or a Helm chart) with that name and the labels {labels}"
        )

    def _where(self, name: str) -> str:
        return f"{self._namespace}/{name}"


def _connect(cluster: str) -> client.ApiClient:
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (config.ConfigException, OSError) as e:
            raise ActuatorError(
                f"cluster {cluster!r}: no Kubernetes credentials: not in a pod ({in_cluster}) "
                f"and no usable kubeconfig ({e})"
            ) from e
    return client.ApiClient(configuration)


def _desired_replicas(deployment: client.V1Deployment) -> int:
    replicas = deployment.spec.replicas if deployment.spec else None
    return 1 if replicas is None else replicas  # the API server's default for an absent count


def _selector(selector: client.V1LabelSelector) -> str:
    """A `V1LabelSelector` in the `labelSelector` query syntax."""
    terms = [f"{key}={value}" for key, value in sorted((selector.match_labels or {}).items())]
    for expression in selector.match_expressions or []:
        key, values = expression.key, ",".join(expression.values or [])
        operators = {
            "In": f"{key} in ({values})",
            "NotIn": f"{key} notin ({values})",
            "Exists": key,
            "DoesNotExist": f"!{key}",
        }
        if expression.operator not in operators:
            raise ActuatorError(f"unknown label selector operator {expression.operator!r}")
        terms.append(operators[expression.operator])
    return ",".join(terms)


def _replica(pod: client.V1Pod, model: str, tier: str) -> Replica:
    metadata = pod.metadata or client.V1ObjectMeta()
    name = metadata.name or ""
    pod_ip = pod.status.pod_ip if pod.status else None
    return Replica(
        worker_id=(metadata.annotations or {}).get(WORKER_ID_ANNOTATION, name),
        model=model,
        tier=tier,
        name=name,
        address=_address(pod_ip, _grpc_port(pod)) if pod_ip else "",
        ready=_is_ready(pod),
    )


def _grpc_port(pod: client.V1Pod) -> int:
    for container in pod.spec.containers if pod.spec else []:
        for port in container.ports or []:
            if port.name == GRPC_PORT_NAME:
                return port.container_port
    return DEFAULT_GRPC_PORT


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _is_ready(pod: client.V1Pod) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def _is_terminating(pod: client.V1Pod) -> bool:
    return pod.metadata is not None and pod.metadata.deletion_timestamp is not None


def _server_message(error: ApiException) -> str:
    """The `message` of the v1 Status the API server sent, if it sent one."""
    try:
        status = json.loads(error.body or "")
    except (TypeError, ValueError):
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return message if isinstance(message, str) else ""
