"""Fuzzing the HTTP input of /mutate and /validate over real HTTPS.

Random bytes, random JSON, and the real apiserver requests with keys deleted and wrong types put at every path
of `request` (down into the object). Whatever arrives, the server answers (no hang), never with a 5xx and
never with an internal error (answered as "admitted unchecked"; there must be none), echoes the uid of every review it
answers with 200, answers in the request's apiVersion, never puts a patch in a validating answer, and a patch
it sends always applies to the object it was sent. It stays healthy throughout.

One server for the module, on its own event loop in a thread, so hypothesis drives it from plain tests.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import re
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jsonpatch
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.test_server_e2e import ADMISSION_FIXTURES, SERVER_NAME, A, client_context, fixture_cluster, fixture_review
from webhook.admission.handler import AdmissionState, Stage, handle
from webhook.admission.wire import _POD_SHAPE, API_VERSIONS, BadReview, parse_review
from webhook.model.config import Settings
from webhook.server import RunningServer, WebhookServer, start_server
from webhook.tls import CertReloader, write_cert_bundle

T = TypeVar("T")
ASCII_LINE = re.compile(r"^[\x20-\x7e]{1,120}$")
FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Remote:
    """The webhook server and an apiserver-like HTTPS client, on an event loop in a background thread."""

    def __init__(self, cert_dir: Path) -> None:
        self.paths = write_cert_bundle(cert_dir, "ipguard", "ipguard", ["127.0.0.1"])
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.thread.start()
        self.state = AdmissionState(fixture_cluster((A,)), Settings(zone_reserve=2))
        self.reloader = CertReloader(self.paths.tls_cert, self.paths.tls_key)
        self.server = WebhookServer(self.state, self.reloader)
        self.running: RunningServer = self.run(start_server(self.server, "127.0.0.1", 0, self.reloader.context))
        self.session: aiohttp.ClientSession = self.run(self._session())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(self.paths.ca_cert)))

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        # A hang is a failure: the apiserver gives up after ?timeout=Ns.
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _request(self, method: str, path: str, body: bytes | None, content_type: str) -> tuple[int, bytes]:
        headers = {"Content-Type": content_type, "User-Agent": "kube-apiserver-admission",
                   "Accept": "application/json, */*"}
        async with self.session.request(method, f"{self.running.url}{path}", data=body, headers=headers,
                                        server_hostname=SERVER_NAME) as response:
            return response.status, await response.read()

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        return self.run(self._request("POST", f"{path}?timeout=5s", body, content_type))

    def get(self, path: str) -> tuple[int, bytes]:
        return self.run(self._request("GET", path, None, "application/json"))

    def close(self) -> None:
        async def stop() -> None:
            await self.session.close()
            await self.running.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    # Thousands of "bad admission request" warnings are expected here; only errors are of interest.
    server_log = logging.getLogger("ipguard.server")
    level = server_log.level
    server_log.setLevel(logging.ERROR)
    server = Remote(tmp_path_factory.mktemp("fuzz-certs"))
    yield server
    # No unexpected handler error in the whole module, and still healthy at the end.
    assert server.server.metrics.errors.values == {}
    assert server.get("/healthz") == (200, b"ok\n")
    server.close()
    server_log.setLevel(level)


def known_uid(document: Any) -> str | None:
    request = document.get("request") if isinstance(document, dict) else None
    uid = request.get("uid") if isinstance(request, dict) else None
    return uid if isinstance(uid, str) and uid else None


def check(remote: Remote, path: str, body: bytes, content_type: str = "application/json") -> int:
    status, data = remote.post(path, body, content_type)
    assert status in (200, 400, 413), (status, data[:300])
    answer = json.loads(data)
    if status != 200:
        assert isinstance(answer["error"], str) and answer["error"] and answer["status"] == status
        return status
    document = json.loads(body)
    assert answer["apiVersion"] == document["apiVersion"] and answer["apiVersion"] in API_VERSIONS
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == known_uid(document) is not None
    assert isinstance(response["allowed"], bool)
    if path == "/validate":
        assert "patch" not in response and "patchType" not in response
    elif "patch" in response:
        assert response["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
        obj = document["request"]["object"]
        jsonpatch.apply_patch(obj, ops)  # never an add under a missing parent, whatever the object looks like
    if not response["allowed"]:
        assert response["status"]["code"] == 403 and response["status"]["reason"] == "Forbidden"
    for warning in response.get("warnings", []):
        assert ASCII_LINE.match(warning), warning
    for key in response.get("auditAnnotations", {}):
        assert key and "/" not in key
    # An internal error is admitted unchecked (a 200): none may happen, whatever the input.
    assert response.get("auditAnnotations", {}).get("outcome") != "error", response
    return status


# ---- strategies ---------------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20), st.sampled_from(["", "x" * 3000, "CREATE", "Pod", "\u0000", "-1"]))
json_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                               max_size=4),
    max_leaves=15)
wrong_values = st.one_of(st.sampled_from([None, 0, -1, 1.5, True, False, "", "x", [], [None], {}, {"a": 1},
                                          [{}], "x" * 1000]), json_values)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths_of(child, (*prefix, i))


DOCUMENTS = {name: fixture_review(name) for name in ADMISSION_FIXTURES}
PATHS = {name: [("request", *p) for p in paths_of(doc["request"])] for name, doc in DOCUMENTS.items()}


@st.composite
def mutated_reviews(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(ADMISSION_FIXTURES))
    document = copy.deepcopy(DOCUMENTS[name])
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(document.get("request"), dict | list):
            break
        paths = list(paths_of(document["request"]))
        path = ("request", *draw(st.sampled_from(paths)))
        parent: Any = document
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        if draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = copy.deepcopy(draw(wrong_values))  # sampled constants are shared objects
    if draw(st.integers(0, 9)) == 0:
        document["apiVersion"] = "admission.k8s.io/v1beta1"
    return name, json.dumps(document).encode()


# ---- the fuzz tests ---------------------------------------------------------------------------------------


@FUZZ
@given(body=st.binary(max_size=2000), endpoint=st.sampled_from(["/mutate", "/validate"]))
def test_random_bytes(remote: Remote, body: bytes, endpoint: str) -> None:
    assert check(remote, endpoint, body) == 400


@FUZZ
@given(value=json_values, endpoint=st.sampled_from(["/mutate", "/validate"]))
def test_random_json(remote: Remote, value: Any, endpoint: str) -> None:
    assert check(remote, endpoint, json.dumps(value).encode()) == 400


@FUZZ
@given(request=st.dictionaries(st.sampled_from(["uid", "kind", "resource", "operation", "object", "namespace",
                                                "name", "dryRun", "oldObject"]), json_values),
       endpoint=st.sampled_from(["/mutate", "/validate"]))
def test_random_review_shaped_json(remote: Remote, request: dict[str, Any], endpoint: str) -> None:
    document = {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}
    check(remote, endpoint, json.dumps(document).encode())


@settings(FUZZ, max_examples=300)
@given(case=mutated_reviews(), endpoint=st.sampled_from(["/mutate", "/validate"]))
def test_mutated_fixture_documents(remote: Remote, case: tuple[str, bytes], endpoint: str) -> None:
    check(remote, endpoint, case[1])


@pytest.mark.parametrize("name", ADMISSION_FIXTURES)
def test_wrong_type_at_every_request_path(remote: Remote, name: str) -> None:
    """Systematically: every path of this request, deleted and replaced by each kind of wrong value."""
    document = DOCUMENTS[name]
    endpoint = "/mutate" if ".mutate" in name else "/validate"
    statuses = []
    for path in PATHS[name][1:]:
        if len(path) > 5:  # deep inside managedFields and the like: the sampled fuzz above goes there
            continue
        replacements: tuple[Any, ...] = ("<delete>", None, 7, "x", [])
        for replacement in replacements:
            mutated = copy.deepcopy(document)
            parent: Any = mutated
            for part in path[:-1]:
                parent = parent[part]
            if replacement == "<delete>":
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
            statuses.append(check(remote, endpoint, json.dumps(mutated).encode()))
    assert statuses and set(statuses) <= {200, 400}


def test_wrong_content_types_and_methods(remote: Remote) -> None:
    body = json.dumps(DOCUMENTS["pod-create-generatename.validate.json"]).encode()
    for content_type in ("text/plain", "application/x-yaml", "multipart/form-data; boundary=x", "application/jsonx"):
        assert check(remote, "/validate", body, content_type) == 400
    assert remote.run(remote._request("GET", "/validate", None, "application/json"))[0] == 405
    assert remote.run(remote._request("PUT", "/mutate", body, "application/json"))[0] == 405
    assert remote.get("/nowhere")[0] == 404
    assert check(remote, "/validate", body) == 200


def test_still_healthy_after_the_fuzzing(remote: Remote) -> None:
    assert remote.get("/healthz") == (200, b"ok\n")
    assert remote.get("/readyz") == (200, b"ok\n")
    status, text = remote.get("/metrics")
    assert status == 200 and b"ipguard_bad_requests_total" in text
    assert check(remote, "/mutate", json.dumps(DOCUMENTS["pod-create-generatename.mutate.json"]).encode()) == 200
    assert remote.server.metrics.errors.values == {}


# ---- pods of any shape the parser lets through, straight into the handler (many more examples) ---------------

LABEL_KEYS = ["topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone", "kubernetes.io/hostname",
              "kubernetes.io/os", "eks.amazonaws.com/fargate-profile", "kubernetes.io/config.mirror",
              "ipguard.io/steered", "vpc.amazonaws.com/pod-eni", "app"]
STRINGS: dict[str, st.SearchStrategy[Any]] = {
    "key": st.sampled_from(LABEL_KEYS),
    "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt", "in", ""]),
    "values": st.sampled_from(["us-east-1a", "us-east-1b", "us-east-1c", "ip-10-0-1-10.ec2.internal", "", "1"]),
    "nodeName": st.sampled_from(["ip-10-0-1-10.ec2.internal", "ip-10-0-2-20.ec2.internal", "unknown", ""]),
    "schedulerName": st.sampled_from(["default-scheduler", "fargate-scheduler", ""]),
    "namespace": st.sampled_from(["payments", "kube-system", ""]),
    "*": st.sampled_from(["us-east-1a", "us-east-1b", "windows", "linux", "true", "", '{"avoidZones":["a"]}',
                          '{"avoidZones":["us-east-1a"],"kept":[[0,"topology.kubernetes.io/zone"]]}']),
}


def from_shape(shape: Any, key: str = "") -> st.SearchStrategy[Any]:
    """Values that mostly have the Pod shape ipguard reads, sometimes null, sometimes anything at all."""
    if isinstance(shape, dict):
        fields = {k: from_shape(v, k) for k, v in shape.items() if k != "*"}
        valid: st.SearchStrategy[Any] = st.fixed_dictionaries({}, optional=fields)
        if "*" in shape:
            valid = st.dictionaries(st.sampled_from(LABEL_KEYS), from_shape(shape["*"], "*"), max_size=3)
        elif key in ("requests", "limits"):
            valid = st.dictionaries(st.sampled_from(["cpu", "vpc.amazonaws.com/pod-eni"]), st.just("1"), max_size=2)
    elif isinstance(shape, list):
        valid = st.lists(from_shape(shape[0], key), max_size=3)
    elif shape == "string":
        valid = STRINGS.get(key, STRINGS["*"])
    elif shape == "boolean":
        valid = st.booleans()
    else:
        valid = st.integers(-5, 200)
    return st.integers(0, 19).flatmap(lambda i: json_values if i == 0 else st.none() if i == 1 else valid)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=from_shape(_POD_SHAPE), operation=st.sampled_from(["CREATE", "CREATE", "UPDATE", "DELETE"]),
       dry_run=st.booleans(), exhausted=st.sampled_from([(), ("us-east-1a",), ("us-east-1a", "us-east-1b",
                                                                              "us-east-1c")]))
def test_handler_on_any_pod_shape(obj: Any, operation: str, dry_run: bool, exhausted: tuple[str, ...]) -> None:
    document = copy.deepcopy(DOCUMENTS["pod-create-generatename.mutate.json"])
    document["request"].update(object=obj, operation=operation, dryRun=dry_run)
    body = json.dumps(document).encode()
    try:
        review = parse_review(body)
    except BadReview as exc:
        assert exc.status == 400 and exc.reason
        event("400")
        return
    state = AdmissionState(fixture_cluster(exhausted), Settings(zone_reserve=2))
    stages: tuple[Stage, ...] = ("mutate", "validate")
    for stage in stages:
        answer = handle(review, stage, state)
        response = answer.response
        event(f"{stage}: {answer.outcome}{' +patch' if answer.patch else ''}")
        assert response["uid"] == review.uid
        for warning in response.get("warnings", []):
            assert ASCII_LINE.match(warning), warning
        if answer.patch:
            assert stage == "mutate"
            jsonpatch.apply_patch(obj, answer.patch)
        else:
            assert "patch" not in response


# ---- model robustness found by this fuzzing (the parser now keeps such pods away from the model) --------------


def test_model_display_name_on_a_malformed_pod() -> None:
    from webhook.model.decide import decide

    decision = decide({"metadata": {"generateName": -1}, "spec": {}}, fixture_cluster(), Settings(),
                      namespace="payments")
    assert decision.pod == "payments/*"


def test_model_allowed_zones_on_a_malformed_node_selector() -> None:
    from webhook.model.pods import allowed_zones

    # a zone value that is not a string matches no zone
    assert allowed_zones({"spec": {"nodeSelector": {"topology.kubernetes.io/zone": ["us-east-1a"]}}},
                         ["us-east-1a"]) == []
