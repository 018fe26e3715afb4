"""deploy/kubernetes and deploy/kserve, checked offline.

Every Kubernetes object passes `kubernetes-validate --strict` for Kubernetes 1.37 (the newest version whose
schemas kubernetes-validate 1.37 ships); the KServe objects pass JSON schemas of the fields they use
(tests/schemas/kserve_*.json, written from KServe's ServingRuntime and InferenceService specs). Beyond
the schemas, the manifests must agree with the server: ports and probes with its settings, the termination
grace period with the drain, the arguments with its own parser, the security context with the image's user.
Each consistency check returns the problems it finds, so the tests can also show that a broken copy of a
manifest is caught.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from server.__main__ import _parser
from server.settings import Settings, given_arguments

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
KSERVE_DIR = ROOT / "deploy" / "kserve"
SCHEMAS_DIR = ROOT / "tests" / "schemas"
# The newest Kubernetes version kubernetes-validate 1.37.0 has schemas for; README's "Deploying" says the same.
KUBERNETES_VERSION = "1.37.0"
# Files that are kustomize configuration, not Kubernetes objects.
KUSTOMIZE_FILES = ("kustomization.yaml",)
# A template the user fills in and applies once; left out of kustomization.yaml on purpose (see its header).
NOT_IN_KUSTOMIZATION = {"secret.yaml"}
SECRETS_MOUNT = "/etc/ortserve/secrets"
# Flags that read the mounted Secret: named in the Deployment's comment, not passed by default (TLS would
# need the probes to change; --auth-config belongs to the security issue's next part).
SECRET_FLAGS = ("--tls-cert", "--tls-key", "--auth-config")

Manifest = dict[str, Any]


# Loading.


def _load(path: Path) -> Manifest:
    """The single YAML document in `path`."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, f"{path.name}: one object per file"
    document: Manifest = documents[0]
    return document


def _object_files() -> list[Path]:
    """deploy/kubernetes/*.yaml that hold Kubernetes objects."""
    return sorted(p for p in KUBERNETES_DIR.glob("*.yaml") if p.name not in KUSTOMIZE_FILES)


def _by_kind(kind: str, name: str = "ortserve") -> Manifest:
    for path in _object_files():
        document = _load(path)
        if document["kind"] == kind and document["metadata"]["name"] == name:
            return document
    raise AssertionError(f"no {kind}/{name} in {KUBERNETES_DIR}")


def _schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / f"kserve_{name}.json").read_text())
    return schema


def _pod_spec(deployment: Manifest) -> Manifest:
    spec: Manifest = deployment["spec"]["template"]["spec"]
    return spec


def _server_container(pod_spec: Manifest, name: str) -> Manifest:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _settings(container: Manifest) -> Settings:
    """What the server makes of the container's arguments (SystemExit if its parser refuses them)."""
    namespace = _parser().parse_args(container.get("args", []))
    return Settings(**given_arguments(namespace))


def _ports(container: Manifest) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _iter_containers(pod_spec: Manifest) -> Iterator[Manifest]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def _dockerfile_uid() -> int:
    match = re.search(r"useradd .*--uid (\d+) ortserve", (ROOT / "Dockerfile").read_text())
    assert match, "Dockerfile: no `useradd --uid N ortserve`"
    return int(match.group(1))


def _validate_kubernetes(document: Manifest) -> None:
    """Raises kubernetes_validate.ValidationError where strict validation fails."""
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


# Consistency checks: each returns the problems it finds (empty when the manifests agree with the server).


def port_problems(deployment: Manifest) -> list[str]:
    """Container ports (and the flags) are the server's default gRPC, HTTP and metrics ports."""
    container = _server_container(_pod_spec(deployment), "ortserve")
    settings = _settings(container)
    defaults = {name: Settings.model_fields[field].default
                for name, field in (("grpc", "port"), ("http", "http_port"), ("metrics", "metrics_port"))}
    flags = {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}
    ports = _ports(container)
    problems = [f"port {n}: container {ports.get(n)}, default {d}" for n, d in defaults.items() if ports.get(n) != d]
    problems += [f"port {n}: container {ports.get(n)}, flag {f}" for n, f in flags.items() if ports.get(n) != f]
    return problems


def probe_problems(deployment: Manifest) -> list[str]:
    """Startup, liveness and readiness ask grpc.health.v1 (service "", the server) on the gRPC port."""
    container = _server_container(_pod_spec(deployment), "ortserve")
    grpc_port = _settings(container).port
    problems = []
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind, {}).get("grpc")
        if probe is None:
            problems.append(f"{kind}: not a gRPC probe")
        elif probe.get("port") != grpc_port or probe.get("service", "") != "":
            problems.append(f"{kind}: {probe}, want port {grpc_port} service ''")
    return problems


def grace_problems(deployment: Manifest) -> list[str]:
    """The pod outlives preStop + drain, and liveness cannot fire during a drain (NOT_SERVING)."""
    pod_spec = _pod_spec(deployment)
    container = _server_container(pod_spec, "ortserve")
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    drain = _settings(container).shutdown_grace_s
    problems = []
    if pre_stop is None:
        problems.append("no preStop sleep")
    elif grace <= drain + pre_stop:
        problems.append(f"terminationGracePeriodSeconds {grace} <= --shutdown-grace-s {drain} + preStop {pre_stop}")
    liveness = container.get("livenessProbe", {})
    window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    if window < grace:
        problems.append(f"liveness fails after {window}s, within the {grace}s a drain may take")
    return problems


def security_problems(pod_spec: Manifest) -> list[str]:
    """Non-root (the image's user), read-only root filesystem, no capabilities, no privilege escalation."""
    problems = []
    pod_context = pod_spec.get("securityContext", {})
    for container in _iter_containers(pod_spec):
        context = container.get("securityContext", {})
        name = container["name"]
        user = context.get("runAsUser", pod_context.get("runAsUser"))
        if user != _dockerfile_uid():
            problems.append(f"{name}: runAsUser {user}, the image's user is {_dockerfile_uid()}")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot", False)):
            problems.append(f"{name}: runAsNonRoot not set")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem writable")
        if context.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities not dropped")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: privilege escalation allowed")
    return problems


def writable_tmp_problems(pod_spec: Manifest) -> list[str]:
    """With a read-only root, /tmp (the workers' private sockets) must be an emptyDir."""
    container = _server_container(pod_spec, _main_container_name(pod_spec))
    mount = next((m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"), None)
    if mount is None:
        return ["/tmp is not mounted"]
    volume: Manifest = next((v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"]), {})
    return [] if "emptyDir" in volume and not mount.get("readOnly") else ["/tmp is not a writable emptyDir"]


def _main_container_name(pod_spec: Manifest) -> str:
    return "ortserve" if any(c["name"] == "ortserve" for c in pod_spec["containers"]) else "kserve-container"


def prometheus_problems(deployment: Manifest) -> list[str]:
    """The pod's scrape annotations point at the metrics port's /metrics."""
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    container = _server_container(_pod_spec(deployment), "ortserve")
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": str(_settings(container).metrics_port),
            "prometheus.io/path": "/metrics"}
    problems = [f"{k}: {annotations.get(k)!r}, want {v!r}" for k, v in want.items() if annotations.get(k) != v]
    if _ports(container).get("metrics") != _settings(container).metrics_port:
        problems.append("the metrics port is not a container port")
    return problems


def service_problems(service: Manifest, deployment: Manifest) -> list[str]:
    """Selects the pods, targets named container ports, and marks the gRPC port as HTTP/2 cleartext."""
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = _ports(_server_container(_pod_spec(deployment), "ortserve"))
    problems = []
    if not service["spec"]["selector"].items() <= pod_labels.items():
        problems.append("selector does not match the pods")
    for port in service["spec"]["ports"]:
        if ports.get(port["targetPort"]) != port["port"]:
            problems.append(f"{port['name']}: targetPort {port['targetPort']} is not container port {port['port']}")
        if port["targetPort"] == "grpc" and port.get("appProtocol") != "kubernetes.io/h2c":
            problems.append(f"{port['name']}: gRPC port without appProtocol kubernetes.io/h2c")
    if "grpc" not in {p["targetPort"] for p in service["spec"]["ports"]}:
        problems.append("no gRPC port")
    return problems


def kserve_problems(runtime: Manifest, service: Manifest) -> list[str]:
    """The runtime serves /mnt/models over v2 and grpc-v2, its h2c port is the gRPC port, metrics are
    annotated, and the InferenceService asks for what the runtime offers."""
    container = runtime["spec"]["containers"][0]
    settings = _settings(container)
    problems = []
    if str(settings.model_repository) != "/mnt/models":
        problems.append(f"--model-repository {settings.model_repository}, KServe mounts the model at /mnt/models")
    if {"v2", "grpc-v2"} - set(runtime["spec"].get("protocolVersions", [])):
        problems.append("protocolVersions lacks v2 or grpc-v2")
    if _ports(container).get("h2c") != settings.port:
        problems.append(f"h2c port {_ports(container).get('h2c')} is not the gRPC port {settings.port}")
    annotations = runtime["spec"].get("annotations", {})
    if (annotations.get("prometheus.kserve.io/port"), annotations.get("prometheus.kserve.io/path")) != (
        str(settings.metrics_port), "/metrics"
    ):
        problems.append(f"metrics annotations {annotations} do not point at {settings.metrics_port} /metrics")
    model = service["spec"]["predictor"]["model"]
    if model.get("runtime") != runtime["metadata"]["name"]:
        problems.append(f"InferenceService runtime {model.get('runtime')!r} is not {runtime['metadata']['name']!r}")
    formats = {(f["name"], f.get("version")) for f in runtime["spec"]["supportedModelFormats"]}
    if (model["modelFormat"]["name"], model["modelFormat"].get("version")) not in formats:
        problems.append(f"modelFormat {model['modelFormat']} is not among the runtime's {formats}")
    if model.get("protocolVersion") not in runtime["spec"]["protocolVersions"]:
        problems.append(f"protocolVersion {model.get('protocolVersion')} is not offered by the runtime")
    return problems


# Schema validation.


@pytest.mark.parametrize("path", _object_files(), ids=lambda p: p.name)
def test_kubernetes_object_passes_strict_validation(path: Path) -> None:
    _validate_kubernetes(_load(path))


def test_kubernetes_validate_command_passes_every_file() -> None:
    """The command line the issue names, over every object file at once."""
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION,
               "--quiet", *map(str, _object_files())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stated_kubernetes_version_is_the_newest_kubernetes_validate_ships() -> None:
    """A kubernetes-validate with newer schemas means: move KUBERNETES_VERSION (and README's text) to them."""
    newest = kubernetes_validate.latest_version()
    assert newest.split(".")[:2] == KUBERNETES_VERSION.split(".")[:2], f"kubernetes-validate ships {newest}"


def test_kustomization_lists_every_object_file() -> None:
    kustomization = _load(KUBERNETES_DIR / "kustomization.yaml")
    assert set(kustomization["resources"]) == {p.name for p in _object_files()} - NOT_IN_KUSTOMIZATION


@pytest.mark.parametrize("name", ["servingruntime", "inferenceservice"])
def test_kserve_object_matches_its_schema(name: str) -> None:
    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(_load(KSERVE_DIR / f"{name}.yaml"))


def test_kserve_runtime_containers_and_volumes_are_valid_core_v1() -> None:
    """The runtime's containers and volumes are core/v1 objects: strict-validated inside a Pod."""
    spec = _load(KSERVE_DIR / "servingruntime.yaml")["spec"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ortserve-onnx"},
           "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])}}
    _validate_kubernetes(pod)


# Consistency with the server.


def test_container_ports_are_the_server_defaults() -> None:
    assert port_problems(_by_kind("Deployment")) == []


def test_probes_ask_grpc_health_on_the_grpc_port() -> None:
    assert probe_problems(_by_kind("Deployment")) == []


def test_pod_outlives_pre_stop_and_drain() -> None:
    assert grace_problems(_by_kind("Deployment")) == []


def test_server_arguments_are_accepted_and_read_the_mounted_repository() -> None:
    pod_spec = _pod_spec(_by_kind("Deployment"))
    container = _server_container(pod_spec, "ortserve")
    settings = _settings(container)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert str(settings.model_repository) in mounts
    init_mounts = {m["mountPath"] for c in pod_spec["initContainers"] for m in c["volumeMounts"]}
    assert str(settings.model_repository) in init_mounts, "nothing fills the model repository"


def test_security_context_is_locked_down() -> None:
    assert security_problems(_pod_spec(_by_kind("Deployment"))) == []
    assert writable_tmp_problems(_pod_spec(_by_kind("Deployment"))) == []


def test_prometheus_annotations_point_at_the_metrics_port() -> None:
    assert prometheus_problems(_by_kind("Deployment")) == []


@pytest.mark.parametrize("name", ["ortserve", "ortserve-headless"])
def test_services_reach_the_pods_with_grpc_app_protocol(name: str) -> None:
    assert service_problems(_by_kind("Service", name), _by_kind("Deployment")) == []


def test_headless_service_is_headless() -> None:
    assert _by_kind("Service", "ortserve-headless")["spec"]["clusterIP"] == "None"


def test_disruption_budget_and_autoscaler_target_the_deployment() -> None:
    deployment = _by_kind("Deployment")
    budget = _by_kind("PodDisruptionBudget")["spec"]
    autoscaler = _by_kind("HorizontalPodAutoscaler")["spec"]
    assert budget["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert autoscaler["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ortserve"}
    # With one pod, a budget of one unavailable pod would allow zero serving.
    assert autoscaler["minReplicas"] >= 2 and deployment["spec"]["replicas"] >= 2


def test_secret_is_mounted_where_the_comments_say() -> None:
    secret = _by_kind("Secret", "ortserve-tls-auth")
    pod_spec = _pod_spec(_by_kind("Deployment"))
    volume = next(v for v in pod_spec["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    mount = next(m for m in _server_container(pod_spec, "ortserve")["volumeMounts"] if m["name"] == volume["name"])
    assert mount["mountPath"] == SECRETS_MOUNT and mount["readOnly"] is True
    assert set(secret["stringData"]) == {"tls.crt", "tls.key", "auth.yaml"}
    text = (KUBERNETES_DIR / "deployment.yaml").read_text()
    for flag in SECRET_FLAGS:
        assert flag in text, f"deployment.yaml's comment does not name {flag}"
        assert flag not in _server_container(pod_spec, "ortserve")["args"], "off by default (see the comment)"


def test_kserve_runtime_and_service_agree_with_the_server() -> None:
    runtime = _load(KSERVE_DIR / "servingruntime.yaml")
    assert kserve_problems(runtime, _load(KSERVE_DIR / "inferenceservice.yaml")) == []
    assert security_problems(runtime["spec"]) == []
    assert writable_tmp_problems(runtime["spec"]) == []


# The HTTP readiness alternative (a kustomize Component holding a JSON patch).


def _apply_replace_ops(document: Manifest, operations: list[dict[str, Any]]) -> Manifest:
    """RFC 6902 `replace` operations (all the component uses) applied to a copy of `document`."""
    patched = copy.deepcopy(document)
    for operation in operations:
        assert operation["op"] == "replace"
        *parents, last = operation["path"].lstrip("/").split("/")
        target: Any = patched
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        assert last in target, f"{operation['path']} does not exist"
        target[last] = operation["value"]
    return patched


def _http_readiness_deployment() -> Manifest:
    component = _load(KUBERNETES_DIR / "http-readiness" / "kustomization.yaml")
    assert component["kind"] == "Component"
    (patch,) = component["patches"]
    assert patch["target"]["kind"] == "Deployment" and patch["target"]["name"] == "ortserve"
    return _apply_replace_ops(_by_kind("Deployment"), yaml.safe_load(patch["patch"]))


def test_http_readiness_component_gives_a_valid_deployment() -> None:
    deployment = _http_readiness_deployment()
    _validate_kubernetes(deployment)
    container = _server_container(_pod_spec(deployment), "ortserve")
    probe = container["readinessProbe"]
    assert probe["httpGet"]["path"] == "/v2/health/ready"
    assert _ports(container)[probe["httpGet"]["port"]] == _settings(container).http_port
    assert "grpc" not in probe


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_valid_objects(tmp_path: Path) -> None:
    """`kubectl kustomize` of the base and of an overlay with the HTTP readiness component."""
    shutil.copytree(KUBERNETES_DIR, tmp_path / "kubernetes")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "resources: [../kubernetes]\ncomponents: [../kubernetes/http-readiness]\n"
    )
    for directory in (tmp_path / "kubernetes", overlay):
        result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        documents = list(yaml.safe_load_all(result.stdout))
        assert len(documents) == len(_object_files()) - len(NOT_IN_KUSTOMIZATION)
        for document in documents:
            _validate_kubernetes(document)
    probes = [d for d in documents if d["kind"] == "Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert "httpGet" in probes["readinessProbe"]


# The checks catch mistakes: broken copies of the manifests fail.


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A mutation setting a dotted path (list indices as numbers) of a manifest to `value`."""

    def mutate(document: Manifest) -> None:
        *parents, last = path.split(".")
        target: Any = document
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value

    return mutate


def _scrape_port(port: str) -> Callable[[Manifest], None]:
    """A mutation of the prometheus.io/port annotation (its key holds a dot, which _set splits on)."""

    def mutate(document: Manifest) -> None:
        document["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = port

    return mutate


POD = "spec.template.spec"
SERVER = f"{POD}.containers.0"
BROKEN_DEPLOYMENTS: dict[str, tuple[Callable[[Manifest], None], Callable[[Manifest], list[str]]]] = {
    "grpc container port moved": (_set(f"{SERVER}.ports.0.containerPort", 9001), port_problems),
    "readiness probe on the HTTP port": (_set(f"{SERVER}.readinessProbe.grpc.port", 8000), probe_problems),
    "grace period shorter than the drain": (_set(f"{POD}.terminationGracePeriodSeconds", 20), grace_problems),
    "no preStop": (_set(f"{SERVER}.lifecycle", {}), grace_problems),
    "a flag the server does not accept": (
        _set(f"{SERVER}.args", ["serve", "--no-such-flag", "1"]), port_problems
    ),
    "writable root filesystem": (
        _set(f"{SERVER}.securityContext.readOnlyRootFilesystem", False), lambda d: security_problems(_pod_spec(d))
    ),
    "capabilities kept": (
        _set(f"{SERVER}.securityContext.capabilities", {}), lambda d: security_problems(_pod_spec(d))
    ),
    "root user": (_set(f"{POD}.securityContext.runAsUser", 0), lambda d: security_problems(_pod_spec(d))),
    "no writable /tmp": (_set(f"{SERVER}.volumeMounts", []), lambda d: writable_tmp_problems(_pod_spec(d))),
    "scraping the HTTP port": (_scrape_port("8000"), prometheus_problems),
}


def _checked(check: Callable[[Manifest], list[str]], document: Manifest) -> list[str]:
    """The check's problems; a SystemExit from the server's parser (a refused flag) is one too."""
    try:
        return check(document)
    except SystemExit as exc:
        return [f"the server's parser refused the arguments (exit {exc.code})"]
    except ValidationError as exc:
        return [f"the server's settings refused the arguments: {exc.errors()[0]['msg']}"]


@pytest.mark.parametrize("mistake", sorted(BROKEN_DEPLOYMENTS))
def test_consistency_checks_catch_a_broken_deployment(mistake: str) -> None:
    mutate, check = BROKEN_DEPLOYMENTS[mistake]
    deployment = copy.deepcopy(_by_kind("Deployment"))
    mutate(deployment)
    assert _checked(check, deployment), f"{mistake}: not caught"


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment"))
    container = _server_container(_pod_spec(deployment), "ortserve")
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_kubernetes(deployment)


def test_strict_validation_catches_a_wrongly_typed_value() -> None:
    deployment = copy.deepcopy(_by_kind("Deployment"))
    _server_container(_pod_spec(deployment), "ortserve")["ports"][0]["containerPort"] = "8001"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_kubernetes(deployment)


def test_service_check_catches_grpc_without_app_protocol() -> None:
    service = copy.deepcopy(_by_kind("Service"))
    for port in service["spec"]["ports"]:
        port.pop("appProtocol", None)
    assert service_problems(service, _by_kind("Deployment"))


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("servingruntime", "spec.containers.0.ports.0.name", "grpc"),
        ("servingruntime", "spec.protocolVersions", ["v3"]),
        ("servingruntime", "spec.supportedModelFormat", []),
        ("inferenceservice", "spec.predictor.model.storageUri", "/local/path"),
        ("inferenceservice", "spec.predictor.model.protocolVersion", "grpc"),
    ],
)
def test_kserve_schemas_catch_a_broken_copy(name: str, path: str, value: Any) -> None:
    document = copy.deepcopy(_load(KSERVE_DIR / f"{name}.yaml"))
    _set(path, value)(document)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_schema(name)).validate(document)


def test_kserve_check_catches_a_mismatched_runtime() -> None:
    runtime = copy.deepcopy(_load(KSERVE_DIR / "servingruntime.yaml"))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = 8000
    assert kserve_problems(runtime, _load(KSERVE_DIR / "inferenceservice.yaml"))


def test_secret_templates_auth_config_is_valid(tmp_path: Path) -> None:
    """The Secret template's auth.yaml is in the format --auth-config validates (not a comment placeholder)."""
    from server.service.auth_config import load_auth_config

    secret = _load(KUBERNETES_DIR / "secret.yaml")
    path = tmp_path / "auth.yaml"
    path.write_text(secret["stringData"]["auth.yaml"])
    config = load_auth_config(path)
    assert [entry.roles for entry in config.api_keys] == [["infer"]]
