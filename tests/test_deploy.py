"""The container and Kubernetes files agree with each other and with the server.

``kubernetes-validate --strict`` (run by scripts/test) checks the manifests against
the API's schemas; these tests check what a schema cannot: that probes, ports,
drain timings, users and environment variables line up.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from clipvision.server.config.flags import build_parser, parse_settings
from clipvision.server.config.settings import Settings
from clipvision.server.healthcheck import main as healthcheck
from clipvision.server.healthcheck import probe_target
from tests.live_server import live_server

ROOT = Path(__file__).parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((MANIFESTS / name).read_text())
    return document


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = manifest("deployment.yaml")["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def container_env() -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in container()["env"]}


def test_probes_ask_the_grpc_health_service_on_the_serving_port() -> None:
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    settings = parse_settings([], environ=container_env())
    assert int(settings.address.rpartition(":")[2]) == ports["grpc"]
    assert int(str(settings.metrics_address).rpartition(":")[2]) == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container()[probe]["grpc"]["port"] == ports["grpc"], probe


def test_the_drain_fits_in_the_termination_grace_period() -> None:
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop_s = float(command[1])
    settings = parse_settings([], environ=container_env())
    # preStop, then SIGTERM and the server's drain, must end before the SIGKILL.
    assert pre_stop_s + settings.grace_period_s < pod["terminationGracePeriodSeconds"]
    assert settings.max_connection_age_s > 0  # new replicas get traffic


def test_every_environment_variable_is_a_server_setting() -> None:
    env = container_env()
    settings = parse_settings([], environ=env)
    assert settings.log_format == env["CLIPVISION_LOG_FORMAT"]
    assert settings.grace_period_s == float(env["CLIPVISION_GRACE_PERIOD"])
    assert settings.max_connection_age_grace_s == float(env["CLIPVISION_MAX_CONNECTION_AGE_GRACE"])
    # A misspelt CLIPVISION_* variable would be ignored silently; each must name a flag.
    help_text = build_parser(env).format_help().replace("\n", " ")
    help_text = re.sub(r"\s+", " ", help_text)
    for name in env:
        if name.startswith("CLIPVISION_"):
            assert f"[env {name}" in help_text, name
    assert env["HF_HOME"].startswith(container()["volumeMounts"][0]["mountPath"])


def test_the_service_is_headless_and_the_autoscaler_targets_the_deployment() -> None:
    deployment = manifest("deployment.yaml")
    service = manifest("service.yaml")
    hpa = manifest("hpa.yaml")
    assert service["spec"]["clusterIP"] == "None"
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {"grpc", "http", "metrics"}
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2  # a drain never leaves nobody serving


def test_image_and_pod_run_as_the_same_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) >= 2  # multi-stage
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    pod = manifest("deployment.yaml")["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (str(pod["runAsUser"]), str(pod["runAsGroup"])) == user
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    # The HEALTHCHECK's command is one of the package's entry points.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert re.search(r'CMD \["clipvision-healthcheck"', dockerfile)
    assert "clipvision-healthcheck" in scripts
    assert 'ENTRYPOINT ["clipvision-server"]' in dockerfile


def test_probe_target_dials_this_host_for_a_wildcard_address() -> None:
    assert probe_target("0.0.0.0:50051") == "127.0.0.1:50051"
    assert probe_target("[::]:50051") == "127.0.0.1:50051"
    assert probe_target("10.0.0.7:9000") == "10.0.0.7:9000"


async def test_healthcheck_passes_only_while_the_server_is_serving(
    base_settings: Settings,
) -> None:
    async with live_server(base_settings, load=False) as live:
        args = ["--address", live.address, "--timeout", "5"]
        assert await asyncio.to_thread(healthcheck, args) == 1  # not loaded yet
        await live.server.load_models()
        assert await asyncio.to_thread(healthcheck, args) == 0
        port = live.port
    # Nothing listens there any more.
    assert (
        await asyncio.to_thread(healthcheck, ["--address", f"127.0.0.1:{port}", "--timeout", "1"])
        == 1
    )


# -- the KubeRay RayJob of the batch job ---------------------------------------------------

RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
# A RayJob is a custom resource, which kubernetes-validate has no schema for. Its own
# fields are checked against the names of KubeRay's ray.io/v1 API (RayJobSpec, RayClusterSpec,
# HeadGroupSpec, WorkerGroupSpec) listed here, and every pod template in it strictly against
# Kubernetes' Pod schema, as the KServe example's predictor is.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
    "managedBy", "deletionStrategy",
}  # fmt: skip
RAY_CLUSTER_SPEC = {
    "autoscalerOptions", "enableInTreeAutoscaling", "headGroupSpec", "headServiceAnnotations",
    "rayVersion", "suspend", "workerGroupSpecs", "gcsFaultToleranceOptions", "managedBy",
}  # fmt: skip
HEAD_GROUP_SPEC = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_SPEC = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "scaleStrategy", "suspend", "template",
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def test_the_rayjob_has_only_kuberay_fields_and_valid_pods() -> None:
    job = yaml.safe_load(RAYJOB.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC
    assert spec["submissionMode"] in SUBMISSION_MODES
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAY_CLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_SPEC
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert set(group) <= WORKER_GROUP_SPEC
        assert {"groupName", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(
        isinstance(value, str)
        for part in (cluster["headGroupSpec"], *groups)
        for value in part["rayStartParams"].values()
    ), "rayStartParams values are strings in KubeRay's API"
    templates = [cluster["headGroupSpec"]["template"], *(group["template"] for group in groups)]
    images = set()
    for number, template in enumerate(templates):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{number}"}}
        kubernetes_validate.validate({**pod, **template}, "1.33.0", strict=True)
        images |= {container["image"] for container in template["spec"]["containers"]}
    assert len(images) == 1, "every Ray node runs the same image (and so the same Ray)"
    gpus = [
        group
        for group in groups
        if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpus, "a worker group with GPUs hosts the model actors"


def test_the_rayjobs_entrypoint_is_a_valid_batch_command() -> None:
    from clipvision.server.batch.cli import build_parser as batch_parser

    spec = yaml.safe_load(RAYJOB.read_text())["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:3] == ["clipvision", "batch", "run"]
    args = batch_parser().parse_args(words[2:])
    assert args.input.startswith("s3://")
    assert args.output.startswith("s3://")
    assert args.ray_address is None  # KubeRay sets RAY_ADDRESS for the submitter
    assert args.device == "auto"  # GPUs are used where the cluster has them
    ray_version = spec["rayClusterSpec"]["rayVersion"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray,) = [d for d in extra["optional-dependencies"]["ray"] if d.startswith("ray[")]
    assert ray_version.startswith("2."), f"{ray_version} outside the ray extra's {ray}"
