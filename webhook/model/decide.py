"""Decisions: given a pod, the index and the settings, say whether ipguard has a say, and if so what it is.

Pure and synchronous: the index does not change while a decision is made, so the figures it uses are one
consistent state. How a decision is answered (patch, denial, warning, record) is the admission layer's job.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import Any, NamedTuple

from webhook.model import pods
from webhook.model.cni import IPV6_STAND_ASIDE
from webhook.model.config import Settings
from webhook.model.findings import Finding
from webhook.model.index import CapacityIndex, Node, PodUse
from webhook.model.labels import OPERATORS, Requirement


class Verdict(enum.Enum):
    NOT_APPLICABLE = "not-applicable"
    ALLOW = "allow"
    STEER = "steer"
    DENY = "deny"


class ZoneCheck(NamedTuple):
    """One allowed zone's figures (a NamedTuple: several are built per request, and it builds fast)."""

    zone: str
    headroom: int  # pods of this kind the zone can still take
    reserve: int
    room: int
    warm_free: int
    subnet_free: int
    reservations: int
    subnets: tuple[str, ...]
    addresses: int = 0  # what its subnets can still give new nodes, less reservations; may be negative
    subnets_known: bool = True  # every node's pod subnet has figures
    needs: str = ""  # for a denial: why free addresses are not pod IPs (a new ENI's or new node's whole request)
    cooling: int = 0  # freed IPs in cooldown on its nodes: no pod IP now, but back within seconds
    # for a denial, when an autoscaler's subnets are known: the zone's launch subnets and their new-node IPs
    launch: tuple[tuple[str, int], ...] | None = None
    uncertain: bool = False  # a subnet cannot fund every node's top-up: which nodes have its last IPs is unknown

    @property
    def exhausted(self) -> bool:
        """No headroom above the reserve: steer away."""
        return self.headroom <= self.reserve

    @property
    def out_of_addresses(self) -> bool:
        """Exhausted, and new nodes would not help either: the subnets have no addresses left above the
        reserve. Only this justifies a denial; full nodes alone are the autoscaler's to fix."""
        return (self.exhausted and self.subnets_known and self.addresses <= self.reserve
                and self.headroom + self.cooling <= self.reserve)


@dataclass(frozen=True, slots=True)
class NodeCheck:
    node: str
    zone: str | None
    known: bool
    room: int
    warm_free: int
    subnet_free: int | None
    reserve: int
    branch_room: int
    can_take: bool
    needs: str = ""  # why the subnet's free addresses do not reach the node
    pinned_by: str = "spec.nodeName"  # what ties the pod to the node, in the pod's own terms


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    pod: str  # namespace/name (namespace/generateName* before the name exists)
    reason: str  # one line: why
    use: PodUse = PodUse.IP
    zones: tuple[ZoneCheck, ...] = ()  # every allowed zone with its figures
    avoid_zones: tuple[str, ...] = ()
    avoid_nodes: tuple[str, ...] = ()
    prefer_zones: tuple[tuple[str, int], ...] = ()  # (zone, weight 1-100), most headroom first
    node: NodeCheck | None = None  # for a pod pinned by spec.nodeName
    stale: bool = False  # figures too old: allowed without judging
    reserve_zone: str | None = None  # where an admitted pod should hold its reservation
    reserve_node: str | None = None
    soft: bool = False  # steer by preference only (see pods.steer_softly)
    only_nodes: tuple[str, ...] = ()  # steer onto these nodes (kubernetes.io/hostname In), when avoiding is too long
    # of avoid_nodes, those with no warm IP whose subnet's last addresses may have gone to other nodes' top-ups
    uncertain_nodes: int = 0
    waits_for_node: bool = False  # no node in its zones can take it now: it waits Pending for a new node
    findings: tuple[Finding, ...] = ()  # checks other than placement (policies, ENIConfigs): see findings.py
    selection: str = ""  # the node selection that lists the only nodes it may run on (`pool=gpu`), when judged so
    selected_nodes: int = 0  # how many nodes that selection allows now
    preempts: int | None = None  # allowed though out of IPs: its priority lets the scheduler preempt for it

    @property
    def open_zones(self) -> tuple[str, ...]:
        return tuple(z.zone for z in self.zones if not z.exhausted)


def not_applicable(pod: str, reason: str) -> Decision:
    return Decision(Verdict.NOT_APPLICABLE, pod, reason, use=PodUse.NONE)


def decide(
    pod: Mapping[str, Any],
    index: CapacityIndex,
    settings: Settings,
    *,
    namespace: str | None = None,
    operation: str = "CREATE",
    stale: bool = False,
    branch: bool = False,
) -> Decision:
    decision = _decide(pod, index, settings, namespace=namespace, operation=operation, stale=stale, branch=branch)
    if decision.verdict is Verdict.DENY and not decision.findings:
        priority = pods.preempting_priority(pod)
        if priority is not None and _preemptible(decision, index):
            # The scheduler evicts a user pod for it where a node has no pod slot left: that pod's IP comes back to
            # it after the cooldown. (Where a node has a slot it binds there without preempting, and the sandbox
            # fails: the denial stands.)
            return replace(decision, verdict=Verdict.ALLOW, preempts=priority, reserve_zone=None, reserve_node=None)
    return decision


def _preemptible(decision: Decision, index: CapacityIndex) -> bool:
    """A node the pod may run on (its pinned node, else any in its allowed zones) whose pod slots are all taken
    and that runs pods with a VPC IP, one of which the scheduler could evict for it. Walks nodes: denials of
    system-critical pods only."""
    def full_with_ip_pods(node: Node | None) -> bool:
        return (node is not None and node.known and node.allocatable_pods is not None
                and node.pods >= node.allocatable_pods and node.assigned > 0)

    if decision.node is not None:
        return full_with_ip_pods(index.nodes.get(decision.node.node))
    zones = {check.zone for check in decision.zones}
    return any(node.zone in zones and index.counted(node) and full_with_ip_pods(node)
               for node in index.nodes.values())


def _decide(
    pod: Mapping[str, Any],
    index: CapacityIndex,
    settings: Settings,
    *,
    namespace: str | None,
    operation: str,
    stale: bool,
    branch: bool,
) -> Decision:
    name = pods.display_name(pod, namespace)
    ns = name.split("/", 1)[0]
    if operation != "CREATE":
        return not_applicable(name, f"{operation} does not change a pod's IP needs; only CREATE is judged")
    if ns in settings.exempt_namespaces:
        return not_applicable(name, f"namespace {ns} is exempt")
    if pods.is_mirror(pod):
        return not_applicable(name, "mirror (static) pod: the kubelet runs it without the scheduler")
    if pods.is_host_network(pod):
        return not_applicable(name, "hostNetwork pod: uses the node's own IP")
    if pods.is_fargate(pod):
        return not_applicable(name, "Fargate pod: each gets its own micro-VM and ENI")
    if pods.targets_windows(pod):
        return not_applicable(name, "Windows pod: a different IPAM, not modelled")
    if index.cni.ipv6:
        return not_applicable(name, IPV6_STAND_ASIDE)
    # pods.pod_use() without the checks made above
    # `branch`: policies select it and it will get a pod-eni request (see admission.objects.branch_policies).
    use = PodUse.BRANCH if branch or pods.wants_branch_eni(pod) else PodUse.IP
    if stale:
        return Decision(Verdict.ALLOW, name, "capacity data is stale: allowed without judging", use=use, stale=True)

    index.expire()
    pinned = pods.node_name(pod)
    if pinned is not None:
        return _decide_pinned(name, pinned, use, index, settings)
    # DaemonSet pods name their node in a matchFields term: affinity cannot steer them, judge their node(s).
    candidates = pods.pinned_nodes(pod)
    if candidates:
        verdicts = [_decide_pinned(name, node, use, index, settings, by=PINNED_BY_AFFINITY) for node in candidates]
        return next((v for v in verdicts if v.verdict is not Verdict.DENY), verdicts[0])

    if not index.has_nodes():
        return Decision(Verdict.ALLOW, name, "no nodes known yet", use=use)
    # Zones without nodes but with known pod subnets count too: new nodes can launch there.
    allowed = pods.allowed_zones(pod, index.candidate_zones())
    if not allowed:
        return Decision(Verdict.ALLOW, name, "its node constraints allow no zone ipguard knows: left to the scheduler",
                        use=use)
    memo = index.memo
    checks = tuple(_zone_check(zone, use, index, settings, memo) for zone in allowed)
    # Only a pod steered softly can select nodes by a label other than zone and OS (the common case skips this).
    soft = pods.steer_softly(pod)
    if use is PodUse.IP and soft:
        selected = _selection(pod, index, index.node_memo)
        if selected is not None and selected.nodes and not selected.taker:
            return _decide_selected(name, selected, checks, use, index, settings)
    # One pass: open zones, zones out of addresses (excluded), zones with full nodes only (preferred against).
    open_checks: list[ZoneCheck] = []
    empty: list[str] = []
    full: list[str] = []
    for check in checks:
        if check.headroom > check.reserve:
            open_checks.append(check)
        elif check.out_of_addresses:  # (IPs in cooldown come back within seconds: no reason to deny)
            empty.append(check.zone)
        else:
            full.append(check.zone)
    avoid_zones = tuple(empty)
    full_zones = tuple(full)
    # Nodes out of IPs that still have pod slots draw the scheduler, which cannot see IPs: keep the pod off them
    # in every zone it may still go to (or, when they are too many to list, onto the nodes that can take it).
    reachable = [c.zone for c in open_checks] + list(full_zones)
    # Branch pods need branch room, which the scheduler checks itself (vpc.amazonaws.com/pod-eni): nodes out of
    # warm-pool IPs are no reason to keep them away.
    # Dry nodes whose subnet's last addresses may have gone to other nodes' warm pools are kept off too, when a
    # zone whose figures are certain has room (never the pod's only way to an IP).
    certain = any(not c.uncertain for c in open_checks)
    avoid_nodes, only_nodes, uncertain = ((), (), 0) if use is PodUse.BRANCH else _node_steering(
        index, settings, reachable, with_takers=bool(open_checks), shun_uncertain=certain)
    if not open_checks:
        if not full_zones:
            return Decision(Verdict.DENY, name, "every allowed zone is out of pod IPs", use=use,
                            zones=_denial_details(checks, index))
        # Nodes are full but subnets have addresses: the pod waits Pending for the autoscaler's new nodes.
        # Keep it (and so the new nodes) away from the zones whose subnets are empty.
        reason = "nodes are full in every allowed zone; subnets have addresses, so new nodes can take it"
        if avoid_zones:
            reason = f"zone(s) {', '.join(avoid_zones)} out of pod IPs; {reason}"
        if avoid_nodes:
            reason += f"; {len(avoid_nodes)} node(s) out of pod IPs avoided"
        # Toward the zones whose subnets have most left for new nodes. The preference also records, on the
        # Pending pod, the zone it waits in: every replica then counts it against that zone's addresses until
        # it is bound (and the reservation does so until the watch shows it), so a burst waiting for new nodes
        # cannot be admitted past what those nodes could get.
        waiting = [c for c in checks if c.zone in full_zones]
        prefer = _preferences([c._replace(headroom=c.addresses) for c in waiting])
        target = max(waiting, key=lambda c: (c.addresses - c.reserve, c.zone)).zone
        return Decision(Verdict.STEER, name, reason, use=use, zones=checks, avoid_zones=avoid_zones,
                        avoid_nodes=avoid_nodes, prefer_zones=prefer, soft=soft, waits_for_node=True,
                        reserve_zone=target)
    # The scheduler, blind to IPs, may put the pod in any open zone (its zone spreading pulls toward the zone with
    # fewest of the app's pods, often the one short of addresses). Charge the pod to the open zone with least to
    # spare: a zone about to run out stops taking pods before the watch shows where this one went, and the total
    # charged is the same.
    scarcest = min(open_checks, key=lambda c: (c.headroom - c.reserve, c.zone))
    # Only zones out of addresses are excluded outright; zones whose nodes are merely full stay allowed (new
    # nodes can come there) and are left behind by the preferences toward the zones with room.
    if not avoid_zones and not full_zones and not avoid_nodes and not only_nodes:
        return Decision(Verdict.ALLOW, name, "allowed zones have room", use=use, zones=checks,
                        reserve_zone=scarcest.zone)
    reasons = []
    if avoid_zones:
        reasons.append(f"zone(s) {', '.join(avoid_zones)} out of pod IPs")
    if full_zones:
        reasons.append(f"zone(s) {', '.join(full_zones)} without node room: preferring the others")
    if len(avoid_nodes) > uncertain:
        reasons.append(f"{len(avoid_nodes) - uncertain} node(s) out of pod IPs")
    if uncertain:
        reasons.append(f"{uncertain} node(s) with no warm IP whose subnet's last addresses may have gone to other "
                       "nodes' warm pools")
    if only_nodes:
        reasons.append(f"only {len(only_nodes)} node(s) can give it an IP")
    return Decision(
        Verdict.STEER,
        name,
        "; ".join(reasons),
        use=use,
        zones=checks,
        avoid_zones=avoid_zones,
        avoid_nodes=avoid_nodes,
        prefer_zones=_preferences(open_checks),
        reserve_zone=scarcest.zone,
        soft=soft,
        only_nodes=only_nodes,
        uncertain_nodes=uncertain,
    )


def _denial_details(checks: tuple[ZoneCheck, ...], index: CapacityIndex) -> tuple[ZoneCheck, ...]:
    """The zones' figures with what a denial adds (walks the zones' nodes and subnets: denials only): why
    their free addresses are not pod IPs, and, when an autoscaler's subnets are known, the zones' ones."""
    autoscaler = index.autoscaler_known()
    return tuple(
        c._replace(needs=index.growth_hint(c.zone), launch=index.launch_subnets(c.zone) if autoscaler else None)
        for c in checks
    )


def _zone_check(zone_name: str, use: PodUse, index: CapacityIndex, settings: Settings,
                memo: dict[Any, Any]) -> ZoneCheck:
    # Read the zone's aggregates directly: this runs for every allowed zone of every admission request, and is
    # kept (`memo`) until the index next changes.
    reserve = settings.reserve_for_zone(zone_name)
    key = ("zone-check", zone_name, use, reserve)
    check: ZoneCheck | None = memo.get(key)
    if check is not None:
        return check
    zone = index.zones[zone_name]
    check = memo[key] = ZoneCheck(
        zone_name,
        zone.branch_headroom if use is PodUse.BRANCH else zone.headroom,
        reserve,
        zone.branch_room if use is PodUse.BRANCH else zone.room,
        zone.warm,
        max(0, zone.loose_supply if use is PodUse.BRANCH else zone.supply),
        zone.reservations + zone.pending,
        zone.subnet_tuple,
        zone.addresses - zone.unbound_reservations - zone.pending,
        zone.unknown_subnet_nodes == 0 and bool(zone.subnet_ids),
        "",
        zone.cooling,
        None,
        zone.topups_short > 0,
    )
    return check


def _node_steering(index: CapacityIndex, settings: Settings, zones: list[str], *, with_takers: bool,
                   shun_uncertain: bool) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(nodes to avoid, nodes to keep to, how many avoided are uncertain): the nodes in these zones that cannot
    give a pod an IP but still have pod slots (the scheduler would bind there), when few enough to list; else,
    where some node can take the pod and those are few enough, the nodes that can. Whichever list is shorter;
    neither when both are too long (the zone figures still steer). `shun_uncertain`: add the dry nodes whose
    subnet's last addresses may be gone (`CapacityIndex.uncertain_nodes`) while the list stays short."""
    limit = settings.max_steered_nodes
    key = (tuple(zones), limit, with_takers, shun_uncertain)
    memo = index.node_memo  # nodes' and subnets' figures only: kept across zone reservations
    cached = memo.get(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    avoid = list(islice(chain.from_iterable(index.exhausted_nodes(zone) for zone in zones), limit + 1))
    result: tuple[tuple[str, ...], tuple[str, ...], int]
    if len(avoid) <= limit:
        uncertain: list[str] = []
        if shun_uncertain:
            more = chain.from_iterable(index.uncertain_nodes(zone) for zone in zones)
            uncertain = list(islice(more, limit - len(avoid) + 1))
            if len(uncertain) > limit - len(avoid):
                uncertain = []
        result = (tuple(sorted(avoid + uncertain)), (), len(uncertain))
    elif not with_takers:
        result = ((), (), 0)
    else:
        takers = index.nodes_that_can_take(zones, limit + 1)
        result = ((), tuple(sorted(takers)), 0) if 0 < len(takers) <= limit else ((), (), 0)
    memo[key] = result
    return result


def _preferences(open_checks: list[ZoneCheck]) -> tuple[tuple[str, int], ...]:
    """Preferred-affinity weights (1-100) in proportion to each open zone's spare headroom."""
    spare = {c.zone: max(c.headroom - c.reserve, 0) for c in open_checks}
    top = max(spare.values(), default=0)
    if top <= 0:
        return ()
    ranked = sorted(spare.items(), key=lambda item: (-item[1], item[0]))
    return tuple((zone, max(1, round(100 * free / top))) for zone, free in ranked)


class Selected(NamedTuple):
    """The nodes a pod's node selection allows, as far as judging it needs them."""

    description: str  # `pool=gpu`, or `pool in (a,b) or name in (n1)` over its terms
    nodes: int  # nodes seen that it allows (all of them unless a taker stopped the walk)
    taker: bool  # one of them can give it an IP
    dry: tuple[str, ...]  # those that cannot but that the scheduler could still bind it to (a pod slot left)


def _anchor(term: pods.NodeTerm, index: CapacityIndex) -> tuple[str, tuple[str, ...]] | None:
    """The requirement of a term that lists its nodes: `In` on a label other than zone and OS (a node group, a
    node pool, a hostname) or on metadata.name; of several, the one naming fewest nodes. None: the term allows
    nodes ipguard cannot list."""
    best: tuple[int, str, tuple[str, ...]] | None = None
    for key, operator, values in term:
        if operator != "In" or not values or key in pods.ZONE_NEUTRAL_KEYS:
            continue
        if key in (pods.NODE_NAME_FIELD, pods.HOSTNAME_LABEL):
            size = len(values)
        elif key.startswith(pods.FIELD_KEY_PREFIX):
            continue
        else:
            size = sum(len(index.nodes_labelled(key, value)) for value in values)
        if best is None or size < best[0]:
            best = (size, key, values)
    return None if best is None else (best[1], best[2])


def _term_checks(term: pods.NodeTerm, anchor: tuple[str, tuple[str, ...]]) -> tuple[Requirement, ...]:
    """A term's requirements as the scheduler matches them against a node's labels, built once per walk; the
    node name as the label `metadata.name` (labels cannot carry that key). Left out: the anchor, which listing
    by it already satisfies (but a hostname anchor, listed by node name), and Gt, Lt and other fields, which
    count as matching: the list can only grow, which never makes a denial."""
    checks = []
    for key, operator, values in term:
        if (key, values) == anchor and key != pods.HOSTNAME_LABEL and operator == "In":
            continue
        if key == pods.NODE_NAME_FIELD and operator in ("In", "NotIn"):
            checks.append(Requirement(NAME_KEY, operator, frozenset(values)))
        elif not key.startswith(pods.FIELD_KEY_PREFIX) and operator in OPERATORS:
            checks.append(Requirement(key, operator, frozenset(values)))
    return tuple(checks)


NAME_KEY = "metadata.name"  # the node's name, matched as if a label


def _term_allows(node: Node, checks: tuple[Requirement, ...]) -> bool:
    for check in checks:
        labels = {NAME_KEY: node.name} if check.key == NAME_KEY else node.labels
        if not check.matches(labels):
            return False
    return True


def _selection(pod: Mapping[str, Any], index: CapacityIndex, memo: dict[Any, Any]) -> Selected | None:
    """The nodes the pod's node selection allows, when every term lists them (None otherwise: a pod with no
    selection, or one on zone or OS labels only, costs O(1) here). Walks only the listed nodes, and stops at the
    first that can give the pod an IP; kept until the index changes."""
    terms = pods.node_terms(pod)
    if not terms:
        return None
    anchors = []
    for term in terms:
        anchor = _anchor(term, index)
        if anchor is None:
            return None
        anchors.append(anchor)
    key = ("selection", terms)
    cached = memo.get(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    seen: set[str] = set()
    dry: list[str] = []
    taker = False
    for term, anchor in zip(terms, anchors, strict=True):
        anchor_key, values = anchor
        names = values if anchor_key in (pods.NODE_NAME_FIELD, pods.HOSTNAME_LABEL) else chain.from_iterable(
            index.nodes_labelled(anchor_key, value) for value in values)
        checks = _term_checks(term, anchor)
        for node_name in names:
            node = index.nodes.get(node_name)
            if node_name in seen or node is None or not node.known or (checks and not _term_allows(node, checks)):
                continue
            seen.add(node_name)
            if not index.counted(node):
                continue
            if _gives_ip(node, index):
                taker = True
                break
            if index.pod_slot(node):
                dry.append(node_name)
        if taker:
            break
    described = " or ".join(
        f"{k.removeprefix(pods.FIELD_KEY_PREFIX)}={v[0]}" if len(v) == 1
        else f"{k.removeprefix(pods.FIELD_KEY_PREFIX)} in ({','.join(v)})" for k, v in dict.fromkeys(anchors))
    result = Selected(described, len(seen), taker, tuple(sorted(dry)))
    memo[key] = result
    return result


def _decide_selected(name: str, selected: Selected, checks: tuple[ZoneCheck, ...], use: PodUse,
                     index: CapacityIndex, settings: Settings) -> Decision:
    """A pod whose node selection allows only listed nodes, none of which can give it an IP. Whether the
    selection is a node group an autoscaler can grow is not known, so new nodes count: denied only when no
    allowed zone's subnets have addresses for one; otherwise kept off the dry nodes (the scheduler, blind to
    IPs, would bind it there and its sandbox would fail) to wait Pending for a new node, with a warning."""
    count = f"none of the {selected.nodes} node(s) its node selection allows ({selected.description})"
    new_node_zones = [c for c in checks if not (c.subnets_known and c.addresses <= c.reserve)]
    if checks and not new_node_zones:
        return Decision(Verdict.DENY, name, f"{count} can give it an IP, and no subnet has addresses for a new node",
                        use=use, zones=_denial_details(checks, index), selection=selected.description,
                        selected_nodes=selected.nodes)
    avoid = selected.dry if len(selected.dry) <= settings.max_steered_nodes else ()
    target = max(new_node_zones, key=lambda c: (c.addresses - c.reserve, c.zone)).zone if new_node_zones else None
    return Decision(Verdict.STEER, name, f"{count} can give it an IP now; it waits for a new node", use=use,
                    zones=checks, avoid_nodes=avoid, waits_for_node=True, reserve_zone=target,
                    selection=selected.description, selected_nodes=selected.nodes)


def _gives_ip(node: Node, index: CapacityIndex) -> bool:
    """The node can give one more pod an IP: an IP slot and an IP at hand, or one back from its cooldown within
    seconds (the kubelet retries the sandbox: no reason to deny). Pod slots are the scheduler's to check."""
    return index.node_has_address(node) or (node.cooling > 0 and node.capacity - node.assigned > 0)


PINNED_BY_AFFINITY = "its node affinity or kubernetes.io/hostname selector"


def _decide_pinned(name: str, node_name: str, use: PodUse, index: CapacityIndex, settings: Settings,
                   by: str = "spec.nodeName") -> Decision:
    figures = index.node_figures(node_name)
    node = index.nodes.get(node_name)
    if figures is None or node is None:
        return Decision(Verdict.ALLOW, name, f"pinned to node {node_name}, which ipguard does not know yet",
                        use=use, node=NodeCheck(node_name, None, False, 0, 0, None, settings.node_reserve, 0,
                                                True))
    if node.windows:
        return not_applicable(name, f"pinned to Windows node {node_name}: a different IPAM, not modelled")
    subnet = index.subnets.get(node.pod_subnet) if node.pod_subnet else None
    if use is PodUse.BRANCH:
        # Unknown limits give no branch room to go on; a branch ENI in its cooldown frees its slot (and its
        # address) within a minute: neither is ground for a denial, as a warm IP in its cooldown is not.
        can_take = node.limits is None or node.branch_cooling > 0 or (
            node.branch_room > 0 and (subnet is None or subnet.supply > 0))
    else:
        # Only addresses count here: a node out of pod slots is the scheduler's and kubelet's to refuse.
        can_take = _gives_ip(node, index)
    check = NodeCheck(
        node=node_name,
        zone=node.zone,
        known=True,
        room=node.room,
        warm_free=node.warm,
        subnet_free=None if subnet is None else max(0, subnet.supply),
        reserve=settings.node_reserve,
        branch_room=node.branch_room,
        can_take=can_take,
        needs="" if can_take else index.node_growth_hint(node),
        pinned_by=by,
    )
    if can_take:
        return Decision(Verdict.ALLOW, name, f"node {node_name} has room", use=use, node=check,
                        reserve_zone=node.zone, reserve_node=node_name)
    return Decision(Verdict.DENY, name, f"node {node_name} cannot give it an IP", use=use, node=check)
