"""The webhook server end to end over real HTTPS, driven with the bodies a real kube-apiserver POSTed.

A fresh CA and serving certificate (`write_cert_bundle`), the real `WebhookServer` on 127.0.0.1 with the
`CertReloader`'s context, and a client that does what the apiserver does: trust only the CA (`caBundle`),
check the service DNS name `ipguard.ipguard.svc` against the SANs (never the Common Name), POST the fixture
bytes unchanged to `/mutate?timeout=5s` / `/validate?timeout=5s` with the captured headers.

The cluster behind it is the fixture cluster (fixtures README): four nodes in us-east-1a/b/c, one pod subnet
per zone. "Exhausted" zones have an empty subnet and nodes that hold no spare IP (EC2's figures).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest

import webhook.server
from tests import scrape
from tests.paths import FIXTURES
from webhook.admission.handler import AdmissionState
from webhook.admission.wire import MAX_BODY_BYTES
from webhook.model.cni import CniSettings
from webhook.model.config import Mode, Settings
from webhook.model.index import CapacityIndex
from webhook.model.limits import LimitsTable
from webhook.server import RunningServer, WebhookServer, start_server
from webhook.tls import CertPaths, CertReloader

SERVER_NAME = "ipguard.ipguard.svc"
A, B, C = "us-east-1a", "us-east-1b", "us-east-1c"
NODES = [
    ("ip-10-0-1-10.ec2.internal", A, "m5.large", 29),
    ("ip-10-0-1-11.ec2.internal", A, "m5.xlarge", 58),
    ("ip-10-0-2-20.ec2.internal", B, "m5.large", 29),
    ("ip-10-0-3-30.ec2.internal", C, "t3.medium", 17),
]
NODE_NAMES = tuple(n[0] for n in NODES)
SUBNETS = {A: "subnet-0a1b2c3d4e5f60718", B: "subnet-0b2c3d4e5f6071829", C: "subnet-0c3d4e5f607182930"}
RESERVE = 2
ASCII_LINE = re.compile(r"^[\x20-\x7e]{1,120}$")


# ---- shared helpers (also used by test_patch, test_messages and test_http_fuzz) ----------------------------


def fixture_cluster(exhausted: Iterable[str] = (), free: int = 100) -> CapacityIndex:
    """The fixture cluster; security groups for pods on (the sg-pod fixture needs branch ENIs)."""
    exhausted = set(exhausted)
    index = CapacityIndex(LimitsTable(), CniSettings(pod_eni=True))
    for name, zone, instance_type, allocatable in NODES:
        index.upsert_node(name, zone=zone, instance_type=instance_type, pod_subnet=SUBNETS[zone],
                          allocatable_pods=allocatable)
        if zone in exhausted:
            index.set_node_held(name, 0)
    for zone, subnet in SUBNETS.items():
        index.upsert_subnet(subnet, zone=zone, cidr="10.0.0.0/24", free_ips=0 if zone in exhausted else free)
    return index


def admission_fixture_names() -> list[str]:
    """Every AdmissionReview the apiserver POSTed (pods, SecurityGroupPolicies, ENIConfigs)."""
    names = []
    for path in sorted(FIXTURES.glob("*.json")):
        if (".mutate" in path.name or ".validate" in path.name) and not path.name.endswith(".meta.json"):
            names.append(path.name)
    return names


ADMISSION_FIXTURES = admission_fixture_names()


def fixture_body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_review(name: str) -> dict[str, Any]:
    review: dict[str, Any] = json.loads(fixture_body(name))
    return review


def fixture_meta(name: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((FIXTURES / name.replace(".json", ".meta.json")).read_text(encoding="utf-8"))
    return meta


def stage_of(name: str) -> str:
    return "mutate" if ".mutate" in name else "validate"


def apiserver_headers(name: str) -> dict[str, str]:
    """The captured request headers, in order, less Host and Content-Length (the client sets those)."""
    return {k: v for k, v in fixture_meta(name)["headers"] if k not in ("Host", "Content-Length")}


def client_context(ca_file: Path) -> ssl.SSLContext:
    """Verify as the apiserver does: only the webhook's caBundle, the SANs, never the CN."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.hostname_checks_common_name = False
    context.set_alpn_protocols(["http/1.1"])
    return context


def check_response(review: dict[str, Any], answer: dict[str, Any], stage: str) -> dict[str, Any]:
    """What the apiserver itself insists on in every answer (behaviour facts 5-7); returns `response`."""
    assert answer["apiVersion"] == review["apiVersion"]
    assert answer["kind"] == "AdmissionReview"
    response: dict[str, Any] = answer["response"]
    assert response["uid"] == review["request"]["uid"]
    assert isinstance(response["allowed"], bool)
    if stage == "validate":
        assert "patch" not in response and "patchType" not in response, response
    elif "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
        assert isinstance(ops, list) and ops
    else:
        assert "patchType" not in response
    if not response["allowed"]:
        status = response["status"]
        assert status["code"] == 403 and status["reason"] == "Forbidden" and status["message"]
        assert "details" not in status
    for warning in response.get("warnings", []):
        assert ASCII_LINE.match(warning), warning
    assert len(response.get("warnings", [])) == len(set(response.get("warnings", [])))
    for key, value in response.get("auditAnnotations", {}).items():
        assert key and "/" not in key and re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", key), key
        assert isinstance(value, str)
    return response


def apply_response(obj: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return obj
    patched: dict[str, Any] = jsonpatch.apply_patch(obj, json.loads(base64.b64decode(response["patch"])))
    return patched


# ---- server harness -----------------------------------------------------------------------------------------


@dataclass
class Harness:
    state: AdmissionState
    server: WebhookServer
    running: RunningServer
    session: aiohttp.ClientSession

    @property
    def index(self) -> CapacityIndex:
        return self.state.index

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        server_hostname: str = SERVER_NAME, skip_auto_headers: tuple[str, ...] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.request(
            method, f"{self.running.url}{path}", data=body, headers=headers, server_hostname=server_hostname,
            timeout=aiohttp.ClientTimeout(total=10), skip_auto_headers=skip_auto_headers,
        ) as response:
            return response.status, dict(response.headers), await response.read()

    async def post(
        self, path: str, body: bytes, content_type: str = "application/json", **extra: str
    ) -> tuple[int, dict[str, Any]]:
        headers = {"User-Agent": "kube-apiserver-admission", "Accept": "application/json, */*",
                   "Content-Type": content_type, "Accept-Encoding": "gzip", **extra}
        status, _, data = await self.request("POST", path, body, headers)
        return status, json.loads(data)

    async def review(self, name: str, body: bytes | None = None) -> dict[str, Any]:
        """POST a fixture as the apiserver did (the same bytes unless `body` is given); the checked response."""
        stage = stage_of(name)
        raw = fixture_body(name) if body is None else body
        started = time.perf_counter()
        query = fixture_meta(name)["query"]  # timeout=5s (timeout=10s for the second mutating webhook)
        status, headers, data = await self.request("POST", f"/{stage}?{query}", raw, apiserver_headers(name))
        assert time.perf_counter() - started < 5.0  # the apiserver gives up at ?timeout=5s
        assert status == 200, data
        assert headers["Content-Type"].startswith("application/json")
        return check_response(json.loads(raw), json.loads(data), stage)

    async def healthy(self) -> None:
        status, _, body = await self.request("GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        response = await self.review("pod-create-generatename.validate.json")
        assert response["uid"] == fixture_review("pod-create-generatename.validate.json")["request"]["uid"]


ServerFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_server(certs: CertPaths) -> AsyncIterator[ServerFactory]:
    started: list[Harness] = []

    async def make(
        exhausted: Iterable[str] = (), mode: Mode = Mode.ENFORCE, index_loaded: Callable[[], bool] = lambda: True,
        stale: Callable[[], str | None] = lambda: None, index: CapacityIndex | None = None,
    ) -> Harness:
        state = AdmissionState(index or fixture_cluster(exhausted), Settings(mode=mode, zone_reserve=RESERVE),
                               stale_reason=stale)
        reloader = CertReloader(certs.tls_cert, certs.tls_key)
        server = WebhookServer(state, reloader, index_loaded=index_loaded,
                               source_ages=lambda: {"nodes": 1.5, "subnets": 20.0})
        running = await start_server(server, "127.0.0.1", 0, reloader.context)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(certs.ca_cert)))
        harness = Harness(state, server, running, session)
        started.append(harness)
        return harness

    yield make
    for harness in started:
        await harness.session.close()
        await harness.running.stop()


# ---- TLS as the apiserver checks it -------------------------------------------------------------------------


async def test_tls_trusts_only_the_ca_and_checks_the_service_name(make_server: ServerFactory,
                                                                  certs: CertPaths) -> None:
    h = await make_server()
    status, _, body = await h.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    # The IP SAN is there too (a `url: https://127.0.0.1...` configuration).
    status, _, _ = await h.request("GET", "/healthz", server_hostname="127.0.0.1")
    assert status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await h.request("GET", "/healthz", server_hostname="other.ipguard.svc")
    async with aiohttp.ClientSession() as stranger:  # the system trust store, not the caBundle
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await stranger.get(f"{h.running.url}/healthz", server_hostname=SERVER_NAME)
    assert h.server.reloader is not None and h.server.reloader.ready


# ---- every real request, in every kind of cluster -----------------------------------------------------------


@pytest.mark.parametrize("exhausted", [(), (A,), (A, B, C)], ids=["roomy", "a-exhausted", "all-exhausted"])
@pytest.mark.parametrize("mode", [Mode.ENFORCE, Mode.WARN, Mode.DRY_RUN], ids=lambda m: m.value)
async def test_every_fixture_answered_as_the_apiserver_requires(
    make_server: ServerFactory, exhausted: tuple[str, ...], mode: Mode
) -> None:
    h = await make_server(exhausted, mode)
    for name in ADMISSION_FIXTURES:
        review = fixture_review(name)
        response = await h.review(name)  # uid echoed, no patch from /validate, 403/Forbidden denials, ...
        request = review["request"]
        if response.get("patch"):
            patched = apply_response(request["object"], response)
            kubernetes_validate.validate(patched, "1.36", strict=True)
        if (request["kind"]["kind"] == "Pod" and request["operation"] != "CREATE") or (
            request["kind"]["kind"] != "Pod" and stage_of(name) == "mutate"
        ):
            assert response["allowed"] is True and "patch" not in response and "warnings" not in response
            assert response["auditAnnotations"]["outcome"] == "not-applicable"
        elif request["kind"]["kind"] != "Pod":
            # SecurityGroupPolicies and ENIConfigs, validated with no EC2 data here: the groups are not checked
            # (and told so); only the policy with 6 groups breaks a quota that needs no EC2 data.
            assert "patch" not in response and "unchecked" in response["auditAnnotations"]["findings"]
            too_many = name.startswith("sgp-create-denied")
            assert response["allowed"] is not (too_many and mode is Mode.ENFORCE)
            assert response["auditAnnotations"]["outcome"] == (
                {Mode.ENFORCE: "denied", Mode.WARN: "warned", Mode.DRY_RUN: "recorded"}[mode] if too_many else "allowed"
            )
        if not response["allowed"]:
            assert (mode, stage_of(name)) == (Mode.ENFORCE, "validate")
        if mode is Mode.DRY_RUN:
            assert set(response) == {"uid", "allowed", "auditAnnotations"} and response["allowed"]
    await h.healthy()


# ---- decisions over the wire ----------------------------------------------------------------------------


async def test_allow(make_server: ServerFactory) -> None:
    h = await make_server()
    for name in ("pod-create-generatename.mutate.json", "pod-create-generatename.validate.json",
                 "pod-create-affinity.mutate.json", "pod-create-nodename.validate.json"):
        response = await h.review(name)
        assert response["allowed"] is True
        assert "patch" not in response and "warnings" not in response and "status" not in response
        assert response["auditAnnotations"]["decision"] == "allow"
        assert response["auditAnnotations"]["outcome"] == "allowed"


async def test_steer(make_server: ServerFactory) -> None:
    h = await make_server((A,))
    name = "pod-create-generatename.mutate.json"
    response = await h.review(name)
    assert response["allowed"] is True
    pod = apply_response(fixture_review(name)["request"]["object"], response)
    kubernetes_validate.validate(pod, "1.36", strict=True)
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "NotIn",
                                            "values": [A]}]}]
    assert response["warnings"] and A in response["warnings"][0]
    notes = response["auditAnnotations"]
    assert (notes["decision"], notes["outcome"], notes["avoid-zones"]) == ("steer", "steered", A)
    # A pod that may run only in us-east-1a and 1c keeps its own term and gains the exclusion.
    response = await h.review("pod-create-affinity.mutate.json")
    pod = apply_response(fixture_review("pod-create-affinity.mutate.json")["request"]["object"], response)
    exprs = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    assert exprs[0] == {"key": "topology.kubernetes.io/zone", "operator": "In", "values": [A, C]}
    assert {"key": "topology.kubernetes.io/zone", "operator": "NotIn", "values": [A]} in exprs
    # The mutating stage takes no reservation; only an admitted validate does.
    assert h.index.reservations() == []


async def test_reinvocation_over_the_wire(make_server: ServerFactory) -> None:
    """Round 0, the other webhook, round 1 (fixture bodies with the real round-0 patch applied)."""
    h = await make_server((A,))
    first = fixture_review("reinvocation.mutate.json")
    response = await h.review("reinvocation.mutate.json")
    pod = apply_response(first["request"]["object"], response)
    pod = jsonpatch.apply_patch(pod, [{"op": "add", "path": "/metadata/labels/other-mutator", "value": "done"}])
    second = fixture_review("reinvocation.mutate-reinvoked.json")
    second["request"]["object"] = pod
    again = await h.review("reinvocation.mutate-reinvoked.json", json.dumps(second).encode())
    assert "patch" not in again, "a reinvoked call on an already-steered pod must change nothing"
    assert again["auditAnnotations"]["decision"] == "steer"


async def test_deny_in_enforce_mode(make_server: ServerFactory) -> None:
    h = await make_server((A, B, C))
    response = await h.review("deny-403.validate.json")
    assert response["allowed"] is False
    status = response["status"]
    assert (status["code"], status["reason"]) == (403, "Forbidden")
    message = status["message"]
    assert message.startswith("ipguard: pod payments/deny-403 ")
    for zone, subnet in SUBNETS.items():
        assert f"{zone}: 0 free pod IPs, reserve {RESERVE}" in message
        assert subnet in message
    assert "prefix delegation" in message.lower() or "subnet" in message
    assert "\n" not in message
    assert response["auditAnnotations"]["outcome"] == "denied"
    assert h.index.reservations() == []  # a denied pod holds nothing
    # The mutating stage never denies (the validating webhook owns denials) and has nothing to steer to.
    mutated = await h.review("pod-create-generatename.mutate.json")
    assert mutated["allowed"] is True and "patch" not in mutated
    # A pod pinned by nodeName is judged on its node, and the message says so.
    pinned = await h.review("pod-create-nodename.validate.json")
    assert pinned["allowed"] is False
    assert "payments/pinned" in pinned["status"]["message"]
    assert "ip-10-0-1-10.ec2.internal" in pinned["status"]["message"]


async def test_warnings_in_warn_mode(make_server: ServerFactory) -> None:
    h = await make_server((A, B, C), Mode.WARN)
    response = await h.review("deny-403.validate.json")
    assert response["allowed"] is True and "status" not in response
    warnings = response["warnings"]
    assert "payments/deny-403" in warnings[0]
    for zone in (A, B, C):
        assert any(zone in w for w in warnings)
    assert response["auditAnnotations"]["outcome"] == "warned"
    # Steering still happens in warn mode.
    h2 = await make_server((A,), Mode.WARN)
    assert "patch" in await h2.review("pod-create-generatename.mutate.json")


async def test_dry_run_mode_only_records(make_server: ServerFactory) -> None:
    h = await make_server((A, B, C), Mode.DRY_RUN, stale=lambda: None)
    for name in ("deny-403.validate.json", "pod-create-generatename.mutate.json", "pod-create-nodename.validate.json"):
        response = await h.review(name)
        assert set(response) == {"uid", "allowed", "auditAnnotations"}
        assert response["allowed"] is True
        assert response["auditAnnotations"]["mode"] == "dry-run"
        assert response["auditAnnotations"]["decision"] == "deny"
        # The validating stage records the denial it would make; the mutating stage never denies anyway.
        assert response["auditAnnotations"]["outcome"] == ("recorded" if "validate" in name else "allowed")
    h2 = await make_server((A,), Mode.DRY_RUN)
    response = await h2.review("pod-create-generatename.mutate.json")
    assert set(response) == {"uid", "allowed", "auditAnnotations"}
    assert response["auditAnnotations"]["decision"] == "steer"
    # Stale data in dry-run mode is recorded, not shown to the user either.
    h3 = await make_server((A,), Mode.DRY_RUN, stale=lambda: "nodes not seen for 300 s")
    response = await h3.review("pod-create-generatename.validate.json")
    assert set(response) == {"uid", "allowed", "auditAnnotations"}
    assert response["auditAnnotations"]["stale"] == "true"


async def test_stale_data_fails_open_with_a_warning(make_server: ServerFactory) -> None:
    h = await make_server((A, B, C), stale=lambda: "subnets not refreshed for 300 s")
    response = await h.review("deny-403.validate.json")
    assert response["allowed"] is True
    assert "stale" in response["warnings"][0]
    assert response["auditAnnotations"]["outcome"] == "stale"


async def test_request_dry_run_takes_no_reservation(make_server: ServerFactory) -> None:
    h = await make_server()
    before = {z: h.index.zone_headroom(z) for z in (A, B, C)}
    dry = fixture_review("pod-create-dryrun-server.validate.json")
    assert dry["request"]["dryRun"] is True
    response = await h.review("pod-create-dryrun-server.validate.json")
    assert response["allowed"] is True
    assert h.index.reservations() == []
    assert {z: h.index.zone_headroom(z) for z in (A, B, C)} == before
    response = await h.review("pod-create-generatename.validate.json")
    assert response["allowed"] is True
    (reservation,) = h.index.reservations()
    assert reservation.key == "payments/api-7d9c8b6f5d-hpsl2"
    after = {z: h.index.zone_headroom(z) for z in (A, B, C)}
    assert sum(before.values()) - sum(after.values()) == 1
    assert after[reservation.zone] == before[reservation.zone] - 1
    # The same pod admitted again (an apiserver retry) still holds one reservation, not two.
    await h.review("pod-create-generatename.validate.json")
    assert len(h.index.reservations()) == 1


def _variant(name: str, change: Callable[[dict[str, Any]], None]) -> bytes:
    review = fixture_review(name)
    change(review["request"])
    return json.dumps(review, separators=(",", ":")).encode()


def _fargate(request: dict[str, Any]) -> None:
    request["object"]["metadata"]["labels"]["eks.amazonaws.com/fargate-profile"] = "fp-default"


def _exempt(request: dict[str, Any]) -> None:
    request["namespace"] = "kube-system"
    request["object"]["metadata"]["namespace"] = "kube-system"


def _mirror(request: dict[str, Any]) -> None:
    request["object"]["metadata"].setdefault("annotations", {})["kubernetes.io/config.mirror"] = "abc123"


@pytest.mark.parametrize("case", ["hostnetwork", "fargate", "exempt-namespace", "mirror", "update"])
async def test_pods_ipguard_does_not_judge(make_server: ServerFactory, case: str) -> None:
    h = await make_server((A, B, C))
    for stage in ("mutate", "validate"):
        name, body = {
            "hostnetwork": (f"pod-create-hostnetwork.{stage}.json", None),
            "fargate": (f"pod-create-generatename.{stage}.json",
                        _variant(f"pod-create-generatename.{stage}.json", _fargate)),
            "exempt-namespace": (f"deny-403.{stage}.json" if stage == "validate" else "patch-add-affinity.mutate.json",
                                 None),
            "mirror": (f"pod-create-nodename.{stage}.json", _variant(f"pod-create-nodename.{stage}.json", _mirror)),
            "update": (f"pod-update-label.{stage}.json", None),
        }[case]
        if case == "exempt-namespace":
            body = _variant(name, _exempt)
        response = await h.review(name, body)
        assert response["allowed"] is True
        assert set(response) == {"uid", "allowed", "auditAnnotations"}, response
        assert response["auditAnnotations"]["outcome"] == "not-applicable"
    assert h.index.reservations() == []


async def test_generate_name_pods(make_server: ServerFactory) -> None:
    h = await make_server((A,))
    mutate = fixture_review("pod-create-generatename.mutate.json")
    assert "name" not in mutate["request"] and "name" not in mutate["request"]["object"]["metadata"]
    response = await h.review("pod-create-generatename.mutate.json")
    assert "patch" in response
    assert "payments/api-7d9c8b6f5d-*" in response["auditAnnotations"]["reason"] or response["warnings"]
    assert h.index.reservations() == []
    # The validating stage sees the generated name (on the steered pod) and reserves under it.
    validate = fixture_review("pod-create-generatename.validate.json")
    validate["request"]["object"] = apply_response(validate["request"]["object"], response)
    answer = await h.review("pod-create-generatename.validate.json", json.dumps(validate).encode())
    assert answer["allowed"] is True
    (reservation,) = h.index.reservations()
    assert reservation.key == "payments/api-7d9c8b6f5d-hpsl2" and reservation.zone in (B, C)


async def test_v1beta1_is_answered_as_v1beta1(make_server: ServerFactory) -> None:
    h = await make_server((A,))
    for name in ("pod-create-generatename.mutate.json", "deny-403.validate.json", "sgp-create.validate.json"):
        review = fixture_review(name)
        review["apiVersion"] = "admission.k8s.io/v1beta1"
        response = await h.review(name, json.dumps(review).encode())  # checks apiVersion echoes v1beta1
        assert response["uid"] == review["request"]["uid"]


async def test_security_group_policies_and_eniconfigs_are_judged_without_ec2_data(make_server: ServerFactory) -> None:
    """With no EC2 data nothing that needs it denies (fail open); the real 6-group policy breaks the
    security-groups-per-ENI quota whatever EC2 says, and is denied as the captured denial was."""
    h = await make_server((A, B, C))
    for name in ADMISSION_FIXTURES:
        if name.startswith(("sgp-", "eniconfig-")):
            response = await h.review(name)
            assert "patch" not in response
            if name == "sgp-create-denied.validate.json":
                assert response["allowed"] is False
                assert response["status"]["message"].startswith(
                    "ipguard: SecurityGroupPolicy payments/too-many-groups lists 6 security groups; an ENI allows at "
                    "most 5 (quota 'Security groups per network interface'"
                )
            else:
                assert response["allowed"] is True


async def test_each_call_has_its_own_uid(make_server: ServerFactory) -> None:
    h = await make_server((A,))
    uids = set()
    for name in ("reinvocation.mutate.json", "reinvocation.mutate2-other.json", "reinvocation.mutate-reinvoked.json",
                 "reinvocation.validate.json"):
        response = await h.review(name)
        uids.add(response["uid"])
    assert len(uids) == 4


# ---- health, readiness, metrics -------------------------------------------------------------------------


async def test_healthz_and_readyz(make_server: ServerFactory) -> None:
    loaded = False
    h = await make_server(index_loaded=lambda: loaded)
    status, _, body = await h.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, _, body = await h.request("GET", "/readyz")
    assert status == 503 and b"index not loaded" in body
    loaded = True
    status, _, body = await h.request("GET", "/readyz")
    assert (status, body) == (200, b"ok\n")


async def test_metrics(make_server: ServerFactory) -> None:
    h = await make_server((A,))
    await h.review("pod-create-generatename.mutate.json")
    await h.review("pod-create-generatename.validate.json")
    await h.review("pod-create-hostnetwork.validate.json")
    await h.post("/validate", b"{not json")
    status, headers, body = await h.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    expected = [
        ("ipguard_admission_requests_total", {"endpoint": "mutate", "decision": "steer", "outcome": "steered"}, 1),
        # the validate call carries the unsteered fixture pod: a steer decision, allowed (nothing to deny)
        ("ipguard_admission_requests_total", {"endpoint": "validate", "decision": "steer", "outcome": "allowed"}, 1),
        ("ipguard_admission_requests_total",
         {"endpoint": "validate", "decision": "not-applicable", "outcome": "not-applicable"}, 1),
        ("ipguard_bad_requests_total", {"endpoint": "validate", "status": "400"}, 1),
        ("ipguard_admission_duration_seconds_count", {"endpoint": "mutate", "decision": "steer"}, 1),
        ("ipguard_admission_duration_seconds_bucket", {"endpoint": "validate", "decision": "steer", "le": "+Inf"}, 1),
        ("ipguard_zone_headroom_pod_ips", {"zone": A}, 0),
        ("ipguard_subnet_free_pod_ips", {"subnet": SUBNETS[B], "zone": B}, 100),
        ("ipguard_reservations", {}, 1),
        ("ipguard_index_age_seconds", {"source": "nodes"}, 1.5),
    ]
    for name, labels, number in expected:
        assert scrape.value(text, name, **labels) == number, (name, labels)
    types = scrape.families(text)
    assert types["ipguard_admission_duration_seconds"] == "histogram"
    assert types["ipguard_handler_errors"] == "counter"
    assert scrape.value(text, "ipguard_certificate_expiry_timestamp_seconds") == (
        h.server.reloader.not_after.timestamp() if h.server.reloader and h.server.reloader.not_after else None)
    # What the library's collectors add: process CPU, memory, file descriptors, Python GC.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert scrape.value(text, name) is not None, name
    assert scrape.value(text, "python_gc_collections_total", generation="0") is not None
    zone_b = re.search(rf'ipguard_zone_headroom_pod_ips{{zone="{B}"}} (\d+)', text)
    assert zone_b and int(zone_b.group(1)) == h.index.zone_headroom(B)


# ---- bad requests ------------------------------------------------------------------------------------------


def _without(path: str) -> bytes:
    review = fixture_review("pod-create-generatename.validate.json")
    node: Any = review
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    del node[last]
    return json.dumps(review).encode()


def _with(path: str, value: Any) -> bytes:
    review = fixture_review("pod-create-generatename.validate.json")
    node: Any = review
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return json.dumps(review).encode()


BAD_BODIES = [
    ("malformed-json", b'{"kind":"AdmissionReview",', "not valid JSON"),
    ("empty", b"", "empty request body"),
    ("not-utf8", b'{"kind":"\xff\xfe"}', "not valid JSON"),
    ("json-array", b"[]", "not a JSON object"),
    ("missing-request", _without("request"), "no request"),
    ("request-null", _with("request", None), "no request"),
    ("missing-uid", _without("request.uid"), "uid"),
    ("empty-uid", _with("request.uid", ""), "uid"),
    ("uid-number", _with("request.uid", 42), "uid"),
    ("missing-object", _without("request.object"), "request.object"),
    ("object-null", _with("request.object", None), "request.object"),
    ("object-list", _with("request.object", []), "request.object"),
    ("wrong-kind", _with("kind", "AdmissionResponse"), "AdmissionReview"),
    ("missing-kind", _without("kind"), "AdmissionReview"),
    ("wrong-apiVersion", _with("apiVersion", "admission.k8s.io/v2"), "apiVersion"),
    ("missing-apiVersion", _without("apiVersion"), "apiVersion"),
    ("request-kind-missing", _without("request.kind"), "request.kind"),
    ("request-resource-missing", _without("request.resource"), "request.resource"),
    ("operation-missing", _without("request.operation"), "request.operation"),
    # Pods the apiserver could never have decoded (found by test_http_fuzz: these used to be HTTP 500s).
    ("pod-name-number", _with("request.object.metadata.name", -1),
     "request.object is not a valid Pod: request.object.metadata.name must be a string"),
    ("pod-metadata-list", _with("request.object.metadata", []), "request.object.metadata must be an object"),
    ("pod-node-selector-list", _with("request.object.spec.nodeSelector", {"topology.kubernetes.io/zone": ["a"]}),
     "request.object.spec.nodeSelector.topology.kubernetes.io/zone must be a string"),
]


@pytest.mark.parametrize(("case", "body", "reason"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_malformed_requests_get_400_with_a_reason(
    make_server: ServerFactory, case: str, body: bytes, reason: str
) -> None:
    h = await make_server((A,))
    for path in ("/mutate?timeout=5s", "/validate?timeout=5s"):
        status, answer = await h.post(path, body)
        assert status == 400, (case, answer)
        assert reason in answer["error"], answer
    await h.healthy()


async def test_wrong_content_type(make_server: ServerFactory) -> None:
    h = await make_server()
    body = fixture_body("pod-create-generatename.validate.json")
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/yaml"):
        status, answer = await h.post("/validate", body, content_type=content_type)
        assert status == 400 and "Content-Type" in answer["error"] and content_type in answer["error"]
    status, _, data = await h.request("POST", "/validate", body, {"User-Agent": "x"},
                                      skip_auto_headers=("Content-Type",))
    assert status == 400 and b"Content-Type" in data and b"missing" in data
    # Parameters are fine: it is still JSON.
    status, answer = await h.post("/validate", body, content_type="application/json; charset=utf-8")
    assert status == 200 and answer["response"]["allowed"] is True
    await h.healthy()


async def test_body_over_7_mib_gets_413(make_server: ServerFactory) -> None:
    h = await make_server()
    review = fixture_review("pod-create-generatename.validate.json")
    review["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (MAX_BODY_BYTES + 10)}
    body = json.dumps(review).encode()
    assert len(body) > MAX_BODY_BYTES
    status, answer = await h.post("/validate?timeout=5s", body)
    assert status == 413 and "bytes" in answer["error"]
    # Without a Content-Length (chunked) the limit holds as well.

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1 << 20):
            yield body[i: i + (1 << 20)]

    status, _, data = await h.request("POST", "/mutate", chunks(),  # type: ignore[arg-type]
                                      {"Content-Type": "application/json"})
    assert status == 413 and b"bytes" in data
    # Just under the limit is a review like any other.
    review["request"]["object"]["metadata"]["annotations"] = {"big": ""}
    base = len(json.dumps(review).encode())
    review["request"]["object"]["metadata"]["annotations"] = {"big": "x" * (MAX_BODY_BYTES - base)}
    body = json.dumps(review).encode()
    assert len(body) == MAX_BODY_BYTES
    status, answer = await h.post("/validate", body)
    assert status == 200 and answer["response"]["uid"] == review["request"]["uid"]
    await h.healthy()


async def test_handler_error_admits_unchecked_and_says_so(make_server: ServerFactory,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error while judging a review: the apiserver treats a 500 as a failed call, which refuses
    the pod under failurePolicy Fail whatever its IP figures. When unsure, admit: HTTP 200, the uid echoed,
    allowed, no patch, a warning and audit annotations that say it went unchecked; the error is counted and
    logged. Only a request with no uid to answer gets a 500."""
    h = await make_server()

    def broken(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(webhook.server, "handle", broken)
    for name in ("pod-create-generatename.mutate.json", "pod-create-generatename.validate.json"):
        review = fixture_review(name)
        status, _, data = await h.request("POST", f"/{stage_of(name)}?timeout=5s", fixture_body(name),
                                          apiserver_headers(name))
        assert status == 200
        response = json.loads(data)["response"]
        assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
        assert "patch" not in response and "status" not in response
        assert response["warnings"] == ["ipguard: admitted unchecked: internal error; see ipguard's log"]
        assert response["auditAnnotations"]["outcome"] == "error"
        assert "boom" not in data.decode()  # no internals on the wire
    review = fixture_review("pod-create-generatename.mutate.json")
    review["apiVersion"] = "admission.k8s.io/v1beta1"
    status, answer = await h.post("/mutate", json.dumps(review).encode())
    assert status == 200 and answer["apiVersion"] == "admission.k8s.io/v1beta1"
    status, _, text = await h.request("GET", "/metrics")
    assert scrape.value(text.decode(), "ipguard_handler_errors_total", endpoint="mutate") == 2

    monkeypatch.setattr(webhook.server, "parse_review", broken)  # fails before the uid is known
    status, answer = await h.post("/validate", fixture_body("pod-create-generatename.validate.json"))
    assert status == 500 and answer["response"]["allowed"] is False
    monkeypatch.undo()
    await h.healthy()


async def test_concurrent_reviews(make_server: ServerFactory) -> None:
    """A burst of creates: each answer carries its own uid, and reservations add up."""
    h = await make_server()
    reviews = []
    for i in range(40):
        review = fixture_review("pod-create-generatename.validate.json")
        review["request"]["uid"] = f"00000000-0000-0000-0000-{i:012d}"
        review["request"]["name"] = review["request"]["object"]["metadata"]["name"] = f"api-{i}"
        reviews.append(review)
    before = sum(h.index.zone_headroom(z) for z in (A, B, C))
    answers = await asyncio.gather(*(h.review("pod-create-generatename.validate.json", json.dumps(r).encode())
                                     for r in reviews))
    assert [a["uid"] for a in answers] == [r["request"]["uid"] for r in reviews]
    assert len(h.index.reservations()) == 40
    assert sum(h.index.zone_headroom(z) for z in (A, B, C)) == before - 40


def test_helpers_cover_all_fixtures() -> None:
    assert len(ADMISSION_FIXTURES) == 37
    assert all(fixture_meta(n)["request_target"].endswith("?timeout=5s")
               or fixture_meta(n)["request_target"].endswith("?timeout=10s") for n in ADMISSION_FIXTURES)
    assert copy.deepcopy(NODES) == NODES
