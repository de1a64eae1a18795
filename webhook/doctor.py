"""`ipguard doctor`: what is wrong with the cluster's pod addressing, with the evidence and the fix.

Each check reads the figures the admission decisions read (the capacity index, the CNI settings, the policy
and ENIConfig stores, the VPC's subnets) and, when it has them, the EKS control plane's subnets and recent
`FailedCreatePodSandBox` events. A finding carries a stable code, whether it needs action, its evidence (the
figures) and the fix. Exit status: 1 when any finding needs action, 0 otherwise, 2 when the input cannot be
read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webhook.admission.handler import AdmissionState
from webhook.admission.objects import eniconfig_context, policy_context, quotas
from webhook.model.eniconfig import eniconfig_findings
from webhook.model.findings import Finding
from webhook.model.index import Node, ZoneFigures
from webhook.model.limits import HOST_NETWORK_PODS, PREFIX_SIZE, max_pods
from webhook.model.sgp import policy_findings
from webhook.sources.events import SandboxEvent

if TYPE_CHECKING:
    from webhook.service import Service

# EKS asks for at least this many free addresses in the cluster's subnets to place the control plane's new
# network interfaces during a version update.
EKS_UPGRADE_FREE_ADDRESSES = 5

ACTION = "action"
INFO = "info"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    code: str  # stable: zone-exhausted, subnet-low, pods-schedule-in-some-zones, ...
    severity: str  # ACTION | INFO
    summary: str  # one line, with names and figures
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_action(self) -> bool:
        return self.severity == ACTION


@dataclass(frozen=True, slots=True)
class ClusterSubnet:
    """A subnet holding the EKS control plane's network interfaces (`Amazon EKS <cluster name>`)."""

    subnet_id: str
    zone: str
    free_ips: int


@dataclass(slots=True)
class Facts:
    state: AdmissionState
    cluster_name: str | None = None
    cluster_subnets: tuple[ClusterSubnet, ...] | None = None  # None: not known (no EC2 access, no cluster name)
    events: tuple[SandboxEvent, ...] | None = None  # None: not read (snapshot)


def diagnose(facts: Facts) -> list[Diagnosis]:
    """Every finding, those that need action first."""
    state = facts.state
    figures = state.index.snapshot()
    found: list[Diagnosis] = []
    found += zone_findings(state, figures.zones)
    found += waiting_findings(state, figures.waiting_nodes)
    found += fragmented_findings(state)
    found += max_pods_findings(state)
    found += object_findings(state)
    found += warm_ip_findings(state)
    if facts.events is not None:
        found += event_findings(state, facts.events)
    if facts.cluster_subnets is not None:
        found += cluster_subnet_findings(state, facts.cluster_name, facts.cluster_subnets)
    return sorted(found, key=lambda d: not d.needs_action)


def _zone_evidence(z: ZoneFigures, reserve: int) -> dict[str, Any]:
    return {"zone": z.zone, "nodes": z.nodes, "headroom": z.headroom, "reserve": reserve, "warmFree": z.warm_free,
            "subnetFree": z.subnet_free, "waitingForIp": z.waiting, "newNodeIps": z.new_node_ips,
            "subnets": list(z.subnets)}


def _out_of_addresses(z: ZoneFigures, reserve: int) -> bool:
    """decide's rule (ZoneCheck.out_of_addresses): no headroom above the reserve, and new nodes would get no
    more than the reserve either."""
    return z.headroom <= reserve and z.new_node_ips <= reserve


def _nodes_in(state: AdmissionState, zone: str) -> list[Node]:
    return [n for n in state.index.nodes.values() if n.known and n.zone == zone and n.schedulable]


def _zone_fix(state: AdmissionState, z: ZoneFigures) -> str:
    cni = state.index.cni
    steps = []
    blocks = sum(s.free_blocks or 0 for s in state.index.subnet_figures() if s.subnet_id in z.subnets)
    if not cni.prefix_delegation:
        nodes = _nodes_in(state, z.zone)
        nitro = sum(1 for n in nodes if n.limits is not None and n.limits.prefix_delegation)
        if nitro and blocks:
            steps.append(f"enable prefix delegation (ENABLE_PREFIX_DELEGATION=true): {nitro} of {len(nodes)} "
                         f"node(s) here are Nitro and the pod subnets have {blocks} free /28 block(s)")
        elif nitro:
            steps.append("prefix delegation would not help here: the pod subnets have no free /28 block")
    steps.append(f"add or expand pod subnets in {z.zone} (a subnet tagged kubernetes.io/role/cni for subnet "
                 "discovery, or a secondary VPC CIDR with custom networking)")
    if z.warm_free:
        steps.append(f"reduce WARM_* waste: the warm pools in {z.zone} hold {z.warm_free} address(es) idle now "
                     "(set WARM_IP_TARGET and MINIMUM_IP_TARGET instead of WARM_ENI_TARGET)")
    return "; ".join(steps)


def zone_findings(state: AdmissionState, zones: Sequence[ZoneFigures]) -> list[Diagnosis]:
    """Zones and pod subnets at or below their reserve (the `FailedCreatePodSandBox` row), and pods that can
    only schedule in some zones because the others are out of addresses."""
    found = []
    settings = state.settings
    exhausted = set()
    for z in zones:
        reserve = settings.reserve_for_zone(z.zone)
        if z.headroom > reserve:
            continue
        exhausted.add(z.zone)
        why = state.index.growth_hint(z.zone)
        found.append(Diagnosis(
            "zone-exhausted", ACTION,
            f"{z.zone}: pod IP headroom {z.headroom} at or below the reserve of {reserve}"
            + (f" ({why})" if why else ""),
            _zone_fix(state, z), {**_zone_evidence(z, reserve), "why": why}))
    zones_by_name = {z.zone: z for z in zones}
    for s in state.index.subnet_figures():
        reserve = settings.reserve_for_zone(s.zone)
        if s.nodes and s.zone not in exhausted and s.supply <= reserve:
            found.append(Diagnosis(
                "subnet-low", ACTION,
                f"{s.subnet_id} ({s.zone}): {s.supply} usable address(es) left for pods, at or below the reserve "
                f"of {reserve}; its {s.nodes} node(s) get no more IPs once their warm pools are used",
                _zone_fix(state, zones_by_name[s.zone]) if s.zone in zones_by_name else
                f"add or expand pod subnets in {s.zone}",
                {"subnet": s.subnet_id, "zone": s.zone, "cidr": s.cidr, "freeIps": s.free_ips,
                 "freeBlocks": s.free_blocks, "usable": s.supply, "nodes": s.nodes, "reserve": reserve}))
    out = [z for z in zones if _out_of_addresses(z, settings.reserve_for_zone(z.zone))]
    open_zones = [z for z in zones if z.headroom > settings.reserve_for_zone(z.zone)]
    if out and open_zones:
        found.append(Diagnosis(
            "pods-schedule-in-some-zones", ACTION,
            f"pods can only schedule in {', '.join(z.zone for z in open_zones)}: "
            f"{', '.join(z.zone for z in out)} {'is' if len(out) == 1 else 'are'} out of addresses",
            f"give {', '.join(z.zone for z in out)} more pod addresses (see zone-exhausted); until then zone "
            "spreading constraints with whenUnsatisfiable: DoNotSchedule leave pods Pending",
            {"zones": [_zone_evidence(z, settings.reserve_for_zone(z.zone)) for z in zones]}))
    return found


def waiting_findings(state: AdmissionState, waiting: Iterable[tuple[str, str, int]]) -> list[Diagnosis]:
    """Pods on nodes that hold no IP for them: ipamd cannot get one (what kubelet reports as
    FailedCreatePodSandBox)."""
    rows: list[dict[str, Any]] = []
    for name, zone, count in waiting:
        node = state.index.nodes[name]
        rows.append({"node": name, "zone": zone, "waiting": count, "why": state.index.node_growth_hint(node)})
    if not rows:
        return []
    total = sum(r["waiting"] for r in rows)
    return [Diagnosis(
        "pods-waiting-for-ip", ACTION,
        f"{total} pod(s) on {len(rows)} node(s) have no IP (FailedCreatePodSandBox): "
        + "; ".join(f"{r['node']}: {r['why'] or 'no address for it'}" for r in rows[:3])
        + (" ..." if len(rows) > 3 else ""),
        "by each node's cause: more addresses in its pod subnets (zone-exhausted, subnet-low), kubelet max-pods "
        "within its pod IPs (max-pods-over-ip-capacity), an ENIConfig for its zone; or move the pods to nodes "
        "with warm IPs",
        {"nodes": rows})]


def fragmented_findings(state: AdmissionState) -> list[Diagnosis]:
    """Prefix delegation on, and a pod subnet with free addresses but no free /28 (InsufficientCidrBlocks)."""
    if not state.index.cni.prefix_delegation:
        return []
    found = []
    for s in state.index.subnet_figures():
        if s.nodes and s.free_blocks == 0 and s.free_ips >= PREFIX_SIZE:
            found.append(Diagnosis(
                "prefix-fragmented", ACTION,
                f"{s.subnet_id} ({s.zone}): {s.free_ips} free addresses but no free /28 block: prefix "
                "delegation gets nothing from it (InsufficientCidrBlocks)",
                "give prefixes a contiguous range: a subnet CIDR reservation of type prefix in a new or emptier "
                "subnet, or a new pod subnet; the free addresses stay scattered until the pods holding them go",
                {"subnet": s.subnet_id, "zone": s.zone, "cidr": s.cidr, "freeIps": s.free_ips, "freeBlocks": 0}))
    return found


def max_pods_findings(state: AdmissionState) -> list[Diagnosis]:
    """Nodes whose kubelet max-pods exceeds the pod IPs they can hold plus the host-network pods: the scheduler
    places pods that then wait for an IP (the custom-networking mistake: max-pods worked out without it)."""
    cni = state.index.cni
    groups: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for node in state.index.nodes.values():
        if not node.known or node.limits is None or node.allocatable_pods is None or node.no_eni_config:
            continue
        # Branch-ENI pods (security groups for pods) count against max-pods but take no warm-pool IP.
        branch = node.limits.branch_enis if cni.pod_eni else 0
        if node.allocatable_pods > node.capacity + HOST_NETWORK_PODS + branch:
            groups[(node.instance_type or "", node.allocatable_pods, node.capacity)].append(node.name)
    found = []
    for (instance_type, allocatable, capacity), names in sorted(groups.items()):
        right = max_pods(state.index.limits.get(instance_type), cni.mode)
        found.append(Diagnosis(
            "max-pods-over-ip-capacity", ACTION,
            f"{len(names)} {instance_type} node(s) have max-pods {allocatable} but hold at most {capacity} pod "
            f"IPs (+{HOST_NETWORK_PODS} host-network pods): pods past that wait for an IP",
            f"set the kubelet's max-pods to {right} (`ipguard max-pods {instance_type}"
            + (" --custom-networking" if cni.custom_networking else "")
            + (" --prefix-delegation" if cni.prefix_delegation else "") + "`)",
            {"instanceType": instance_type, "maxPods": allocatable, "podIpCapacity": capacity,
             "rightMaxPods": right, "nodes": sorted(names)}))
    return found


# What the object checks found that blocks pods or leaves a policy without effect.
_OBJECT_ACTION = frozenset({"pod-eni-off", "no-branch-room", "zone-without-eniconfig", "wrong-zone",
                            "unknown-subnet", "unknown-group"})
_SGP_NOT_APPLIED = frozenset({"pod-eni-off", "no-branch-room"})


def _from_finding(finding: Finding, subject: str, fix: str) -> Diagnosis:
    code = "sg-policy-not-applied" if finding.code in _SGP_NOT_APPLIED else finding.code
    severity = ACTION if finding.deny or finding.code in _OBJECT_ACTION else INFO
    return Diagnosis(code, severity, finding.message, fix, {"object": subject, "check": finding.code})


_REVIEW = "correct the object (ipguard check -f FILE judges the corrected one before you apply it)"
_OBJECT_FIXES = {
    "pod-eni-off": "set ENABLE_POD_ENI=true on aws-node (and the cluster role's AmazonEKSVPCResourceController)",
    "no-branch-room": "add nodes of a trunking-capable type (not t3): vpc.amazonaws.com/pod-eni is 0 on all nodes",
    "zone-without-eniconfig": "create an ENIConfig for that zone (named for the zone when ENI_CONFIG_LABEL_DEF is "
                              "topology.kubernetes.io/zone) with a pod subnet in it",
    "wrong-zone": "point the ENIConfig at a subnet in its nodes' zone",
}


def object_findings(state: AdmissionState) -> list[Diagnosis]:
    """SecurityGroupPolicies and ENIConfigs through the checks admission runs on them; SG policies that will not
    apply (ENABLE_POD_ENI off, or no node with branch capacity) said once."""
    found: list[Diagnosis] = []
    seen: set[str] = set()
    context = policy_context(state)
    for namespace in sorted(state.policies.policies):
        for name, policy in sorted(state.policies.policies[namespace].items()):
            for finding in policy_findings(policy, state.policies, state.vpc, quotas(state), context):
                if finding.code in _SGP_NOT_APPLIED:
                    if finding.code in seen:
                        continue
                    seen.add(finding.code)
                    total = sum(len(p) for p in state.policies.policies.values())
                    finding = Finding(finding.code, False, f"{total} SecurityGroupPolicy(ies) will not apply: "
                                      + finding.message.split(": ", 1)[-1], finding.warning)
                found.append(_from_finding(finding, f"SecurityGroupPolicy {namespace}/{name}",
                                           _OBJECT_FIXES.get(finding.code, _REVIEW)))
    eni_context = eniconfig_context(state)
    for name, config in sorted(state.eni_configs.configs.items()):
        for finding in eniconfig_findings(config, None, state.eni_configs, state.vpc, quotas(state), eni_context):
            if finding.code == "subnet-low":
                continue  # zone-exhausted and subnet-low above say it with the whole zone's figures
            if finding.code == "zone-without-eniconfig":
                if finding.message in seen:
                    continue
                seen.add(finding.message)
            found.append(_from_finding(finding, f"ENIConfig {name}", _OBJECT_FIXES.get(finding.code, _REVIEW)))
    if state.index.cni.custom_networking and not state.eni_configs.configs:
        from webhook.model.eniconfig import missing_config_findings

        for finding in missing_config_findings(state.eni_configs, ()):
            found.append(_from_finding(finding, "ENIConfig", _OBJECT_FIXES["zone-without-eniconfig"]))
    return found


def warm_ip_findings(state: AdmissionState) -> list[Diagnosis]:
    """WARM_IP_TARGET without MINIMUM_IP_TARGET: ipamd calls EC2 every few pods, and the CNI's logs show
    throttled ("intermittent") AWS API errors when many nodes do."""
    cni = state.index.cni
    if not cni.warm_ip_target or cni.minimum_ip_target:
        return []
    return [Diagnosis(
        "warm-ip-target-churn", INFO,
        f"WARM_IP_TARGET={cni.warm_ip_target} without MINIMUM_IP_TARGET: every node calls EC2 each time its "
        "pods use the warm IPs up (throttling shows as intermittent AWS API errors in the CNI's logs)",
        "set MINIMUM_IP_TARGET to the usual pods per node, so ipamd asks once at start-up",
        {"WARM_IP_TARGET": cni.warm_ip_target})]


_CAUSES = (
    ("InsufficientCidrBlocks", "the subnet has no free /28 block for a prefix"),
    ("failed to assign an IP address", "ipamd had no IP for the pod"),
    ("pod-eni", "no branch ENI for the pod (security groups for pods)"),
    ("security group", "no branch ENI for the pod (security groups for pods)"),
)


def event_findings(state: AdmissionState, events: Sequence[SandboxEvent]) -> list[Diagnosis]:
    """Recent FailedCreatePodSandBox events, each matched to its node's zone and the cause the index shows."""
    if not events:
        return []
    index = state.index
    rows = []
    for event in events:
        node_name = event.node or _pod_node(state, event.namespace, event.pod)
        node = index.nodes.get(node_name) if node_name else None
        zone = node.zone if node is not None else None
        said = next((cause for marker, cause in _CAUSES if marker.lower() in event.message.lower()), None)
        shown = ""
        if node is not None and node.waiting:
            shown = index.node_growth_hint(node) or "the node holds no IP for it"
        elif zone is not None:
            reserve = state.settings.reserve_for_zone(zone)
            if index.zone_headroom(zone) <= reserve:
                shown = index.growth_hint(zone) or f"{zone} is at or below its reserve"
        rows.append({"pod": f"{event.namespace}/{event.pod}", "node": node_name, "zone": zone, "count": event.count,
                     "lastSeen": event.last_seen, "cause": said or "not an address problem",
                     "indexShows": shown or "no shortage there now", "message": event.message[:300]})
    zones = sorted({str(r["zone"]) for r in rows if r["zone"]})
    address = [r for r in rows if r["cause"] != "not an address problem" or r["indexShows"] != "no shortage there now"]
    return [Diagnosis(
        "failed-create-pod-sandbox", ACTION if address else INFO,
        f"{len(rows)} recent FailedCreatePodSandBox event(s)" + (f" in {', '.join(zones)}" if zones else "")
        + (f"; {len(address)} for want of an address" if address else "; none for want of an address"),
        "see the zone and node findings above for the fix where the index shows a shortage; otherwise read the "
        "event's message (aws-node logs: /var/log/aws-routed-eni/ipamd.log on the node)",
        {"events": rows})]


def _pod_node(state: AdmissionState, namespace: str, pod: str) -> str | None:
    entry = state.index.pods.get(f"{namespace}/{pod}")
    return entry[0] if entry is not None else None


def cluster_subnet_findings(state: AdmissionState, cluster: str | None,
                            subnets: Sequence[ClusterSubnet]) -> list[Diagnosis]:
    """Cluster subnets (where the control plane's ENIs live) with fewer free addresses than a version update
    needs to place new ones: pods drawing on them block upgrades."""
    pod_subnets = {s.subnet_id for s in state.index.subnet_figures() if s.nodes}
    found = []
    for s in sorted(subnets, key=lambda s: s.subnet_id):
        if s.free_ips >= EKS_UPGRADE_FREE_ADDRESSES:
            continue
        drained = s.subnet_id in pod_subnets
        found.append(Diagnosis(
            "cluster-subnet-low", ACTION,
            f"{s.subnet_id} ({s.zone}) holds the control plane's network interfaces (Amazon EKS "
            f"{cluster or '<cluster>'}) and has {s.free_ips} free address(es); a version update needs "
            f"{EKS_UPGRADE_FREE_ADDRESSES}" + (": pods draw on it" if drained else ""),
            (f"set a zone reserve for {s.zone} of at least {EKS_UPGRADE_FREE_ADDRESSES} (zoneReserves: "
             f"{s.zone}={EKS_UPGRADE_FREE_ADDRESSES}) so ipguard keeps pods from draining it, and move pods to "
             "other subnets" if drained else
             "free addresses in it, or update the cluster's subnets (aws eks update-cluster-config "
             "--resources-vpc-config subnetIds=...)"),
            {"subnet": s.subnet_id, "zone": s.zone, "freeIps": s.free_ips, "needed": EKS_UPGRADE_FREE_ADDRESSES,
             "podSubnet": drained, "cluster": cluster}))
    return found


# ---- output and the command --------------------------------------------------------------------------------


def doctor_text(found: Sequence[Diagnosis]) -> str:
    if not found:
        return "no problem found"
    lines = []
    for d in found:
        lines.append(f"[{'ACTION' if d.needs_action else 'info'}] {d.code}: {d.summary}")
        lines.append(f"  fix: {d.fix}")
    action = sum(d.needs_action for d in found)
    lines.append(f"{len(found)} finding(s), {action} needing action")
    return "\n".join(lines)


def doctor_json(found: Sequence[Diagnosis]) -> list[dict[str, Any]]:
    return [{"code": d.code, "severity": d.severity, "summary": d.summary, "evidence": d.evidence, "fix": d.fix}
            for d in found]


def run_doctor(facts: Facts, *, as_json: bool) -> int:
    found = diagnose(facts)
    print(json.dumps(doctor_json(found), indent=2) if as_json else doctor_text(found))
    return 1 if any(d.needs_action for d in found) else 0


def snapshot_facts(path: str) -> Facts:
    """A snapshot file's cluster; its `clusterSubnets` (when listed) are the control plane's subnets."""
    from webhook.sources.snapshot import load_snapshot

    snapshot = load_snapshot(path)
    index = snapshot.build_index(clock=lambda: 0.0)
    policies, eni_configs, vpc = snapshot.build_objects(index)
    state = AdmissionState(index, snapshot.settings, policies=policies, eni_configs=eni_configs, vpc=vpc)
    cluster = None
    if snapshot.cluster_subnets is not None:
        by_id = {s.subnet_id: s for s in snapshot.subnets}
        cluster = tuple(ClusterSubnet(sid, by_id[sid].zone, by_id[sid].free_ips) for sid in snapshot.cluster_subnets)
    return Facts(state, snapshot.cluster_name, cluster)


async def live_facts(service: Service, events_since: float) -> Facts:
    """The loaded service's state, its EC2 poller's control-plane view, and recent sandbox events."""
    from webhook.sources.events import sandbox_events

    events = await sandbox_events(service.api, events_since)
    cluster_name = cluster = None
    if service.poller is not None:
        cluster_name = service.poller.cluster_name
        plane = service.poller.control_plane
        if plane is not None:
            cluster = tuple(ClusterSubnet(sid, info.zone, info.free_ips) for sid, info in sorted(plane.subnets.items()))
    return Facts(service.state, cluster_name, cluster, events)


LiveRunner = Callable[..., int]  # cli.with_live_service(args, use, not_loaded=...)


def main(args: argparse.Namespace, live: LiveRunner) -> int:
    if args.live:
        async def use(service: Service) -> int:
            return run_doctor(await live_facts(service, args.events_since), as_json=args.json)

        return live(args, use, not_loaded=2)
    from webhook.sources.snapshot import SnapshotError

    try:
        facts = snapshot_facts(args.snapshot)
    except SnapshotError as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 2
    return run_doctor(facts, as_json=args.json)


def add_parser(sub: Any, live_source_args: Callable[[argparse.ArgumentParser], None], default_snapshot: Path,
               live: LiveRunner) -> None:
    dp = sub.add_parser("doctor", help="what is wrong with pod addressing: findings, evidence and fixes")
    dp.add_argument("--snapshot", default=str(default_snapshot), help="cluster snapshot file (YAML)")
    dp.add_argument("--live", action="store_true", help="read the live cluster (and EC2, and recent Events)")
    dp.add_argument("--timeout", type=float, default=60.0, help="with --live: seconds to wait for the data")
    dp.add_argument("--events-since", type=float, default=3600.0, metavar="SECONDS",
                    help="with --live: FailedCreatePodSandBox events seen this recently (default 3600)")
    dp.add_argument("--json", action="store_true", help="the findings as a JSON list")
    live_source_args(dp)
    dp.set_defaults(func=lambda args: main(args, live))
