"""`ipguard plan`: does the subnet math close for N pods per zone on nodes of one type?

Exit status: 0 when the pods fit in every subnet in the mode asked for, 1 when they do not, 2 for bad input.
The arithmetic is `webhook.model.plan`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from webhook.model.cni import CniSettings, CniSettingsError
from webhook.model.limits import LimitsTable, UnknownInstanceType
from webhook.model.plan import (
    DOES_NOT_FIT,
    FITS_WITH_PREFIX_DELEGATION,
    ModePlan,
    Plan,
    PlanError,
    SubnetPlan,
    make_plan,
)
from webhook.report import format_table

# The EKS add-on's aws-node manifest sets WARM_PREFIX_TARGET=1 (ipamd's own default when unset is 0).
DEFAULT_WARM_PREFIX_TARGET = 1


def cni_settings(args: argparse.Namespace) -> CniSettings:
    """The warm-pool flags as the aws-node env would carry them (parsed, and checked, as ipamd would)."""
    env = {"ENABLE_PREFIX_DELEGATION": "true" if args.prefix_delegation else "false",
           "WARM_PREFIX_TARGET": str(args.warm_prefix_target)}
    for flag, name in (("warm_eni_target", "WARM_ENI_TARGET"), ("warm_ip_target", "WARM_IP_TARGET"),
                       ("minimum_ip_target", "MINIMUM_IP_TARGET"), ("max_eni", "MAX_ENI")):
        value = getattr(args, flag)
        if value is not None:
            env[name] = str(value)
    return CniSettings.from_env(env)


def _mode_row(label: str, plan: ModePlan | None, available: int) -> list[object]:
    if plan is None:
        return [label, "-", "-", "-", "-", "-", "-", "-", available, "not on this type (not Nitro)", "-"]
    need = plan.need
    fits = "yes" if plan.fits else "no"
    if plan.fits and not plan.fits_scattered:
        fits = "yes, if primaries stay packed"
    return [label, need.nodes, need.node_primaries, need.eni_primaries, need.pod_ips, need.idle,
            need.blocks if label == "prefix delegation" else "-", need.needed, available, fits, plan.largest]


def plan_text(plan: Plan) -> str:
    first = plan.subnets[0]
    second = first.secondary.need
    lines = [f"{plan.pods} pods per zone on {plan.instance_type}: {second.pods_per_node} pod IPs per node "
             f"(max-pods {second.max_pods})"
             + (f", {first.prefix.need.pods_per_node} with prefix delegation (max-pods {first.prefix.need.max_pods})"
                if first.prefix is not None else ", no prefix delegation on this type (not Nitro)")]
    for subnet in plan.subnets:
        space = subnet.space
        lines += ["", f"{space.cidr}: {space.size} addresses, {space.available} after AWS's 5 reserved, "
                      f"{space.blocks} usable /28 block(s)"]
        rows = [_mode_row("secondary IPs", subnet.secondary, space.available),
                _mode_row("prefix delegation", subnet.prefix, space.available)]
        lines.append(format_table(["MODE", "NODES", "NODE-PRIMARIES", "ENI-PRIMARIES", "POD-IPS", "IDLE",
                                   "/28S", "NEEDED", "AVAILABLE", "FITS", "LARGEST"], rows))
        if subnet.prefix is not None and subnet.prefix.fits and not subnet.prefix.fits_scattered:
            lines.append("  primaries EC2 scatters across the /28 blocks can break them: keep them packed with a "
                         "subnet CIDR reservation of type prefix")
    lines += ["", f"verdict: {plan.verdict}" + _advice(plan)]
    return "\n".join(lines)


def _advice(plan: Plan) -> str:
    asked = "in secondary-IP mode"
    if plan.prefix_delegation:
        can = plan.subnets[0].prefix is not None
        asked = "with prefix delegation" if can else (
            f"in secondary-IP mode: {plan.instance_type} takes no prefixes, ipamd runs it on secondary IPs")
    if plan.verdict == DOES_NOT_FIT:
        return (f" (neither mode holds {plan.pods} pods in every subnet: add a secondary VPC CIDR (100.64.0.0/10 "
                "with custom networking) for larger pod subnets, or switch to an overlay CNI)")
    if plan.verdict == FITS_WITH_PREFIX_DELEGATION:
        return " (set ENABLE_PREFIX_DELEGATION=true on aws-node; Nitro nodes only)"
    if not plan.fits:
        return " (the /28 blocks do not fit these subnets; turn prefix delegation off)"
    return f" ({asked})"


def _mode_json(plan: ModePlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    need = plan.need
    return {"mode": need.mode, "nodes": need.nodes, "podsPerNode": need.pods_per_node, "maxPods": need.max_pods,
            "nodePrimaries": need.node_primaries, "eniPrimaries": need.eni_primaries, "podIps": need.pod_ips,
            "idle": need.idle, "blocks": need.blocks, "needed": need.needed, "fits": plan.fits,
            "fitsScattered": plan.fits_scattered, "largestPods": plan.largest}


def _subnet_json(subnet: SubnetPlan) -> dict[str, Any]:
    space = subnet.space
    return {"cidr": space.cidr, "addresses": space.size, "available": space.available, "blocks": space.blocks,
            "secondaryIp": _mode_json(subnet.secondary), "prefixDelegation": _mode_json(subnet.prefix)}


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"pods": plan.pods, "instanceType": plan.instance_type, "prefixDelegation": plan.prefix_delegation,
            "verdict": plan.verdict, "fits": plan.fits, "subnets": [_subnet_json(s) for s in plan.subnets]}


def main(args: argparse.Namespace) -> int:
    try:
        limits = LimitsTable().get(args.instance_type)
        plan = make_plan(args.cidr, args.pods, limits, cni_settings(args))
    except (UnknownInstanceType, CniSettingsError, PlanError) as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_json(plan), indent=2))
    else:
        print(plan_text(plan))
    return 0 if plan.fits else 1


def add_parser(sub: Any) -> None:
    pp = sub.add_parser("plan", help="does the subnet math close for N pods per zone on one instance type?")
    pp.add_argument("--cidr", action="append", required=True, metavar="CIDR",
                    help="a zone's pod subnet, e.g. 10.0.32.0/20 (repeatable: one per zone)")
    pp.add_argument("--pods", type=int, required=True, metavar="N", help="pods per zone that take a VPC IP")
    pp.add_argument("--instance-type", required=True, metavar="T", help="the nodes' instance type, e.g. m5.large")
    pp.add_argument("--prefix-delegation", action="store_true", help="ENABLE_PREFIX_DELEGATION=true")
    pp.add_argument("--warm-eni-target", type=int, metavar="N", help="WARM_ENI_TARGET (default 1)")
    pp.add_argument("--warm-ip-target", type=int, metavar="N", help="WARM_IP_TARGET")
    pp.add_argument("--minimum-ip-target", type=int, metavar="N", help="MINIMUM_IP_TARGET")
    pp.add_argument("--warm-prefix-target", type=int, default=DEFAULT_WARM_PREFIX_TARGET, metavar="N",
                    help="WARM_PREFIX_TARGET (default 1, as the EKS add-on sets it)")
    pp.add_argument("--max-eni", type=int, metavar="N", help="MAX_ENI")
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp.set_defaults(func=main)
