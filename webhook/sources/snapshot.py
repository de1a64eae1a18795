"""A cluster snapshot file (YAML): nodes, subnets, pods, CNI settings and ipguard settings in one place.

It feeds the index for the demo, for `ipguard report --snapshot`, and for tests. Format (examples/cluster.yaml
is a full example):

    cni: {ENABLE_PREFIX_DELEGATION: "false", WARM_ENI_TARGET: "1"}   # the aws-node env
    settings: {mode: enforce, zoneReserve: "5"}                     # ipguard's ConfigMap data
    eniConfigs: {us-east-1a: subnet-...}                            # custom networking: ENIConfig -> subnet,
    #   or {us-east-1a: {subnet: subnet-..., securityGroups: [sg-...]}}; a node picks its eniConfig, else the
    #   one named for its zone when ENI_CONFIG_LABEL_DEF is the zone label, else "default" (MyENIConfig's
    #   order); when that one does not exist the node gets no pod IP
    vpcId: vpc-...                                                  # optional, named in messages
    subnets:
      - {id: subnet-..., zone: us-east-1a, cidr: 10.0.0.0/24, free: 12, freeBlocks: 0}
      - {id: subnet-..., zone: us-east-1a, free: 4000,              # subnets no node uses yet may be listed:
         tags: {kubernetes.io/role/cni: "1"}, launchable: false}    # discovery-tagged, or an autoscaler's
    nodes:
      - name: ip-10-0-1-10.ec2.internal
        zone: us-east-1a
        type: m5.large
        subnet: subnet-...          # the node's own subnet
        eniConfig: us-east-1a       # optional (custom networking); default by ENI_CONFIG_LABEL_DEF
        allocatablePods: 29         # optional; default: the type's max-pods
        heldIPs: 27                 # optional: what EC2 says the node holds
        enis: 3                     # optional, with heldIPs: the ENIs carrying them (default: as few as hold them)
        lostEnis: 0                 # optional, with heldIPs: ENI slots taken by ENIs that carry no pod IPs
                                    # (tagged node.k8s.amazonaws.com/no_manage=true, EFA-only, in a subnet
                                    # tagged kubernetes.io/role/cni=0)
        unschedulable: false        # cordoned: no new pods, and ipamd gives it no new IP
        os: linux
        labels: {eks.amazonaws.com/nodegroup: web}   # optional: for pods that select nodes by label
        pods: {ip: 20, hostNetwork: 2, completed: 3, branch: 0}   # branch: pods on branch ENIs; the
                                    # branch capacity is the type's (vpc.amazonaws.com/pod-eni), 0 for t3
    # Security groups for pods (all optional). The subnets listed above are taken as all of the VPC's, and
    # securityGroups, when the key is present, as all of its groups: a group or subnet not listed does not exist.
    securityGroups:
      - {id: sg-..., name: db-access, inbound: {ipv4: 12, ipv6: 0}, outbound: {ipv4: 1, ipv6: 1}}
    securityGroupPolicies:            # as kubectl shows them (metadata.name/namespace, spec)
      - metadata: {name: api-db, namespace: payments}
        spec: {podSelector: {matchLabels: {app: api}}, securityGroups: {groupIds: [sg-...]}}
    serviceAccounts:
      - {namespace: payments, name: api, labels: {team: payments}}
    pods:                             # pods with labels, for policy matching (besides the counts per node)
      - {namespace: payments, name: api-0, node: ip-..., labels: {app: api}, serviceAccount: api, branch: true}
    quotas: {securityGroupsPerENI: 5, rulesPerSecurityGroup: 60}   # as Service Quotas would report them
    clusterName: demo                 # optional: the EKS cluster
    clusterSubnets: [subnet-...]      # optional: where the control plane's ENIs are (listed under subnets)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from webhook.model.cni import DEFAULT_ENI_CONFIG_NAME, CniSettings, CniSettingsError
from webhook.model.config import ConfigError, Settings
from webhook.model.eniconfig import EniConfig, EniConfigStore
from webhook.model.index import CapacityIndex, PodUse, pod_key
from webhook.model.limits import LimitsTable, UnknownInstanceType, max_pods
from webhook.model.pods import HOSTNAME_LABEL, ZONE_LABEL
from webhook.model.sgp import PolicyStore, parse_policy
from webhook.model.vpc import GroupRules, Quotas, VpcFacts, VpcSubnet


class SnapshotError(ValueError):
    """A snapshot file that cannot be loaded; the message names the file and the place."""


@dataclass(frozen=True, slots=True)
class SnapshotNode:
    name: str
    zone: str
    instance_type: str
    subnet: str
    pod_subnet: str | None  # None: custom networking and no ENIConfig for it
    allocatable_pods: int | None
    held_ips: int | None
    held_enis: int | None
    schedulable: bool
    cordoned: bool
    ip_pods: int
    host_network_pods: int
    completed_pods: int
    branch_pods: int
    eni_config: str | None = None  # the ENIConfig it selects (custom networking)
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. its node group, for pods that select by it
    lost_enis: int = 0  # ENI slots taken by ENIs that carry no pod IPs
    windows: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotSubnet:
    subnet_id: str
    zone: str
    cidr: str
    free_ips: int
    free_blocks: int | None
    tags: Mapping[str, str] = field(default_factory=dict)  # e.g. kubernetes.io/role/cni for subnet discovery
    launchable: bool = False  # an autoscaler (Karpenter) launches nodes into it


@dataclass(frozen=True, slots=True)
class SnapshotPod:
    namespace: str
    name: str
    node: str | None
    labels: dict[str, str]
    service_account: str
    branch: bool


@dataclass(slots=True)
class Snapshot:
    source: str
    cni: CniSettings
    settings: Settings
    settings_data: dict[str, str]
    subnets: list[SnapshotSubnet] = field(default_factory=list)
    nodes: list[SnapshotNode] = field(default_factory=list)
    vpc_id: str | None = None
    eni_configs: dict[str, EniConfig] = field(default_factory=dict)
    security_groups: list[GroupRules] | None = None  # None: not given (existence is not checked)
    policies: list[dict[str, Any]] = field(default_factory=list)
    service_accounts: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    pods: list[SnapshotPod] = field(default_factory=list)
    quotas: Quotas | None = None
    cluster_name: str | None = None
    cluster_subnets: list[str] | None = None  # None: not given

    def build_objects(self, index: CapacityIndex) -> tuple[PolicyStore, EniConfigStore, VpcFacts]:
        """The policy, ENIConfig and VPC stores, and the labelled pods added to `index` (from build_index)."""
        policies = PolicyStore()
        for raw in self.policies:
            policies.put_policy(parse_policy(raw))
        for namespace, name, labels in self.service_accounts:
            policies.put_service_account(namespace, name, labels)
        for pod in self.pods:  # build_index counted them
            key = pod_key(pod.namespace, pod.name)
            policies.put_pod(key, pod.namespace, (tuple(sorted(pod.labels.items())), pod.service_account))
        configs = EniConfigStore()
        for config in self.eni_configs.values():
            configs.put(config)
        if self.cni.custom_networking:
            for node in self.nodes:
                configs.set_node(node.name, node.eni_config, node.zone)
        vpc = VpcFacts(vpc_id=self.vpc_id, service_quotas=self.quotas, static=True, clock=lambda: 0.0)
        vpc.set_subnets({s.subnet_id: VpcSubnet(s.subnet_id, s.zone, s.free_ips, s.cidr) for s in self.subnets})
        if self.security_groups is not None:
            vpc.set_groups({g.group_id: g for g in self.security_groups})
        return policies, configs, vpc

    def build_index(self, limits: LimitsTable | None = None, **kwargs: Any) -> CapacityIndex:
        index = CapacityIndex(
            limits or LimitsTable(),
            self.cni,
            node_reserve=self.settings.node_reserve,
            reservation_ttl=self.settings.reservation_ttl,
            **kwargs,
        )
        for node in self.nodes:
            index.upsert_node(
                node.name,
                zone=node.zone,
                instance_type=node.instance_type,
                pod_subnet=node.pod_subnet,
                allocatable_pods=node.allocatable_pods,
                schedulable=node.schedulable,
                cordoned=node.cordoned,
                no_eni_config=node.pod_subnet is None,
                labels={ZONE_LABEL: node.zone, HOSTNAME_LABEL: node.name, **node.labels},
                windows=node.windows,
            )
            if node.held_ips is not None:
                index.set_node_held(node.name, node.held_ips, enis=node.held_enis, lost_enis=node.lost_enis)
            short = node.name.split(".", 1)[0]
            for i in range(node.ip_pods):
                index.upsert_pod(f"apps/{short}-app-{i}", node.name, PodUse.IP)
            for i in range(node.branch_pods):
                index.upsert_pod(f"apps/{short}-sg-{i}", node.name, PodUse.BRANCH)
            for i in range(node.host_network_pods):
                index.upsert_pod(f"kube-system/{short}-host-{i}", node.name, PodUse.NONE)
            # Completed pods take nothing: they stay out of the index, as the watch source leaves them out.
        for pod in self.pods:
            index.upsert_pod(pod_key(pod.namespace, pod.name), pod.node, PodUse.BRANCH if pod.branch else PodUse.IP)
        # Subnet figures last: EC2 measured them with these pods and warm pools already in place. Under custom
        # networking only the ENIConfigs' subnets give pod addresses; the nodes' own subnets are not pod subnets.
        pod_subnets = {c.subnet for c in self.eni_configs.values()} if self.cni.custom_networking else None
        for subnet in self.subnets:
            if pod_subnets is not None and subnet.subnet_id not in pod_subnets:
                continue
            index.upsert_subnet(
                subnet.subnet_id,
                zone=subnet.zone,
                cidr=subnet.cidr,
                free_ips=subnet.free_ips,
                free_blocks=subnet.free_blocks,
                tags=subnet.tags,
                launchable=subnet.launchable,
            )
        return index


def load_snapshot(path: str | Path, limits: LimitsTable | None = None) -> Snapshot:
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise SnapshotError(f"{path}: not valid YAML: {exc}") from None
    return parse_snapshot(document, str(path), limits or LimitsTable())


def parse_snapshot(document: Any, source: str, limits: LimitsTable) -> Snapshot:
    doc = _mapping(document, source, "the document")
    env = {str(k): str(v) for k, v in _mapping(doc.get("cni", {}), source, "cni").items()}
    settings_data = {str(k): str(v) for k, v in _mapping(doc.get("settings", {}), source, "settings").items()}
    try:
        cni = CniSettings.from_env(env)
    except CniSettingsError as exc:
        raise SnapshotError(f"{source}: cni: {exc}") from None
    try:
        settings = Settings.from_configmap(settings_data)
    except ConfigError as exc:
        raise SnapshotError(f"{source}: settings: {exc}") from None
    snapshot = Snapshot(source, cni, settings, settings_data)
    _parse_vpc_objects(doc, source, snapshot)
    eni_configs = {name: config.subnet for name, config in snapshot.eni_configs.items()}

    for i, raw in enumerate(_list(doc.get("subnets", []), source, "subnets")):
        where = f"subnets[{i}]"
        item = _mapping(raw, source, where)
        free_blocks = item.get("freeBlocks")
        snapshot.subnets.append(
            SnapshotSubnet(
                subnet_id=_str(item, "id", source, where),
                zone=_str(item, "zone", source, where),
                cidr=str(item.get("cidr", "")),
                free_ips=_int(item, "free", source, where),
                free_blocks=None if free_blocks is None else _int(item, "freeBlocks", source, where),
                tags={str(k): str(v) for k, v in _mapping(item.get("tags", {}), source, f"{where}.tags").items()},
                launchable=bool(item.get("launchable", False)),
            )
        )
    known_subnets = {s.subnet_id for s in snapshot.subnets}
    if len(known_subnets) != len(snapshot.subnets):
        ids = [s.subnet_id for s in snapshot.subnets]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise SnapshotError(f"{source}: subnet ids must be unique: {', '.join(duplicates)} listed twice")

    for i, raw in enumerate(_list(doc.get("nodes", []), source, "nodes")):
        item = _mapping(raw, source, f"nodes[{i}]")
        where = f"nodes[{i}] ({item.get('name', '?')})"
        zone = _str(item, "zone", source, where)
        instance_type = _str(item, "type", source, where)
        try:
            type_limits = limits.get(instance_type)
        except UnknownInstanceType as exc:
            raise SnapshotError(f"{source}: {where}: {exc}") from None
        subnet = _str(item, "subnet", source, where)
        pod_subnet: str | None = subnet
        config_name = None
        if cni.custom_networking:
            # The CNI's order (MyENIConfig): the node's own choice, the zone under a zone label, then "default".
            config_name = str(item.get("eniConfig") or "")
            if not config_name:
                config_name = zone if cni.eni_config_label_def == ZONE_LABEL else DEFAULT_ENI_CONFIG_NAME
            # A node whose ENIConfig does not exist gets no pod IPs; ipguard has no pod subnet for it.
            pod_subnet = eni_configs.get(config_name)
        if pod_subnet is not None and pod_subnet not in known_subnets:
            raise SnapshotError(f"{source}: {where}: pod subnet {pod_subnet} is not listed under subnets")
        pods = _mapping(item.get("pods", {}), source, f"{where}.pods")
        allocatable = item.get("allocatablePods")
        held = item.get("heldIPs")
        enis = item.get("enis")
        if enis is not None and held is None:
            raise SnapshotError(f"{source}: {where}: enis needs heldIPs (the IPs those ENIs hold)")
        if item.get("lostEnis") is not None and held is None:
            raise SnapshotError(f"{source}: {where}: lostEnis needs heldIPs (EC2's view of the node's ENIs)")
        cordoned = bool(item.get("unschedulable", False))
        snapshot.nodes.append(
            SnapshotNode(
                name=_str(item, "name", source, where),
                zone=zone,
                instance_type=instance_type,
                subnet=subnet,
                pod_subnet=pod_subnet,
                allocatable_pods=(
                    max_pods(type_limits, cni.mode)
                    if allocatable is None
                    else _int(item, "allocatablePods", source, where)
                ),
                held_ips=None if held is None else _int(item, "heldIPs", source, where),
                held_enis=None if enis is None else _int(item, "enis", source, where),
                schedulable=not cordoned and item.get("os", "linux") == "linux",
                cordoned=cordoned,
                ip_pods=_int(pods, "ip", source, where, 0),
                host_network_pods=_int(pods, "hostNetwork", source, where, 0),
                completed_pods=_int(pods, "completed", source, where, 0),
                branch_pods=_int(pods, "branch", source, where, 0),
                eni_config=config_name,
                labels=_labels(item.get("labels"), source, where),
                lost_enis=_int(item, "lostEnis", source, where, 0),
                windows=item.get("os", "linux") == "windows",
            )
        )
    names = [n.name for n in snapshot.nodes]
    if len(names) != len(set(names)):
        raise SnapshotError(f"{source}: node names must be unique")
    for i, raw in enumerate(_list(doc.get("pods", []), source, "pods")):
        where = f"pods[{i}]"
        item = _mapping(raw, source, where)
        node = item.get("node")
        if node is not None and node not in names:
            raise SnapshotError(f"{source}: {where}: node {node} is not listed under nodes")
        snapshot.pods.append(SnapshotPod(
            namespace=_str(item, "namespace", source, where),
            name=_str(item, "name", source, where),
            node=None if node is None else str(node),
            labels=_labels(item.get("labels"), source, where),
            service_account=str(item.get("serviceAccount") or "default"),
            branch=bool(item.get("branch", False)),
        ))
    if "clusterSubnets" in doc:
        cluster_subnets = [str(sid) for sid in _list(doc.get("clusterSubnets"), source, "clusterSubnets")]
        for sid in cluster_subnets:
            if sid not in known_subnets:
                raise SnapshotError(f"{source}: clusterSubnets: {sid} is not listed under subnets")
        snapshot.cluster_subnets = cluster_subnets
    if doc.get("clusterName") is not None:
        snapshot.cluster_name = str(doc["clusterName"])
    return snapshot


def _labels(value: Any, source: str, where: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _mapping(value, source, f"{where}.labels").items()}


def _parse_vpc_objects(doc: Mapping[str, Any], source: str, snapshot: Snapshot) -> None:
    """eniConfigs, securityGroups, securityGroupPolicies, serviceAccounts, quotas and vpcId."""
    for name, value in _mapping(doc.get("eniConfigs", {}), source, "eniConfigs").items():
        where = f"eniConfigs.{name}"
        if isinstance(value, str):
            snapshot.eni_configs[str(name)] = EniConfig(str(name), value)
            continue
        item = _mapping(value, source, where)
        groups = [str(g) for g in _list(item.get("securityGroups", []), source, f"{where}.securityGroups")]
        snapshot.eni_configs[str(name)] = EniConfig(str(name), _str(item, "subnet", source, where), tuple(groups))
    if "securityGroups" in doc:
        snapshot.security_groups = []
        for i, raw in enumerate(_list(doc.get("securityGroups"), source, "securityGroups")):
            where = f"securityGroups[{i}]"
            item = _mapping(raw, source, where)
            inbound = _mapping(item.get("inbound", {}), source, f"{where}.inbound")
            outbound = _mapping(item.get("outbound", {}), source, f"{where}.outbound")
            snapshot.security_groups.append(GroupRules(
                _str(item, "id", source, where),
                _int(inbound, "ipv4", source, f"{where}.inbound", 0),
                _int(inbound, "ipv6", source, f"{where}.inbound", 0),
                _int(outbound, "ipv4", source, f"{where}.outbound", 0),
                _int(outbound, "ipv6", source, f"{where}.outbound", 0),
                str(item.get("name", "")),
            ))
    for i, raw in enumerate(_list(doc.get("securityGroupPolicies", []), source, "securityGroupPolicies")):
        item = _mapping(raw, source, f"securityGroupPolicies[{i}]")
        _str(_mapping(item.get("metadata"), source, f"securityGroupPolicies[{i}]"), "name", source,
             f"securityGroupPolicies[{i}].metadata")
        snapshot.policies.append(dict(item))
    for i, raw in enumerate(_list(doc.get("serviceAccounts", []), source, "serviceAccounts")):
        where = f"serviceAccounts[{i}]"
        item = _mapping(raw, source, where)
        snapshot.service_accounts.append((_str(item, "namespace", source, where), _str(item, "name", source, where),
                                          _labels(item.get("labels"), source, where)))
    if "quotas" in doc:
        item = _mapping(doc.get("quotas"), source, "quotas")
        snapshot.quotas = Quotas(_int(item, "securityGroupsPerENI", source, "quotas", 5),
                                 _int(item, "rulesPerSecurityGroup", source, "quotas", 60), "Service Quotas")
    if doc.get("vpcId") is not None:
        snapshot.vpc_id = str(doc["vpcId"])


def _mapping(value: Any, source: str, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SnapshotError(f"{source}: {where} must be a mapping, not {type(value).__name__}")
    return value


def _list(value: Any, source: str, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SnapshotError(f"{source}: {where} must be a list, not {type(value).__name__}")
    return value


def _str(item: Mapping[str, Any], key: str, source: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise SnapshotError(f"{source}: {where}: {key} is required (a non-empty string)")
    return value


def _int(item: Mapping[str, Any], key: str, source: str, where: str, default: int | None = None) -> int:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SnapshotError(f"{source}: {where}: {key} must be a whole number >= 0, not {value!r}")
    return value
