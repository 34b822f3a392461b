"""The deployment examples in ``deploy/`` and the Containerfile, checked offline: the HAProxy
file with ``haproxy -c``, the Kubernetes manifests against the API schemas of a pinned
Kubernetes version (``kubernetes-validate``) and against the hardening every workload must
keep, the rules in the ConfigMap loaded as ``dicomfw check`` would, the drain sequence against
the grace period, and the Containerfile against the README's install steps."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicomfw.service.daemon import load_runtime
from tests.harness import Pki
from tests.scalehelpers import HAPROXY, HAPROXY_EXAMPLE, REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
#: The Kubernetes version the manifests are written for (its API schemas, strictly).
KUBERNETES_VERSION = "1.32.0"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")
#: What the supervisor allows after the drain deadline (the A-ABORTs' and the audit's flush).
STOP_MARGIN_SECONDS = 10

Manifest = dict[str, Any]


def manifests() -> list[Manifest]:
    found: list[Manifest] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def one(kind: str, name: str) -> Manifest:
    [found] = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def hardening_problems(manifest: Manifest) -> list[str]:
    """What keeps a workload's containers from being hardened: each needs CPU and memory
    requests and limits, no privilege escalation, not privileged, a read-only root, a non-root
    user, every capability dropped (NET_BIND_SERVICE at most added back) and the runtime's
    seccomp profile."""
    if manifest["kind"] not in WORKLOADS:
        return []
    pod = manifest["spec"]["template"]["spec"]
    pod_context = pod.get("securityContext", {})
    problems = []
    for container in pod["containers"] + pod.get("initContainers", []):
        where = f"{manifest['kind']}/{manifest['metadata']['name']}/{container['name']}"
        context = container.get("securityContext", {})
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{where}: no {resource} in resources.{kind}")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: privilege escalation allowed")
        if context.get("privileged", False):
            problems.append(f"{where}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: writable root file system")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot", False)):
            problems.append(f"{where}: may run as root")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{where}: capabilities not all dropped")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: capabilities beyond NET_BIND_SERVICE")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: no seccomp profile")
    return problems


def dicomfw_rules() -> dict[str, Any]:
    rules: dict[str, Any] = yaml.safe_load(one("ConfigMap", "dicomfw-rules")["data"]["rules.yaml"])
    return rules


def dicomfw_container() -> tuple[Manifest, Manifest]:
    pod = one("Deployment", "dicomfw")["spec"]["template"]
    [container] = pod["spec"]["containers"]
    return pod, container


@pytest.mark.skipif(not HAPROXY.exists(), reason="HAProxy is not installed (Debian haproxy)")
def test_the_haproxy_example_is_valid() -> None:
    checked = subprocess.run(
        [str(HAPROXY), "-c", "-f", str(HAPROXY_EXAMPLE)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_kubernetes_manifests_validate_against_the_pinned_version() -> None:
    found = manifests()
    kinds = {m["kind"] for m in found}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    for manifest in found:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_a_manifest_with_a_typo_fails_validation() -> None:
    """The validation is strict: a misspelt key is an error, not silently ignored."""
    deployment = copy.deepcopy(one("Deployment", "dicomfw"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_workload_is_hardened() -> None:
    workloads = [m for m in manifests() if m["kind"] in WORKLOADS]
    assert len(workloads) == 2  # dicomfw and its Redis
    assert [problem for m in workloads for problem in hardening_problems(m)] == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda c: c["resources"].pop("limits"),
            ["no cpu in resources.limits", "no memory in resources.limits"],
        ),
        (
            lambda c: c["securityContext"].update(allowPrivilegeEscalation=True),
            ["privilege escalation allowed"],
        ),
        (
            lambda c: c["securityContext"].pop("allowPrivilegeEscalation"),
            ["privilege escalation allowed"],
        ),
        (
            lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
            ["capabilities beyond NET_BIND_SERVICE"],
        ),
        (
            lambda c: c["securityContext"].update(readOnlyRootFilesystem=False),
            ["writable root file system"],
        ),
    ],
    ids=["no limits", "escalation allowed", "escalation not forbidden", "NET_ADMIN", "writable"],
)
def test_the_hardening_check_fails_a_manifest_that_lowers_the_bar(
    change: Any, problem: list[str]
) -> None:
    deployment = copy.deepcopy(one("Deployment", "dicomfw"))
    change(deployment["spec"]["template"]["spec"]["containers"][0])
    where = "Deployment/dicomfw/dicomfw: "
    assert hardening_problems(deployment) == [where + p for p in problem]


def test_the_probes_ports_and_grace_period_match_the_rules() -> None:
    rules = dicomfw_rules()
    pod, container = dicomfw_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    metrics = int(rules["metrics"]["bind"].rsplit(":", 1)[1])
    assert ports["metrics"] == metrics == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    listening = {int(listener["bind"].rsplit(":", 1)[1]) for listener in rules["listeners"]}
    assert listening | {metrics} == set(ports.values())
    assert min(listening) > 1024  # no capability at all: unprivileged ports, mapped by the Service
    service = one("Service", "dicomfw")
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    # SIGTERM comes after preStop; /ready is 503 for the notice, then the drain and its margin
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    limits = rules["limits"]
    needed = (
        pre_stop + limits["drain_notice_seconds"] + limits["drain_seconds"] + STOP_MARGIN_SECONDS
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    # the notice outlasts the readiness probe noticing (period x failures)
    probe = container["readinessProbe"]
    assert limits["drain_notice_seconds"] >= probe["periodSeconds"] * probe["failureThreshold"]


def test_the_rules_in_the_configmap_load_with_the_secrets_mounted(tmp_path: Path, pki: Pki) -> None:
    mounted = {
        "tls/tls.crt": pki.fw_server.cert,
        "tls/tls.key": pki.fw_server.key,
        "tls/ca.crt": pki.ca,
        "tls/client.crt": pki.fw_client.cert,
        "tls/client.key": pki.fw_client.key,
    }
    secrets = {key for secret in ("dicomfw-tls", "dicomfw-redis")
               for key in one("Secret", secret)["stringData"]}  # fmt: skip
    assert {Path(name).name for name in mounted} | {"password"} == secrets
    for name, source in mounted.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(source, tmp_path / name)
    (tmp_path / "redis").mkdir()
    (tmp_path / "redis" / "password").write_text("secret\n")
    text = one("ConfigMap", "dicomfw-rules")["data"]["rules.yaml"]
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace("/etc/dicomfw/", f"{tmp_path}/"))
    config = load_runtime(path).config  # the rules and every TLS file, as `dicomfw check`
    assert config.limits.store is not None
    assert config.limits.store.url == "redis://dicomfw-redis:6379/0"
    assert config.limits.store.password_file == tmp_path / "redis" / "password"


def test_the_containerfile_runs_the_readme_install_steps() -> None:
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("## Running it as a systemd service") :]
    install = install[install.index("# 1. ") : install.index("# 3. ")]
    steps = [
        line.removeprefix("sudo ").split("  #")[0].strip()
        for line in install.splitlines()
        if line.startswith("sudo ")
    ]
    containerfile = (REPO / "Containerfile").read_text()
    runs = [
        command.strip()
        for line in re.findall(r"(?m)^RUN (.+)$", containerfile)
        for command in line.split("&&")
    ]
    assert len(steps) == 4 and [run for run in runs if run in steps] == steps
    # besides them, only what an image needs: a package list to install from, then none
    extra = [run for run in runs if run not in steps]
    assert extra == ["apt-get update", "rm -rf /var/lib/apt/lists/*"]
