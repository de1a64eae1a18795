"""`ipguard check`: real files run through both admission stages as the API server would, on a snapshot."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.paths import FIXTURES
from webhook.apiserver import admission_review, as_created, default_pod
from webhook.check import template_hash
from webhook.cli import main

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "examples" / "cluster.yaml"
A, B, C = "us-east-1a", "us-east-1b", "us-east-1c"


def deployment(name: str, replicas: int, node_selector: dict[str, str] | None = None,
               kind: str = "Deployment", api: str = "apps/v1", **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": name, "image": f"registry.example.com/{name}:1"}]}
    if node_selector:
        spec["nodeSelector"] = node_selector
    body: dict[str, Any] = {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                            "template": {"metadata": {"labels": {"app": name}}, "spec": spec}, **extra}
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": "shop"}, "spec": body}


def pod(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
            "spec": {"containers": [{"name": "c", "image": "registry.example.com/c:1"}], **spec}}


def write(path: Path, *objects: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump_all(objects), encoding="utf-8")
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check", "--snapshot", str(CLUSTER), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *args, "--json")
    return code, json.loads(out)


def test_replicas_pinned_to_a_dry_zone_are_admitted_until_its_reserve_then_denied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each admitted replica is counted before the next is judged (DESIGN "Decisions": reservations), so a
    Deployment pinned to us-east-1a (12 pod IPs of headroom, reserve 3) gets 9 replicas and 3 denials."""
    cache = deployment("cache", 12, {"topology.kubernetes.io/zone": A})
    path = write(tmp_path / "cache.yaml", cache)
    code, report = run_json(capsys, "-f", path)
    assert code == 1
    [obj] = report["objects"]
    # the zone's only node without room has no pod slot either: the scheduler skips it, nothing to steer
    assert obj["summary"] == {"replicas": 12, "admitted": 9, "steered": 0, "denied": 3}
    assert obj["verdict"] == "denied"
    replicas = obj["replicas"]
    assert [r["verdict"] for r in replicas] == ["admitted"] * 9 + ["denied"] * 3
    assert all(r["zone"] == A and r["node"] for r in replicas[:9])
    first_denied = replicas[9]
    assert first_denied["webhook"] == "validate.ipguard.io"
    name = first_denied["name"]
    assert name.startswith(f"cache-{template_hash(cache['spec']['template'])}-")
    assert first_denied["kubectl"] == [
        'Error creating: admission webhook "validate.ipguard.io" denied the request: ' + first_denied["denial"]
    ]
    # the zone still has 3 free pod IPs, all kept back by its reserve: the denial says so
    assert first_denied["denial"].startswith(f"ipguard: pod shop/{name} would take a pod IP that ipguard keeps "
                                             "in reserve in every zone it may run in")
    assert f"{A}: 3 free pod IPs, all kept back by its reserve of 3" in first_denied["denial"]


def test_warn_mode_admits_what_enforce_would_deny_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--mode overrides the configured mode: in warn mode a would-be denial is a warning, exit 0."""
    path = write(tmp_path / "cache.yaml", deployment("cache", 12, {"topology.kubernetes.io/zone": A}))
    code, report = run_json(capsys, "-f", path, "--mode", "warn")
    assert code == 0
    [obj] = report["objects"]
    assert obj["summary"]["denied"] == 0 and obj["summary"]["admitted"] == 12
    last = obj["replicas"][-1]
    assert last["outcome"] == "warned"
    warning = f"Warning: ipguard: pod shop/{last['name']} would be denied"
    assert any(line.startswith(warning) for line in last["kubectl"])


def test_a_bare_pod_denial_reads_as_kubectl_prints_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A denied Pod is shown as `kubectl create -f` shows it: Error from server (Forbidden): error when
    creating "FILE": admission webhook "..." denied the request: MESSAGE (fixtures README, behaviour 1.2)."""
    filler = write(tmp_path / "filler.yaml", deployment("cache", 9, {"topology.kubernetes.io/zone": A}))
    last = write(tmp_path / "last.yaml", pod("one-more", nodeSelector={"topology.kubernetes.io/zone": A}))
    code, out, err = run(capsys, "-f", filler, "-f", last)
    assert code == 1 and err == ""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Pod shop/one-more: denied"))
    assert f"({last}: document 1)" in lines[head]
    assert lines[head + 1].startswith(
        f'  Error from server (Forbidden): error when creating "{last}": admission webhook "validate.ipguard.io" '
        "denied the request: ipguard: pod shop/one-more would take a pod IP that ipguard keeps in reserve in "
        "every zone it may run in: "
    )
    assert "Deployment shop/cache: 9 replica(s): 9 admitted (0 steered), 0 denied" in out


def test_steering_patch_is_applied_before_validation_and_described(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mutate, apply the JSON Patch, validate the patched pod: a steered pod lands where its patch allows
    and the patch is told in words."""
    path = write(tmp_path / "web.yaml", deployment("web", 40))
    code, report = run_json(capsys, "-f", path)
    assert code == 0
    [obj] = report["objects"]
    assert obj["summary"]["admitted"] == 40 and obj["summary"]["denied"] == 0
    steered = [r for r in obj["replicas"] if r["verdict"] == "steered"]
    assert steered
    for replica in steered:
        assert replica["patch"], replica
        avoided = [p.split("other than ", 1)[1] for p in replica["patch"] if "a node other than" in p]
        assert all(replica["node"] not in nodes for nodes in avoided)
        assert any(p.startswith("prefers zone ") for p in replica["patch"])
    # later replicas saw the earlier ones: 1a's nodes never go past its reserve
    assert sum(r["zone"] == A for r in obj["replicas"]) <= 12 - 3


def test_each_workload_kind_makes_the_pods_its_controller_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """StatefulSet pods are named NAME-i; Jobs run min(parallelism, completions) pods; a CronJob's Job is
    named NAME-<minutes>; a DaemonSet has one pod per schedulable node, pinned by matchFields, and judged on
    that node: the full t3.medium in us-east-1a cannot give its pod an IP."""
    sts = deployment("db", 3, kind="StatefulSet")
    job = deployment("batch", 0, kind="Job", api="batch/v1", parallelism=4, completions=2)
    del job["spec"]["replicas"]
    cron_job = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly", "namespace": "shop"},
                "spec": {"schedule": "0 3 * * *", "jobTemplate": {"spec": deployment("x", 1)["spec"]}}}
    daemon = deployment("agent", 0, kind="DaemonSet")
    rs = deployment("api-7d9c8b6f5d", 2, kind="ReplicaSet")
    path = write(tmp_path / "all.yaml", sts, job, cron_job, daemon, rs)
    code, report = run_json(capsys, "-f", path)
    assert code == 1
    by_kind = {o["kind"]: o for o in report["objects"]}
    assert [r["name"] for r in by_kind["StatefulSet"]["replicas"]] == ["db-0", "db-1", "db-2"]
    assert by_kind["Job"]["summary"]["replicas"] == 2
    assert all(r["name"].startswith("batch-") for r in by_kind["Job"]["replicas"])
    assert by_kind["CronJob"]["summary"]["replicas"] == 1
    assert by_kind["CronJob"]["replicas"][0]["name"].startswith("nightly-29500000-")
    daemon_pods = by_kind["DaemonSet"]["replicas"]
    assert len(daemon_pods) == 10  # every node of the snapshot
    assert by_kind["DaemonSet"]["summary"] == {"replicas": 10, "admitted": 9, "steered": 0, "denied": 1}
    [denied] = [r for r in daemon_pods if r["verdict"] == "denied"]
    assert "node ip-10-0-1-13.ec2.internal (us-east-1a): room 0" in denied["denial"]
    assert len({r["node"] for r in daemon_pods if r["node"]}) == 9
    assert all(r["name"].startswith("api-7d9c8b6f5d-") for r in by_kind["ReplicaSet"]["replicas"])
    assert all(o["verdict"] in ("admitted", "steered") for o in report["objects"] if o["kind"] != "DaemonSet")


def test_json_input_lists_and_standard_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON files, `kind: List` documents and `-` for standard input all work; objects ipguard does not judge
    are listed as such and do not fail the check."""
    listing = {"apiVersion": "v1", "kind": "List", "items": [pod("a"), pod("b")]}
    json_path = tmp_path / "pods.json"
    json_path.write_text(json.dumps(listing, indent=2), encoding="utf-8")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}, "spec": {}}
    monkeypatch.setattr("sys.stdin", io.StringIO(yaml.safe_dump(service) + "---\n" + yaml.safe_dump(pod("c"))))
    code, report = run_json(capsys, "-f", str(json_path), "-f", "-")
    assert code == 0
    names = [(o["file"], o["document"], o["kind"], o["name"]) for o in report["objects"]]
    assert names == [(str(json_path), 1, "Pod", "a"), (str(json_path), 1, "Pod", "b"), ("-", 1, "Service", "web"),
                     ("-", 2, "Pod", "c")]
    assert [o["verdict"] for o in report["objects"]][2] == "not-judged"
    assert all(o["replicas"][0]["node"] for o in report["objects"] if o["kind"] == "Pod")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n---\nfoo: [1, 2\n",
         "bad.yaml: document 2: not valid YAML at line 7"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c}]}\n---\n- a list\n",
         "bad.yaml: document 2: not an object (a list)"),
        ("metadata: {name: a}\n", "bad.yaml: document 1: apiVersion and kind are required"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 2}\n",
         "bad.yaml: document 1: spec.template is required (a pod template)"),
        ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: -1, template: {}}\n",
         "bad.yaml: document 1: spec.replicas must be a whole number >= 0, not -1"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {hostNetwork: 'yes', containers: [{name: c}]}\n",
         "bad.yaml: document 1: request.object is not a valid Pod: request.object.spec.hostNetwork must be a boolean"),
        ("apiVersion: v1\nkind: Pod\nspec: {containers: [{name: c}]}\n",
         "bad.yaml: document 1: Pod has no metadata.name"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    """Exit 2, nothing judged, one line on stderr naming the file and the document."""
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    code, out, err = run(capsys, "-f", str(path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ipguard: ")
    assert expected in err, err


def test_a_missing_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "-f", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: cannot read: No such file or directory" in err


def test_reviews_look_like_the_apiservers() -> None:
    """The reviews sent to each stage carry the fields, in the order, of the real captures: no name at the
    mutating stage for a generateName pod, the generated name, uid and creation time at the validating stage."""
    real_mutate = json.loads((FIXTURES / "pod-create-generatename.mutate.json").read_bytes())["request"]
    real_validate = json.loads((FIXTURES / "pod-create-generatename.validate.json").read_bytes())["request"]
    template = real_mutate["object"]
    ours = admission_review(default_pod(template), "payments", None)["request"]
    assert list(ours) == list(real_mutate)
    assert ours["object"]["spec"] == template["spec"]  # already defaulted: nothing added, nothing lost
    created = as_created(template, "api-7d9c8b6f5d-hpsl2")
    validate = admission_review(created, "payments", "api-7d9c8b6f5d-hpsl2")["request"]
    assert list(validate) == list(real_validate)
    assert {"name", "uid", "generation", "creationTimestamp"} <= set(created["metadata"])
    assert created["status"]["phase"] == "Pending"
    real_eni = json.loads((FIXTURES / "eniconfig-create.mutate.json").read_bytes())["request"]
    from webhook.apiserver import ENI_CONFIG

    eni = admission_review(real_eni["object"], None, "us-east-1a", kind=ENI_CONFIG)["request"]
    assert list(eni) == list(real_eni) and eni["kind"] == real_eni["kind"] and eni["resource"] == real_eni["resource"]


EXAMPLES = sorted(p for p in (REPO / "examples" / "sgp").glob("*.yaml") if not p.name.startswith("cluster-"))


def expectation(path: Path) -> tuple[Path, str, list[str]]:
    """The `# Snapshot:` and `# Expect: VERDICT (code, ...)` header of an example file."""
    text = path.read_text(encoding="utf-8")
    snapshot = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# Snapshot:"))
    expect = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# Expect:"))
    verdict, _, rest = expect.partition(" ")
    return REPO / snapshot, verdict, [c.strip() for c in rest.strip("()").split(",") if c.strip()]


def test_every_deny_and_warn_case_has_an_example() -> None:
    cases = {code for path in EXAMPLES for code in expectation(path)[2]}
    assert {"unknown-group", "too-many-groups", "union-too-many-groups", "selects-nothing", "rules-near-quota",
            "pod-eni-off", "no-branch-room", "unknown-subnet", "wrong-zone", "subnet-low", "subnet-changed",
            "zone-without-eniconfig"} <= cases


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_sgp(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ipguard check` on every file in examples/sgp/ gives the verdict and findings its header states,
    with the exit status that goes with it."""
    snapshot, verdict, expected = expectation(path)
    code = main(["check", "--snapshot", str(snapshot), "-f", str(path), "--json"])
    report = json.loads(capsys.readouterr().out)
    [obj] = report["objects"]
    assert obj["verdict"] == verdict
    assert code == (1 if verdict == "denied" else 0)
    found = {c for r in obj["replicas"] for c in r["findings"]}
    assert set(expected) <= found, found
    for replica in obj["replicas"]:
        assert all(len(w) <= 120 for w in replica["warnings"])
        if replica["verdict"] == "denied":
            assert replica["denial"].startswith("ipguard: ")


def test_report_on_the_sgp_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    """`ipguard report` says which quotas are in force and where from, the branch-ENI headroom per zone (none
    where only t3 nodes run), and per policy its groups, union and the rule figures nearest the quota."""
    assert main(["report", "--snapshot", str(REPO / "examples" / "cluster-sgp.yaml"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["securityGroupsForPods"]
    assert report["quotas"] == {"securityGroupsPerENI": 5, "rulesPerSecurityGroup": 60, "source": "Service Quotas"}
    assert report["branchHeadroom"]["us-east-1c"] == 0 and report["branchHeadroom"]["us-east-1b"] > 0
    policies = {p["policy"]: p for p in report["securityGroupPolicies"]}
    assert (policies["payments/api-db-access"]["union"], policies["payments/api-db-access"]["pods"]) == (4, 3)
    assert max(r["most"] for r in policies["payments/partner-access"]["rules"]) == 55
    assert main(["report", "--snapshot", str(REPO / "examples" / "sgp" / "cluster-missing-eniconfig.yaml")]) == 0
    text = capsys.readouterr().out
    assert "warning: 1 node(s) in us-east-1b select ENIConfig us-east-1b, which does not exist" in text
    assert "quotas 5 groups per ENI, 60 rules per group and direction (from defaults)" in text


def test_manifests_register_and_allow_what_the_checks_need() -> None:
    """The validating webhook takes SecurityGroupPolicy and ENIConfig CREATE/UPDATE (the mutating one pods
    only); RBAC reads service accounts; the IAM policy lets ipguard read the two quotas (optional)."""
    configs = list(yaml.safe_load_all((REPO / "manifests" / "base" / "webhooks.yaml").read_text()))
    mutating, validating = (c["webhooks"][0] for c in configs)
    assert [r["resources"] for r in mutating["rules"]] == [["pods"]]
    rules = {r["resources"][0]: r for r in validating["rules"]}
    assert rules["securitygrouppolicies"]["operations"] == ["CREATE", "UPDATE"]
    assert (rules["eniconfigs"]["apiGroups"], rules["eniconfigs"]["scope"]) == (["crd.k8s.amazonaws.com"], "Cluster")
    role = next(d for d in yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text())
                if d["kind"] == "ClusterRole")
    assert "serviceaccounts" in role["rules"][0]["resources"]
    iam = json.loads((REPO / "manifests" / "iam-policy.json").read_text())
    assert any("servicequotas:GetServiceQuota" in s["Action"] for s in iam["Statement"])
