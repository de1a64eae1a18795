"""Scenario files (YAML, examples/scenarios/) and the simulated cluster they start from.

    name: zone-near-exhaustion
    description: one line
    snapshot: ../cluster.yaml      # a cluster snapshot (the format of examples/cluster.yaml), relative to this file
    duration: 300                  # simulated seconds
    seed: 1
    settings: {mode: enforce}      # ipguard's ConfigMap for the replay (reserves default to 0)
    ipguard: {replicas: 1, ec2Period: 30, watchLag: 1}
    autoscaler: {type: m5.large, pendingFor: 30, boot: 60, maxNodes: 10, subnets: {us-east-1a: subnet-...}}
    deployments:
      web: {namespace: apps, nodeSelector: {...}, affinity: {...}, branch: false, securityGroups: 1}
    events:
      - {at: 0, scale: web, replicas: 300, over: 60}     # create pods evenly over `over` seconds
      - {at: 30, job: batch, pods: 100, runtime: 20, over: 5}
      - {at: 90, rollout: web, batch: 10, every: 5}      # replace every pod of web, `batch` at a time
      - {at: 120, delete: web, count: 50}
      - {at: 150, cordon: ip-10-0-1-10.ec2.internal}
      - {at: 160, eniConfig: pods-b, node: ip-10-0-1-10.ec2.internal}  # relabel the node to this ENIConfig
      - {at: 170, eniConfig: pods-b, subnet: subnet-0c}                # give the ENIConfig another subnet

Snapshot extensions the simulator reads (ipguard's loader ignores them): `tags` on a subnet (e.g.
kubernetes.io/role/cni), `maxPods` on a node (the kubelet's max-pods when it differs from allocatable pods).
A node's `heldIPs` is not used: the simulation gives each node what its own ipamd would hold for its pods, and a
snapshot whose subnets cannot hold that (with their `free` and `freeBlocks` left) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from webhook.model.limits import LimitsTable, max_pods
from webhook.sim import ipamd as ip
from webhook.sim.addresses import BLOCK, Ec2Error
from webhook.sim.cluster import AutoscalerConfig, Cluster, SimPod
from webhook.sim.ec2 import Ec2
from webhook.sources.snapshot import Snapshot, SnapshotError, parse_snapshot

WARM_UP = -3600.0  # the starting state was reached long before the scenario begins


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message names the file and the place."""


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    replicas: int = 1
    ec2_period: float = 30.0
    watch_lag: float = 1.0
    step: float = 1.0


@dataclass(slots=True)
class Scenario:
    name: str
    description: str
    source: str
    snapshot_doc: dict[str, Any]
    snapshot: Snapshot
    duration: float
    seed: int
    settings: dict[str, str]
    options: ReplayOptions
    autoscaler: dict[str, Any] | None
    deployments: dict[str, dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where} must be a mapping")
    return dict(value)


SCENARIOS = Path(__file__).resolve().parent.parent.parent / "examples" / "scenarios"


def find_scenario(name: str) -> Path:
    """A scenario file by path, or by name among the bundled examples/scenarios."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return SCENARIOS / f"{name}.yaml"


def load_scenario(path: str | Path, limits: LimitsTable | None = None,
                  snapshot: str | Path | None = None) -> Scenario:
    """`snapshot` replaces the scenario's own starting snapshot."""
    path = Path(path)
    try:
        doc = _mapping(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    return parse_scenario(doc, path, limits or LimitsTable(), snapshot)


def parse_scenario(doc: Mapping[str, Any], path: Path, limits: LimitsTable,
                   snapshot_path: str | Path | None = None) -> Scenario:
    where = str(path)
    snap_ref = snapshot_path or doc.get("snapshot")
    if snap_ref is not None:
        snap_file = Path(snap_ref)
        if not snap_file.is_absolute() and snapshot_path is None:
            snap_file = path.parent / snap_file
        try:
            snapshot_doc = _mapping(yaml.safe_load(snap_file.read_text(encoding="utf-8")), str(snap_file))
        except (OSError, yaml.YAMLError) as exc:
            raise ScenarioError(f"{where}: snapshot {snap_file}: cannot read: {exc}") from None
        snap_source = str(snap_file)
    else:
        if not doc.get("cluster"):
            raise ScenarioError(f"{where}: no starting state: give `snapshot: FILE`, `cluster:` or --snapshot")
        snapshot_doc = _mapping(doc.get("cluster"), f"{where}: cluster")
        snap_source = f"{where} (cluster)"
    try:
        snapshot = parse_snapshot(snapshot_doc, snap_source, limits)
    except SnapshotError as exc:
        raise ScenarioError(str(exc)) from None
    for subnet in snapshot.subnets:
        if not subnet.cidr:
            raise ScenarioError(f"{snap_source}: subnet {subnet.subnet_id} needs a cidr for the simulation")
    ipguard = _mapping(doc.get("ipguard"), f"{where}: ipguard")
    options = ReplayOptions(
        replicas=int(ipguard.get("replicas", 1)),
        ec2_period=float(ipguard.get("ec2Period", 30.0)),
        watch_lag=float(ipguard.get("watchLag", 1.0)),
        step=float(doc.get("step", 1.0)),
    )
    deployments = {str(k): _mapping(v, f"{where}: deployments.{k}")
                   for k, v in _mapping(doc.get("deployments"), f"{where}: deployments").items()}
    events = [_mapping(e, f"{where}: events[{i}]") for i, e in enumerate(doc.get("events") or [])]
    for i, event in enumerate(events):
        target = event.get("scale") or event.get("rollout") or (event.get("delete"))
        if target is not None and target not in deployments:
            raise ScenarioError(f"{where}: events[{i}]: no deployment {target!r}")
    autoscaler = doc.get("autoscaler")
    return Scenario(
        name=str(doc.get("name") or path.stem),
        description=str(doc.get("description") or ""),
        source=where,
        snapshot_doc=snapshot_doc,
        snapshot=snapshot,
        duration=float(doc.get("duration", 300)),
        seed=int(doc.get("seed", 1)),
        settings={str(k): str(v) for k, v in _mapping(doc.get("settings"), f"{where}: settings").items()},
        options=options,
        autoscaler=_mapping(autoscaler, f"{where}: autoscaler") if autoscaler else None,
        deployments=deployments,
        events=events,
    )


def cni_env(scenario: Scenario) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(scenario.snapshot_doc.get("cni"), "cni").items()}


def eni_configs(scenario: Scenario) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(scenario.snapshot_doc.get("eniConfigs"), "eniConfigs").items()}


def existing_pod(key: str, node: str, *, host_network: bool = False, branch: bool = False) -> dict[str, Any]:
    namespace, name = key.split("/", 1)
    container: dict[str, Any] = {"name": "app", "image": "registry.example.com/app:1"}
    if branch:
        container["resources"] = {"requests": {"vpc.amazonaws.com/pod-eni": "1"},
                                  "limits": {"vpc.amazonaws.com/pod-eni": "1"}}
    spec: dict[str, Any] = {"nodeName": node, "containers": [container]}
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"app": "existing"}}, "spec": spec,
            "status": {"phase": "Running"}}


def build_cluster(scenario: Scenario, limits: LimitsTable | None = None) -> Cluster:
    """The scenario's starting state: subnets as address sets, nodes with ENIs holding what their ipamd would hold
    for their pods, and the rest of each subnet taken by other workloads down to the snapshot's free figures."""
    limits = limits or LimitsTable()
    ec2 = Ec2(seed=scenario.seed)
    raw_subnets = {str(s.get("id")): s for s in scenario.snapshot_doc.get("subnets") or [] if isinstance(s, Mapping)}
    for subnet in scenario.snapshot.subnets:
        tags = {str(k): str(v) for k, v in _mapping(raw_subnets.get(subnet.subnet_id, {}).get("tags"), "tags").items()}
        ec2.add_subnet(subnet.subnet_id, subnet.zone, subnet.cidr, tags)
    # Whole free /28 blocks the snapshot reports are set aside first, so the nodes' own addresses do not break them.
    set_aside = {}
    for subnet in scenario.snapshot.subnets:
        if subnet.free_blocks:
            try:
                set_aside[subnet.subnet_id] = ec2.subnets[subnet.subnet_id].space.allocate_prefixes(subnet.free_blocks)
            except Ec2Error as exc:
                raise ScenarioError(f"{scenario.source}: subnet {subnet.subnet_id}: {exc}") from None
    cni = cni_env(scenario)
    cluster = Cluster(ec2, cni, limits, seed=scenario.seed, eni_configs=eni_configs(scenario))
    raw_nodes = {str(n.get("name")): n for n in scenario.snapshot_doc.get("nodes") or [] if isinstance(n, Mapping)}
    for snap in scenario.snapshot.nodes:
        raw = raw_nodes.get(snap.name, {})
        type_limits = limits.get(snap.instance_type)
        allocatable = snap.allocatable_pods or max_pods(type_limits, cluster.settings.cni.mode)
        node = cluster.add_node(snap.name, snap.zone, snap.instance_type, snap.subnet, allocatable_pods=allocatable,
                                eni_config=str(raw.get("eniConfig") or "") or None, now=WARM_UP,
                                unschedulable=not snap.schedulable)
        node.ipamd.max_pods = int(raw.get("maxPods", allocatable))
        short = snap.name.split(".", 1)[0]
        was_schedulable = node.ipamd.schedulable
        node.ipamd.schedulable = True  # the pods arrived before any cordon
        for i in range(snap.host_network_pods):
            _place(cluster, existing_pod(f"kube-system/{short}-host-{i}", snap.name, host_network=True))
        for i in range(snap.branch_pods):
            _place(cluster, existing_pod(f"apps/{short}-sg-{i}", snap.name, branch=True))
        for i in range(snap.ip_pods):
            pod = _place(cluster, existing_pod(f"apps/{short}-app-{i}", snap.name))
            if pod.phase != "Running":
                raise ScenarioError(f"{scenario.source}: node {snap.name} cannot hold {snap.ip_pods} pod IPs")
        _settle(node.ipamd)
        node.ipamd.schedulable = was_schedulable
    for subnet in scenario.snapshot.subnets:
        aside = set_aside.get(subnet.subnet_id, [])
        try:
            ec2.occupy(subnet.subnet_id, subnet.free_ips - BLOCK * len(aside),
                       None if subnet.free_blocks is None else 0)
        except ValueError as exc:
            raise ScenarioError(f"{scenario.source}: subnet {subnet.subnet_id}: {exc} (after the nodes' own addresses)"
                                ) from None
        for prefix in aside:
            ec2.subnets[subnet.subnet_id].space.release_prefix(prefix)
    if scenario.autoscaler:
        cluster.autoscaler = autoscaler_config(scenario, cluster)
    return cluster


def _place(cluster: Cluster, obj: dict[str, Any]) -> SimPod:
    """A pod already running at the start: bound, and its address taken, growing the node's pool as needed."""
    key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    pod = cluster.create_pod(key, obj, WARM_UP)
    node = cluster.nodes[pod.node or ""]
    for _ in range(200):
        cluster.start_sandboxes(WARM_UP)
        if pod.phase == "Running":
            break
        ip.update_pool(node.ipamd, WARM_UP)
    pod.sandbox_failed = pod.waited = False
    pod.failure_cause = None
    return pod


def _settle(node: ip.Ipamd) -> None:
    for _ in range(100):
        before = (ip.pool_stats(node, WARM_UP), len(node.enis))
        ip.update_pool(node, WARM_UP)
        if (ip.pool_stats(node, WARM_UP), len(node.enis)) == before:
            return


def autoscaler_config(scenario: Scenario, cluster: Cluster) -> AutoscalerConfig:
    raw = scenario.autoscaler or {}
    subnets = {str(k): str(v) for k, v in _mapping(raw.get("subnets"), "autoscaler.subnets").items()}
    if not subnets:
        for node in scenario.snapshot.nodes:
            subnets.setdefault(node.zone, node.subnet)
    return AutoscalerConfig(
        instance_type=str(raw.get("type", "m5.large")),
        subnets=subnets,
        pending_for=float(raw.get("pendingFor", 30.0)),
        boot=float(raw.get("boot", 60.0)),
        interval=float(raw.get("interval", 10.0)),
        max_nodes=int(raw.get("maxNodes", 20)),
        max_pods=int(raw["maxPods"]) if raw.get("maxPods") is not None else None,
    )
