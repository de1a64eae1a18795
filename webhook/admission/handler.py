"""From a parsed review to the AdmissionResponse: decide, then answer as the stage and mode require.

- /mutate steers (a JSON Patch) and never denies; the validating stage owns denials.
- /validate denies (enforce), warns (warn) or only records (dry-run); it never returns a patch, not even an
  empty one (the apiserver fails the request). An admitted pod takes a reservation unless the request is a
  dry run.
Every answer carries audit annotations with the decision and the figures behind it.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson

from webhook.admission import objects
from webhook.admission.messages import (
    audit_annotations,
    clean_warning,
    denial_message,
    denial_warnings,
    preempt_warning,
    steer_warning,
    wait_warning,
)
from webhook.admission.patch import Steering, steering_patch, without_steering
from webhook.admission.reservations import ReservationGuard
from webhook.admission.wire import AdmissionResponse, Review
from webhook.model.cni import CniSettings
from webhook.model.config import Mode, Settings
from webhook.model.decide import Decision, Verdict, decide, not_applicable
from webhook.model.eniconfig import EniConfigStore
from webhook.model.findings import denial_text
from webhook.model.index import CapacityIndex, pod_key
from webhook.model.pods import display_name
from webhook.model.sgp import PolicyStore
from webhook.model.vpc import VpcFacts

Stage = Literal["mutate", "validate"]


@dataclass(slots=True)
class AdmissionState:
    """What a decision reads: the index, the settings in force, and whether the data is fresh enough."""

    index: CapacityIndex
    settings: Settings
    stale_reason: Callable[[], str | None] = field(default=lambda: None)  # why data is stale, or None
    policies: PolicyStore = field(default_factory=PolicyStore)  # SecurityGroupPolicies, service accounts
    eni_configs: EniConfigStore = field(default_factory=EniConfigStore)
    vpc: VpcFacts = field(default_factory=VpcFacts)  # security groups, subnets, quotas (EC2)
    guard: ReservationGuard = field(init=False)

    def __post_init__(self) -> None:
        self.guard = ReservationGuard(self.index, self.index.clock)


@dataclass(frozen=True, slots=True)
class Answer:
    response: AdmissionResponse
    decision: Decision
    outcome: str  # allowed | steered | denied | warned | recorded | not-applicable | stale
    patch: list[dict[str, Any]] | None = None
    reservation: Literal["held", "skipped"] | None = None  # skipped: the zone's unconfirmed bound was reached


def _steering(decision: Decision) -> Steering:
    return Steering(decision.avoid_zones, decision.avoid_nodes, decision.prefer_zones, decision.reason,
                    soft=decision.soft, only_nodes=decision.only_nodes)


def judge(review: Review, stage: Stage, state: AdmissionState) -> Decision:
    """The decision on a review's object, from the index and settings in force."""
    kind = objects.judged_kind(review)
    if kind is not None:
        return objects.judge_object(kind, review, stage, state)
    if review.kind != "Pod" or review.group != "":
        return not_applicable(f"{review.namespace or ''}/{review.name or ''}".strip("/"),
                              f"{review.kind} objects are not judged by this version")
    assert review.object is not None or review.operation not in ("CREATE", "UPDATE")
    stale = state.stale_reason()
    # Judge the pod as the user wrote it: after a mutation (or on reinvocation) it carries ipguard's own
    # steering, and a decision resting on that would take the steering back, or deny on ipguard's own terms.
    pod = without_steering(review.object or {})
    branch, policies = objects.branch_policies(pod, review.namespace, stage, state)
    if branch and policies and stale is None and review.operation == "CREATE":
        denial = objects.branch_group_denial(display_name(pod, review.namespace), policies, state)
        if denial is not None:
            return denial
    decision = decide(pod, state.index, state.settings, namespace=review.namespace, operation=review.operation,
                      stale=stale is not None, branch=branch)
    if stale is not None and decision.stale:
        decision = Decision(decision.verdict, decision.pod, f"stale data: {stale}", use=decision.use, stale=True)
    return decision


def respond(review: Review, decision: Decision, stage: Stage, settings: Settings, cni: CniSettings) -> Answer:
    """The AdmissionResponse for a decision: a pure function of its inputs."""
    mode = settings.mode
    response: AdmissionResponse = {"uid": review.uid, "allowed": True}
    warnings: list[str] = []
    patch: list[dict[str, Any]] | None = None
    outcome = "allowed"

    if decision.verdict is Verdict.NOT_APPLICABLE:
        outcome = "not-applicable"
    elif decision.stale:
        outcome = "stale"
        # Said once, by the validating stage; dry-run only records, whatever happens.
        if stage == "validate" and mode is not Mode.DRY_RUN:
            warnings.append(clean_warning(f"ipguard: pod admitted unchecked: {decision.reason}"))
    elif stage == "mutate":
        if review.object is not None and mode is not Mode.DRY_RUN:
            # Also for ALLOW/DENY: a reinvoked call must take back steering the pod no longer needs.
            steering = _steering(decision) if decision.verdict is Verdict.STEER else Steering()
            ops = steering_patch(review.object, steering)
            if ops:
                patch = ops
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(orjson.dumps(ops)).decode("ascii")
        if decision.verdict is Verdict.STEER:
            outcome = "steered" if mode is not Mode.DRY_RUN else "recorded"
            if mode is not Mode.DRY_RUN:
                warnings.append(steer_warning(decision))
    elif decision.preempts is not None:
        # Said once, by the validating stage: out of IPs, yet the scheduler can free some for it.
        if mode is not Mode.DRY_RUN:
            warnings.append(preempt_warning(decision))
    elif decision.waits_for_node:
        # Said once, by the validating stage: without an autoscaler such a pod sits Pending with no other hint.
        if mode is not Mode.DRY_RUN:
            warnings.append(wait_warning(decision))
    elif decision.verdict is Verdict.DENY:
        if mode is Mode.ENFORCE:
            outcome = "denied"
            response["allowed"] = False
            message = denial_text(decision.findings) if decision.findings else denial_message(decision, cni)
            response["status"] = {"code": 403, "reason": "Forbidden", "message": message}
        elif mode is Mode.WARN:
            outcome = "warned"
            if decision.findings:
                warnings.extend(clean_warning(f.warning) for f in decision.findings if f.deny)
            else:
                warnings.extend(denial_warnings(decision))
        else:
            outcome = "recorded"
    if stage == "validate" and mode is not Mode.DRY_RUN:
        # Findings that never deny are said in every mode but dry-run.
        warnings.extend(clean_warning(f.warning) for f in decision.findings if not f.deny)

    if warnings:
        response["warnings"] = list(dict.fromkeys(w for w in warnings if w))
    response["auditAnnotations"] = audit_annotations(decision, mode.value, outcome)
    if decision.findings:
        response["auditAnnotations"]["findings"] = ",".join(f.code for f in decision.findings)
    return Answer(response, decision, outcome, patch)


def handle(review: Review, stage: Stage, state: AdmissionState, *, reserve: bool = True) -> Answer:
    """Decide, answer, and (validating an admitted pod, not a dry run) hold its IP until the watch shows it.
    `reserve` False: answer alike, but hold nothing (a caller that may not be the API server)."""
    # (not for a caller that may not be the API server: it must not move a real pod's reservation either)
    own = _own_key(review) if reserve and stage == "validate" and not review.dry_run else None
    if own is not None:
        # A create retried under the same name (refused after this admission by a quota or a later webhook) is
        # judged without the reservation its first try took, which its own IP would otherwise be counted in.
        state.index.release(own)
    decision = judge(review, stage, state)
    answer = respond(review, decision, stage, state.settings, state.index.cni)
    if own is not None and answer.response["allowed"] and decision.reserve_zone:
        settings = state.settings
        held = state.guard.reserve(own, decision.reserve_zone, decision.reserve_node,
                                   window=settings.reservation_confirm, limit=settings.max_unconfirmed)
        return replace(answer, reservation="held" if held else "skipped")
    return answer


def _own_key(review: Review) -> str | None:
    """The index key of the pod a review creates, when it has a namespace and a name."""
    if review.kind != "Pod" or review.operation != "CREATE" or not review.namespace:
        return None
    metadata = (review.object or {}).get("metadata")
    name = review.name or (metadata.get("name") if isinstance(metadata, dict) else None)
    return pod_key(review.namespace, name) if isinstance(name, str) and name else None
