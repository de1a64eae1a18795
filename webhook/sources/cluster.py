"""What the Kubernetes objects mean for the index: the handlers the watches feed.

Plain dicts in (the JSON of list items and watch events), index updates out. Each handler keeps only what
the index needs of an object (memory matters at 150,000 pods). A relist is bracketed by `begin_resync` and
`end_resync`, which removes whatever the server no longer has, so the index ends exactly as the server's
state after any gap in the watch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from webhook.model import pods as podlib
from webhook.model.cni import DEFAULT_ENI_CONFIG_NAME, IPV6_STAND_ASIDE, CniSettings, CniSettingsError
from webhook.model.config import NO_VALID_SETTINGS, ConfigError, Settings
from webhook.model.eniconfig import EniConfigStore, parse_eniconfig
from webhook.model.index import CapacityIndex, pod_key
from webhook.model.sgp import PolicyStore, parse_policy, pod_shape
from webhook.sources.provider_ids import node_instances_from_provider_ids

log = logging.getLogger("ipguard.sources")

EXTERNAL_ENI_CONFIG_LABEL = "vpc.amazonaws.com/externalEniConfig"
INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
COMPUTE_TYPE_LABEL = "eks.amazonaws.com/compute-type"
UNSCHEDULABLE_TAINT = "node.kubernetes.io/unschedulable"
AWS_NODE_CONTAINER = "aws-node"


class Handler(Protocol):
    def upsert(self, obj: Mapping[str, Any]) -> None: ...
    def delete(self, obj: Mapping[str, Any]) -> None: ...
    def begin_resync(self) -> None: ...
    def end_resync(self) -> None: ...


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _key(obj: Mapping[str, Any]) -> str:
    meta = _meta(obj)
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class _Resync:
    """Remembers the keys a relist brought, to drop the ones it did not."""

    def __init__(self) -> None:
        self.seen: set[str] | None = None

    def begin(self) -> None:
        self.seen = set()

    def saw(self, key: str) -> None:
        if self.seen is not None:
            self.seen.add(key)

    def end(self, existing: set[str]) -> set[str]:
        gone = existing - self.seen if self.seen is not None else set()
        self.seen = None
        return gone


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    zone: str | None
    instance_type: str | None
    provider_id: str | None
    allocatable_pods: int | None
    schedulable: bool
    cordoned: bool  # ipamd adds no IP or ENI to it (isENIAttachmentAllowed)
    labels: dict[str, str]  # kept whole: which label and annotation name the ENIConfig depends on the CNI
    annotations: dict[str, str]  # settings, which may arrive after the node
    windows: bool = False  # kubernetes.io/os=windows: its own IPAM


def _quantity(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    meta = _meta(obj)
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    zone = labels.get(podlib.ZONE_LABEL) or labels.get(podlib.LEGACY_ZONE_LABEL)
    instance_type = next((labels[k] for k in INSTANCE_TYPE_LABELS if labels.get(k)), None)
    linux = labels.get(podlib.OS_LABEL, "linux") == "linux"
    fargate = labels.get(COMPUTE_TYPE_LABEL) == "fargate"
    # ipamd reads the taint the node lifecycle controller adds on cordon; spec.unschedulable is the cordon.
    taints = spec.get("taints") or []
    cordoned = bool(spec.get("unschedulable", False)) or any(
        isinstance(t, Mapping) and t.get("key") == UNSCHEDULABLE_TAINT and t.get("effect") == "NoSchedule"
        for t in taints
    )
    return NodeInfo(
        name=str(meta.get("name")),
        zone=zone,
        instance_type=instance_type,
        provider_id=spec.get("providerID"),
        allocatable_pods=_quantity((status.get("allocatable") or {}).get("pods")),
        schedulable=linux and not fargate and not cordoned,
        cordoned=cordoned,
        labels={str(k): str(v) for k, v in labels.items()},
        annotations={str(k): str(v) for k, v in annotations.items()},
        windows=labels.get(podlib.OS_LABEL) == "windows",
    )


@dataclass(slots=True)
class ClusterFeed:
    """The cluster's state as the index and settings need it, merged from every watch and from EC2."""

    index: CapacityIndex
    apply_settings: Callable[[Settings], None]
    config_name: str = "ipguard"
    config_namespace: str = "ipguard"
    min_staleness: float = 0.0  # the least stalenessSeconds the sources support (smaller is refused)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    ec2_node_subnets: dict[str, str] = field(default_factory=dict)  # node -> its pod IPs' subnet per EC2
    eni_configs: dict[str, str] = field(default_factory=dict)  # ENIConfig name -> subnet
    namespaces: set[str] = field(default_factory=set)
    security_group_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    cni_nodes: set[str] = field(default_factory=set)
    node_class_subnets: dict[str, dict[str, str]] = field(default_factory=dict)  # EC2NodeClass -> subnet -> zone
    cni_env_seen: bool = False
    config_errors: int = 0
    config_last_error: str | None = None  # why the ConfigMap as it is now is refused; None while it is valid
    settings_seen: bool = False
    policies: PolicyStore = field(default_factory=PolicyStore)  # what SecurityGroupPolicy checks read
    eni_store: EniConfigStore = field(default_factory=EniConfigStore)  # what ENIConfig checks read
    # Valid settings have been in force: from a valid ConfigMap, or the defaults when the first list found none.
    # Until then a refused ConfigMap means NO_VALID_SETTINGS, not the defaults.
    settings_valid_seen: bool = False

    @property
    def config_key(self) -> str:
        return f"{self.config_namespace}/{self.config_name}"

    def config_problem(self) -> str | None:
        """What a refused ConfigMap means for the settings in force (for the log and /readyz), or None."""
        if self.config_last_error is None:
            return None
        if not self.settings_valid_seen:
            return (f"ConfigMap {self.config_key} refused ({self.config_last_error}); no valid settings yet, so "
                    "ipguard runs as dry-run (never denies or steers) until a valid ConfigMap arrives")
        return f"ConfigMap {self.config_key} refused ({self.config_last_error}); the last good settings stay in force"

    # -- node subnet: custom networking uses the ENIConfig's subnet; otherwise the node's own (from EC2)

    def eni_config_name(self, info: NodeInfo) -> str | None:
        """The ENIConfig the node selects under custom networking (None when it is off)."""
        cni = self.index.cni
        if not cni.custom_networking:
            return None
        # Resolved now, not when the node was seen: the aws-node env may arrive after the nodes. The CNI's
        # order: the external label, the annotation, the label, then the ENIConfig named "default".
        return (
            info.labels.get(EXTERNAL_ENI_CONFIG_LABEL)
            or info.annotations.get(cni.eni_config_annotation_def)
            or info.labels.get(cni.eni_config_label_def)
            or DEFAULT_ENI_CONFIG_NAME
        )

    def pod_subnet(self, info: NodeInfo) -> str | None:
        name = self.eni_config_name(info)
        if name is not None:
            return self.eni_configs.get(name)
        return self.ec2_node_subnets.get(info.name)

    def sync_node(self, name: str) -> None:
        info = self.nodes.get(name)
        if info is None:
            self.eni_store.set_node(name, None, None)
            return
        self.eni_store.set_node(name, self.eni_config_name(info), info.zone)
        pod_subnet = self.pod_subnet(info)
        self.index.upsert_node(
            name,
            zone=info.zone,
            instance_type=info.instance_type,
            pod_subnet=pod_subnet,
            allocatable_pods=info.allocatable_pods,
            schedulable=info.schedulable,
            cordoned=info.cordoned,
            # MyENIConfig finds none: ipamd attaches no pod ENI, and the node gives no pod IP.
            no_eni_config=self.index.cni.custom_networking and pod_subnet is None,
            labels=info.labels,
            windows=info.windows,
        )

    def sync_all_nodes(self) -> None:
        for name in self.nodes:
            self.sync_node(name)

    def set_ec2_node_subnets(self, subnets: Mapping[str, str]) -> None:
        names = set(subnets) | set(self.ec2_node_subnets)
        changed = [n for n in names if subnets.get(n) != self.ec2_node_subnets.get(n)]
        self.ec2_node_subnets = dict(subnets)
        for name in changed:
            self.sync_node(name)

    def node_instances(self) -> dict[str, str]:
        """node name -> EC2 instance id, from providerID `aws:///us-east-1a/i-0123...`."""
        return node_instances_from_provider_ids({n: i.provider_id for n, i in self.nodes.items() if i.provider_id})

    def subnets_in_use(self) -> set[str]:
        """Pod subnets: the ENIConfigs' under custom networking (the nodes' own subnets then give pods
        nothing), else the nodes' own."""
        if self.index.cni.custom_networking:
            return set(self.eni_configs.values())
        return set(self.ec2_node_subnets.values())

    def launch_subnets(self) -> set[str]:
        """Subnets Karpenter can launch new nodes into: every EC2NodeClass's resolved `status.subnets`."""
        return {subnet for subnets in self.node_class_subnets.values() for subnet in subnets}

    def handlers(self) -> dict[str, Handler]:
        return {
            "nodes": NodeHandler(self),
            "pods": PodHandler(self),
            "namespaces": NamespaceHandler(self),
            "serviceaccounts": ServiceAccountHandler(self),
            "eniconfigs": EniConfigHandler(self),
            "securitygrouppolicies": SgpHandler(self),
            "cninodes": CniNodeHandler(self),
            "ec2nodeclasses": Ec2NodeClassHandler(self),
            "daemonsets": AwsNodeHandler(self),
            "configmaps": ConfigMapHandler(self),
        }


class NodeHandler:
    def __init__(self, feed: ClusterFeed) -> None:
        self.feed = feed
        self.resync = _Resync()

    def upsert(self, obj: Mapping[str, Any]) -> None:
        info = node_info(obj)
        self.resync.saw(info.name)
        if self.feed.nodes.get(info.name) != info:
            self.feed.nodes[info.name] = info
            self.feed.sync_node(info.name)

    def delete(self, obj: Mapping[str, Any]) -> None:
        self._remove(str(_meta(obj).get("name")))

    def _remove(self, name: str) -> None:
        self.feed.nodes.pop(name, None)
        self.feed.index.remove_node(name)
        self.feed.eni_store.set_node(name, None, None)

    def begin_resync(self) -> None:
        self.resync.begin()

    def end_resync(self) -> None:
        for name in self.resync.end(set(self.feed.nodes)):
            self._remove(name)


class PodHandler:
    def __init__(self, feed: ClusterFeed) -> None:
        self.feed = feed
        self.resync = _Resync()

    def upsert(self, obj: Mapping[str, Any]) -> None:
        meta = _meta(obj)
        key = pod_key(str(meta.get("namespace")), str(meta.get("name")))
        self.resync.saw(key)
        if podlib.is_terminal(obj):
            # Succeeded/Failed pods have released their IP.
            self.feed.index.remove_pod(key)
            self.feed.policies.drop_pod(key)
            return
        self.feed.policies.put_pod(key, str(meta.get("namespace")), pod_shape(obj))
        node = podlib.node_name(obj)
        if node is not None:
            node = sys.intern(node)  # one string per node, not one per pod (150,000 pods)
        steered = None if node else podlib.steered_zone(obj)
        self.feed.index.upsert_pod(key, node, podlib.pod_use(obj), steered_zone=steered)

    def delete(self, obj: Mapping[str, Any]) -> None:
        meta = _meta(obj)
        key = pod_key(str(meta.get("namespace")), str(meta.get("name")))
        self.feed.index.remove_pod(key)
        self.feed.policies.drop_pod(key)

    def begin_resync(self) -> None:
        self.resync.begin()

    def end_resync(self) -> None:
        for key in self.resync.end(set(self.feed.index.pods) | set(self.feed.policies.pods)):
            self.feed.index.remove_pod(key)
            self.feed.policies.drop_pod(key)


class _KeyedStore:
    """Base for handlers that keep a small dict of objects by key."""

    def __init__(self, feed: ClusterFeed) -> None:
        self.feed = feed
        self.resync = _Resync()

    def keys(self) -> set[str]:
        raise NotImplementedError

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def drop(self, key: str) -> None:
        raise NotImplementedError

    def upsert(self, obj: Mapping[str, Any]) -> None:
        key = _key(obj)
        self.resync.saw(key)
        self.put(key, obj)

    def delete(self, obj: Mapping[str, Any]) -> None:
        self.drop(_key(obj))

    def begin_resync(self) -> None:
        self.resync.begin()

    def end_resync(self) -> None:
        for key in self.resync.end(self.keys()):
            self.drop(key)


class NamespaceHandler(_KeyedStore):
    def keys(self) -> set[str]:
        return set(self.feed.namespaces)

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        self.feed.namespaces.add(key)

    def drop(self, key: str) -> None:
        self.feed.namespaces.discard(key)


class ServiceAccountHandler(_KeyedStore):
    """Service accounts' labels, for serviceAccountSelector (nothing else of them is kept)."""

    def keys(self) -> set[str]:
        return {f"{ns}/{name}" for ns, accounts in self.feed.policies.service_accounts.items() for name in accounts}

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        namespace, _, name = key.partition("/")
        labels = _meta(obj).get("labels") or {}
        self.feed.policies.put_service_account(namespace, name, {str(k): str(v) for k, v in labels.items()})

    def drop(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        self.feed.policies.drop_service_account(namespace, name)


class EniConfigHandler(_KeyedStore):
    def keys(self) -> set[str]:
        return set(self.feed.eni_configs)

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        self.feed.eni_store.put(parse_eniconfig(obj))
        subnet = (obj.get("spec") or {}).get("subnet")
        if isinstance(subnet, str) and self.feed.eni_configs.get(key) != subnet:
            self.feed.eni_configs[key] = subnet
            self.feed.sync_all_nodes()

    def drop(self, key: str) -> None:
        self.feed.eni_store.drop(key)
        if self.feed.eni_configs.pop(key, None) is not None:
            self.feed.sync_all_nodes()


class SgpHandler(_KeyedStore):
    def keys(self) -> set[str]:
        return set(self.feed.security_group_policies)

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        spec = obj.get("spec") or {}
        # Only what matching and quota checks read.
        self.feed.security_group_policies[key] = {
            "podSelector": spec.get("podSelector"),
            "serviceAccountSelector": spec.get("serviceAccountSelector"),
            "groupIds": list((spec.get("securityGroups") or {}).get("groupIds") or []),
        }
        self.feed.policies.put_policy(parse_policy(obj))

    def drop(self, key: str) -> None:
        self.feed.security_group_policies.pop(key, None)
        namespace, _, name = key.partition("/")
        self.feed.policies.drop_policy(namespace, name)


class CniNodeHandler(_KeyedStore):
    def keys(self) -> set[str]:
        return set(self.feed.cni_nodes)

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        self.feed.cni_nodes.add(key)

    def drop(self, key: str) -> None:
        self.feed.cni_nodes.discard(key)


class Ec2NodeClassHandler(_KeyedStore):
    """Karpenter's EC2NodeClasses (`karpenter.k8s.aws/v1`): the subnets its controller resolved from the
    subnet selector (`status.subnets`: id and zone) are where Karpenter launches new nodes."""

    def keys(self) -> set[str]:
        return set(self.feed.node_class_subnets)

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        listed = (obj.get("status") or {}).get("subnets") or []
        self.feed.node_class_subnets[key] = {
            s["id"]: str(s.get("zone") or "") for s in listed if isinstance(s, dict) and isinstance(s.get("id"), str)
        }

    def drop(self, key: str) -> None:
        self.feed.node_class_subnets.pop(key, None)


def aws_node_env(daemonset: Mapping[str, Any]) -> dict[str, str]:
    """The aws-node container's literal env (valueFrom entries cannot be resolved here and are skipped)."""
    template = ((daemonset.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in template.get("containers") or []:
        if container.get("name") == AWS_NODE_CONTAINER:
            return {e["name"]: str(e["value"]) for e in container.get("env") or [] if "value" in e and "name" in e}
    return {}


class AwsNodeHandler(_KeyedStore):
    """The aws-node DaemonSet in kube-system: its env is the CNI's settings."""

    def keys(self) -> set[str]:
        return {"kube-system/aws-node"} if self.feed.cni_env_seen else set()

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        if key != "kube-system/aws-node":
            return
        try:
            cni = CniSettings.from_env(aws_node_env(obj))
        except CniSettingsError as exc:
            log.error("aws-node env not understood; keeping the CNI settings in force",
                      extra={"fields": {"error": str(exc)}})
            return
        self.feed.cni_env_seen = True
        if cni != self.feed.index.cni:
            if cni.ipv6 and not self.feed.index.cni.ipv6:
                log.warning(IPV6_STAND_ASIDE)
            self.feed.index.set_cni(cni)
            self.feed.sync_all_nodes()  # custom networking changes where pod subnets come from
            log.info("CNI settings applied", extra={"fields": {"cni": repr(cni)}})

    def drop(self, key: str) -> None:
        if key == "kube-system/aws-node":
            self.feed.cni_env_seen = False


class ConfigMapHandler(_KeyedStore):
    """ipguard's own ConfigMap: a valid change applies at once; an invalid one is refused and counted, and the
    last good settings stay in force (NO_VALID_SETTINGS when there were none)."""

    def keys(self) -> set[str]:
        return {self.feed.config_key} if self.feed.settings_seen else set()

    def put(self, key: str, obj: Mapping[str, Any]) -> None:
        feed = self.feed
        if key != feed.config_key:
            return
        data = obj.get("data") or {}
        try:
            settings = Settings.from_configmap({str(k): str(v) for k, v in data.items()},
                                               min_staleness=feed.min_staleness)
        except ConfigError as exc:
            feed.config_errors += 1
            feed.config_last_error = str(exc)
            log.error(str(feed.config_problem()), extra={"fields": {"error": str(exc)}})
            if not feed.settings_valid_seen:
                feed.apply_settings(NO_VALID_SETTINGS)
            return
        if feed.config_last_error is not None:
            # Said even when the corrected ConfigMap equals the settings in force: the refusal is over.
            log.info("ConfigMap %s valid again; its settings are in force", key,
                     extra={"fields": {"mode": settings.mode.value, "refused": feed.config_last_error}})
        feed.settings_seen = True
        feed.settings_valid_seen = True
        feed.config_last_error = None
        feed.apply_settings(settings)

    def end_resync(self) -> None:
        super().end_resync()
        if self.feed.config_last_error is None:
            self.feed.settings_valid_seen = True  # listed with no ConfigMap: the documented defaults hold

    def drop(self, key: str) -> None:
        if key == self.feed.config_key:
            # Keep what is in force: a deleted ConfigMap must not switch a cluster from warn to enforce.
            log.warning("ConfigMap %s deleted: the settings in force stay until it is back", key)
            self.feed.settings_seen = False
            if self.feed.settings_valid_seen:
                self.feed.config_last_error = None  # nothing refused is left (without valid settings, dry-run stays)
