"""ENIConfig checks (custom networking, `crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped).

Under custom networking each node takes its pod ENIs from the subnet (and security groups) of the ENIConfig
it selects, in the CNI's order (DESIGN.md "Decisions"): the `vpc.amazonaws.com/externalEniConfig` label, the
`ENI_CONFIG_ANNOTATION_DEF` annotation, the `ENI_CONFIG_LABEL_DEF` label, then the ENIConfig named
`default`. An ENIConfig whose subnet is missing, or in another zone than its nodes, makes every new ENI on
those nodes fail (ipamd's `CreateNetworkInterface` is refused), and their pods stay in ContainerCreating.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.model.findings import Finding
from webhook.model.sgp import group_findings
from webhook.model.vpc import Quotas, VpcFacts

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class EniConfig:
    name: str
    subnet: str
    groups: tuple[str, ...] = ()


def parse_eniconfig(obj: Mapping[str, Any]) -> EniConfig:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    assert isinstance(meta, dict) and isinstance(spec, dict)
    groups = spec.get("securityGroups")
    return EniConfig(
        name=str(meta.get("name") or ""),
        subnet=str(spec.get("subnet") or ""),
        groups=tuple(dict.fromkeys(str(g) for g in groups)) if isinstance(groups, list) else (),
    )


@dataclass(slots=True)
class EniConfigStore:
    """The ENIConfigs, and which one each node selects (kept as counts per zone, so checks never walk nodes)."""

    configs: dict[str, EniConfig] = field(default_factory=dict)
    selections: dict[str, Counter[str]] = field(default_factory=dict)  # ENIConfig name -> zone -> nodes
    node_choice: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (ENIConfig name, zone)

    def put(self, config: EniConfig) -> None:
        self.configs[config.name] = config

    def drop(self, name: str) -> None:
        self.configs.pop(name, None)

    def set_node(self, node: str, name: str | None, zone: str | None) -> None:
        """The ENIConfig a node selects (None: custom networking is off, or the node is gone)."""
        choice = (name, zone or "") if name is not None else None
        old = self.node_choice.get(node)
        if old == choice:
            return
        if old is not None:
            counts = self.selections[old[0]]
            counts[old[1]] -= 1
            if counts[old[1]] <= 0:
                del counts[old[1]]
            if not counts:
                del self.selections[old[0]]
            del self.node_choice[node]
        if choice is not None:
            self.node_choice[node] = choice
            self.selections.setdefault(choice[0], Counter())[choice[1]] += 1

    def zones_of(self, name: str) -> dict[str, int]:
        """Zones of the nodes that select this ENIConfig, with how many nodes."""
        return {z: n for z, n in self.selections.get(name, Counter()).items() if n > 0}

    def unmatched(self, names: Iterable[str]) -> dict[str, dict[str, int]]:
        """Zone -> {ENIConfig name the nodes look for -> nodes}, for nodes whose ENIConfig is not among
        `names`."""
        present = set(names)
        found: dict[str, dict[str, int]] = {}
        for name, zones in self.selections.items():
            if name in present:
                continue
            for zone, nodes in zones.items():
                if nodes > 0:
                    found.setdefault(zone or "unknown zone", {})[name] = nodes
        return found


@dataclass(frozen=True, slots=True)
class EniConfigContext:
    custom_networking: bool
    label_def: str  # the CNI's ENI_CONFIG_LABEL_DEF
    zones: frozenset[str]  # zones the cluster knows (nodes, subnets)
    subnets_current: bool
    groups_current: bool
    reserve: Mapping[str, int]  # zone -> reserve
    subnet_free: Mapping[str, int]  # subnet -> addresses it can still give (the index's figure where known)


def intended_zone(config: EniConfig, store: EniConfigStore, context: EniConfigContext) -> tuple[str | None, str]:
    """The zone the ENIConfig serves, and why: named for a zone that nodes select it by, or the one zone of
    the nodes that select it now."""
    if context.label_def == ZONE_LABEL and config.name in context.zones:
        return config.name, f"it is named for zone {config.name} and ENI_CONFIG_LABEL_DEF is {ZONE_LABEL}"
    zones = store.zones_of(config.name)
    if len(zones) == 1:
        zone, nodes = next(iter(zones.items()))
        if zone:
            return zone, f"the {nodes} node(s) that select it are in {zone}"
    return None, ""


def eniconfig_findings(config: EniConfig, old: EniConfig | None, store: EniConfigStore, vpc: VpcFacts,
                       quotas: Quotas, context: EniConfigContext) -> list[Finding]:
    """Everything wrong with an ENIConfig being created or updated, denying findings first."""
    subject = f"ENIConfig {config.name}"
    found: list[Finding] = []
    subnet = vpc.subnets.get(config.subnet)
    where = f"VPC {vpc.vpc_id}" if vpc.vpc_id else "the cluster's VPC"
    if not context.subnets_current:
        found.append(Finding(
            "subnet-unchecked", False,
            f"{subject}: subnet {config.subnet or '(none)'} was not checked (EC2 data missing or stale).",
            f"ipguard: {subject}: subnet not checked, EC2 data missing or stale",
        ))
    elif subnet is None:
        found.append(Finding(
            "unknown-subnet", True,
            f"{subject}: subnet {config.subnet or '(none given)'} does not exist in {where}; nodes that select "
            f"it cannot create pod ENIs.",
            f"ipguard: {subject}: subnet {config.subnet or '(none)'} not in {where}",
        ))
    if config.groups:
        found.extend(group_findings(subject, config.groups, vpc, quotas, context.groups_current))
    if subnet is not None:
        zone, why = intended_zone(config, store, context)
        if zone is not None and subnet.zone != zone:
            found.append(Finding(
                "wrong-zone", True,
                f"{subject}: subnet {subnet.subnet_id} is in {subnet.zone}, but {why}: the CNI would ask for ENIs "
                f"in another zone than the instance's and EC2 refuses them.",
                f"ipguard: {subject}: subnet {subnet.subnet_id} is in {subnet.zone}, its nodes in {zone}",
            ))
        free = context.subnet_free.get(subnet.subnet_id, subnet.free_ips)
        reserve = context.reserve.get(subnet.zone, 0)
        if free <= reserve:
            found.append(Finding(
                "subnet-low", False,
                f"{subject}: subnet {subnet.subnet_id} has {max(free, 0)} free addresses, at or below the reserve "
                f"of {reserve} for {subnet.zone}.",
                f"ipguard: {subject}: subnet {subnet.subnet_id} has {max(free, 0)} free addresses (reserve {reserve})",
            ))
    if old is not None and old.subnet != config.subnet and store.zones_of(config.name):
        nodes = sum(store.zones_of(config.name).values())
        found.append(Finding(
            "subnet-changed", False,
            f"{subject}: {nodes} running node(s) select it and keep their ENIs in {old.subnet}; only new ENIs "
            f"come from {config.subnet}.",
            f"ipguard: {subject}: {nodes} node(s) keep ENIs in {old.subnet}; new ENIs use {config.subnet}",
        ))
    if context.custom_networking:
        found.extend(missing_config_findings(store, [*store.configs, config.name]))
    return sorted(found, key=lambda f: not f.deny)


def missing_config_findings(store: EniConfigStore, names: Iterable[str]) -> list[Finding]:
    """Zones whose nodes select an ENIConfig that does not exist (custom networking on): their pods fail."""
    found = []
    for zone, wanted in sorted(store.unmatched(names).items()):
        nodes = sum(wanted.values())
        looked_for = ", ".join(sorted(wanted))
        found.append(Finding(
            "zone-without-eniconfig", False,
            f"{nodes} node(s) in {zone} select ENIConfig {looked_for}, which does not exist: custom networking "
            f"gives their pods no IP.",
            f"ipguard: {nodes} node(s) in {zone} select missing ENIConfig {looked_for}",
        ))
    return found
