"""Headroom tables for people (`ipguard report`) and machines (`--json`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from webhook.model.config import Settings
from webhook.model.index import HEADROOM_RULE, IndexSnapshot


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


def report_text(snapshot: IndexSnapshot, settings: Settings) -> str:
    zone_rows = [
        (z.zone, z.nodes, z.room, z.warm_free, z.subnet_free, z.reservations + z.pending, z.waiting, z.headroom,
         z.new_node_ips, settings.reserve_for_zone(z.zone), zone_status(z.headroom, settings.reserve_for_zone(z.zone)))
        for z in snapshot.zones
    ]
    subnet_rows = [
        (s.subnet_id, s.zone, s.cidr or "-", s.free_ips, "-" if s.free_blocks is None else s.free_blocks,
         s.supply, s.nodes)
        for s in snapshot.subnets
    ]
    out = [
        "Zones (pod IPs)",
        format_table(
            ["ZONE", "NODES", "NODE-ROOM", "WARM-FREE", "SUBNET-FREE", "RESERVED", "WAITING", "HEADROOM",
             "NEW-NODES", "RESERVE", "STATUS"],
            zone_rows,
        ),
        "",
        "Subnets",
        format_table(["SUBNET", "ZONE", "CIDR", "FREE-IPS", "FREE-/28", "USABLE", "NODES"], subnet_rows),
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


def report_json(snapshot: IndexSnapshot, settings: Settings) -> dict[str, Any]:
    return {
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
            }
            for s in snapshot.subnets
        ],
        "nodes": snapshot.nodes,
        "pods": snapshot.pods,
        "reservations": snapshot.reservations,
        "unknownInstanceTypes": list(snapshot.unknown_types),
        "nodesWaitingForIp": [{"node": n, "zone": z, "waiting": w} for n, z, w in snapshot.waiting_nodes],
    }
