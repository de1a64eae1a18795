"""Headroom tables for people (`ipguard report`) and machines (`--json`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from webhook.model.cni import IPV6_STAND_ASIDE
from webhook.model.config import Settings
from webhook.model.eniconfig import missing_config_findings
from webhook.model.index import HEADROOM_RULE, IndexSnapshot
from webhook.model.sgp import union_excesses

if TYPE_CHECKING:
    from webhook.admission.handler import AdmissionState


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], int) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers))] + [line(r) for r in cells])


def zone_status(headroom: int, reserve: int) -> str:
    if headroom <= reserve:
        return "EXHAUSTED"
    if headroom <= 2 * reserve + 5:
        return "low"
    return "ok"


def objects_json(snapshot: IndexSnapshot, state: AdmissionState) -> dict[str, Any]:
    """Security groups for pods and custom networking: quotas and where they came from, branch-ENI headroom
    per zone, each policy's groups, union and rule figures, and nodes that find no ENIConfig."""
    from webhook.admission.objects import quotas as quotas_in_force

    quotas = quotas_in_force(state)
    vpc = state.vpc
    policies = []
    for namespace in sorted(state.policies.policies):
        for _, policy in sorted(state.policies.policies[namespace].items()):
            excesses, _ = union_excesses(policy, state.policies, 0)  # quota 0: every subject it selects
            rules = []
            for group in policy.groups:
                counts = vpc.groups.get(group)
                if counts is not None:
                    direction, most = counts.most
                    rules.append({"group": group, "most": most, "direction": direction})
            policies.append({
                "policy": policy.key, "groups": list(policy.groups),
                "union": max((len(e.groups) for e in excesses), default=len(policy.groups)),
                "pods": sum(e.pods for e in excesses), "rules": rules, "applies": policy.applies,
            })
    missing = missing_config_findings(state.eni_configs, state.eni_configs.configs) if (
        state.index.cni.custom_networking) else []
    return {
        "podEni": state.index.cni.pod_eni,
        "quotas": {"securityGroupsPerENI": quotas.groups_per_eni, "rulesPerSecurityGroup": quotas.rules_per_group,
                   "source": quotas.source},
        "branchHeadroom": {z.zone: max(z.branch_headroom, 0) for z in snapshot.zones},
        "securityGroupPolicies": policies,
        "eniConfigFindings": [f.message for f in missing],
    }


def objects_text(snapshot: IndexSnapshot, state: AdmissionState) -> list[str]:
    data = objects_json(snapshot, state)
    quotas = data["quotas"]
    out = [
        "",
        f"Security groups for pods: ENABLE_POD_ENI {'on' if data['podEni'] else 'off'}; quotas "
        f"{quotas['securityGroupsPerENI']} groups per ENI, {quotas['rulesPerSecurityGroup']} rules per group "
        f"and direction (from {quotas['source']})",
        format_table(["ZONE", "BRANCH-HEADROOM"], sorted(data["branchHeadroom"].items())),
    ]
    if data["securityGroupPolicies"]:
        rows = []
        for p in data["securityGroupPolicies"]:
            top = max(p["rules"], key=lambda r: r["most"], default=None)
            rows.append((p["policy"], len(p["groups"]), p["union"], p["pods"],
                         f"{top['group']} {top['most']} {top['direction']}" if top else "-"))
        out += ["", format_table(["POLICY", "GROUPS", "UNION", "PODS", "MOST-RULES"], rows)]
    out += [f"warning: {message}" for message in data["eniConfigFindings"]]
    return out


TOPUPS_NOTE = (
    "TOP-UPS: addresses the subnet's nodes will draw to bring their pools back to their warm targets since EC2's "
    "last figures. Short: what is left cannot fund them all, so which nodes get its last addresses shows only at "
    "the next refresh; pods are kept off its nodes that had no warm IP while a zone without that doubt has room."
)


def report_text(snapshot: IndexSnapshot, settings: Settings, state: AdmissionState | None = None) -> str:
    zone_rows = [
        (z.zone, z.nodes, z.room, z.warm_free, z.subnet_free, z.reservations + z.pending, z.waiting, z.headroom,
         z.new_node_ips, settings.reserve_for_zone(z.zone), zone_status(z.headroom, settings.reserve_for_zone(z.zone)))
        for z in snapshot.zones
    ]
    subnet_rows = [
        (s.subnet_id, s.zone, s.cidr or "-", s.free_ips, "-" if s.free_blocks is None else s.free_blocks,
         s.supply, s.nodes, f"{s.topups} short" if s.topups_short else s.topups)
        for s in snapshot.subnets
    ]
    out = [
        *([IPV6_STAND_ASIDE, ""] if snapshot.ipv6 else []),
        "Zones (pod IPs)",
        format_table(
            ["ZONE", "NODES", "NODE-ROOM", "WARM-FREE", "SUBNET-FREE", "RESERVED", "WAITING", "HEADROOM",
             "NEW-NODES", "RESERVE", "STATUS"],
            zone_rows,
        ),
        "",
        "Subnets",
        format_table(["SUBNET", "ZONE", "CIDR", "FREE-IPS", "FREE-/28", "USABLE", "NODES", "TOP-UPS"], subnet_rows),
        *([TOPUPS_NOTE] if any(s.topups_short for s in snapshot.subnets) else []),
        *(objects_text(snapshot, state) if state is not None else []),
        "",
        f"{snapshot.nodes} nodes, {snapshot.pods} pods, {snapshot.reservations} reservations; "
        f"per zone, {HEADROOM_RULE}",
    ]
    if snapshot.waiting_nodes:
        out += ["", "Nodes with pods waiting for an IP (FailedCreatePodSandBox while ipamd cannot get them one)",
                format_table(["NODE", "ZONE", "WAITING"], list(snapshot.waiting_nodes))]
    if snapshot.unknown_types:
        out.append(f"unknown instance types (judged by allocatable pods only): {', '.join(snapshot.unknown_types)}")
    return "\n".join(out)


def report_json(snapshot: IndexSnapshot, settings: Settings, state: AdmissionState | None = None) -> dict[str, Any]:
    extra = {"securityGroupsForPods": objects_json(snapshot, state)} if state is not None else {}
    return {
        **extra,
        "standsAside": IPV6_STAND_ASIDE if snapshot.ipv6 else None,
        "zones": [
            {
                "zone": z.zone,
                "nodes": z.nodes,
                "nodeRoom": z.room,
                "warmFree": z.warm_free,
                "subnetFree": z.subnet_free,
                "reserved": z.reservations + z.pending,
                "waitingForIp": z.waiting,
                "headroom": z.headroom,
                "newNodeIps": z.new_node_ips,
                "reserve": settings.reserve_for_zone(z.zone),
                "exhausted": z.headroom <= settings.reserve_for_zone(z.zone),
                "subnets": list(z.subnets),
            }
            for z in snapshot.zones
        ],
        "subnets": [
            {
                "subnetId": s.subnet_id,
                "zone": s.zone,
                "cidr": s.cidr,
                "freeIps": s.free_ips,
                "freeBlocks": s.free_blocks,
                "usable": s.supply,
                "nodes": s.nodes,
                "topUps": s.topups,
                "topUpsShort": s.topups_short,
            }
            for s in snapshot.subnets
        ],
        "nodes": snapshot.nodes,
        "pods": snapshot.pods,
        "reservations": snapshot.reservations,
        "unknownInstanceTypes": list(snapshot.unknown_types),
        "nodesWaitingForIp": [{"node": n, "zone": z, "waiting": w} for n, z, w in snapshot.waiting_nodes],
    }
