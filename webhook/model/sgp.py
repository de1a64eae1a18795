"""SecurityGroupPolicy matching and security-group quota math (security groups for pods).

Matching follows the VPC resource controller (`GetMatchingSecurityGroupForPods` in
aws/amazon-vpc-resource-controller-k8s, pkg/utils/helper.go): the policies of the pod's namespace; a policy
with neither selector, or with no groups, is skipped; `podSelector` over the pod's labels and
`serviceAccountSelector` over the labels of the pod's service account, both required to match when both are
set; a selector the conversion refuses matches nothing. The pod's branch ENI gets the de-duplicated union of
the matching policies' groups, and EC2 refuses an ENI with more groups than the security-groups-per-ENI quota.

`PolicyStore` keeps what matching needs of the cluster: the policies, the service accounts' labels, and the
pods by "shape" (labels and service account: a Deployment's replicas share one), so a policy can be judged
against the pods that exist now without walking every pod.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook.model.findings import Finding
from webhook.model.labels import LabelSelector, SelectorError, parse_selector
from webhook.model.vpc import Quotas, VpcFacts

SAMPLE_NAMES = 3  # pods named in a message, besides how many there are

Labels = tuple[tuple[str, str], ...]  # sorted (key, value) pairs: hashable, shared by a workload's replicas
Shape = tuple[Labels, str]  # (pod labels, service account name)


def dedupe(groups: Iterable[str]) -> tuple[str, ...]:
    """Groups in first-seen order, each once (the controller's RemoveDuplicatedSg)."""
    return tuple(dict.fromkeys(groups))


@dataclass(frozen=True, slots=True)
class Policy:
    namespace: str
    name: str
    groups: tuple[str, ...]  # de-duplicated
    pod_selector_set: bool = False
    pod_selector: LabelSelector | None = None  # None when unset or refused
    sa_selector_set: bool = False
    sa_selector: LabelSelector | None = None
    errors: tuple[str, ...] = ()  # selectors the conversion refuses

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def applies(self) -> bool:
        """The controller skips a policy with neither selector or with no groups."""
        return (self.pod_selector_set or self.sa_selector_set) and bool(self.groups)

    def matches(self, pod_labels: Mapping[str, str] | None, sa_labels: Mapping[str, str] | None) -> bool:
        """Whether the policy selects a pod with these labels and service account labels (None: unknown,
        which a set selector never matches)."""
        if not self.applies:
            return False
        if self.pod_selector_set and (
            self.pod_selector is None or pod_labels is None or not self.pod_selector.matches(pod_labels)
        ):
            return False
        return not self.sa_selector_set or (
            self.sa_selector is not None and sa_labels is not None and self.sa_selector.matches(sa_labels)
        )


def _selector(raw: Any, what: str, errors: list[str]) -> tuple[bool, LabelSelector | None]:
    if raw is None:
        return False, None
    try:
        return True, parse_selector(raw)
    except SelectorError as exc:
        errors.append(f"{what}: {exc}")
        return True, None


def parse_policy(obj: Mapping[str, Any], namespace: str | None = None) -> Policy:
    """A SecurityGroupPolicy from its JSON form (a malformed part reads as absent or refused, as in the
    controller)."""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    assert isinstance(meta, dict) and isinstance(spec, dict)
    errors: list[str] = []
    pod_set, pod_selector = _selector(spec.get("podSelector"), "podSelector", errors)
    sa_set, sa_selector = _selector(spec.get("serviceAccountSelector"), "serviceAccountSelector", errors)
    groups_spec = spec.get("securityGroups")
    raw_groups = groups_spec.get("groupIds") if isinstance(groups_spec, dict) else None
    groups = dedupe(str(g) for g in raw_groups) if isinstance(raw_groups, list) else ()
    return Policy(
        namespace=str(namespace or meta.get("namespace") or "default"),
        name=str(meta.get("name") or meta.get("generateName") or ""),
        groups=groups,
        pod_selector_set=pod_set,
        pod_selector=pod_selector,
        sa_selector_set=sa_set,
        sa_selector=sa_selector,
        errors=tuple(errors),
    )


def pod_shape(pod: Mapping[str, Any]) -> Shape:
    # Runs on every pod watch event: plain dict access, no copies beyond the shape itself.
    meta = pod.get("metadata")
    spec = pod.get("spec")
    labels = meta.get("labels") if type(meta) is dict else None
    account = (spec.get("serviceAccountName") or spec.get("serviceAccount")) if type(spec) is dict else None
    items = tuple(sorted(labels.items())) if type(labels) is dict and labels else ()
    return items, account if isinstance(account, str) and account else "default"


@dataclass(slots=True)
class ShapeCount:
    count: int = 0
    names: list[str] = field(default_factory=list)  # a few of the pods' keys (namespace/name), for messages


@dataclass(slots=True)
class PolicyStore:
    """Policies, service accounts and pod shapes, by namespace. Updated by the watches (or a snapshot)."""

    policies: dict[str, dict[str, Policy]] = field(default_factory=dict)
    service_accounts: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    shapes: dict[str, dict[Shape, ShapeCount]] = field(default_factory=dict)
    pods: dict[str, Shape] = field(default_factory=dict)  # pod key (namespace/name) -> its shape
    _interned: dict[Shape, Shape] = field(default_factory=dict)

    # -- updates

    def put_policy(self, policy: Policy) -> None:
        self.policies.setdefault(policy.namespace, {})[policy.name] = policy

    def drop_policy(self, namespace: str, name: str) -> None:
        found = self.policies.get(namespace)
        if found is not None:
            found.pop(name, None)
            if not found:
                del self.policies[namespace]

    def put_service_account(self, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        self.service_accounts.setdefault(namespace, {})[name] = dict(labels)

    def drop_service_account(self, namespace: str, name: str) -> None:
        found = self.service_accounts.get(namespace)
        if found is not None:
            found.pop(name, None)
            if not found:
                del self.service_accounts[namespace]

    def put_pod(self, key: str, namespace: str, shape: Shape) -> None:
        """A pod (key `namespace/name`) as the watch shows it; O(1), and nothing kept when it did not change."""
        old = self.pods.get(key)
        if old is not None:
            if old == shape:
                return
            self.drop_pod(key)
        shape = self._interned.setdefault(shape, shape)  # a workload's replicas share one shape object
        self.pods[key] = shape
        counted = self.shapes.setdefault(namespace, {}).get(shape)
        if counted is None:
            counted = self.shapes[namespace][shape] = ShapeCount()
        counted.count += 1
        if len(counted.names) < SAMPLE_NAMES:
            counted.names.append(key)

    def drop_pod(self, key: str) -> None:
        shape = self.pods.pop(key, None)
        if shape is None:
            return
        namespace = key.partition("/")[0]
        shapes = self.shapes[namespace]
        counted = shapes[shape]
        counted.count -= 1
        if key in counted.names:
            counted.names.remove(key)
        if counted.count <= 0:
            del shapes[shape]
            self._interned.pop(shape, None)
            if not shapes:
                del self.shapes[namespace]

    # -- queries

    def account_labels(self, namespace: str, account: str) -> dict[str, str] | None:
        return self.service_accounts.get(namespace, {}).get(account)

    def matching(self, namespace: str, pod_labels: Mapping[str, str] | None, account: str | None,
                 *, sa_labels: Mapping[str, str] | None = None, skip: str | None = None) -> list[Policy]:
        """The policies of the namespace that select such a pod, in name order (`skip`: a policy's name)."""
        if account is not None:
            sa_labels = self.account_labels(namespace, account)
        return [
            p for name, p in sorted(self.policies.get(namespace, {}).items())
            if name != skip and p.matches(pod_labels, sa_labels)
        ]

    def pod_policies(self, pod: Mapping[str, Any], namespace: str) -> list[Policy]:
        labels, account = pod_shape(pod)
        return self.matching(namespace, dict(labels), account)

    def subjects(self, namespace: str) -> Iterator[Subject]:
        """What a policy of the namespace can select now: each pod shape, and each service account (for
        pods not created yet; only policies without a pod selector can match those)."""
        for shape, counted in self.shapes.get(namespace, {}).items():
            labels, account = shape
            yield Subject(dict(labels), account, self.account_labels(namespace, account), counted.count,
                          tuple(k.partition("/")[2] for k in counted.names))
        for account, account_labels in self.service_accounts.get(namespace, {}).items():
            yield Subject(None, account, account_labels, 0, ())


@dataclass(frozen=True, slots=True)
class Subject:
    pod_labels: dict[str, str] | None  # None: a service account's future pods, labels unknown
    account: str
    account_labels: dict[str, str] | None
    pods: int
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnionExcess:
    """Pods that would get more groups than an ENI may carry, from this policy with others."""

    others: tuple[str, ...]  # the other policies' names
    groups: tuple[str, ...]  # the union
    pods: int
    names: tuple[str, ...]
    account: str | None  # for service-account subjects (no pod yet)


def union_excesses(policy: Policy, store: PolicyStore, quota: int) -> tuple[list[UnionExcess], int]:
    """Where the union of `policy`'s groups with the other matching policies' exceeds the quota, and how many
    subjects (pod shapes and service accounts) it selects at all."""
    excesses: list[UnionExcess] = []
    selected = 0
    for subject in store.subjects(policy.namespace):
        if not policy.matches(subject.pod_labels, subject.account_labels):
            continue
        selected += 1
        others = store.matching(policy.namespace, subject.pod_labels, None, sa_labels=subject.account_labels,
                                skip=policy.name)
        union = dedupe([*policy.groups, *(g for p in others for g in p.groups)])
        if len(union) > quota:
            excesses.append(UnionExcess(tuple(p.name for p in others), union, subject.pods, subject.names,
                                        None if subject.pod_labels is not None else subject.account))
    return excesses, selected


def _listed(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


QUOTA_NAME = "quota 'Security groups per network interface'"


def too_many_groups(subject: str, groups: tuple[str, ...], quotas: Quotas) -> Finding:
    return Finding(
        "too-many-groups", True,
        f"{subject} lists {len(groups)} security groups; an ENI allows at most {quotas.groups_per_eni} "
        f"({QUOTA_NAME}, from {quotas.source}).",
        f"ipguard: {subject} lists {len(groups)} security groups; an ENI allows {quotas.groups_per_eni}",
    )


def union_finding(policy: Policy, excesses: list[UnionExcess], quotas: Quotas) -> Finding:
    worst = max(excesses, key=lambda e: (len(e.groups), e.pods))
    pods = sum(e.pods for e in excesses)
    names = [n for e in excesses for n in e.names]
    others = sorted({o for e in excesses for o in e.others})
    who = (f"{pods} pod(s) ({_listed(names, SAMPLE_NAMES)})" if pods else
           f"the pods of service account(s) {_listed(e.account or '' for e in excesses)}")
    return Finding(
        "union-too-many-groups", True,
        f"SecurityGroupPolicy {policy.key} with {_listed(policy.namespace + '/' + o for o in others)} selects "
        f"{who}; their branch ENI would get the union of {len(worst.groups)} security groups "
        f"({_listed(worst.groups)}), more than the {quotas.groups_per_eni} an ENI allows ({QUOTA_NAME}), and EC2 "
        f"refuses it: those pods would not start.",
        f"ipguard: {policy.key} with {_listed(others, 2)}: {len(worst.groups)} groups for {who}; "
        f"ENI max {quotas.groups_per_eni}",
    )


def group_findings(subject: str, groups: Iterable[str], vpc: VpcFacts, quotas: Quotas, current: bool) -> list[Finding]:
    """Groups that do not exist (EC2 data current) and groups near the rules quota."""
    groups = tuple(groups)
    found: list[Finding] = []
    if not current:
        found.append(Finding(
            "groups-unchecked", False, f"{subject}: its security groups were not checked (EC2 data missing or stale).",
            f"ipguard: {subject}: security groups not checked, EC2 data missing or stale",
        ))
        return found
    missing = [g for g in groups if g not in vpc.groups]
    if missing:
        where = f"VPC {vpc.vpc_id}" if vpc.vpc_id else "the cluster's VPC"
        found.append(Finding(
            "unknown-group", True,
            f"{subject}: security group(s) {_listed(missing)} do not exist in {where}; a branch ENI with them "
            f"cannot be created.",
            f"ipguard: {subject}: security group(s) {_listed(missing, 2)} not in {where}",
        ))
    for group in groups:
        rules = vpc.groups.get(group)
        if rules is None:
            continue
        direction, count = rules.most
        if quotas.rules_near_quota(count):
            over = "over" if count > quotas.rules_per_group else "within 10% of"
            found.append(Finding(
                "rules-near-quota", False,
                f"{subject}: security group {group} has {count} {direction} rules, {over} the quota of "
                f"{quotas.rules_per_group} per direction and family.",
                f"ipguard: {group} has {count} {direction} rules ({over} quota {quotas.rules_per_group})",
            ))
    return found


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """The cluster facts a SecurityGroupPolicy check reads besides the store and the VPC."""

    pod_eni: bool  # the CNI's ENABLE_POD_ENI
    branch_room: int  # branch ENIs free on schedulable nodes, all zones
    data_stale: bool  # pod and node data too old to deny on
    groups_current: bool


def policy_findings(policy: Policy, store: PolicyStore, vpc: VpcFacts, quotas: Quotas,
                    context: PolicyContext) -> list[Finding]:
    """Everything wrong with a SecurityGroupPolicy, denying findings first."""
    subject = f"SecurityGroupPolicy {policy.key}"
    found: list[Finding] = []
    if len(policy.groups) > quotas.groups_per_eni:
        found.append(too_many_groups(subject, policy.groups, quotas))
    found.extend(group_findings(subject, policy.groups, vpc, quotas, context.groups_current))
    for error in policy.errors:
        found.append(Finding("bad-selector", False, f"{subject}: {error}; the controller matches nothing with it.",
                             f"ipguard: {subject}: {error}"))
    if not policy.applies:
        why = "no security groups" if not policy.groups else "neither podSelector nor serviceAccountSelector"
        found.append(Finding("skipped", False, f"{subject} has {why}: the resource controller skips it.",
                             f"ipguard: {subject} has {why}: the controller skips it"))
        return sorted(found, key=lambda f: not f.deny)
    excesses, selected = union_excesses(policy, store, quotas.groups_per_eni)
    if excesses and len(policy.groups) <= quotas.groups_per_eni:
        union = union_finding(policy, excesses, quotas)
        if context.data_stale:
            union = Finding(union.code, False, union.message + " (not denied: the pod data is stale)",
                            union.warning)
        found.append(union)
    if selected == 0:
        found.append(Finding("selects-nothing", False,
                             f"{subject} selects no current pod or service account in {policy.namespace}.",
                             f"ipguard: {subject} selects no current pod or service account"))
    if not context.pod_eni:
        found.append(Finding("pod-eni-off", False,
                             f"{subject} will not apply: the VPC CNI's ENABLE_POD_ENI is off (SG policy not applied).",
                             f"ipguard: ENABLE_POD_ENI is off: {subject} will not apply"))
    elif context.branch_room <= 0:
        found.append(Finding("no-branch-room", False,
                             f"{subject}: no node can take a branch ENI now (no vpc.amazonaws.com/pod-eni room; "
                             f"t3 and other non-trunking types have none).",
                             "ipguard: no node has vpc.amazonaws.com/pod-eni room: its pods will stay Pending"))
    return sorted(found, key=lambda f: not f.deny)


def pod_group_findings(pod_name: str, policies: list[Policy], quotas: Quotas) -> list[Finding]:
    """A branch-ENI pod whose matching policies' union exceeds the quota: it cannot start."""
    union = dedupe(g for p in policies for g in p.groups)
    if len(union) <= quotas.groups_per_eni:
        return []
    names = _listed(p.name for p in policies)
    return [Finding(
        "union-too-many-groups", True,
        f"pod {pod_name} is selected by SecurityGroupPolicies {names}; its branch ENI would get "
        f"{len(union)} security groups ({_listed(union)}), more than the {quotas.groups_per_eni} an ENI allows "
        f"({QUOTA_NAME}), and EC2 refuses it. Fix: merge or narrow these policies.",
        f"ipguard: pod {pod_name}: policies {_listed((p.name for p in policies), 2)} give {len(union)} groups; "
        f"ENI max {quotas.groups_per_eni}",
    )]
