"""Texts a developer reads: the denial message, admission warnings, and the audit annotations.

The denial message is what `kubectl` prints after "admission webhook ... denied the request:": it names the
pod, what is full and by how much, and what to do. Warnings are one short ASCII line each (the apiserver
drops warnings with a newline or tab and cuts past 4096 characters per response).
"""

from __future__ import annotations

from webhook.model.cni import CniSettings
from webhook.model.decide import Decision, NodeCheck, ZoneCheck
from webhook.model.index import PodUse

WARNING_MAX = 120


def clean_warning(text: str) -> str:
    """One printable ASCII line of at most 120 characters."""
    # Fast path first: ipguard's own texts are plain ASCII already.
    ascii_text = text if text.isascii() and text.isprintable() else "".join(
        c if 32 <= ord(c) < 127 else " " for c in text
    )
    line = " ".join(ascii_text.split())
    return line if len(line) <= WARNING_MAX else line[: WARNING_MAX - 3].rstrip() + "..."


def _kept_back(check: ZoneCheck) -> bool:
    """Free pod IPs there, all kept back by the zone's reserve: only the reserve stands in the pod's way."""
    return check.headroom > 0 or check.addresses > 0


def _zone_phrase(check: ZoneCheck) -> str:
    subnets = ", ".join(check.subnets) or "no known pod subnet"
    free = max(check.headroom, 0)
    if _kept_back(check):
        head = f"{check.zone}: {free} free pod IPs, all kept back by its reserve of {check.reserve}"
    else:
        head = f"{check.zone}: {free} free pod IPs, reserve {check.reserve}"
    details = [f"node room {check.room}", f"warm IPs {check.warm_free}",
               f"subnet {subnets}: {check.subnet_free} free"]
    if check.reservations:
        details.append(f"{check.reservations} pod(s) admitted in the last seconds, not yet on a node")
    if check.needs:
        details.append(check.needs)
    return f"{head} ({', '.join(details)})"


def _limited_by_subnets(checks: tuple[ZoneCheck, ...]) -> bool:
    return any(c.warm_free + c.subnet_free <= c.room for c in checks)


def _limited_by_nodes(checks: tuple[ZoneCheck, ...]) -> bool:
    return any(c.room < c.warm_free + c.subnet_free for c in checks)


def remedies(decision: Decision, cni: CniSettings) -> list[str]:
    """What an operator can do, most useful first, for what actually ran out."""
    fixes: list[str] = []
    if decision.use is PodUse.BRANCH:
        fixes.append("add nodes of a trunking-capable type (security groups for pods need branch ENIs)")
    subnets_short = (
        _limited_by_subnets(decision.zones)
        or any(c.out_of_addresses for c in decision.zones)
        or (decision.node is not None and decision.node.subnet_free == 0)
    )
    nodes_short = _limited_by_nodes(decision.zones) or (decision.node is not None and decision.node.room == 0)
    if subnets_short:
        fixes.append("add pod subnet space (a larger or additional subnet, or custom networking on a secondary CIDR)")
        if cni.uses_ip_targets:
            fixes.append("lower WARM_IP_TARGET/MINIMUM_IP_TARGET so nodes hold fewer idle IPs")
        else:
            fixes.append("set WARM_IP_TARGET (or lower WARM_ENI_TARGET) so nodes hold fewer idle IPs")
    if subnets_short and any(c.launch is not None for c in decision.zones):
        fixes.append("give the autoscaler subnets with addresses in these zones (EC2NodeClass subnetSelectorTerms)")
    if nodes_short and not subnets_short:  # more pods per node, or new nodes, need subnet addresses first
        if not cni.prefix_delegation:
            fixes.append("enable prefix delegation (ENABLE_PREFIX_DELEGATION=true) for more pod IPs per node")
        fixes.append("add nodes (or larger instance types) in these zones")
    if any(_kept_back(c) and c.reserve for c in decision.zones):
        fixes.append("lower zoneReserve/zoneReserves (kept for bursts and for pods other ipguard replicas admit)")
    if decision.zones and len(decision.zones) < 2:
        fixes.append("or let the pod run in more zones")
    return fixes or ["add nodes or pod subnet space in the allowed zones"]


def _node_phrase(check: NodeCheck) -> str:
    subnet = "unknown" if check.subnet_free is None else f"{check.subnet_free} free"
    needs = f" ({check.needs})" if check.needs else ""
    return (
        f"node {check.node} ({check.zone or 'unknown zone'}): room {check.room} (reserve {check.reserve}), "
        f"warm IPs {check.warm_free}, subnet {subnet}{needs}"
    )


def launch_phrase(checks: tuple[ZoneCheck, ...]) -> str:
    """What the autoscaler's subnets (Karpenter's EC2NodeClass) in the allowed zones have for new nodes, when
    such subnets are known at all: a zone whose nodes are full is the autoscaler's to fix only if it can
    launch there with addresses."""
    if all(c.launch is None for c in checks):
        return ""
    launch = [(subnet, free, c.zone) for c in checks for subnet, free in (c.launch or ())]
    listed = ", ".join(f"{subnet} ({zone}) {max(free, 0)} free" for subnet, free, zone in launch)
    if all(free <= 0 for _, free, _ in launch):
        return "no autoscaler subnet in the allowed zones has addresses" + (f" ({listed})" if listed else "")
    return f"autoscaler subnets: {listed}"


def denial_message(decision: Decision, cni: CniSettings) -> str:
    what = "a branch ENI (security groups for pods)" if decision.use is PodUse.BRANCH else "a pod IP"
    fixes = "; ".join(remedies(decision, cni))
    if decision.node is not None:
        return (
            f"ipguard: pod {decision.pod} is pinned by {decision.node.pinned_by} and that node cannot give it {what}: "
            f"{_node_phrase(decision.node)}. Fix: remove {decision.node.pinned_by} so the scheduler can choose a node, "
            f"or {fixes}."
        )
    zones = "; ".join([*(_zone_phrase(c) for c in decision.zones), *filter(None, [launch_phrase(decision.zones)])])
    if decision.selection:
        return (
            f"ipguard: pod {decision.pod} may only run on the {decision.selected_nodes} node(s) its node selection "
            f"allows ({decision.selection}), none of which can give it {what}, and no subnet in its zones has "
            f"addresses for a new node: {zones}. Fix: {fixes}."
        )
    if decision.zones and all(_kept_back(c) for c in decision.zones):
        return (
            f"ipguard: pod {decision.pod} would take {what} that ipguard keeps in reserve in every zone it may "
            f"run in: {zones}. Fix: {fixes}."
        )
    return (
        f"ipguard: pod {decision.pod} cannot get {what} in any zone it may run in: {zones}. Fix: {fixes}."
    )


def denial_warnings(decision: Decision) -> list[str]:
    """The denial as warnings (warn mode): one short line per fact."""
    lines = [f"ipguard: pod {decision.pod} would be denied: {decision.reason}"]
    if decision.node is not None:
        node = decision.node
        lines.append(f"ipguard: node {node.node}: room {node.room}, warm IPs {node.warm_free}")
    for check in decision.zones:
        lines.append(f"ipguard: zone {check.zone}: {max(check.headroom, 0)} free pod IPs (reserve {check.reserve})")
    return [clean_warning(line) for line in lines]


def preempt_warning(decision: Decision) -> str:
    return clean_warning(f"ipguard: {decision.reason}; admitted: at priority {decision.preempts} it may preempt "
                         "lower-priority pods and take their IPs")


def wait_warning(decision: Decision) -> str:
    if decision.selection:
        return clean_warning(
            f"ipguard: no node matching {decision.selection} can give it an IP; it waits Pending for a new node"
        )
    zones = ", ".join(c.zone for c in decision.zones if c.exhausted and not c.out_of_addresses)
    return clean_warning(
        f"ipguard: no node in zone(s) {zones} can give it an IP; it waits Pending for a new node"
    )


def steer_warning(decision: Decision) -> str:
    if decision.only_nodes:
        return clean_warning(
            f"ipguard: kept to the {len(decision.only_nodes)} node(s) that can still give it a pod IP"
        )
    parts = []
    if decision.avoid_zones:
        parts.append(f"zone(s) {', '.join(decision.avoid_zones)}")
    out = len(decision.avoid_nodes) - decision.uncertain_nodes
    if out:
        parts.append(f"{out} node(s)")
    doubt = decision.uncertain_nodes  # dry nodes whose subnet's last IPs may have gone to other nodes' top-ups
    if not parts and not doubt:
        top = ", ".join(zone for zone, _ in decision.prefer_zones[:3])
        return clean_warning(f"ipguard: preferring zone(s) {top}: the others have no node room left")
    if not parts:
        return clean_warning(f"ipguard: steered away from {doubt} node(s) with no warm IP: their subnet's last IPs "
                             "may be on other nodes")
    more = f"; {doubt} more with no warm IP may be too" if doubt else ""
    return clean_warning(f"ipguard: steered away from {' and '.join(parts)}: out of pod IPs{more}")


def zone_summary(checks: tuple[ZoneCheck, ...]) -> str:
    """`us-east-1a=3/5,us-east-1b=40/5`: free pod IPs / reserve per zone."""
    return ",".join(f"{c.zone}={c.headroom}/{c.reserve}" for c in checks)


def audit_annotations(decision: Decision, mode: str, outcome: str) -> dict[str, str]:
    """Keys without '/': the apiserver prefixes `<webhook name>/` and drops keys that carry one."""
    notes = {"decision": decision.verdict.value, "outcome": outcome, "mode": mode, "reason": decision.reason}
    if decision.zones:
        notes["zones"] = zone_summary(decision.zones)
    if decision.avoid_zones:
        notes["avoid-zones"] = ",".join(decision.avoid_zones)
    if decision.avoid_nodes:
        notes["avoid-nodes"] = ",".join(decision.avoid_nodes)
    if decision.only_nodes:
        notes["only-nodes"] = ",".join(decision.only_nodes)
    if decision.waits_for_node:
        notes["waits-for-node"] = "true"
    if decision.selection:
        notes["selection"] = f"{decision.selection} nodes={decision.selected_nodes}"
    if decision.node is not None:
        notes["node"] = f"{decision.node.node} room={decision.node.room} warm={decision.node.warm_free}"
    if decision.stale:
        notes["stale"] = "true"
    if decision.preempts is not None:
        notes["preempts"] = str(decision.preempts)
    return notes
