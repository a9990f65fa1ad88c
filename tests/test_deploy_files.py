"""Offline validation of the deployment files: cluster/, deploy/, docker/ and .dockerignore.

Everything here runs without network, Docker, Kubernetes or a Ray cluster: Ray's own
cluster-config validation (defaults merged, then ray-schema.json), botocore's EC2 model for
node_config, kubernetes-validate for core Kubernetes kinds, and the KubeRay rules that no
schema catches. Each rule is a function returning a list of problems, so the negative tests
can mutate a valid file and check that the rule notices.

The RayService's ``serveConfigV2`` goes through Ray Serve's own config schema (as ``serve
deploy`` checks it) and its application args through `metapeft_ray.on_ray.serve.builder_args`.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import botocore.session
import kubernetes_validate
import pytest
import ray
import yaml
from botocore.validate import ParamValidator
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.autoscaler._private.util import prepare_config, validate_config

from metapeft_ray.core import metrics as metapeft_metrics
from metapeft_ray.on_ray.serve import builder_args

ROOT = Path(__file__).resolve().parents[1]
RAY_VERSION = ray.__version__

CLUSTER_YAML = ROOT / "cluster" / "aws-gpu.yaml"
LOCAL_SCRIPT = ROOT / "cluster" / "local-multinode.sh"
DEPLOY = ROOT / "deploy"
RAYCLUSTER_YAML = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB_YAML = DEPLOY / "kuberay" / "rayjob.yaml"
RAYSERVICE_YAML = DEPLOY / "kuberay" / "rayservice.yaml"
PODMONITOR_YAML = DEPLOY / "prometheus" / "podmonitor.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD_JSON = DEPLOY / "grafana" / "metapeft-dashboard.json"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

METRICS_PORT = 8080
# The metric names as Prometheus shows them (ray_ + metapeft_ prefix, counters with _total),
# declared once in metapeft_ray.core.metrics, which records them: training's and serving's.
ALL_METRICS = metapeft_metrics.METRICS + metapeft_metrics.SERVE_METRICS
METRICS = metapeft_metrics.prometheus_names(ALL_METRICS)
METRIC_SERIES = metapeft_metrics.prometheus_series(ALL_METRICS)

# Known spec fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/*_types.go).
RAYCLUSTER_SPEC_KEYS = frozenset(
    {
        "authOptions",
        "autoscalerOptions",
        "enableInTreeAutoscaling",
        "gcsFaultToleranceOptions",
        "headGroupSpec",
        "headServiceAnnotations",
        "managedBy",
        "rayVersion",
        "suspend",
        "upgradeStrategy",
        "workerGroupSpecs",
    }
)
RAYJOB_SPEC_KEYS = frozenset(
    {
        "activeDeadlineSeconds",
        "backoffLimit",
        "clusterSelector",
        "deletionStrategy",
        "entrypoint",
        "entrypointNumCpus",
        "entrypointNumGpus",
        "entrypointResources",
        "jobId",
        "managedBy",
        "metadata",
        "rayClusterSpec",
        "runtimeEnvYAML",
        "shutdownAfterJobFinishes",
        "submissionMode",
        "submitterConfig",
        "submitterPodTemplate",
        "suspend",
        "ttlSecondsAfterFinished",
    }
)
RAYSERVICE_SPEC_KEYS = frozenset(
    {
        "deploymentUnhealthySecondThreshold",
        "excludeHeadPodFromServeSvc",
        "rayClusterConfig",
        "rayClusterDeletionDelaySeconds",
        "serveConfigV2",
        "serveService",
        "serviceUnhealthySecondThreshold",
        "upgradeStrategy",
    }
)
SERVE_IMPORT_PATH = "metapeft_ray.on_ray.serve:app_builder"
SERVE_DEPLOYMENTS = ("AdaptationServer", "TaskStore")  # the store holds the app's tasks: one replica
WORKER_GROUP_KEYS = ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template")
CUSTOM_API_GROUPS = ("ray.io/", "monitoring.coreos.com/")
# Where the head's dashboard finds Prometheus and Grafana (its Metrics tab embeds the panels).
HEAD_DASHBOARD_ENV = ("RAY_PROMETHEUS_HOST", "RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST")
# KubeRay's own token authentication (spec.authOptions) arrived in this operator version.
AUTH_OPTIONS_SINCE = (1, 5, 1)
# The label naming a Ray cluster in Prometheus, and the dashboard variable that filters on it.
CLUSTER_LABEL = "ray_io_cluster"
CLUSTER_FILTER = f'{CLUSTER_LABEL}=~"$cluster"'


# --- helpers ---------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return load_docs_text(path.read_text())


def load_docs_text(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    (doc,) = load_docs(path)
    return doc


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in load_docs(path):
            yield path, doc


def k8s_errors(doc: dict[str, Any]) -> list[str]:
    """kubernetes-validate against the newest bundled Kubernetes schema, unknown fields refused."""
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


def pod_template_errors(template: dict[str, Any], name: str) -> list[str]:
    """A KubeRay pod template is a core/v1 PodTemplateSpec: validate it as a PodTemplate."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
    return [f"{name}: {e}" for e in k8s_errors(wrapped)]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template.get("spec", {}).get("containers", [])


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


# --- cluster launcher (AWS) ------------------------------------------------------------------


def launcher_schema_check(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's own check, as `ray up` does it: merge the provider defaults, then the schema."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def run_instances_errors(node_config: dict[str, Any]) -> str:
    """botocore's EC2 RunInstances input shape: unknown keys and wrong types, recursively."""
    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    report = ParamValidator().validate({"MinCount": 1, "MaxCount": 1, **node_config}, shape)
    return report.generate_report() if report.has_errors() else ""


def launcher_problems(raw: dict[str, Any]) -> list[str]:
    problems = []
    image = raw.get("docker", {}).get("image", "")
    if not image.endswith(f":{RAY_VERSION}"):
        problems.append(f"docker.image {image!r} is not tagged {RAY_VERSION}")
    # Without explicit setup commands Ray merges in its defaults (a nightly Ray wheel).
    problems += [f"{key} missing" for key in ("setup_commands", "head_setup_commands") if key not in raw]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any(f"--metrics-export-port={METRICS_PORT}" in c for c in raw.get(key, [])):
            problems.append(f"{key}: no --metrics-export-port={METRICS_PORT}")
    node_types = raw.get("available_node_types", {})
    for name, node_type in node_types.items():
        if "Arn" not in node_type["node_config"].get("IamInstanceProfile", {}):
            problems.append(f"{name}: no IamInstanceProfile.Arn (S3 access)")
        if errors := run_instances_errors(node_type["node_config"]):
            problems.append(f"{name}.node_config: {errors}")
    gpu_types = [n for n, t in node_types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    if not gpu_types:
        problems.append("no worker node type with a GPU resource")
    return problems


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_launcher_passes_ray_validation(launcher: dict[str, Any]) -> None:
    config = launcher_schema_check(launcher)
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_launcher_rules(launcher: dict[str, Any]) -> None:
    assert launcher_problems(launcher) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["available_node_types"]["worker.gpu"].update(min_workers="0"), "integer"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    ],
    ids=["unknown-top-level-key", "string-min-workers", "unknown-head-type"],
)
def test_cluster_launcher_validation_rejects(
    launcher: dict[str, Any], mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(launcher)
    mutate(broken)
    with pytest.raises(Exception, match=expected):
        launcher_schema_check(broken)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda n: n.update(InstanceTyp="g5.xlarge"), 'Unknown parameter in input: "InstanceTyp"'),
        (lambda n: n["IamInstanceProfile"].update(ARN="x"), "Unknown parameter in IamInstance"),
        (lambda n: n["BlockDeviceMappings"][0]["Ebs"].update(VolumeSize="200"), "Invalid type"),
    ],
    ids=["misspelled-key", "nested-unknown-key", "wrong-type"],
)
def test_node_config_checked_against_ec2_model(
    launcher: dict[str, Any], mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(launcher)
    mutate(broken["available_node_types"]["worker.gpu"]["node_config"])
    assert any(expected in p for p in launcher_problems(broken))


# --- local two-node script ---------------------------------------------------------------------


def code_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if not line.lstrip().startswith("#")]


def script_problems(script: str) -> list[str]:
    code = "\n".join(code_lines(script))
    problems = [f"uses {word}" for word in ("pkill", "killall") if word in script]
    # `ray stop` stops every Ray process of the user, not only this script's nodes.
    if re.search(r"\bray\}?\"?\s+stop\b", code, flags=re.IGNORECASE):
        problems.append("runs `ray stop`")
    for flag in (
        "--num-cpus",
        "--object-store-memory",
        "--temp-dir",
        "--dashboard-agent-listen-port",
        "--metrics-export-port",
        "--address",
    ):
        if flag not in code:
            problems.append(f"never passes {flag}")
    if not re.search(r"\btimeout\b[^\n]*\bstart\b", code):
        problems.append("`ray start` is not wrapped in timeout")
    if "RAY_AUTH_MODE" not in script:
        problems.append("RAY_AUTH_MODE is not documented")
    return problems


def test_local_multinode_script_syntax() -> None:
    subprocess.run(["bash", "-n", str(LOCAL_SCRIPT)], check=True, capture_output=True)


def test_local_multinode_script_rules() -> None:
    assert script_problems(LOCAL_SCRIPT.read_text()) == []


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("ray stop", "runs `ray stop`"),
        ('"$RAY" stop --force', "runs `ray stop`"),
        ("pkill -f raylet", "uses pkill"),
        ("killall raylet", "uses killall"),
    ],
)
def test_local_multinode_script_rejects_broad_stops(line: str, expected: str) -> None:
    assert expected in script_problems(LOCAL_SCRIPT.read_text() + f"\n{line}\n")


def test_local_multinode_script_syntax_error_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "broken.sh"
    broken.write_text(LOCAL_SCRIPT.read_text() + "\nif true; then\n")
    assert subprocess.run(["bash", "-n", str(broken)], capture_output=True).returncode != 0


# --- KubeRay, Kubernetes and Prometheus Operator manifests --------------------------------------


def ray_containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, group spec, Ray container) for the head group and every worker group."""
    groups = [("head", spec.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        pod = containers(group.get("template", {}))
        yield name, group, pod[0] if pod else {}


def auth_problems(where: str, container: dict[str, Any]) -> list[str]:
    env = env_of(container)
    problems = []
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        problems.append(f"{where}: RAY_AUTH_MODE is not token")
    if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
        problems.append(f"{where}: RAY_AUTH_TOKEN does not come from a Secret")
    return problems


def shm_problems(where: str, template: dict[str, Any], container: dict[str, Any]) -> list[str]:
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in template.get("spec", {}).get("volumes", [])}
    volume = volumes.get(mounts.get("/dev/shm", ""), {})
    if volume.get("emptyDir", {}).get("medium") != "Memory":
        return [f"{where}: /dev/shm is not an emptyDir with medium Memory"]
    return []


def unknown_fields(spec: dict[str, Any], known: frozenset[str], where: str) -> list[str]:
    return [f"{where}: unknown spec field {k!r}" for k in sorted(set(spec) - known)]


def gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def group_problems(at: str, group: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Rules for one head or worker group and its Ray container."""
    # KubeRay passes rayStartParams to `ray start` as a map[string]string.
    problems = [
        f"{at}: rayStartParams[{k!r}] = {v!r} is not a string"
        for k, v in group.get("rayStartParams", {}).items()
        if not isinstance(v, str)
    ]
    template = group.get("template", {})
    problems += [
        f"{at}: image {c.get('image')!r} does not carry Ray {RAY_VERSION}"
        for c in containers(template)
        if RAY_VERSION not in c.get("image", "")
    ]
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    if ports.get("metrics") != METRICS_PORT:
        problems.append(f"{at}: no container port 'metrics' = {METRICS_PORT}")
    problems += shm_problems(at, template, container)
    problems += auth_problems(at, container)
    return problems + pod_template_errors(template, at)


def ray_cluster_spec_problems(spec: dict[str, Any], where: str) -> list[str]:
    problems = unknown_fields(spec, RAYCLUSTER_SPEC_KEYS, where)
    if spec.get("rayVersion") != RAY_VERSION:
        problems.append(f"{where}: rayVersion {spec.get('rayVersion')!r} != {RAY_VERSION!r}")
    head = spec.get("headGroupSpec")
    if not head or not {"rayStartParams", "template"} <= set(head):
        problems.append(f"{where}: headGroupSpec needs rayStartParams and template")
    if not spec.get("workerGroupSpecs"):
        problems.append(f"{where}: no workerGroupSpecs")
    gpu_groups = 0
    for name, group, container in ray_containers(spec):
        at = f"{where}/{name}"
        problems += group_problems(at, group, container)
        if name == "head":
            env = env_of(container)
            problems += [
                f"{at}: {key} is not an http(s) URL in the head's env"
                for key in HEAD_DASHBOARD_ENV
                if not str(env.get(key, {}).get("value", "")).startswith(("http://", "https://"))
            ]
            continue
        problems += [f"{at}: missing {k}" for k in WORKER_GROUP_KEYS if k not in group]
        replicas = [group.get(k, 0) for k in ("minReplicas", "replicas", "maxReplicas")]
        if replicas != sorted(replicas):
            problems.append(f"{at}: needs minReplicas <= replicas <= maxReplicas")
        gpu_groups += gpu_limit(container) >= 1
    if not gpu_groups:
        problems.append(f"{where}: no worker group with an nvidia.com/gpu limit")
    if spec.get("enableInTreeAutoscaling"):
        problems += auth_problems(f"{where}/autoscaler", spec.get("autoscalerOptions", {}))
    return problems


def ray_resource_problems(doc: dict[str, Any]) -> list[str]:
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") != "ray.io/v1" or not doc.get("metadata", {}).get("name"):
        return [f"{where}: needs apiVersion ray.io/v1 and metadata.name"]
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return ray_cluster_spec_problems(spec, where)
    if doc["kind"] == "RayService":
        problems = unknown_fields(spec, RAYSERVICE_SPEC_KEYS, where)
        return (
            problems
            + ray_cluster_spec_problems(spec.get("rayClusterConfig", {}), where)
            + (serve_config_problems(spec, where))
        )
    problems = unknown_fields(spec, RAYJOB_SPEC_KEYS, where)
    # A retry resubmits the same run.name, which resumes from the last checkpoint: retry.
    backoff = spec.get("backoffLimit")
    if not isinstance(backoff, int) or isinstance(backoff, bool) or backoff < 1:
        problems.append(f"{where}: backoffLimit {backoff!r} is not an integer >= 1")
    entrypoint = spec.get("entrypoint", "")
    if not re.match(r"metapeft train --config \S+", entrypoint) or "s3://" not in entrypoint:
        problems.append(f"{where}: entrypoint is not `metapeft train --config ...` to s3://")
    if "rayClusterSpec" in spec:
        problems += ray_cluster_spec_problems(spec["rayClusterSpec"], where)
    if submitter := spec.get("submitterPodTemplate"):
        problems += pod_template_errors(submitter, f"{where}/submitter")
        problems += auth_problems(f"{where}/submitter", containers(submitter)[0])
    return problems


def serve_config_problems(spec: dict[str, Any], where: str) -> list[str]:
    """``serveConfigV2`` through Ray Serve's schema, each application's args through
    `builder_args`; a proxy beyond loopback needs the token, which every Ray container must
    read from a Secret; every Ray container exposes the proxy's port as ``serve``."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(spec.get("serveConfigV2", "")))
    except (ValidationError, yaml.YAMLError) as err:
        return [f"{where}: serveConfigV2: {str(err).splitlines()[0]}"]
    problems = []
    cluster = spec.get("rayClusterConfig", {})
    http = config.http_options
    for name, _, container in ray_containers(cluster):
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
        if ports.get("serve") != http.port:
            problems.append(f"{where}/{name}: no container port 'serve' = {http.port}")
    for app in config.applications:
        at = f"{where}/{app.name}"
        if app.import_path != SERVE_IMPORT_PATH:
            problems.append(f"{at}: import_path {app.import_path!r} is not {SERVE_IMPORT_PATH!r}")
            continue
        try:
            _, settings, _ = builder_args(app.args or {})
        except ValueError as err:
            problems.append(f"{at}: {err}")
            continue
        if http.host not in ("127.0.0.1", "localhost") and not (settings.token_env or settings.token_file):
            problems.append(f"{at}: the proxy listens on {http.host} and no token guards the routes")
        if settings.token_env:
            problems += [
                f"{where}/{name}: {settings.token_env} does not come from a Secret"
                for name, _, c in ray_containers(cluster)
                if "secretKeyRef" not in env_of(c).get(settings.token_env, {}).get("valueFrom", {})
            ]
        problems += [
            f"{at}: unknown deployment {d.name!r} (the app has {', '.join(SERVE_DEPLOYMENTS)})"
            for d in app.deployments
            if d.name not in SERVE_DEPLOYMENTS
        ]
        problems += [
            f"{at}: TaskStore has num_replicas {d.num_replicas}: it is the tasks' one copy"
            for d in app.deployments
            if d.name == "TaskStore"
            and ({"num_replicas", "autoscaling_config"} & d.model_fields_set)
            and d.num_replicas != 1
        ]
    return problems


def operator_problems(text: str) -> list[str]:
    """A KubeRay file names the oldest operator it needs (``KubeRay operator >= X.Y``) and uses
    ``authOptions`` only if that operator has it: an older operator's CRD drops the unknown
    field silently and the cluster starts without a token."""
    match = re.search(r"KubeRay operator >= (\d+(?:\.\d+)*)", text)
    if not match:
        return ["no `KubeRay operator >= X.Y` in the file's comments"]
    minimum = tuple(int(x) for x in match.group(1).split("."))
    if minimum < AUTH_OPTIONS_SINCE and list(values_of(load_docs_text(text), "authOptions")):
        since = ".".join(map(str, AUTH_OPTIONS_SINCE))
        return [f"authOptions needs KubeRay >= {since}, the file targets >= {match.group(1)}"]
    return []


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load_one(RAYCLUSTER_YAML)


def test_manifests_are_named_resources_of_the_expected_kinds() -> None:
    docs = list(manifests())
    for path, doc in docs:
        assert {"apiVersion", "kind"} <= set(doc), path
        assert doc.get("metadata", {}).get("name"), path
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayCluster", "RayJob", "Secret", "ServiceAccount", "PodMonitor"} <= kinds


def test_core_kinds_pass_kubernetes_validate() -> None:
    core = [(p, d) for p, d in manifests() if not d["apiVersion"].startswith(CUSTOM_API_GROUPS)]
    assert core
    for path, doc in core:
        assert k8s_errors(doc) == [], path


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML, RAYSERVICE_YAML], ids=lambda p: p.name)
def test_kuberay_resources_follow_the_rules(path: Path) -> None:
    assert ray_resource_problems(load_one(path)) == []


@pytest.mark.parametrize("path", [RAYCLUSTER_YAML, RAYJOB_YAML, RAYSERVICE_YAML], ids=lambda p: p.name)
def test_kuberay_files_declare_their_operator_version(path: Path) -> None:
    assert operator_problems(path.read_text()) == []


def test_auth_options_are_refused_below_the_operator_that_has_them() -> None:
    text = RAYCLUSTER_YAML.read_text().replace("spec:\n", "spec:\n  authOptions:\n    mode: token\n", 1)
    assert any("authOptions needs KubeRay >= 1.5.1" in p for p in operator_problems(text))
    assert operator_problems(text.replace("KubeRay operator >= 1.3", "KubeRay operator >= 1.5.1")) == []
    assert operator_problems("kind: RayCluster\n") != []


def values_of(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a parsed YAML/JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from values_of(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from values_of(item, key)


def test_secret_refs_resolve_to_the_example_secret() -> None:
    docs = [doc for _, doc in manifests()]
    secrets = {
        d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
        for d in docs
        if d["kind"] == "Secret"
    }
    refs = list(values_of(docs, "secretKeyRef"))
    assert refs
    for ref in refs:
        assert ref["key"] in secrets.get(ref["name"], {}), f"{ref} names no example Secret key"


def _set_start_param(doc: dict[str, Any], value: Any) -> None:
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = value


def _drop_head_env(key: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        head = containers(doc["spec"]["headGroupSpec"]["template"])[0]
        head["env"] = [e for e in head["env"] if e["name"] != key]

    return mutate


def _drop_gpu(doc: dict[str, Any]) -> None:
    for c in containers(doc["spec"]["workerGroupSpecs"][0]["template"]):
        for section in c["resources"].values():
            section.pop("nvidia.com/gpu", None)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: _set_start_param(d, 4), "is not a string"),
        (lambda d: _set_start_param(d, True), "is not a string"),
        (lambda d: d["spec"].update(rayVersion="2.9.0"), "rayVersion"),
        (lambda d: d["spec"].update(workerGroupSpec=[]), "unknown spec field"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), "missing maxReplicas"),
        (_drop_gpu, "nvidia.com/gpu"),
        (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].pop("volumes"), "/dev/shm"),
        (
            lambda d: containers(d["spec"]["headGroupSpec"]["template"])[0].update(image="x:2.9.0"),
            "does not carry Ray",
        ),
        (
            lambda d: containers(d["spec"]["headGroupSpec"]["template"])[0].update(cpu="4"),
            "Additional properties are not allowed",
        ),
        (lambda d: containers(d["spec"]["headGroupSpec"]["template"])[0].pop("env"), "RAY_AUTH_MODE"),
        (_drop_head_env("RAY_GRAFANA_HOST"), "head: RAY_GRAFANA_HOST"),
        (_drop_head_env("RAY_PROMETHEUS_HOST"), "head: RAY_PROMETHEUS_HOST"),
    ],
    ids=[
        "int-start-param",
        "bool-start-param",
        "ray-version",
        "unknown-spec-field",
        "no-max-replicas",
        "no-gpu-limit",
        "no-shm-volume",
        "image-version",
        "pod-template-schema",
        "no-auth-env",
        "no-grafana-host",
        "no-prometheus-host",
    ],
)
def test_kuberay_rules_reject_broken_cluster(
    raycluster: dict[str, Any], mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(raycluster)
    mutate(broken)
    problems = ray_resource_problems(broken)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"].pop("backoffLimit"), "backoffLimit None"),
        (lambda d: d["spec"].update(backoffLimit=0), "backoffLimit 0"),
        (lambda d: d["spec"].update(backoffLimit="2"), "backoffLimit '2'"),
        (
            lambda d: _drop_head_env("RAY_GRAFANA_HOST")({"spec": d["spec"]["rayClusterSpec"]}),
            "head: RAY_GRAFANA_HOST",
        ),
    ],
    ids=["no-backoff-limit", "zero-backoff-limit", "string-backoff-limit", "no-grafana-host"],
)
def test_rayjob_rules_reject_a_broken_job(mutate: Callable[[dict[str, Any]], None], expected: str) -> None:
    broken = copy.deepcopy(load_one(RAYJOB_YAML))
    mutate(broken)
    problems = ray_resource_problems(broken)
    assert any(expected in p for p in problems), problems


def _edit_serve_config(edit: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        edit(config)
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)

    return mutate


def _app_args(config: dict[str, Any]) -> dict[str, Any]:
    return config["applications"][0]["args"]


def _drop_worker_token(doc: dict[str, Any]) -> None:
    worker = containers(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"])[0]
    worker["env"] = [e for e in worker["env"] if e["name"] != "METAPEFT_SERVE_TOKEN"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_edit_serve_config(lambda c: _app_args(c).pop("token_env")), "no token guards the routes"),
        (_drop_worker_token, "gpu: METAPEFT_SERVE_TOKEN does not come from a Secret"),
        (_edit_serve_config(lambda c: c["applications"][0].update(import_path="app:x")), "import_path"),
        (_edit_serve_config(lambda c: _app_args(c).update(cache_sise=3)), "cache_sise: unknown key"),
        (_edit_serve_config(lambda c: _app_args(c).update(adapters={})), "adapters: a mapping"),
        (_edit_serve_config(lambda c: c["http_options"].update(port="http")), "serveConfigV2: "),
        (_edit_serve_config(lambda c: c["http_options"].update(port=8001)), "'serve' = 8001"),
        (
            _edit_serve_config(
                lambda c: c["applications"][0]["deployments"].append({"name": "TaskStore", "num_replicas": 2})
            ),
            "TaskStore has num_replicas 2",
        ),
        (
            _edit_serve_config(lambda c: c["applications"][0]["deployments"].append({"name": "Store"})),
            "unknown deployment 'Store'",
        ),
        (_edit_serve_config(lambda c: _app_args(c).update(max_batch_size=0)), "max_batch_size=0"),
        (lambda d: d["spec"].update(serveConfig={}), "unknown spec field 'serveConfig'"),
        (lambda d: d["spec"]["rayClusterConfig"].update(rayVersion="2.9.0"), "rayVersion"),
    ],
    ids=[
        "no-token",
        "worker-token-env",
        "import-path",
        "unknown-arg",
        "no-adapters",
        "serve-schema",
        "serve-port",
        "store-replicas",
        "unknown-deployment",
        "batch-size",
        "unknown-spec-field",
        "ray-version",
    ],
)
def test_rayservice_rules_reject_a_broken_service(
    mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    broken = copy.deepcopy(load_one(RAYSERVICE_YAML))
    mutate(broken)
    problems = ray_resource_problems(broken)
    assert any(expected in p for p in problems), problems


def test_podmonitors_scrape_named_ports_of_head_and_workers(raycluster: dict[str, Any]) -> None:
    monitors = load_docs(PODMONITOR_YAML)
    assert all(m["apiVersion"] == "monitoring.coreos.com/v1" and m["kind"] == "PodMonitor" for m in monitors)
    declared = {
        name: {p["name"] for p in c.get("ports", [])} for name, _, c in ray_containers(raycluster["spec"])
    }
    scraped: dict[str, set[str]] = {}
    for monitor in monitors:
        node_type = monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"]
        scraped[node_type] = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert set(scraped) == {"head", "worker"}
    assert "metrics" in scraped["head"] and "metrics" in scraped["worker"]
    assert scraped["head"] <= declared["head"]
    for name, ports in declared.items():
        if name != "head":
            assert scraped["worker"] <= ports, name


# --- Prometheus (VMs) and Grafana -------------------------------------------------------------


def test_prometheus_config_uses_ray_service_discovery_file() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    files = [
        f for job in config["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]
    ]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    problems, seen = [], set()
    panels = dashboard.get("panels", [])
    if len({p.get("id") for p in panels}) != len(panels):
        problems.append("panel ids are not unique")
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        if not exprs:
            problems.append(f"panel {panel.get('title')!r} has no targets")
        for expr in exprs:
            unfiltered = [
                m.group(0)
                for m in re.finditer(r"\bray_metapeft_\w+(\{[^}]*\})?", expr)
                if CLUSTER_FILTER not in (m.group(1) or "")
            ]
            problems += [
                f"{panel.get('title')!r}: {s!r} is not filtered by {CLUSTER_FILTER}" for s in unfiltered
            ]
            names = set(re.findall(r"\bray_metapeft_\w+", expr))
            if not names:
                problems.append(f"{panel.get('title')!r}: {expr!r} reads no ray_metapeft_ metric")
            problems += [f"{panel.get('title')!r}: unknown metric {n}" for n in sorted(names - METRIC_SERIES)]
            seen |= names
    missing = {m for m in METRICS if not any(s.startswith(m) for s in seen)}
    problems += [f"no panel shows {m}" for m in sorted(missing)]
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    if f", {CLUSTER_LABEL})" not in variables.get("cluster", {}).get("definition", ""):
        problems.append(f"no template variable `cluster` listing the values of {CLUSTER_LABEL}")
    if CLUSTER_FILTER not in variables.get("run", {}).get("definition", ""):
        problems.append(f"the `run` variable's values are not filtered by {CLUSTER_FILTER}")
    return problems


def test_grafana_dashboard_panels_read_metapeft_metrics() -> None:
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    assert dashboard_problems(dashboard) == []
    quantiles = [
        t["expr"] for p in dashboard["panels"] for t in p["targets"] if "histogram_quantile(0.95" in t["expr"]
    ]
    assert any("ray_metapeft_inner_loop_seconds_bucket" in q and "by (le)" in q for q in quantiles)


def dashboard_labels(dashboard: dict[str, Any]) -> set[str]:
    """Labels the panels group or filter by: ``by (a, b)`` and ``{a=~"..."}``."""
    labels: set[str] = set()
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                labels |= {x.strip() for x in group.split(",") if x.strip()}
            labels |= set(re.findall(r"[{,]\s*(\w+)\s*[=!]~?", expr))
    return labels


def test_grafana_dashboard_uses_only_declared_tag_keys() -> None:
    labels = dashboard_labels(json.loads(DASHBOARD_JSON.read_text()))
    assert {"run", "worker", "le", CLUSTER_LABEL} <= labels
    assert labels <= {*metapeft_metrics.TAG_KEYS, *metapeft_metrics.SERVE_TAG_KEYS, "le", CLUSTER_LABEL}


def test_every_scrape_sets_the_cluster_label() -> None:
    """The dashboard's `cluster` variable filters on a label that Ray does not set: the PodMonitors
    (KubeRay) and the VM scrape config must add it to every target."""
    for monitor in load_docs(PODMONITOR_YAML):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            targets = [r["targetLabel"] for r in endpoint.get("relabelings", [])]
            assert CLUSTER_LABEL in targets, (monitor["metadata"]["name"], endpoint["port"])
    for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]:
        relabels = {r["target_label"]: r for r in job.get("relabel_configs", [])}
        assert relabels.get(CLUSTER_LABEL, {}).get("replacement"), job["job_name"]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", "reads no ray_metapeft_ metric"),
        ("ray_metapeft_meta_los", "unknown metric"),
        ('max(ray_metapeft_meta_step{run=~"$run"})', "is not filtered by ray_io_cluster"),
        ("max(ray_metapeft_meta_step)", "is not filtered by ray_io_cluster"),
    ],
)
def test_grafana_rules_reject_foreign_or_misspelled_metrics(expr: str, expected: str) -> None:
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    dashboard["panels"][0]["targets"][0]["expr"] = expr
    assert any(expected in p for p in dashboard_problems(dashboard))


@pytest.mark.parametrize(
    ("variable", "expected"),
    [("cluster", "no template variable `cluster`"), ("run", "`run` variable's values")],
)
def test_grafana_rules_reject_a_dashboard_without_the_cluster_variable(variable: str, expected: str) -> None:
    dashboard = json.loads(DASHBOARD_JSON.read_text())
    for v in dashboard["templating"]["list"]:
        if v["name"] == variable:
            v["definition"] = "label_values(ray_metapeft_meta_step, run)"
    assert any(expected in p for p in dashboard_problems(dashboard))


# --- image -------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(code_lines(text)))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in joined.splitlines()
        if line.strip()
    ]


def dockerfile_problems(text: str) -> list[str]:
    instructions = dockerfile_instructions(text)
    problems = []
    bases = [
        args.split()[-1] if " AS " in args.upper() else args.split()[0]
        for op, args in instructions
        if op == "FROM"
    ]
    match = re.fullmatch(r"rayproject/ray:([^-]+)-py311-gpu", bases[-1] if bases else "")
    if not match or match.group(1) != RAY_VERSION:
        problems.append(f"FROM {bases} is not rayproject/ray:{RAY_VERSION}-py311-gpu")
    users = [args.split(":")[0] for op, args in instructions if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"final USER is {users[-1] if users else 'unset'}: must be non-root")
    runs = " ".join(args for op, args in instructions if op == "RUN")
    if not re.search(r"pip install[^&]*\btorch *[<>=~]", runs) or "peft" not in runs:
        problems.append("torch (a version range) and peft are not installed")
    if not any(op == "COPY" and args.split()[-2:-1] == ["."] for op, args in instructions):
        problems.append("the repository is not copied in")
    return problems


def test_dockerfile_rules() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace(f"ray:{RAY_VERSION}-", "ray:2.9.0-"), "FROM"),
        (lambda t: t + "\nUSER root\n", "non-root"),
    ],
    ids=["base-version", "root-user"],
)
def test_dockerfile_rules_reject(edit: Callable[[str], str], expected: str) -> None:
    assert any(expected in p for p in dockerfile_problems(edit(DOCKERFILE.read_text())))


def test_dockerignore_excludes_local_state() -> None:
    patterns = {line.strip().rstrip("/") for line in code_lines(DOCKERIGNORE.read_text())}
    assert {".git", "venv", ".venv", "runs", "outputs"} <= patterns
