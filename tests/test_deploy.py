"""The container and Kubernetes files agree with each other and with the server.

``kubernetes-validate --strict`` (run by scripts/test) checks the manifests against
the API's schemas; these tests check what a schema cannot: that probes, ports,
drain timings, users and environment variables line up.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

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
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {"grpc", "metrics"}
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
