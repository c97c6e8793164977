"""deploy/kubernetes/ without a cluster (issue 12): every manifest valid for several Kubernetes versions
(kubernetes-validate's bundled schemas, strict: unknown fields fail too), the grace period at least
the worst case check-config prints for the ConfigMap's TOML, and that TOML passing check-config."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sidecar.durations import parse_duration
from testkit import PY, ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
# Kubernetes minor versions supported when this was written (Nov 2026), and the newest the package knows.
VERSIONS = ("1.34.0", "1.35.0", "1.36.0", "1.37.0")
# What the downward API and the node would give the container: sane values for check-config here.
POD_ENV = {
    "HOST_IP": "10.0.0.7",
    "CONSUL_HTTP_ADDR": "http://10.0.0.7:8500",
    "POD_IP": "10.244.1.23",
    "POD_NAME": "web-7d9c5b6f4-x2kqp",
    "APP_VERSION": "v1",
}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object in deploy/kubernetes/ (the kustomization is kustomize's, not the API's)."""
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((f"{path.name}: {doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def one(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in manifests() if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects in deploy/kubernetes/"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    # One container: a sidecar container beside the app would get the pod's SIGTERM at the same moment.
    assert len(containers) == 1, containers
    return dict(containers[0])


def sidecar_toml() -> str:
    return str(one("ConfigMap")["data"]["web.toml"])


def check_config(tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    cfg = tmp_path / "web.toml"
    cfg.write_text(sidecar_toml())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(POD_ENV)
    done = subprocess.run(
        [PY, "-m", "sidecar", "check-config", "-c", str(cfg)], capture_output=True, text=True, env=env, timeout=60
    )
    return done, (json.loads(done.stdout) if done.returncode == 0 else {})


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    """Each object validates, strictly, against that version's schemas (bundled with the package:
    no network). The control: a Deployment with a misspelt field fails the same validation."""
    objects = manifests()
    assert {doc["kind"] for _, doc in objects} == {"ConfigMap", "Deployment"}
    for where, doc in objects:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where} is not valid for Kubernetes {version}: {e.message} at {list(e.path)}")
    bad = json.loads(json.dumps(one("Deployment")))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/kubernetes/` applies every manifest in the folder, and only those."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files)


@pytest.mark.integration
def test_the_configmaps_toml_passes_check_config(tmp_path: Path) -> None:
    """check-config on the ConfigMap's TOML, with the environment the Deployment gives the container:
    exit 0, no warning, and it registers the pod's IP with an ID unique to the pod."""
    done, doc = check_config(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    reg = doc["registration"]
    assert reg["Address"] == POD_ENV["POD_IP"] and reg["Port"] == 8080
    # The default ID: in a pod, the host name is the pod's name; with the pod's IP, unique per pod.
    assert reg["ID"] == f"web-{socket.gethostname()}-{POD_ENV['POD_IP']}-8080"
    assert doc["consul"]["address"] == POD_ENV["CONSUL_HTTP_ADDR"]


@pytest.mark.integration
def test_grace_period_covers_check_configs_worst_case(tmp_path: Path) -> None:
    """terminationGracePeriodSeconds is at least the worst-case shutdown check-config prints for the
    ConfigMap's TOML (else the kubelet SIGKILLs a drain in progress)."""
    done, doc = check_config(tmp_path)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"worst-case shutdown: (\S+)", done.stderr)
    assert printed is not None and printed.group(1) == doc["shutdown"]["worst_case"], done.stderr
    worst = parse_duration(printed.group(1))
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= worst, f"terminationGracePeriodSeconds {grace} < check-config's worst case {worst:g}s"


@pytest.mark.integration
def test_deployment_runs_the_sidecar_in_wrapper_mode_with_probes_on_its_status_port(tmp_path: Path) -> None:
    """The Deployment's contract: rolling one pod at a time with none unavailable; the sidecar is the
    container's entrypoint with the app after '--' (wrapper mode); the config file it reads is the
    mounted ConfigMap; readiness on /ready and liveness on /healthz at the status listener's port;
    the agent reached at the node's address (status.hostIP) and every ${VAR} the TOML needs set."""
    spec = one("Deployment")["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    c = container()
    assert c["command"] == ["consul-sidecar"]
    args = c["args"]
    assert args[0] == "run" and "--" in args and len(args) > args.index("--") + 1, args
    config_path = Path(args[args.index("-c") + 1])
    mount = next(m for m in c["volumeMounts"] if config_path.parent == Path(m["mountPath"]))
    volume = next(v for v in spec["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_path.name in one("ConfigMap")["data"]

    _, doc = check_config(tmp_path)
    status_port = int(doc["status"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == status_port, (probe, get)
    assert ports["http"] == doc["registration"]["Port"]

    env = {e["name"]: e for e in c["env"]}
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert "$(HOST_IP)" in env["CONSUL_HTTP_ADDR"]["value"]
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", sidecar_toml()))  # no ":-default"
    assert needed <= set(env), f"the TOML needs {sorted(needed - set(env))}, which the container does not set"
