"""Judging objects other than a pod's placement: SecurityGroupPolicies, ENIConfigs, and a branch-ENI pod's
policies. Builds what the model's checks read from the admission state and turns their findings into a
Decision, which `handler.respond()` answers like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from webhook.model.decide import Decision, Verdict, not_applicable
from webhook.model.eniconfig import EniConfigContext, eniconfig_findings, parse_eniconfig
from webhook.model.findings import Finding
from webhook.model.index import PodUse
from webhook.model.pods import wants_branch_eni
from webhook.model.sgp import Policy, PolicyContext, parse_policy, pod_group_findings, policy_findings
from webhook.model.vpc import Quotas

if TYPE_CHECKING:
    from webhook.admission.handler import AdmissionState, Stage
    from webhook.admission.wire import Review

SGP_GROUP, SGP_KIND = "vpcresources.k8s.aws", "SecurityGroupPolicy"
ENICONFIG_GROUP, ENICONFIG_KIND = "crd.k8s.amazonaws.com", "ENIConfig"


def quotas(state: AdmissionState) -> Quotas:
    return state.vpc.quotas(state.settings.groups_per_eni, state.settings.rules_per_group)


def judged_kind(review: Review) -> str | None:
    """"sgp", "eniconfig", or None for kinds this module does not judge."""
    if review.group == SGP_GROUP and review.kind == SGP_KIND:
        return "sgp"
    if review.group == ENICONFIG_GROUP and review.kind == ENICONFIG_KIND:
        return "eniconfig"
    return None


def _decision(subject: str, findings: list[Finding]) -> Decision:
    denying = [f for f in findings if f.deny]
    if denying:
        reason = "; ".join(f.code for f in denying)
        return Decision(Verdict.DENY, subject, reason, use=PodUse.NONE, findings=tuple(findings))
    reason = "; ".join(f.code for f in findings) or "no problem found"
    return Decision(Verdict.ALLOW, subject, reason, use=PodUse.NONE, findings=tuple(findings))


def judge_object(kind: str, review: Review, stage: Stage, state: AdmissionState) -> Decision:
    subject = f"{review.namespace + '/' if review.namespace else ''}{review.name or ''}"
    if stage != "validate":
        return not_applicable(subject, f"{review.kind} objects are judged at validation")
    if review.operation not in ("CREATE", "UPDATE") or review.object is None:
        return not_applicable(subject, f"{review.operation} of a {review.kind} is not judged")
    if kind == "sgp":
        policy = parse_policy(review.object, review.namespace)
        return _decision(policy.key, policy_findings(policy, state.policies, state.vpc, quotas(state),
                                                     policy_context(state)))
    config = parse_eniconfig(review.object)
    old = parse_eniconfig(review.old_object) if review.old_object is not None else None
    return _decision(config.name, eniconfig_findings(config, old, state.eni_configs, state.vpc, quotas(state),
                                                     eniconfig_context(state)))


def eniconfig_context(state: AdmissionState) -> EniConfigContext:
    bound = state.settings.staleness_bound
    index = state.index
    return EniConfigContext(
        custom_networking=index.cni.custom_networking,
        label_def=index.cni.eni_config_label_def,
        zones=frozenset([*index.zones, *(s.zone for s in state.vpc.subnets.values())]),
        subnets_current=state.vpc.subnets_current(bound),
        groups_current=state.vpc.groups_current(bound),
        reserve=_Reserves(state),
        subnet_free={sid: s.addresses for sid, s in index.subnets.items()},
    )


class _Reserves(Mapping[str, int]):
    """Zone -> reserve, read from the settings on demand."""

    def __init__(self, state: AdmissionState) -> None:
        self.settings = state.settings

    def __getitem__(self, zone: str) -> int:
        return self.settings.reserve_for_zone(zone)

    def __iter__(self) -> Any:
        return iter(self.settings.zone_reserves)

    def __len__(self) -> int:
        return len(self.settings.zone_reserves)


def policy_context(state: AdmissionState) -> PolicyContext:
    index = state.index
    return PolicyContext(
        pod_eni=index.cni.pod_eni,
        branch_room=sum(zone.branch_room for zone in index.zones.values()),  # zones are few
        data_stale=state.stale_reason() is not None,
        groups_current=state.vpc.groups_current(state.settings.staleness_bound),
    )


def branch_policies(pod: Mapping[str, Any], namespace: str | None, stage: Stage,
                    state: AdmissionState) -> tuple[bool, list[Policy]]:
    """Whether the pod gets a branch ENI, and the policies that select it. It does when it requests
    vpc.amazonaws.com/pod-eni, or, at /mutate (the resource controller's own webhook, which adds that request,
    may run after ipguard's), when policies select it and ENABLE_POD_ENI is on."""
    policies = state.policies.pod_policies(pod, namespace or "default") if state.policies.policies else []
    requested = wants_branch_eni(pod)
    branch = requested or (stage == "mutate" and bool(policies) and state.index.cni.pod_eni)
    return branch, policies


def branch_group_denial(name: str, policies: list[Policy], state: AdmissionState) -> Decision | None:
    """A denial for a branch-ENI pod whose policies' union of groups exceeds the quota, or None."""
    findings = pod_group_findings(name, policies, quotas(state))
    if not findings:
        return None
    return Decision(Verdict.DENY, name, "; ".join(f.code for f in findings), use=PodUse.BRANCH,
                    findings=tuple(findings))
