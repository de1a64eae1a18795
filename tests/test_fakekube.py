"""Tests for tests.fakekube: the real kubernetes_asyncio client against the fake API server, and the wire format
compared with the kube-apiserver captures in tests/fixtures/apiserver."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.fakekube import ApiError, FakeKube, decode_continue, encode_continue, query_bool
from tests.paths import FIXTURES

ENI = ("crd.k8s.amazonaws.com", "v1alpha1", "eniconfigs")
SGP = ("vpcresources.k8s.aws", "v1beta1", "securitygrouppolicies")
CNINODE = ("vpcresources.k8s.aws", "v1alpha1", "cninodes")


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def fixture_lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line]


def fixture_nodes() -> list[dict[str, Any]]:
    pages = [fixture_json(f"listwatch-nodes-limit2-page{i}.json") for i in (1, 2)]
    return [item for page in pages for item in page["items"]]


def make_node(name: str, zone: str = "us-east-1a") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "spec": {"providerID": f"aws:///{zone}/i-0123456789abcdef0"},
        "status": {"allocatable": {"pods": "29"}},
    }


def make_pod(name: str, namespace: str, node: str | None = None, app: str = "api") -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    if node:
        spec["nodeName"] = node
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": spec,
        "status": {"phase": "Pending"},
    }


@pytest.fixture
async def fk() -> AsyncIterator[FakeKube]:
    server = FakeKube(bookmark_interval=0.1)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def api(fk: FakeKube) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(client.Configuration(host=fk.url)) as api_client:
        yield api_client


@pytest.fixture
async def http(fk: FakeKube) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(fk.url) as session:
        yield session


async def load_fixture_nodes(fk: FakeKube) -> None:
    for node in fixture_nodes():
        await fk.create("nodes", node)


async def next_event(w: watch.Watch) -> dict[str, Any]:
    ev: dict[str, Any] = await asyncio.wait_for(w.__anext__(), 5)
    return ev


async def next_bookmark_at(w: watch.Watch, rv: int) -> dict[str, Any]:
    """Skip (earlier) bookmarks until one carries ``rv``; anything but a BOOKMARK on the way is a failure."""
    for _ in range(100):
        ev = await next_event(w)
        assert ev["type"] == "BOOKMARK", ev["type"]
        if ev["raw_object"]["metadata"]["resourceVersion"] == str(rv):
            return ev
    raise AssertionError(f"no bookmark at {rv}")


def body_of(exc: ApiException) -> Any:
    """ApiException.body is the decoded *str* body at runtime (annotated bytes | None)."""
    body: Any = exc.body
    return body


# ---------------------------------------------------------------------------------------------------------------
# lists
# ---------------------------------------------------------------------------------------------------------------


async def test_pagination_with_real_client(fk: FakeKube, api: client.ApiClient) -> None:
    await load_fixture_nodes(fk)
    v1 = client.CoreV1Api(api)
    page1 = await v1.list_node(limit=2)
    assert [n.metadata.name for n in page1.items] == ["ip-10-0-1-10.ec2.internal", "ip-10-0-1-11.ec2.internal"]
    assert page1.metadata.remaining_item_count == 2
    rv = page1.metadata.resource_version
    assert rv == str(fk.resource_version)
    # same token format (and start key) as the real apiserver's page-1 token
    real = decode_continue(fixture_json("listwatch-nodes-limit2-page1.json")["metadata"]["continue"])
    assert decode_continue(page1.metadata._continue) == (int(rv), real[1])
    assert page1.metadata._continue == encode_continue(int(rv), "ip-10-0-1-11.ec2.internal\x00")
    page2 = await v1.list_node(limit=2, _continue=page1.metadata._continue)
    assert [n.metadata.name for n in page2.items] == ["ip-10-0-2-20.ec2.internal", "ip-10-0-3-30.ec2.internal"]
    assert page2.metadata._continue is None and page2.metadata.remaining_item_count is None
    assert page2.metadata.resource_version == rv
    full = await v1.list_node()
    assert [n.metadata.name for n in full.items] == [n.metadata.name for n in page1.items + page2.items]
    assert full.items[0].status.allocatable["pods"] == "29"


async def test_continue_is_served_as_of_the_list_resource_version(fk: FakeKube, api: client.ApiClient) -> None:
    await load_fixture_nodes(fk)
    v1 = client.CoreV1Api(api)
    page1 = await v1.list_node(limit=2)
    before = {n["metadata"]["name"]: n["metadata"]["resourceVersion"] for n in await fk.objects("nodes")}
    await fk.patch("nodes", "ip-10-0-2-20.ec2.internal", {"metadata": {"labels": {"changed": "yes"}}})
    await fk.delete("nodes", "ip-10-0-3-30.ec2.internal")
    await fk.create("nodes", make_node("ip-10-0-9-99.ec2.internal"))
    page2 = await v1.list_node(limit=2, _continue=page1.metadata._continue)
    assert {n.metadata.name: n.metadata.resource_version for n in page2.items} == {
        "ip-10-0-2-20.ec2.internal": before["ip-10-0-2-20.ec2.internal"],
        "ip-10-0-3-30.ec2.internal": before["ip-10-0-3-30.ec2.internal"],
    }
    assert "changed" not in (page2.items[0].metadata.labels or {})
    now = await v1.list_node()
    assert [n.metadata.name for n in now.items][-2:] == ["ip-10-0-2-20.ec2.internal", "ip-10-0-9-99.ec2.internal"]
    assert int(now.metadata.resource_version) == fk.resource_version


async def test_remaining_item_count_with_history(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    await fk.create_many("nodes", [make_node(f"n{i:02d}") for i in range(10)])
    async with http.get("/api/v1/nodes", params={"limit": "3"}) as r:
        page1 = await r.json()
    assert page1["metadata"]["remainingItemCount"] == 7
    await fk.delete("nodes", "n05")
    await fk.create("nodes", make_node("n99"))
    async with http.get("/api/v1/nodes", params={"limit": "3", "continue": page1["metadata"]["continue"]}) as r:
        page2 = await r.json()
    assert [i["metadata"]["name"] for i in page2["items"]] == ["n03", "n04", "n05"]
    assert page2["metadata"]["remainingItemCount"] == 4  # n06..n09 as of the first page


async def test_list_wire_shape_matches_fixtures(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    await load_fixture_nodes(fk)
    for pod in fixture_json("listwatch-pods-limit500.json")["items"]:
        await fk.create("pods", pod)
    real1 = fixture_json("listwatch-nodes-limit2-page1.json")
    async with http.get("/api/v1/nodes", params={"limit": "2"}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert r.headers["Cache-Control"] == "no-cache, private"
        assert "Audit-Id" in r.headers
        raw = await r.read()
        ours = json.loads(raw)
    assert raw.endswith(b"]}\n") and raw.count(b"\n") == 1 and b": " not in raw[:200]  # compact, like Go's
    assert list(ours) == list(real1) == ["kind", "apiVersion", "metadata", "items"]
    assert (ours["kind"], ours["apiVersion"]) == ("NodeList", "v1")
    assert list(ours["metadata"]) == list(real1["metadata"])
    for item in ours["items"]:
        assert "kind" not in item and "apiVersion" not in item
        assert list(item) == ["metadata", "spec", "status"]
    assert list(ours["items"][0]["metadata"])[:4] == ["name", "uid", "resourceVersion", "creationTimestamp"]
    real2 = fixture_json("listwatch-nodes-limit2-page2.json")
    async with http.get("/api/v1/nodes", params={"limit": "2", "continue": ours["metadata"]["continue"]}) as r:
        ours2 = await r.json()
    assert list(ours2) == list(real2) and list(ours2["metadata"]) == list(real2["metadata"]) == ["resourceVersion"]
    # same nodes, same content apart from server-assigned metadata
    for mine, theirs in zip(ours["items"] + ours2["items"], real1["items"] + real2["items"], strict=True):
        for k in ("uid", "resourceVersion", "creationTimestamp"):
            mine["metadata"].pop(k), theirs["metadata"].pop(k)
        assert mine == theirs
    realp = fixture_json("listwatch-pods-limit500.json")
    async with http.get("/api/v1/pods", params={"limit": "500"}) as r:
        pods = await r.json()
    assert list(pods) == list(realp) and list(pods["metadata"]) == list(realp["metadata"])
    assert pods["kind"] == "PodList"
    assert [p["metadata"]["name"] for p in pods["items"]] == [p["metadata"]["name"] for p in realp["items"]]
    assert all(list(p) == ["metadata", "spec", "status"] for p in pods["items"])
    assert all(p["metadata"]["generation"] == 1 for p in pods["items"])


async def test_expired_continue_gives_the_real_410(fk: FakeKube, api: client.ApiClient) -> None:
    await load_fixture_nodes(fk)
    v1 = client.CoreV1Api(api)
    page1 = await v1.list_node(limit=2)
    await fk.create("nodes", make_node("ip-10-0-9-99.ec2.internal"))
    await fk.compact()
    with pytest.raises(ApiException) as ei:
        await v1.list_node(limit=2, _continue=page1.metadata._continue)
    assert ei.value.status == 410
    # byte-for-byte the captured body (same start key; the new token has rv -1)
    assert body_of(ei.value) == (FIXTURES / "listwatch-nodes-continue-expired-410.json").read_text()
    # the token handed back continues inconsistently, from the current state
    token = json.loads(body_of(ei.value))["metadata"]["continue"]
    rest = await v1.list_node(limit=10, _continue=token)
    assert [n.metadata.name for n in rest.items] == [
        "ip-10-0-2-20.ec2.internal", "ip-10-0-3-30.ec2.internal", "ip-10-0-9-99.ec2.internal"]


async def test_list_resource_version_semantics(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    await load_fixture_nodes(fk)
    old_rv = fk.resource_version
    await fk.patch("nodes", "ip-10-0-1-10.ec2.internal", {"metadata": {"labels": {"x": "1"}}})
    # Exact at an rv still in history: the old state
    async with http.get("/api/v1/nodes", params={"resourceVersion": str(old_rv),
                                                  "resourceVersionMatch": "Exact"}) as r:
        body = await r.json()
    assert body["metadata"]["resourceVersion"] == str(old_rv)
    assert "x" not in body["items"][0]["metadata"]["labels"]
    # too large -> 504 like the fixture
    real504 = fixture_json("listwatch-nodes-list-rv-too-large-504.json")
    async with http.get("/api/v1/nodes", params={"resourceVersion": "999999", "limit": "2"}) as r:
        assert r.status == 504
        assert "Transfer-Encoding" not in r.headers and "Content-Length" in r.headers
        body = await r.json()
    expected = dict(real504, message=f"Timeout: Too large resource version: 999999, current: {fk.resource_version}")
    assert body == expected
    assert list(body) == list(real504)
    # Exact at a compacted rv -> 410, byte-identical
    await fk.compact()
    async with http.get("/api/v1/nodes", params={"resourceVersion": str(old_rv),
                                                  "resourceVersionMatch": "Exact"}) as r:
        assert r.status == 410
        assert await r.read() == (FIXTURES / "listwatch-nodes-list-rv-exact-compacted-410.json").read_bytes()
    # NotOlderThan / rv=0 are served from the current state
    for params in ({"resourceVersion": "0"}, {"resourceVersion": str(old_rv)}):
        async with http.get("/api/v1/nodes", params=params) as r:
            assert r.status == 200
            assert (await r.json())["metadata"]["resourceVersion"] == str(fk.resource_version)


async def test_list_too_large_with_real_client(fk: FakeKube, api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as ei:
        await client.CoreV1Api(api).list_node(resource_version="999999", limit=2)
    assert ei.value.status == 504
    assert json.loads(body_of(ei.value))["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


# ---------------------------------------------------------------------------------------------------------------
# watch with the real client
# ---------------------------------------------------------------------------------------------------------------


async def test_watch_replays_added_modified_deleted_in_order(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create("nodes", make_node("existing"))
    rv0 = fk.resource_version
    await fk.create("nodes", make_node("n1"))
    await fk.patch("nodes", "n1", {"metadata": {"labels": {"a": "b"}}})
    await fk.patch_status("nodes", "n1", {"allocatable": {"pods": "58"}})
    await fk.delete("nodes", "n1")
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(rv0), timeout_seconds=10)
        events = [await next_event(w) for _ in range(4)]
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    rvs = [int(e["object"].metadata.resource_version) for e in events]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4 and rvs[-1] == fk.resource_version
    assert isinstance(events[0]["object"], client.V1Node)
    assert events[1]["object"].metadata.labels["a"] == "b"
    assert events[2]["object"].status.allocatable == {"pods": "58"}
    # DELETED: the last state, with a new resourceVersion
    assert events[3]["object"].status.allocatable == {"pods": "58"} and rvs[3] > rvs[2]
    assert all(e["raw_object"]["kind"] == "Node" and e["raw_object"]["apiVersion"] == "v1" for e in events)
    assert w.resource_version == str(rvs[-1])


async def test_live_watch_without_resource_version(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create("pods", make_pod("existing", "payments"))
    async with watch.Watch() as w:
        w.stream(v1.list_pod_for_all_namespaces, timeout_seconds=10)
        first = await next_event(w)  # synthetic ADDED for what already exists
        assert (first["type"], first["object"].metadata.name) == ("ADDED", "existing")
        assert isinstance(first["object"], client.V1Pod)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("pods")
        await fk.create("pods", make_pod("p1", "kube-system"))
        ev = await asyncio.wait_for(pending, 5)
        assert (ev["type"], ev["object"].metadata.namespace) == ("ADDED", "kube-system")
        await fk.update("pods", dict(ev["raw_object"], status={"phase": "Running"}))
        ev = await next_event(w)
        assert (ev["type"], ev["object"].status.phase) == ("MODIFIED", "Running")
        await fk.delete("pods", "p1", namespace="kube-system")
        ev = await next_event(w)
        assert ev["type"] == "DELETED"


async def test_bookmarks(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create("nodes", make_node("n1"))
    rv = fk.resource_version
    real = next(e for e in fixture_lines("listwatch-nodes-watch.ndjson") if e["type"] == "BOOKMARK")
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(rv), allow_watch_bookmarks=True, timeout_seconds=10)
        ev = await next_event(w)
        assert ev["type"] == "BOOKMARK"
        expected = json.loads(json.dumps(real["object"]))
        expected["metadata"]["resourceVersion"] = str(rv)
        assert ev["raw_object"] == expected  # same (zero-valued) Node as the real apiserver sends
        assert w.resource_version == str(rv)
        await fk.create("nodes", make_node("n2"))
        ev = await next_event(w)
        while ev["type"] == "BOOKMARK":  # one may have been sent before the create
            ev = await next_event(w)
        assert ev["type"] == "ADDED"
        ev = await next_event(w)  # nothing queued: the next thing is a bookmark at the current rv
        assert ev["type"] == "BOOKMARK"
        assert ev["raw_object"]["metadata"]["resourceVersion"] == str(fk.resource_version)
    rec = fk.request_log[-1]
    assert rec.watch and rec.query["watch"] == "True" and rec.query["allowWatchBookmarks"] == "True"
    # bookmarks carry the global rv: writes to other resources move it too
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(fk.resource_version), allow_watch_bookmarks=True,
                 timeout_seconds=10)
        await fk.create("configmaps", {"metadata": {"name": "c", "namespace": "default"}, "data": {}})
        await next_bookmark_at(w, fk.resource_version)


async def test_timeout_seconds_ends_the_stream(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    t0 = time.monotonic()
    events = []
    async with watch.Watch() as w:
        async for ev in w.stream(v1.list_node, resource_version=str(fk.resource_version), timeout_seconds=1):
            events.append(ev)
    assert events == []
    assert 0.9 <= time.monotonic() - t0 < 3


async def test_compaction_gives_410_from_watch_stream(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create("nodes", make_node("n1"))
    old = fk.resource_version
    await fk.patch("nodes", "n1", {"metadata": {"labels": {"x": "y"}}})
    await fk.compact()
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as ei:
            async for _ in w.stream(v1.list_node, resource_version=str(old), timeout_seconds=5):
                pass
    # kubernetes_asyncio turns the in-stream ERROR event into ApiException(status=code, reason="<reason>: <msg>")
    assert ei.value.status == 410
    assert ei.value.reason == f"Expired: too old resource version: {old} ({fk.resource_version})"
    assert fk.request_count("/api/v1/nodes", watch=True) == 1
    # without timeout_seconds the client retries a 410 once (same resourceVersion), then raises
    fk.reset_counters()
    async with watch.Watch() as w:
        with pytest.raises(ApiException) as ei:
            async for _ in w.stream(v1.list_node, resource_version=str(old)):
                pass
    assert ei.value.status == 410
    assert fk.request_count("/api/v1/nodes", watch=True) == 2
    # a watch from the compaction point itself is fine
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(fk.resource_version), timeout_seconds=5)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("nodes")
        await fk.delete("nodes", "n1")
        assert (await asyncio.wait_for(pending, 5))["type"] == "DELETED"


async def test_history_limit_evicts_like_compaction() -> None:
    fk = FakeKube(history_limit=3)
    await fk.start()
    try:
        rv0 = fk.resource_version
        await fk.create_many("nodes", [make_node(f"n{i}") for i in range(5)])
        async with (
            aiohttp.ClientSession(fk.url) as http,
            http.get("/api/v1/nodes", params={"watch": "1", "resourceVersion": str(rv0)}) as r,
        ):
            line = json.loads(await r.read())
        assert line["type"] == "ERROR" and line["object"]["code"] == 410
        assert line["object"]["message"] == f"too old resource version: {rv0} ({rv0 + 2})"
    finally:
        await fk.stop()


async def test_close_watches(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(fk.resource_version), timeout_seconds=30)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("nodes")
        assert await fk.close_watches() == 1
        with pytest.raises(StopAsyncIteration):  # clean end of stream, long before timeoutSeconds
            await asyncio.wait_for(pending, 5)
    assert fk.watcher_count() == 0
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(fk.resource_version), timeout_seconds=30)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("nodes")
        await fk.close_watches("nodes", abort=True)
        with pytest.raises(aiohttp.ClientPayloadError):  # connection dropped mid-stream
            await asyncio.wait_for(pending, 5)


# ---------------------------------------------------------------------------------------------------------------
# watch wire format
# ---------------------------------------------------------------------------------------------------------------


async def read_watch(fk: FakeKube, http: aiohttp.ClientSession, path: str, params: dict[str, str],
                     resource: str) -> tuple[aiohttp.ClientResponse, list[dict[str, Any]]]:
    """Open a watch, let it register, end it cleanly and return every line it sent."""
    async with http.get(path, params=params) as r:
        await fk.wait_for_watchers(resource)
        await fk.close_watches(resource)
        body = await r.read()
    return r, [json.loads(line) for line in body.splitlines()]


async def test_watch_wire_shape_matches_fixture(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    nodes = fixture_nodes()
    await fk.create("nodes", nodes[0])
    rv0 = fk.resource_version
    await fk.patch_status("nodes", nodes[0]["metadata"]["name"], {"conditions": []})
    await fk.create("nodes", nodes[3])
    await fk.delete("nodes", nodes[3]["metadata"]["name"])
    r, ours = await read_watch(fk, http, "/api/v1/nodes", {"watch": "1", "allowWatchBookmarks": "true",
                                                           "resourceVersion": str(rv0)}, "nodes")
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Transfer-Encoding"] == "chunked"
    real = {e["type"]: e for e in fixture_lines("listwatch-nodes-watch.ndjson")}
    assert [e["type"] for e in ours] == ["MODIFIED", "ADDED", "DELETED"]
    for ev in ours:
        assert list(ev) == ["type", "object"]
        obj, robj = ev["object"], real[ev["type"]]["object"]
        assert list(obj)[:2] == ["kind", "apiVersion"] == list(robj)[:2]
        assert list(obj) == list(robj)
        assert (obj["kind"], obj["apiVersion"]) == ("Node", "v1")
    assert int(ours[2]["object"]["metadata"]["resourceVersion"]) == fk.resource_version
    # raw bytes: one compact JSON document per line
    raw_real = (FIXTURES / "listwatch-nodes-watch.ndjson").read_bytes()
    assert raw_real.endswith(b"}\n") and b'{"type":"ADDED","object":{"kind":"Node","apiVersion":"v1",' in raw_real


async def test_watch_too_old_raw_matches_fixture(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    await fk.create("nodes", make_node("n1"))
    old = fk.resource_version - 1
    await fk.compact()
    async with http.get("/api/v1/nodes", params={"watch": "1", "allowWatchBookmarks": "true",
                                                  "resourceVersion": str(old), "timeoutSeconds": "3"}) as r:
        assert r.status == 200
        body = await r.read()
    real = (FIXTURES / "listwatch-nodes-watch-too-old-410.ndjson").read_bytes()
    assert body == real.replace(b"447 (462)", f"{old} ({fk.resource_version})".encode())


async def test_watch_future_resource_version_is_empty(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    async with http.get("/api/v1/nodes", params={"watch": "1", "allowWatchBookmarks": "true",
                                                  "resourceVersion": "999999", "timeoutSeconds": "1"}) as r:
        assert r.status == 200
        assert await r.read() == (FIXTURES / "listwatch-nodes-watch-rv-too-large-empty.ndjson").read_bytes() == b""
    assert time.monotonic() - t0 >= 0.9


@pytest.mark.parametrize("spelling", ["1", "true", "True", "yes"])
async def test_watch_parameter_is_lenient(fk: FakeKube, http: aiohttp.ClientSession, spelling: str) -> None:
    await fk.create("nodes", make_node("n1"))
    r, lines = await read_watch(fk, http, "/api/v1/nodes", {"watch": spelling}, "nodes")
    assert r.status == 200 and [e["type"] for e in lines] == ["ADDED"]


@pytest.mark.parametrize("spelling", ["0", "false", "False", "FALSE"])
async def test_watch_false_lists(fk: FakeKube, http: aiohttp.ClientSession, spelling: str) -> None:
    async with http.get("/api/v1/nodes", params={"watch": spelling}) as r:
        assert (await r.json())["kind"] == "NodeList"
    assert query_bool(None) is False and query_bool("") is True


async def test_send_initial_events(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    await fk.create("nodes", make_node("n1"))
    _, lines = await read_watch(fk, http, "/api/v1/nodes", {
        "watch": "true", "sendInitialEvents": "true", "allowWatchBookmarks": "true",
        "resourceVersionMatch": "NotOlderThan"}, "nodes")
    assert [e["type"] for e in lines][:2] == ["ADDED", "BOOKMARK"]
    assert lines[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# ---------------------------------------------------------------------------------------------------------------
# custom resources, namespaces, selectors
# ---------------------------------------------------------------------------------------------------------------


async def test_custom_resources(fk: FakeKube, api: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api)
    eni = fixture_json("eniconfig-create.mutate.json")["request"]["object"]
    await fk.create("eniconfigs", eni)
    await fk.create("eniconfigs", dict(eni, metadata={"name": "us-east-1b"}))
    sgp = fixture_json("sgp-create.mutate.json")["request"]["object"]
    await fk.create("securitygrouppolicies", sgp)
    await fk.create("sgp", dict(sgp, metadata={"name": "other", "namespace": "kube-system"}))
    await fk.create("cninodes", {"metadata": {"name": "ip-10-0-1-10.ec2.internal"},
                                 "spec": {"features": [{"name": "SecurityGroupsForPods"}]}})
    page1 = await custom.list_cluster_custom_object(*ENI, limit=1)
    assert list(page1) == ["apiVersion", "items", "kind", "metadata"]  # unstructured list: keys sorted
    assert page1["kind"] == "ENIConfigList" and page1["metadata"]["remainingItemCount"] == 1
    item = page1["items"][0]
    assert (item["apiVersion"], item["kind"]) == ("crd.k8s.amazonaws.com/v1alpha1", "ENIConfig")  # kept on items
    assert list(item) == sorted(item) and item["spec"] == eni["spec"] and item["metadata"]["generation"] == 1
    page2 = await custom.list_cluster_custom_object(*ENI, limit=1, _continue=page1["metadata"]["continue"])
    assert [i["metadata"]["name"] for i in page2["items"]] == ["us-east-1b"]
    assert page2["metadata"]["continue"] == ""
    all_sgps = await custom.list_cluster_custom_object(*SGP)
    assert [(i["metadata"]["namespace"], i["metadata"]["name"]) for i in all_sgps["items"]] == [
        ("kube-system", "other"), ("payments", "api-db-access")]
    ns_sgps = await custom.list_namespaced_custom_object(*SGP[:2], "payments", SGP[2])
    assert [i["metadata"]["name"] for i in ns_sgps["items"]] == ["api-db-access"]
    cnd = await custom.get_cluster_custom_object(*CNINODE, "ip-10-0-1-10.ec2.internal")
    assert cnd["kind"] == "CNINode"
    rv0 = fk.resource_version
    await fk.patch("eniconfigs", "us-east-1b", {"spec": {"subnet": "subnet-1"}})
    await fk.delete("eniconfigs", "us-east-1b")
    async with watch.Watch() as w:
        w.stream(custom.list_cluster_custom_object, *ENI, resource_version=str(rv0), timeout_seconds=5)
        events = [await next_event(w) for _ in range(2)]
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["spec"]["subnet"] == "subnet-1" and events[0]["object"]["kind"] == "ENIConfig"
    assert events[0]["object"]["metadata"]["generation"] == 2


async def test_disabled_crd_is_404(fk: FakeKube, api: client.ApiClient, http: aiohttp.ClientSession) -> None:
    custom = client.CustomObjectsApi(api)
    await fk.disable_crd("eniconfigs")
    with pytest.raises(ApiException) as ei:
        await custom.list_cluster_custom_object(*ENI)
    assert ei.value.status == 404
    assert json.loads(body_of(ei.value)) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "the server could not find the requested resource", "reason": "NotFound", "details": {},
        "code": 404}
    with pytest.raises(ApiException) as ei:
        async with watch.Watch() as w:
            async for _ in w.stream(custom.list_cluster_custom_object, *ENI, timeout_seconds=1):
                pass
    assert ei.value.status == 404
    async with http.get("/apis") as r:
        groups = [g["name"] for g in (await r.json())["groups"]]
    assert "crd.k8s.amazonaws.com" not in groups and "vpcresources.k8s.aws" in groups
    async with http.get("/apis/crd.k8s.amazonaws.com/v1alpha1") as r:
        assert r.status == 404
    await fk.disable_crd("securitygrouppolicies")
    async with http.get("/apis/vpcresources.k8s.aws") as r:
        group = await r.json()
    assert group["preferredVersion"]["version"] == "v1alpha1" and len(group["versions"]) == 1
    await fk.enable_crd("eniconfigs")
    assert (await custom.list_cluster_custom_object(*ENI))["items"] == []


async def test_disabled_at_construction() -> None:
    fk = FakeKube(disabled=["cninodes"])
    url = await fk.start()
    try:
        async with aiohttp.ClientSession(url) as http:
            async with http.get("/apis/vpcresources.k8s.aws/v1alpha1/cninodes") as r:
                assert r.status == 404
            async with http.get("/apis/vpcresources.k8s.aws/v1beta1/securitygrouppolicies") as r:
                assert r.status == 200
    finally:
        await fk.stop()


async def test_namespaces_and_selectors(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create_many("pods", [
        make_pod("a", "payments", node="n1"), make_pod("b", "payments", node="n2", app="db"),
        make_pod("c", "kube-system", node="n1", app="dns"), make_pod("d", "default"),
    ])
    everything = await v1.list_pod_for_all_namespaces()
    assert [(p.metadata.namespace, p.metadata.name) for p in everything.items] == [
        ("default", "d"), ("kube-system", "c"), ("payments", "a"), ("payments", "b")]
    names = [p.metadata.name for p in (await v1.list_namespaced_pod("payments")).items]
    assert names == ["a", "b"]
    on_n1 = await v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in on_n1.items] == ["c", "a"]
    unscheduled = await v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=")
    assert [p.metadata.name for p in unscheduled.items] == ["d"]
    sel = await v1.list_pod_for_all_namespaces(label_selector="app in (api,db),app!=db")
    assert [p.metadata.name for p in sel.items] == ["d", "a"]
    page = await v1.list_pod_for_all_namespaces(field_selector="metadata.namespace=payments", limit=1)
    assert page.metadata._continue and page.metadata.remaining_item_count is None  # no count with a selector
    with pytest.raises(ApiException) as ei:
        await v1.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert ei.value.status == 400
    # a selector watch sees an object leave the selection as DELETED
    rv0 = fk.resource_version
    await fk.patch("pods", "a", {"metadata": {"labels": {"app": "other"}}}, namespace="payments")
    await fk.patch("pods", "c", {"metadata": {"labels": {"app": "api"}}}, namespace="kube-system")
    async with watch.Watch() as w:
        w.stream(v1.list_pod_for_all_namespaces, label_selector="app=api", resource_version=str(rv0),
                 timeout_seconds=5)
        events = [await next_event(w) for _ in range(2)]
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("DELETED", "a"), ("ADDED", "c")]
    assert events[0]["object"].metadata.labels["app"] == "api"  # the last state that matched
    # a namespaced watch only sees its namespace
    async with watch.Watch() as w:
        w.stream(v1.list_namespaced_pod, "kube-system", resource_version=str(rv0), timeout_seconds=5)
        ev = await next_event(w)
    assert (ev["type"], ev["object"].metadata.name) == ("MODIFIED", "c")


async def test_store_metadata_and_global_resource_version(fk: FakeKube) -> None:
    rv0 = fk.resource_version
    node = await fk.create("nodes", make_node("n1"))
    pod = await fk.create("pods", {"metadata": {"generateName": "api-7d9c8b6f5d-", "namespace": "payments"},
                                   "spec": {"containers": [{"name": "c", "image": "i"}]}})
    cm = await fk.create("configmaps", {"metadata": {"name": "cfg"}, "data": {"k": "v"}})
    assert [int(o["metadata"]["resourceVersion"]) for o in (node, pod, cm)] == [rv0 + 1, rv0 + 2, rv0 + 3]
    assert node["kind"] == "Node" and "generation" not in node["metadata"] and node["metadata"]["uid"]
    assert pod["metadata"]["name"].startswith("api-7d9c8b6f5d-") and len(pod["metadata"]["name"]) == 20
    assert pod["metadata"]["generation"] == 1 and cm["metadata"]["namespace"] == "default"
    assert list(cm) == ["kind", "apiVersion", "metadata", "data"]
    # no-op update: no new resourceVersion
    again = await fk.update("nodes", node)
    assert again["metadata"]["resourceVersion"] == node["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as ei:
        await fk.update("nodes", dict(node, spec={"unschedulable": True}) | {
            "metadata": dict(node["metadata"], resourceVersion="1")})
    assert ei.value.code == 409 and ei.value.reason == "Conflict"
    with pytest.raises(ApiError) as ei:
        await fk.create("nodes", make_node("n1"))
    assert ei.value.code == 409 and ei.value.reason == "AlreadyExists"
    with pytest.raises(ApiError) as ei:
        await fk.delete("pods", "nope", namespace="payments")
    assert ei.value.body()["message"] == 'pods "nope" not found'
    assert fk.count("nodes") == 1


async def test_http_writes_with_real_client(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    created = await v1.create_namespaced_config_map("payments", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="cfg"), data={"a": "1"}))
    assert created.metadata.namespace == "payments" and created.metadata.uid
    await fk.create("nodes", make_node("n1"))
    patched = await v1.patch_node("n1", {"metadata": {"labels": {"ipguard": "yes"}}})
    assert patched.metadata.labels["ipguard"] == "yes"
    # the main resource ignores status; the status subresource takes only status
    patched = await v1.patch_node("n1", {"status": {"allocatable": {"pods": "1"}}})
    assert patched.status.allocatable == {"pods": "29"}
    patched = await v1.patch_node_status("n1", {"status": {"allocatable": {"pods": "1"}}})
    assert patched.status.allocatable == {"pods": "1"}
    with pytest.raises(ApiException) as ei:
        await v1.read_node("missing")
    assert ei.value.status == 404
    await v1.delete_namespaced_config_map("cfg", "payments")
    assert fk.count("configmaps") == 0


# ---------------------------------------------------------------------------------------------------------------
# discovery, availability, counters, threads
# ---------------------------------------------------------------------------------------------------------------


async def test_discovery(fk: FakeKube, api: client.ApiClient, http: aiohttp.ClientSession) -> None:
    version = await client.VersionApi(api).get_code()
    assert version.git_version == "v1.36.2"
    groups = await client.ApisApi(api).get_api_versions()
    assert {g.name for g in groups.groups} == {
        "admissionregistration.k8s.io", "apps", "crd.k8s.amazonaws.com", "vpcresources.k8s.aws", "karpenter.k8s.aws"}
    async with http.get("/api/v1") as r:
        names = {res["name"] for res in (await r.json())["resources"]}
    assert {"nodes", "nodes/status", "pods", "pods/status", "namespaces", "configmaps", "secrets"} <= names
    async with http.get("/apis/vpcresources.k8s.aws/v1beta1") as r:
        res = (await r.json())["resources"]
    assert res[0]["name"] == "securitygrouppolicies" and res[0]["shortNames"] == ["sgp"] and res[0]["namespaced"]
    async with http.get("/api/v1/widgets") as r:
        assert r.status == 404


async def test_pause_and_resume(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await fk.create("nodes", make_node("n1"))
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version=str(fk.resource_version), timeout_seconds=30)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("nodes")
        await fk.pause()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(pending, 5)
    with pytest.raises(aiohttp.ClientError):
        await v1.list_node()
    await fk.resume()
    assert len((await v1.list_node()).items) == 1
    await fk.pause("503")
    with pytest.raises(ApiException) as ei:
        await v1.list_node()
    assert ei.value.status == 503
    await fk.resume()
    assert len((await v1.list_node()).items) == 1


async def test_request_counters(fk: FakeKube, api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    await v1.list_node()
    await v1.list_node(limit=1)
    async with watch.Watch() as w:
        w.stream(v1.list_node, resource_version="999999", timeout_seconds=30)
        pending = asyncio.ensure_future(w.__anext__())
        await fk.wait_for_watchers("nodes")
        await fk.close_watches()
        with pytest.raises(StopAsyncIteration):
            await pending
    assert fk.requests["/api/v1/nodes"] == 3
    assert fk.request_count("/api/v1/nodes", watch=False) == 2
    assert fk.request_count("/api/v1/nodes", watch=True) == 1
    rec = next(r for r in fk.request_log if r.watch)
    assert rec.query["watch"] == "True" and rec.query["timeoutSeconds"] == "30"  # kubernetes_asyncio's spelling
    fk.reset_counters()
    assert fk.requests["/api/v1/nodes"] == 0


async def test_server_in_another_thread() -> None:
    fk = FakeKube()
    url = fk.start_in_thread()
    try:
        await fk.create("nodes", make_node("n1"))  # from this loop: runs on the server's loop
        await asyncio.to_thread(fk.call, fk.create("nodes", make_node("n2")))
        async with client.ApiClient(client.Configuration(host=url)) as api:
            nodes = await client.CoreV1Api(api).list_node()
        assert [n.metadata.name for n in nodes.items] == ["n1", "n2"]
    finally:
        fk.stop_in_thread()


async def test_bulk_load_and_paginate_quickly(fk: FakeKube, http: aiohttp.ClientSession) -> None:
    pod = make_pod("x", "ns", node="n")
    pod["metadata"]["annotations"] = {"note": "x" * 1000}
    t0 = time.monotonic()
    await fk.create_many("pods", (
        dict(pod, metadata=dict(pod["metadata"], name=f"p{i:05d}", namespace=f"ns{i % 7}")) for i in range(20_000)
    ))
    t1 = time.monotonic()
    seen = 0
    token = ""
    while True:
        params = {"limit": "500"} | ({"continue": token} if token else {})
        async with http.get("/api/v1/pods", params=params) as r:
            body = await r.json()
        seen += len(body["items"])
        token = body["metadata"].get("continue", "")
        if not token:
            break
    t2 = time.monotonic()
    assert seen == 20_000
    assert t1 - t0 < 5 and t2 - t1 < 5, (t1 - t0, t2 - t1)


def test_continue_token_roundtrip() -> None:
    real = fixture_json("listwatch-nodes-limit2-page1.json")["metadata"]["continue"]
    assert encode_continue(*decode_continue(real)) == real
    assert base64.urlsafe_b64decode(real + "==").startswith(b'{"v":"meta.k8s.io/v1","rv":424,')
