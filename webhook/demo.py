"""`ipguard demo`: the whole job on the embedded demo cluster, over real HTTPS, with no AWS and no cluster.

It generates certificates, starts the webhook server on 127.0.0.1 on the demo snapshot, then plays the
apiserver and the scheduler: it scales a Deployment up pod by pod, sending each pod through /mutate then
/validate as the apiserver would, applies the returned patch, and binds each admitted pod to a node the
way the scheduler would (spreading across zones, within the pod's node affinity). Then a second Deployment
pinned to the busiest zone shows a real denial.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import ssl
import sys
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import jsonpatch

from webhook.admission.handler import AdmissionState
from webhook.apiserver import admission_review, as_created, default_pod, generated_name
from webhook.model.index import pod_key
from webhook.model.pods import ZONE_LABEL, allowed_zones
from webhook.report import format_table
from webhook.scheduler import Scheduler
from webhook.server import RunningServer, WebhookServer, start_server
from webhook.sources.snapshot import Snapshot
from webhook.tls import CertReloader, service_dns_names, write_cert_bundle

SERVICE, NAMESPACE = "ipguard", "ipguard"
SERVER_NAME = f"{SERVICE}.{NAMESPACE}.svc"


def deployment_pod(
    name: str, namespace: str, template_hash: str, node_selector: dict[str, str] | None
) -> dict[str, Any]:
    """A pod as the ReplicaSet controller creates it (generateName, no name yet), defaults applied."""
    spec: dict[str, Any] = {
        "containers": [{
            "name": name, "image": f"registry.example.com/{name}:1.4.2",
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        }],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    return default_pod({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "generateName": f"{name}-{template_hash}-", "namespace": namespace,
            "labels": {"app": name, "pod-template-hash": template_hash},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-{template_hash}",
                                 "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": spec,
    })


@dataclass(slots=True)
class Tally:
    admitted: Counter[str] = field(default_factory=Counter)
    steered_away: Counter[str] = field(default_factory=Counter)
    denied: Counter[str] = field(default_factory=Counter)
    unschedulable: int = 0
    denial_message: str | None = None


class DemoClient:
    """Plays the kube-apiserver: HTTPS that trusts only the CA and checks the service DNS name."""

    def __init__(self, url: str, ca_file: Path) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.hostname_checks_common_name = False
        self.url = url
        self.context = context
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))

    async def review(self, path: str, review: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(
            f"{self.url}{path}?timeout=5s", data=json.dumps(review).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "kube-apiserver-admission"},
            server_hostname=SERVER_NAME,
        ) as response:
            response.raise_for_status()
            answer: dict[str, Any] = await response.json()
        if answer["response"]["uid"] != review["request"]["uid"]:
            raise RuntimeError("webhook answered with a different uid")
        result: dict[str, Any] = answer["response"]
        return result

    async def close(self) -> None:
        await self.session.close()


async def create_pod(
    client: DemoClient, scheduler: Scheduler, tally: Tally, template: dict[str, Any], zones: list[str],
    rng: random.Random, out: TextIO,
) -> None:
    namespace = template["metadata"]["namespace"]
    mutated = await client.review("/mutate", admission_review(copy.deepcopy(template), namespace, None))
    pod = copy.deepcopy(template)
    if mutated.get("patch"):
        pod = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(mutated["patch"])))
    name = generated_name(pod["metadata"]["generateName"], rng)
    pod = as_created(pod, name)
    validated = await client.review("/validate", admission_review(pod, namespace, name))
    avoided = [z for z in zones if z not in allowed_zones(pod, zones) and z in allowed_zones(template, zones)]
    for zone in avoided:
        tally.steered_away[zone] += 1
    label = f"{namespace}/{name}"
    if not validated["allowed"]:
        target = ",".join(allowed_zones(pod, zones))
        for zone in allowed_zones(pod, zones):
            tally.denied[zone] += 1
        tally.denial_message = validated.get("status", {}).get("message")
        print(f"  {label:<34} DENIED     (no pod IPs in {target})", file=out)
        return
    node = scheduler.bind(pod, pod_key(namespace, name))
    if node is None:
        tally.unschedulable += 1
        print(f"  {label:<34} admitted, but no node fits (Pending)", file=out)
        return
    zone = scheduler.index.nodes[node].zone or "?"
    tally.admitted[zone] += 1
    steer = f"steered away from {','.join(avoided)}" if avoided else ""
    print(f"  {label:<34} -> {zone} {node:<28} {steer}".rstrip(), file=out)


async def run_demo(
    snapshot: Snapshot, *, replicas: int = 36, pinned: int = 2, serve: bool = False, port: int = 0,
    certs_dir: Path | None = None, out: TextIO | None = None,
) -> Tally:
    # Resolved at call time, not import time: sys.stdout may have been replaced since (pytest's capsys, ...).
    out = out if out is not None else sys.stdout
    index = snapshot.build_index()
    state = AdmissionState(index, snapshot.settings)
    zones = index.zone_names()
    before = {z: index.zone_headroom(z) for z in zones}
    with tempfile.TemporaryDirectory(prefix="ipguard-demo-") as tmp:
        cert_dir = certs_dir or Path(tmp)
        paths = write_cert_bundle(cert_dir, SERVICE, NAMESPACE, ["127.0.0.1"])
        reloader = CertReloader(paths.tls_cert, paths.tls_key)
        running: RunningServer = await start_server(WebhookServer(state, reloader), "127.0.0.1", port,
                                                    reloader.context)
        client = DemoClient(running.url, paths.ca_cert)
        print(f"ipguard demo: webhook serving on {running.url} (certificate for "
              f"{', '.join(service_dns_names(SERVICE, NAMESPACE)[2:3])}, trusted through a fresh CA)", file=out)
        print(f"cluster: {snapshot.source}, mode {snapshot.settings.mode.value}, "
              f"{len(snapshot.nodes)} nodes in {', '.join(zones)}", file=out)
        tally = Tally()
        scheduler = Scheduler(index, preferences=False)
        rng = random.Random(42)
        try:
            print(f"\nScaling Deployment shop/web to {replicas} replicas (each pod: /mutate, /validate, bind):",
                  file=out)
            template = deployment_pod("web", "shop", "5f7c9d8b6", None)
            for _ in range(replicas):
                await create_pod(client, scheduler, tally, template, zones, rng, out)
            busiest = min(zones, key=lambda z: index.zone_headroom(z))
            print(f"\nScaling Deployment shop/cache (nodeSelector {ZONE_LABEL}={busiest}) to {pinned} replicas:",
                  file=out)
            pinned_template = deployment_pod("cache", "shop", "7b8c6d5f4", {ZONE_LABEL: busiest})
            for _ in range(pinned):
                await create_pod(client, scheduler, tally, pinned_template, zones, rng, out)
            after = {z: index.zone_headroom(z) for z in zones}
            rows = [
                (z, tally.admitted[z], tally.steered_away[z], tally.denied[z], before[z], after[z],
                 snapshot.settings.reserve_for_zone(z))
                for z in zones
            ]
            print("\n" + format_table(
                ["ZONE", "ADMITTED", "STEERED-AWAY", "DENIED", "HEADROOM-BEFORE", "HEADROOM-AFTER", "RESERVE"], rows),
                file=out)
            if tally.denial_message:
                print("\nA denial, as kubectl shows it:\n"
                      f"Error from server (Forbidden): admission webhook \"validate.ipguard.io\" denied the request: "
                      f"{tally.denial_message}", file=out)
            if serve:
                print(f"\nServing on {running.url} until interrupted. Try:\n"
                      f"  curl --cacert {paths.ca_cert} --resolve {SERVER_NAME}:{running.port}:127.0.0.1 \\\n"
                      f"    -H 'Content-Type: application/json' --data @examples/review-pod.json \\\n"
                      f"    https://{SERVER_NAME}:{running.port}/validate", file=out)
                await asyncio.Event().wait()
        finally:
            await client.close()
            await running.stop()
    return tally
