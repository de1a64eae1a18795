"""Recent `FailedCreatePodSandBox` Events (core/v1), as the kubelet reports a pod whose network setup failed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s

SANDBOX_REASON = "FailedCreatePodSandBox"


@dataclass(frozen=True, slots=True)
class SandboxEvent:
    namespace: str
    pod: str
    node: str | None  # source.host (the kubelet's node)
    message: str
    count: int = 1
    last_seen: str = ""  # RFC 3339


def _when(event: Any) -> dt.datetime | None:
    for value in (event.last_timestamp, event.event_time, event.first_timestamp, event.metadata.creation_timestamp):
        if isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return None


async def sandbox_events(api: k8s.ApiClient, since_seconds: float, now: dt.datetime | None = None,
                         ) -> tuple[SandboxEvent, ...]:
    """Pod events with reason FailedCreatePodSandBox seen in the last `since_seconds`, newest first."""
    now = now or dt.datetime.now(dt.UTC)
    listing = await k8s.CoreV1Api(api).list_event_for_all_namespaces(
        field_selector=f"reason={SANDBOX_REASON},involvedObject.kind=Pod")
    found: list[tuple[dt.datetime, SandboxEvent]] = []
    for event in listing.items:
        when = _when(event)
        if when is None or (now - when).total_seconds() > since_seconds:
            continue
        obj = event.involved_object
        host = event.source.host if event.source is not None else None
        found.append((when, SandboxEvent(obj.namespace or event.metadata.namespace or "", obj.name or "",
                                         host or None, event.message or "", event.count or 1,
                                         when.isoformat().replace("+00:00", "Z"))))
    return tuple(e for _, e in sorted(found, key=lambda pair: pair[0], reverse=True))
