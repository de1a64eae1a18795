"""The watch handlers: Kubernetes objects (plain dicts, as listed and watched) into the index and settings."""

from __future__ import annotations

import json
from typing import Any

from tests import live
from webhook.model.config import NO_VALID_SETTINGS, Mode, Settings
from webhook.model.index import CapacityIndex, PodUse
from webhook.model.pods import STEERED_ANNOTATION
from webhook.sources.cluster import ClusterFeed

A, B = "us-east-1a", "us-east-1b"


def feed() -> tuple[ClusterFeed, list[Settings]]:
    applied: list[Settings] = []
    return ClusterFeed(CapacityIndex(), applied.append), applied


def eni_config(name: str, subnet: str) -> dict[str, Any]:
    return {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig", "metadata": {"name": name},
            "spec": {"subnet": subnet, "securityGroups": ["sg-0123456789abcdef0"]}}


def test_custom_networking_resolves_eniconfigs_whenever_the_cni_settings_arrive() -> None:
    f, _ = feed()
    h = f.handlers()
    # nodes first, as a relist may deliver them; the aws-node env and the ENIConfigs later
    h["nodes"].upsert(live.node("n-a", A, "i-0aaaaaaaaaaaaaaaa"))
    labelled = live.node("n-b", B, "i-0bbbbbbbbbbbbbbbb")
    labelled["metadata"]["labels"]["eniconfig"] = "pods-b"
    h["nodes"].upsert(labelled)
    assert f.index.nodes["n-a"].pod_subnet is None  # secondary-IP mode: from EC2, not known yet
    h["eniconfigs"].upsert(eni_config(A, "subnet-pods-a"))
    h["eniconfigs"].upsert(eni_config("pods-b", "subnet-pods-b"))
    h["daemonsets"].upsert(live.aws_node({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true",
                                          "ENI_CONFIG_LABEL_DEF": "topology.kubernetes.io/zone"}))
    assert f.index.cni.custom_networking
    assert f.index.nodes["n-a"].pod_subnet == "subnet-pods-a"
    assert f.index.nodes["n-b"].pod_subnet is None  # no ENIConfig named us-east-1b
    # the label definition changes: node n-b's own label now names its ENIConfig
    h["daemonsets"].upsert(live.aws_node({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true",
                                          "ENI_CONFIG_LABEL_DEF": "eniconfig"}))
    assert f.index.nodes["n-b"].pod_subnet == "subnet-pods-b"
    assert f.index.nodes["n-a"].pod_subnet is None
    # the annotation wins over the label
    annotated = live.node("n-a", A, "i-0aaaaaaaaaaaaaaaa")
    annotated["metadata"]["annotations"] = {"k8s.amazonaws.com/eniConfig": "pods-b"}
    h["nodes"].upsert(annotated)
    assert f.index.nodes["n-a"].pod_subnet == "subnet-pods-b"
    h["eniconfigs"].delete(eni_config("pods-b", "subnet-pods-b"))
    assert f.index.nodes["n-a"].pod_subnet is None


def test_pods_terminal_pending_steered_and_relisted() -> None:
    f, _ = feed()
    h = f.handlers()
    h["nodes"].upsert(live.node("n-a", A, "i-0aaaaaaaaaaaaaaaa"))
    pods = h["pods"]
    pods.upsert(live.pod("shop", "web-1", "n-a"))
    pods.upsert(live.pod("shop", "host-1", "n-a", hostNetwork=True))
    assert f.index.pods["shop/web-1"] == ("n-a", PodUse.IP, None)
    assert f.index.pods["shop/host-1"] == ("n-a", PodUse.NONE, None)
    pods.upsert(live.pod("shop", "web-1", "n-a", phase="Succeeded"))  # its IP is released
    assert "shop/web-1" not in f.index.pods
    # an unbound pod ipguard steered counts against the zone its record prefers, until bound
    steered = live.pod("shop", "web-2", None, phase="Pending")
    steered["metadata"]["annotations"] = {STEERED_ANNOTATION: json.dumps(
        {"avoidZones": [B], "avoidNodes": [], "preferZones": [[A, 100]], "createdRequired": True, "reason": "x"})}
    pods.upsert(steered)
    assert f.index.zones[A].pending == 1
    steered["spec"]["nodeName"] = "n-a"
    steered["status"]["phase"] = "Running"
    pods.upsert(steered)
    assert f.index.zones[A].pending == 0 and f.index.pods["shop/web-2"][0] == "n-a"
    # a relist that lacks a pod removes it; one that has it keeps it
    pods.begin_resync()
    pods.upsert(steered)
    pods.end_resync()
    assert set(f.index.pods) == {"shop/web-2"}
    assert f.index.aggregates() == f.index.recount()


def test_nodes_deleted_and_relisted() -> None:
    f, _ = feed()
    h = f.handlers()
    for name in ("n-a", "n-b"):
        h["nodes"].upsert(live.node(name, A, "i-0" + name[-1] * 16))
    h["pods"].upsert(live.pod("shop", "web-1", "n-b"))
    h["nodes"].begin_resync()
    h["nodes"].upsert(live.node("n-a", A, "i-0aaaaaaaaaaaaaaaa"))
    h["nodes"].end_resync()
    assert set(f.nodes) == {"n-a"} and f.index.zone_figures(A).nodes == 1
    assert f.node_instances() == {"n-a": "i-0aaaaaaaaaaaaaaaa"}
    h["pods"].delete(live.pod("shop", "web-1", "n-b"))
    # only its freed IP is left on the record, through ipamd's cooldown
    assert f.index.nodes["n-b"].cooling == 1 and not f.index.nodes["n-b"].known
    assert f.index.aggregates() == f.index.recount()


def test_configmap_bad_refused_good_applied_delete_keeps() -> None:
    f, applied = feed()
    h = f.handlers()["configmaps"]
    h.upsert(live.config_map({"mode": "warn", "zoneReserve": "4"}))
    assert applied[-1].mode.value == "warn" and applied[-1].zone_reserve == 4
    h.upsert(live.config_map({"mode": "warn", "zoneReserve": "lots"}))
    assert f.config_errors == 1 and "zoneReserve" in str(f.config_last_error) and len(applied) == 1
    h.delete(live.config_map({}))
    assert len(applied) == 1  # the settings in force stay
    other = live.config_map({"mode": "enforce"})
    other["metadata"]["name"] = "someone-else"
    h.upsert(other)
    assert len(applied) == 1


def test_configmap_refused_before_any_valid_settings_means_dry_run_not_the_defaults() -> None:
    """An invalid ConfigMap at start-up: no last good settings, so never deny or steer (dry-run) until a valid one;
    a ConfigMap absent at the first list leaves the documented defaults as the good settings."""
    f, applied = feed()
    h = f.handlers()["configmaps"]
    h.begin_resync()
    h.upsert(live.config_map({"mode": "warn", "maxSteerdNodes": "5"}))
    h.end_resync()
    assert applied == [NO_VALID_SETTINGS] and NO_VALID_SETTINGS.mode is Mode.DRY_RUN
    assert "dry-run" in str(f.config_problem()) and "maxSteerdNodes" in str(f.config_problem())
    h.upsert(live.config_map({"mode": "warn"}))
    assert applied[-1].mode is Mode.WARN and f.config_problem() is None

    absent, applied_absent = feed()
    h = absent.handlers()["configmaps"]
    h.begin_resync()
    h.end_resync()
    h.upsert(live.config_map({"mode": "bogus"}))
    assert applied_absent == [] and "last good settings stay in force" in str(absent.config_problem())
    h.delete(live.config_map({}))
    assert absent.config_problem() is None  # nothing refused is left; the defaults stay in force

    f, applied = feed()
    h = f.handlers()["configmaps"]
    h.upsert(live.config_map({"mode": "bogus"}))
    h.delete(live.config_map({}))
    assert applied == [NO_VALID_SETTINGS] and "dry-run" in str(f.config_problem())  # still no valid settings


def test_eniconfig_lookup_follows_the_cni_order() -> None:
    f, _ = feed()
    h = f.handlers()
    h["daemonsets"].upsert(live.aws_node({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true",
                                          "ENI_CONFIG_ANNOTATION_DEF": "example.com/pods"}))
    for name, subnet in (("default", "subnet-default"), ("ext", "subnet-ext"), ("ann", "subnet-ann"),
                         ("lab", "subnet-lab")):
        h["eniconfigs"].upsert(eni_config(name, subnet))
    node = live.node("n-a", A, "i-0aaaaaaaaaaaaaaaa")
    h["nodes"].upsert(node)
    assert f.index.nodes["n-a"].pod_subnet == "subnet-default"  # nothing names one: the "default" ENIConfig
    node["metadata"]["labels"]["k8s.amazonaws.com/eniConfig"] = "lab"
    h["nodes"].upsert(node)
    assert f.index.nodes["n-a"].pod_subnet == "subnet-lab"
    node["metadata"]["annotations"] = {"example.com/pods": "ann"}
    h["nodes"].upsert(node)
    assert f.index.nodes["n-a"].pod_subnet == "subnet-ann"  # the configured annotation beats the label
    node["metadata"]["labels"]["vpc.amazonaws.com/externalEniConfig"] = "ext"
    h["nodes"].upsert(node)
    assert f.index.nodes["n-a"].pod_subnet == "subnet-ext"  # the external label beats both


def ec2_node_class(name: str, subnets: list[Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "karpenter.k8s.aws/v1", "kind": "EC2NodeClass", "metadata": {"name": name},
                           "spec": {"subnetSelectorTerms": [{"tags": {"karpenter.sh/discovery": "prod"}}]}}
    if subnets is not None:
        obj["status"] = {"subnets": subnets}
    return obj


def test_ec2_node_classes_name_the_subnets_karpenter_launches_into() -> None:
    """Karpenter launches new nodes into the subnets its controller resolved for each EC2NodeClass
    (`status.subnets`: id and zone); a class not resolved yet names none, and a relist drops deleted classes."""
    f, _ = feed()
    h = f.handlers()
    h["ec2nodeclasses"].upsert(ec2_node_class("default", [
        {"id": "subnet-0aaaaaaaaaaaaaaaa", "zone": A, "zoneID": "use1-az1"},
        {"id": "subnet-0bbbbbbbbbbbbbbbb", "zone": B, "zoneID": "use1-az2"},
        {"zone": B}, "junk",  # no id: not a subnet
    ]))
    h["ec2nodeclasses"].upsert(ec2_node_class("gpu", None))  # status not written yet
    assert f.launch_subnets() == {"subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"}
    assert f.node_class_subnets["default"]["subnet-0bbbbbbbbbbbbbbbb"] == B
    h["ec2nodeclasses"].upsert(ec2_node_class("gpu", [{"id": "subnet-0cccccccccccccccc", "zone": A}]))
    assert "subnet-0cccccccccccccccc" in f.launch_subnets()
    h["ec2nodeclasses"].begin_resync()
    h["ec2nodeclasses"].upsert(ec2_node_class("gpu", [{"id": "subnet-0cccccccccccccccc", "zone": A}]))
    h["ec2nodeclasses"].end_resync()
    assert f.launch_subnets() == {"subnet-0cccccccccccccccc"}
    h["ec2nodeclasses"].delete(ec2_node_class("gpu", None))
    assert f.launch_subnets() == set()
