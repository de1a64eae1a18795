"""The manifests as `kubectl kustomize` renders them, and the image they run.

Every rendered object is checked against the Kubernetes OpenAPI schema (kubernetes-validate, strict), and the
safety properties an admin expects of an admission webhook are pinned: non-root, read-only root filesystem, no
privilege escalation, no capabilities, resources, probes, a PodDisruptionBudget, zone spread, least-privilege
RBAC, webhook timeouts of at most 5 s and failurePolicy Ignore. The webhooks' matchConditions (CEL) are
evaluated with a CEL interpreter on pods exactly as a real kube-apiserver sent them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio import client as k8s

from tests.paths import FIXTURES, REPO
from webhook.sources.kube import watched_resources

BIN = Path(sys.executable).parent
K8S_VERSION = "1.36"
NAMESPACE = "ipguard"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}
# Kinds whose schema is a CRD's, not Kubernetes' own (kubernetes-validate knows only the built-in kinds).
CRD_KINDS = {"Certificate", "Issuer", "PrometheusRule", "ServiceMonitor"}


def kustomize(path: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize path` renders."""
    done = subprocess.run([str(BIN / "kubectl"), "kustomize", str(path)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return kustomize(REPO / "manifests")


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def webhooks(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for o in objects:
        if o["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            yield from o["webhooks"]


def rules(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for o in objects:
        if o["kind"] in ("Role", "ClusterRole"):
            for rule in o["rules"]:
                yield o, rule


def test_every_rendered_object_is_valid_for_kubernetes(base: list[dict[str, Any]]) -> None:
    """Each object the base renders passes the Kubernetes OpenAPI schema, unknown fields refused."""
    assert {o["kind"] for o in base} >= {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap",
                                         "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    for obj in base:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_container_runs_non_root_read_only_without_privileges(base: list[dict[str, Any]]) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, every capability dropped, seccomp."""
    spec = pod_spec(base)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]


def test_the_container_has_resources_and_probes(base: list[dict[str, Any]]) -> None:
    """Requests for CPU and memory, a memory limit, readiness on /readyz and liveness on /healthz."""
    for container in pod_spec(base)["containers"]:
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_replicas_are_spread_over_zones_and_kept_by_a_pdb(base: list[dict[str, Any]]) -> None:
    """Two or more replicas, spread over zones, and a PDB that keeps one through voluntary disruptions."""
    deployment = only(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    spread = pod_spec(base)["topologySpreadConstraints"]
    assert any(c["topologyKey"] == "topology.kubernetes.io/zone"
               and c["labelSelector"]["matchLabels"].items() <= labels.items() for c in spread)
    pdb = only(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] >= 1


def test_webhooks_fail_open_and_answer_within_five_seconds(base: list[dict[str, Any]]) -> None:
    """failurePolicy Ignore by default (ipguard must never become the outage) and timeoutSeconds <= 5."""
    hooks = list(webhooks(base))
    assert len(hooks) == 2
    for hook in hooks:
        assert hook["failurePolicy"] == "Ignore"
        assert 1 <= hook["timeoutSeconds"] <= 5
        assert hook["sideEffects"] == "NoneOnDryRun"


def test_webhooks_exclude_ipguards_own_namespace_and_kube_system(base: list[dict[str, Any]]) -> None:
    """ipguard never judges the pods it needs to start, nor kube-system's."""
    assert only(base, "Deployment")["metadata"]["namespace"] == NAMESPACE
    for hook in webhooks(base):
        names = [e for e in hook["namespaceSelector"]["matchExpressions"]
                 if e["key"] == "kubernetes.io/metadata.name"]
        assert names and names[0]["operator"] == "NotIn"
        assert {NAMESPACE, "kube-system"} <= set(names[0]["values"])
        assert hook["clientConfig"]["service"]["namespace"] == NAMESPACE


def _review_pod(fixture: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads((FIXTURES / fixture).read_text())["request"]["object"]
    return pod


def _match(hook: dict[str, Any], pod: dict[str, Any]) -> bool:
    """True when every matchCondition holds (the apiserver then calls the webhook)."""
    env = celpy.Environment()
    activation = {"object": celpy.json_to_cel(pod)}
    return all(bool(env.program(env.compile(c["expression"])).evaluate(activation))
               for c in hook["matchConditions"])


def test_match_conditions_skip_host_network_and_mirror_pods(base: list[dict[str, Any]]) -> None:
    """hostNetwork pods take no pod IP and mirror pods cannot be steered: the apiserver does not call for them.

    Pods as a real kube-apiserver sent them: a plain pod (called), a hostNetwork pod (skipped), the plain pod
    with the kubelet's mirror annotation (skipped).
    """
    plain = _review_pod("pod-create-generatename.validate.json")
    host = _review_pod("pod-create-hostnetwork.validate.json")
    assert host["spec"]["hostNetwork"] is True
    mirror = json.loads(json.dumps(plain))
    mirror["metadata"].setdefault("annotations", {})["kubernetes.io/config.mirror"] = "0123abcd"
    for hook in webhooks(base):
        assert _match(hook, plain)
        assert not _match(hook, host)
        assert not _match(hook, mirror)
        assert _match(hook, {**plain, "spec": {**plain["spec"], "hostNetwork": False}})


def test_match_conditions_pass_policies_and_eniconfigs_through_even_without_a_spec(
        base: list[dict[str, Any]]) -> None:
    """The validating webhook also judges SecurityGroupPolicies and ENIConfigs: the conditions, written for pods,
    must let them through, one without a spec included. (The interpreter here reads `has()` on a missing parent
    as false; the apiserver's CEL may raise "no such key" there instead, which would leave the call to
    failurePolicy: the expressions test `spec` first.)"""
    validating = [h for h in webhooks(base) if h["name"].startswith("validate.")]
    assert validating
    objects = [_review_pod(name) for name in sorted(p.name for p in FIXTURES.glob("*.validate.json"))
               if json.loads((FIXTURES / name).read_text())["request"]["kind"]["kind"] != "Pod"]
    assert {o["kind"] for o in objects} == {"SecurityGroupPolicy", "ENIConfig"}
    bare = {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig", "metadata": {"name": "us-east-1a"}}
    for hook in validating:
        for obj in [*objects, bare]:
            assert _match(hook, obj) is True, obj["kind"]


async def test_rbac_reads_only_what_the_watches_list(base: list[dict[str, Any]]) -> None:
    """List and watch only the resources ipguard's watches list; no get on whole kinds, no writes but by name."""
    api = k8s.ApiClient()
    try:
        watched = {w.kind for w in watched_resources(api, NAMESPACE, "ipguard")}
    finally:
        await api.close()
    read: set[str] = set()
    for _role, rule in rules(base):
        verbs = set(rule["verbs"])
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        if verbs & WRITE_VERBS or "get" in verbs:
            assert rule.get("resourceNames"), f"{rule} writes or gets without naming the objects"
        if verbs & {"list", "watch"}:
            assert verbs >= {"list", "watch"}
            read |= set(rule["resources"])
    assert read == watched


def test_rbac_touches_no_secret_but_its_own(base: list[dict[str, Any]]) -> None:
    """Secrets only by name, in ipguard's namespace; nothing cluster-wide on secrets."""
    for role, rule in rules(base):
        if "secrets" in rule["resources"]:
            assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE
            assert rule["resourceNames"] == ["ipguard-tls"]
            assert "list" not in rule["verbs"] and "watch" not in rule["verbs"]


def test_dockerfile_passes_hadolint() -> None:
    """The Dockerfile passes hadolint with its default rules."""
    done = subprocess.run([str(BIN / "hadolint"), "--no-color", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_runs_ipguard_serve_non_root_with_pinned_dependencies() -> None:
    """The image's user is numeric and not root, its entry point is `ipguard serve`, and pip installs under
    constraints.txt (the versions the tests ran with)."""
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert 'ENTRYPOINT ["ipguard"]' in lines and 'CMD ["serve"]' in lines


def test_image_installs_uvloop_for_ipguard_serve() -> None:
    """`ipguard serve` runs on uvloop when it is installed (webhook/eventloop.py): the image installs the uvloop
    extra, pinned like everything else."""
    installs = [line for line in (REPO / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert any("'.[uvloop]'" in line for line in installs)
    assert any(line.startswith("uvloop==") for line in (REPO / "constraints.txt").read_text().splitlines())


def test_the_deployment_manages_its_certificates_in_a_writable_memory_volume(base: list[dict[str, Any]]) -> None:
    """The base runs --manage-certificates and writes the served pair to an in-memory emptyDir (the root
    filesystem stays read-only); the Secret it keeps is shipped empty, so re-applying never resets it."""
    container = pod_spec(base)["containers"][0]
    assert "--manage-certificates" in container["args"]
    cert = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--tls-cert="))
    mount = next(m for m in container["volumeMounts"] if cert.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(base)["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    secret = only(base, "Secret", "ipguard-tls")
    assert "data" not in secret and "stringData" not in secret
    for hook in webhooks(base):
        assert "caBundle" not in hook["clientConfig"]  # kept by ipguard; an apply must not empty it


def test_cert_manager_overlay_injects_the_ca_and_mounts_its_secret() -> None:
    """manifests/cert-manager: no self-management (no flag, no Secret or webhook write access), the Secret
    cert-manager fills mounted read-only, the CA injected into both webhook configurations from the
    Certificate whose DNS names the apiserver dials."""
    objects = kustomize(REPO / "manifests" / "cert-manager")
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    container = pod_spec(objects)["containers"][0]
    assert "--manage-certificates" not in container["args"]
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "ipguard-tls"
    assert not [o for o in objects if o["kind"] == "Secret"]
    for _role, rule in rules(objects):
        assert "secrets" not in rule["resources"]
        assert not set(rule["verbs"]) & WRITE_VERBS
    certificate = only(objects, "Certificate", "ipguard-tls")
    assert certificate["spec"]["secretName"] == "ipguard-tls"
    assert "ipguard.ipguard.svc" in certificate["spec"]["dnsNames"]
    for obj in objects:
        if obj["kind"].endswith("WebhookConfiguration"):
            assert obj["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == "ipguard/ipguard-tls"


def test_network_policy_component_admits_only_the_control_plane_and_the_scraper(base: list[dict[str, Any]],
                                                                                tmp_path: Path) -> None:
    """manifests/network-policy, added to an overlay: a valid NetworkPolicy on ipguard's pods, ingress only,
    to the container's https port only, from an ipBlock (the control plane) and the monitoring namespace."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "manifests").symlink_to(REPO / "manifests")  # kustomize takes relative paths only
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["manifests/base"], "components": ["manifests/network-policy"]}))
    objects = kustomize(overlay)
    policy = only(objects, "NetworkPolicy")
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in pod_spec(objects)["containers"][0]["ports"]}
    sources = []
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= port_names
        sources += [next(iter(peer)) for peer in rule["from"]]
    assert sorted(sources) == ["ipBlock", "namespaceSelector"]


def test_pods_carry_scrape_annotations_for_their_metrics_port(base: list[dict[str, Any]]) -> None:
    """Annotation-based Prometheus discovery finds /metrics on the container's https port."""
    template = only(base, "Deployment")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scheme"] == "https" and int(annotations["prometheus.io/port"]) == ports["https"]
