"""`KubernetesActuator` through the real `kubernetes` client against a fake API server on
loopback, which answers in the shapes a real API server sends (`k8s_responses/`: a DeploymentList,
a PodList, a Scale and v1 Status errors) and records every request, so that the tests assert
the calls the actuator made: paths, label selectors, patch bodies and content types."""

from __future__ import annotations

import copy
import json
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes.client import ApiClient, Configuration
from kubernetes.config import kube_config

from services.controlplane.actuator import ActuatorError, Replica
from services.controlplane.kubernetes import (
    KubernetesActuator,
    deployment_labels,
    deployment_name,
    model_label,
)

RESPONSES = Path(__file__).parent / "k8s_responses"
NAMESPACE = "kvmesh"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PREFILL = "kvmesh-huggingfacetb-smollm2-135m-instruct-prefill"
DECODE = "kvmesh-huggingfacetb-smollm2-135m-instruct-decode"
# Pod names as a ReplicaSet makes them: generateName cut to 58 characters plus 5 random ones.
READY = "kvmesh-huggingfacetb-smollm2-135m-instruct-prefill-7d9f8b6x4k2p"
NOT_READY = "kvmesh-huggingfacetb-smollm2-135m-instruct-prefill-7d9f8b6q8zrt"
PENDING = "kvmesh-huggingfacetb-smollm2-135m-instruct-prefill-7d9f8b6m2vhn"
TERMINATING = "kvmesh-huggingfacetb-smollm2-135m-instruct-prefill-7d9f8b6b7nwd"
DECODE_IPV6 = "kvmesh-huggingfacetb-smollm2-135m-instruct-decode-5c8d7f9bh6tqs"
DECODE_IPV4 = "kvmesh-huggingfacetb-smollm2-135m-instruct-decode-5c8d7f9br9jxl"
CAPACITY = 6  # the fixtures' Deployments ask for 3 + 2
MERGE_PATCH = "application/merge-patch+json"
PATCH_TYPES = {MERGE_PATCH, "application/strategic-merge-patch+json"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: Any
    authorization: str = ""


def _recorded(name: str) -> Any:
    return json.loads((RESPONSES / name).read_text())


def _merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386, which is all the fake needs of strategic merge too."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            if not isinstance(target.get(key), dict):
                target[key] = {}
            _merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, equals, value = term.partition("=")
        if not equals:
            raise ValueError(f"the fake only knows equality selectors, not {term!r}")
        if labels.get(key) != value:
            return False
    return True


class FakeKubeApi:
    """The slice of an API server that the actuator uses, for one namespace. State changes
    (scale, annotations, resourceVersion) only as far as a later read in a test needs."""

    def __init__(self) -> None:
        deployments = _recorded("deployments.json")["items"]
        pods = _recorded("pods.json")["items"]
        self.deployments: dict[str, Any] = {item["metadata"]["name"]: item for item in deployments}
        self.pods: dict[str, Any] = {item["metadata"]["name"]: item for item in pods}
        self.requests: list[Request] = []
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) answered with 403
        self.host = ""
        self._resource_version = 48213
        apps = "/apis/apps/v1/namespaces/{namespace}/deployments"
        pods_path = "/api/v1/namespaces/{namespace}/pods"
        self.app = web.Application(middlewares=[self._record])
        self.app.router.add_get(apps, self._list_deployments)
        self.app.router.add_get(apps + "/{name}", self._get_deployment)
        self.app.router.add_get(apps + "/{name}/scale", self._get_scale)
        self.app.router.add_patch(apps + "/{name}/scale", self._patch_scale)
        self.app.router.add_get(pods_path, self._list_pods)
        self.app.router.add_patch(pods_path + "/{name}", self._patch_pod)

    def patches(self) -> list[Request]:
        return [request for request in self.requests if request.method == "PATCH"]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        self.requests.append(
            Request(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                content_type=request.headers.get("Content-Type", ""),
                body=json.loads(raw) if raw else None,
                authorization=request.headers.get("Authorization", ""),
            )
        )
        response: web.StreamResponse = await handler(request)
        return response

    async def _list_deployments(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "list", "deployments", "apps"):
            return denied
        items = self._select(self.deployments, request)
        return self._list("DeploymentList", "apps/v1", items)

    async def _get_deployment(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "get", "deployments", "apps"):
            return denied
        deployment = self._find(self.deployments, request)
        if deployment is None:
            return self._not_found(request, "deployments", "apps")
        return web.json_response({"kind": "Deployment", "apiVersion": "apps/v1", **deployment})

    async def _get_scale(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "get", "deployments/scale", "apps"):
            return denied
        deployment = self._find(self.deployments, request)
        if deployment is None:
            return self._not_found(request, "deployments", "apps")
        return web.json_response(self._scale(deployment))

    async def _patch_scale(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "patch", "deployments/scale", "apps"):
            return denied
        deployment = self._find(self.deployments, request)
        if deployment is None:
            return self._not_found(request, "deployments", "apps")
        if request.content_type not in PATCH_TYPES:
            return self._status(
                415, "UnsupportedMediaType", f"{request.content_type} is not served"
            )
        scale = self._scale(deployment)
        _merge_patch(scale, await request.json())
        deployment["spec"]["replicas"] = scale["spec"]["replicas"]
        deployment["metadata"]["generation"] += 1
        self._touch(deployment)
        return web.json_response(self._scale(deployment))

    async def _list_pods(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "list", "pods", ""):
            return denied
        return self._list("PodList", "v1", self._select(self.pods, request))

    async def _patch_pod(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "patch", "pods", ""):
            return denied
        pod = self._find(self.pods, request)
        if pod is None:
            return self._not_found(request, "pods", "")
        if request.content_type not in PATCH_TYPES:
            return self._status(
                415, "UnsupportedMediaType", f"{request.content_type} is not served"
            )
        _merge_patch(pod, await request.json())
        self._touch(pod)
        return web.json_response({"kind": "Pod", "apiVersion": "v1", **pod})

    def _find(self, objects: dict[str, Any], request: web.Request) -> Any:
        found = objects.get(request.match_info["name"])
        in_namespace = found and found["metadata"]["namespace"] == request.match_info["namespace"]
        return found if in_namespace else None

    def _select(self, objects: dict[str, Any], request: web.Request) -> list[Any]:
        selector = request.query.get("labelSelector", "")
        return [
            item
            for item in objects.values()
            if item["metadata"]["namespace"] == request.match_info["namespace"]
            and _matches(item["metadata"].get("labels", {}), selector)
        ]

    def _list(self, kind: str, api_version: str, items: list[Any]) -> web.Response:
        metadata = {"resourceVersion": str(self._resource_version)}
        body = {"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}
        return web.json_response(body)

    def _scale(self, deployment: Any) -> Any:
        scale = _recorded("scale.json")
        for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp"):
            scale["metadata"][key] = deployment["metadata"][key]
        match_labels = deployment["spec"]["selector"]["matchLabels"]
        scale["spec"]["replicas"] = deployment["spec"]["replicas"]
        scale["status"]["replicas"] = deployment["status"]["replicas"]
        scale["status"]["selector"] = ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
        return scale

    def _touch(self, item: Any) -> None:
        self._resource_version += 1
        item["metadata"]["resourceVersion"] = str(self._resource_version)

    def _deny(
        self, request: web.Request, verb: str, resource: str, group: str
    ) -> web.Response | None:
        if (verb, resource) not in self.forbidden:
            return None
        name = request.match_info.get("name")
        kind = resource.split("/")[0]
        subject = f"{kind}.{group}" if group else kind
        message = (
            f"{subject}{f' {json.dumps(name)}' if name else ''} is forbidden: User "
            f'"system:serviceaccount:kvmesh:kvmesh-controlplane" cannot {verb} resource '
            f'"{resource}" in API group "{group}" in the namespace '
            f'"{request.match_info["namespace"]}"'
        )
        details = {"name": name, "group": group, "kind": kind}
        return self._status(403, "Forbidden", message, details, recorded="status_forbidden.json")

    def _not_found(self, request: web.Request, kind: str, group: str) -> web.Response:
        name = request.match_info["name"]
        subject = f"{kind}.{group}" if group else kind
        details = {"name": name, "group": group, "kind": kind}
        message = f"{subject} {json.dumps(name)} not found"
        return self._status(404, "NotFound", message, details, recorded="status_not_found.json")

    def _status(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        *,
        recorded: str = "status_not_found.json",
    ) -> web.Response:
        status = _recorded(recorded)
        status.update(code=code, reason=reason, message=message)
        if details is None:
            status.pop("details")
        else:
            status["details"] = {key: value for key, value in details.items() if value}
        return web.json_response(status, status=code)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKubeApi]:
    fake = FakeKubeApi()
    runner = web.AppRunner(fake.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.host = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


def _api_client(host: str) -> ApiClient:
    return ApiClient(Configuration(host=host, no_proxy="127.0.0.1"))


@pytest.fixture
async def actuator(kube: FakeKubeApi) -> AsyncIterator[KubernetesActuator]:
    api = _api_client(kube.host)
    actuator = KubernetesActuator("dc1", namespace=NAMESPACE, capacity=CAPACITY, api_client=api)
    try:
        yield actuator
    finally:
        await actuator.close()
        api.close()


@pytest.fixture
def closed_clients(monkeypatch: pytest.MonkeyPatch) -> list[ApiClient]:
    """Every ApiClient whose `close` is called while the test runs."""
    closed: list[ApiClient] = []
    close = ApiClient.close

    def recording_close(self: ApiClient) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(ApiClient, "close", recording_close)
    return closed


def _prefill(name: str, *, worker_id: str = "", address: str = "", ready: bool = False) -> Replica:
    return Replica(worker_id or name, MODEL, "prefill", name, address, ready)


def test_deployment_name_sanitizes_the_model() -> None:
    assert deployment_name(MODEL, "prefill") == PREFILL
    assert deployment_name("Qwen/Qwen2.5-0.5B-Instruct", "decode") == (
        "kvmesh-qwen-qwen2-5-0-5b-instruct-decode"
    )
    assert model_label(MODEL) == "huggingfacetb-smollm2-135m-instruct"
    assert deployment_labels(MODEL, "decode") == {
        "app.kubernetes.io/part-of": "kvmesh",
        "kvmesh.io/model": "huggingfacetb-smollm2-135m-instruct",
        "kvmesh.io/tier": "decode",
    }


def test_deployment_name_truncates_with_a_hash() -> None:
    long_model = "meta-llama/" + "Llama-3.3-70B-Instruct-" * 4
    name = deployment_name(long_model, "decode")
    # Golden: Deployments are created under this name by hand or by templates, so the rule
    # (and the hash) must never change.
    assert name == "kvmesh-meta-llama-llama-3-3-70b-instruct-llama-412c1445-decode"
    assert len(name) <= 63 and DNS_LABEL.match(name)
    assert deployment_name(long_model + "x", "decode") != name
    label = model_label(long_model)
    assert len(label) <= 63 and DNS_LABEL.match(label)
    assert label == "meta-llama-llama-3-3-70b-instruct-llama-3-3-70b-instru-412c1445"
    assert label != model_label(long_model + "x")
    assert deployment_name("///", "prefill") == "kvmesh-732c4e97-prefill"


async def test_replicas_maps_pods(kube: FakeKubeApi, actuator: KubernetesActuator) -> None:
    replicas = await actuator.replicas(MODEL, "prefill")

    assert replicas == [  # by pod name; the terminating pod is left out
        _prefill(PENDING),
        _prefill(NOT_READY, address="10.244.2.9:50061"),
        _prefill(READY, worker_id="w-3f9c2a71", address="10.244.1.17:50061", ready=True),
    ]
    selector = "app.kubernetes.io/name=kvmesh-worker,kvmesh.io/model={},kvmesh.io/tier=prefill"
    assert kube.requests == [
        Request("GET", f"/apis/apps/v1/namespaces/kvmesh/deployments/{PREFILL}", {}, "", None),
        Request(
            "GET",
            "/api/v1/namespaces/kvmesh/pods",
            {"labelSelector": selector.format(model_label(MODEL))},
            "",
            None,
        ),
    ]


async def test_replicas_default_port_and_ipv6(actuator: KubernetesActuator) -> None:
    replicas = await actuator.replicas(MODEL, "decode")

    assert replicas == [  # no container port named "grpc": 50051
        Replica("w-c47a9e10", MODEL, "decode", DECODE_IPV6, "[fd00:10:244:1::1a]:50051", True),
        Replica(DECODE_IPV4, MODEL, "decode", DECODE_IPV4, "10.244.1.22:50051", True),
    ]


async def test_add_patches_the_scale(kube: FakeKubeApi, actuator: KubernetesActuator) -> None:
    added = await actuator.add(MODEL, "prefill", 1)

    assert added == [Replica("", MODEL, "prefill", f"{PREFILL}-pending-3")]
    scale_path = f"/apis/apps/v1/namespaces/kvmesh/deployments/{PREFILL}/scale"
    assert kube.patches() == [
        Request("PATCH", scale_path, {}, MERGE_PATCH, {"spec": {"replicas": 4}})
    ]
    listing = [r for r in kube.requests if r.path == "/apis/apps/v1/namespaces/kvmesh/deployments"]
    assert [r.query for r in listing] == [{"labelSelector": "app.kubernetes.io/part-of=kvmesh"}]
    assert kube.deployments[PREFILL]["spec"]["replicas"] == 4

    # 4 + 2 fill the cluster now: one more is refused.
    with pytest.raises(ActuatorError, match="already ask for 6 of its 6"):
        await actuator.add(MODEL, "decode", 1)
    assert len(kube.patches()) == 1


async def test_add_over_capacity_patches_nothing(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    with pytest.raises(ActuatorError, match=r"cannot add 2 decode replica.*5 of its 6"):
        await actuator.add(MODEL, "decode", 2)

    assert kube.patches() == []
    assert kube.deployments[DECODE]["spec"]["replicas"] == 2


async def test_remove_marks_pods_then_scales_down(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    await actuator.remove(MODEL, "prefill", [READY, NOT_READY])

    drained = {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "-1000"}}}
    pods = "/api/v1/namespaces/kvmesh/pods"
    scale = f"/apis/apps/v1/namespaces/kvmesh/deployments/{PREFILL}/scale"
    assert kube.patches() == [
        Request("PATCH", f"{pods}/{READY}", {}, MERGE_PATCH, drained),
        Request("PATCH", f"{pods}/{NOT_READY}", {}, MERGE_PATCH, drained),
        Request("PATCH", scale, {}, MERGE_PATCH, {"spec": {"replicas": 1}}),
    ]
    assert kube.pods[READY]["metadata"]["annotations"] == {
        "kvmesh.io/worker-id": "w-3f9c2a71",
        "controller.kubernetes.io/pod-deletion-cost": "-1000",
    }
    assert kube.deployments[PREFILL]["spec"]["replicas"] == 1


async def test_remove_never_scales_below_zero(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    kube.deployments[PREFILL]["spec"]["replicas"] = 1

    await actuator.remove(MODEL, "prefill", [READY, NOT_READY, PENDING])

    assert kube.patches()[-1].body == {"spec": {"replicas": 0}}


async def test_remove_leaves_terminating_pods_alone(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    # Already going (say the first call's scale-down went through): scaling down again
    # would take a second pod.
    await actuator.remove(MODEL, "prefill", [TERMINATING])

    assert kube.patches() == []


async def test_remove_unknown_name_changes_nothing(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    placeholder = f"{PREFILL}-pending-3"
    with pytest.raises(ActuatorError) as raised:
        await actuator.remove(MODEL, "prefill", [READY, DECODE_IPV4, placeholder])

    message = str(raised.value)
    assert f"cannot remove {DECODE_IPV4}, {placeholder}: not a pod of" in message
    assert f"kvmesh/{PREFILL}" in message
    assert kube.patches() == []


async def test_missing_deployment_says_what_to_create(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    for attempt in (actuator.replicas(model, "prefill"), actuator.add(model, "prefill", 1)):
        with pytest.raises(ActuatorError) as raised:
            await attempt
        message = str(raised.value)
        assert "no Deployment 'kvmesh-qwen-qwen2-5-0-5b-instruct-prefill'" in message
        assert "in namespace 'kvmesh'" in message
        assert "does not create them" in message
        assert "kvmesh.io/model=qwen-qwen2-5-0-5b-instruct" in message
    assert [r.method for r in kube.requests] == ["GET", "GET"]


async def test_deployment_without_kvmesh_labels_is_refused(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    del kube.deployments[PREFILL]["metadata"]["labels"]["app.kubernetes.io/part-of"]

    with pytest.raises(
        ActuatorError, match=re.escape("lacks the labels app.kubernetes.io/part-of=kvmesh")
    ):
        await actuator.add(MODEL, "prefill", 1)
    assert kube.patches() == []


async def test_forbidden_scale_names_the_rbac(
    kube: FakeKubeApi, actuator: KubernetesActuator
) -> None:
    kube.forbidden.add(("patch", "deployments/scale"))

    with pytest.raises(ActuatorError) as raised:
        await actuator.add(MODEL, "prefill", 1)

    message = str(raised.value)
    assert f"scaling Deployment kvmesh/{PREFILL} to 4 failed with 403 Forbidden" in message
    assert 'cannot patch resource "deployments/scale"' in message  # the API server's words
    assert "needs RBAC in namespace 'kvmesh'" in message
    assert "get and patch on deployments/scale" in message
    assert kube.deployments[PREFILL]["spec"]["replicas"] == 3


async def test_forbidden_pod_list(kube: FakeKubeApi, actuator: KubernetesActuator) -> None:
    kube.forbidden.add(("list", "pods"))

    with pytest.raises(ActuatorError, match=r"403 Forbidden \(pods is forbidden.*RBAC"):
        await actuator.replicas(MODEL, "prefill")


async def test_unreachable_api_server() -> None:
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = _api_client(f"http://127.0.0.1:{port}")
    actuator = KubernetesActuator("dc1", namespace=NAMESPACE, capacity=CAPACITY, api_client=api)
    try:
        with pytest.raises(
            ActuatorError, match=re.escape(f"API at http://127.0.0.1:{port} did not answer")
        ):
            await actuator.replicas(MODEL, "prefill")
    finally:
        api.close()


async def test_kubeconfig_when_not_in_a_pod(
    kube: FakeKubeApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    closed_clients: list[ApiClient],
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": kube.host}}],
                "users": [{"name": "controlplane", "user": {"token": "t0ken"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "controlplane"}}
                ],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))

    actuator = KubernetesActuator("dc1", namespace=NAMESPACE, capacity=CAPACITY)
    assert len(await actuator.replicas(MODEL, "prefill")) == 3
    assert {r.authorization for r in kube.requests} == {"Bearer t0ken"}
    await actuator.close()
    assert len(closed_clients) == 1


async def test_close_leaves_a_given_client_open(
    actuator: KubernetesActuator, closed_clients: list[ApiClient]
) -> None:
    await actuator.close()

    assert closed_clients == []
    assert len(await actuator.replicas(MODEL, "decode")) == 2


def test_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "absent"))

    with pytest.raises(ActuatorError, match="no Kubernetes credentials: not in a pod"):
        KubernetesActuator("dc1", namespace=NAMESPACE, capacity=CAPACITY)
