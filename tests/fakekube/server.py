"""A Kubernetes-style API server for tests and benchmarks (plain HTTP, aiohttp).

Serves list (paginated, served "as of" a resourceVersion), watch (ADDED/MODIFIED/DELETED, BOOKMARK, ERROR 410,
timeoutSeconds) and simple writes for core/v1 nodes, pods, namespaces, configmaps, secrets, apps/v1 daemonsets,
admissionregistration.k8s.io/v1 mutating/validating webhook configurations, the EKS CRDs (ENIConfig,
SecurityGroupPolicy, CNINode) and Karpenter's EC2NodeClass, reproducing the wire format captured from
kube-apiserver v1.36 in tests/fixtures/apiserver (see the README there, "List/watch facts").

Typical use::

    fk = FakeKube(bookmark_interval=0.1)
    base_url = await fk.start()
    await fk.create("nodes", {"metadata": {"name": "ip-10-0-1-10.ec2.internal"}, "spec": {}, "status": {}})
    ...
    await fk.stop()

Resource keys are the plural resource names (``"nodes"``, ``"pods"``, ``"namespaces"``, ``"configmaps"``,
``"daemonsets"``, ``"eniconfigs"``, ``"securitygrouppolicies"``, ``"cninodes"``, ``"ec2nodeclasses"``); the
singular, the Kind, the short names (``"sgp"``, ``"cnd"``, ...) and ``plural.group`` are accepted as aliases.

Run standalone (e.g. for a benchmark in another process; prints the base URL):
``python -c 'from tests.fakekube.server import main; main()' --port 8001``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import re
import ssl
import threading
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from .store import (
    ABORT,
    ADDED,
    CLOSE,
    JSON,
    ApiError,
    Entry,
    FieldRequirement,
    LabelRequirement,
    ListPage,
    ResourceStore,
    Store,
    TooOldResourceVersion,
    Watcher,
    bad_request,
    not_found_path,
    parse_field_selector,
    parse_label_selector,
)

T = TypeVar("T")

PauseMode = Literal["refuse", "503", "stall"]

_WRITE_BATCH = 256 * 1024
_STATUS_VERBS = ["get", "patch", "update"]
_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    watch: bool
    authorization: str | None = None


def query_bool(value: str | None) -> bool:
    """kube-apiserver's lenient bool parsing of query parameters: absent -> false; ``0``/``false`` (any case) ->
    false; anything else (``1``, ``true``, ``True``, ``yes``, even empty) -> true."""
    if value is None:
        return False
    return not (value == "0" or value.lower() == "false")


def _version_priority(version: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (-1, 0, 0)
    stage = {"alpha": 0, "beta": 1, None: 2}[m.group(2)]
    return (stage, int(m.group(1)), int(m.group(3) or 0))


class FakeKube:
    """In-process fake kube-apiserver. All mutators are coroutines that may be awaited from any event loop or
    thread: they run on the server's loop, so watchers see writes in resourceVersion order."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 1.0,
        history_limit: int = 10_000,
        disabled: Iterable[str] = (),
        default_watch_timeout: float | None = None,
        git_version: str = "v1.36.2",
        start_resource_version: int = 1,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        #: serve HTTPS with this context (as a real apiserver does), plain HTTP without one
        self.ssl_context = ssl_context
        self.port = port
        #: seconds between BOOKMARK events on watches with allowWatchBookmarks=true (0 disables them)
        self.bookmark_interval = bookmark_interval
        #: used when a watch has no timeoutSeconds (None: the stream stays open until closed)
        self.default_watch_timeout = default_watch_timeout
        self.git_version = git_version
        self.store = Store(history_limit=history_limit, start_rv=start_resource_version)
        for key in disabled:
            self.store.resolve(key).enabled = False
        #: number of requests per URL path (all methods, lists and watches alike)
        self.requests: Counter[str] = Counter()
        #: the most recent requests (bounded)
        self.request_log: deque[RequestRecord] = deque(maxlen=100_000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._paused: PauseMode | None = None
        self._watches: dict[Watcher, web.BaseRequest] = {}
        self._watch_change = asyncio.Event()
        self._thread: threading.Thread | None = None
        self._flowschema_uid = str(uuid.uuid4())
        self._prioritylevel_uid = str(uuid.uuid4())
        #: awaited with (method, path) before each request is handled: lets a test order concurrent requests, or
        #: answer for the server by raising ApiError (a 403 from RBAC, say)
        self.before_request: Callable[[str, str], Awaitable[None]] | None = None

    # ==========================================================================================================
    # lifecycle
    # ==========================================================================================================

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion (etcd revision)."""
        return self.store.rv

    async def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``)."""
        self._loop = asyncio.get_running_loop()
        self._watch_change = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.on_response_prepare.append(self._add_headers)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await self._listen()
        return self.url

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """End open watches cleanly and stop serving."""

        async def run() -> None:
            if self._runner is None:
                return
            self._end_watches(None, abort=False)
            await self._runner.cleanup()
            self._runner = None
            self._site = None

        await self._on_loop_async(run)

    def start_in_thread(self) -> str:
        """Run the server on its own event loop in a daemon thread; returns the base URL. Use ``call`` (or await
        the async methods from any loop) to mutate state, and ``stop_in_thread`` to finish."""
        loop = asyncio.new_event_loop()
        started: concurrent.futures.Future[str] = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                started.set_result(loop.run_until_complete(self.start()))
            except BaseException as exc:  # pragma: no cover - startup failure
                started.set_exception(exc)
                return
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fakekube", daemon=True)
        self._thread.start()
        return started.result(timeout=30)

    def stop_in_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Run a coroutine (e.g. ``fk.create(...)``) on the server loop from a plain thread and wait for it."""
        if self._loop is None:
            raise RuntimeError("FakeKube is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _on_loop(self, fn: Callable[[], T]) -> T:
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover
            running = None
        if loop is None or running is loop or loop.is_closed():
            return fn()

        async def run() -> T:
            return fn()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), loop))

    # ==========================================================================================================
    # state mutation / inspection for tests
    # ==========================================================================================================

    def _obj(self, rs: ResourceStore, e: Entry) -> JSON:
        out: JSON = orjson.loads(rs.object_bytes(e.raw))
        return out

    async def create(self, resource_key: str, obj: JSON, *, namespace: str | None = None) -> JSON:
        """Create an object (sets uid, creationTimestamp, resourceVersion, generation); returns it as a GET
        would. Namespaced objects default to ``metadata.namespace`` then ``"default"``."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(lambda: self._obj(rs, self.store.create(rs, obj, namespace)))

    async def create_many(self, resource_key: str, objs: Iterable[JSON], *, namespace: str | None = None) -> int:
        """Bulk create (one ADDED event each); much faster than ``create`` in a loop. Returns the count."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(lambda: self.store.create_many(rs, objs, namespace))

    async def update(self, resource_key: str, obj: JSON, *, namespace: str | None = None) -> JSON:
        """Replace an object entirely (spec, status, metadata; uid/creationTimestamp kept). If
        ``obj.metadata.resourceVersion`` is set it must be current (else ApiError 409). A no-op update creates
        no event and no new resourceVersion."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(lambda: self._obj(rs, self.store.update(rs, obj, namespace=namespace)))

    replace = update

    async def patch(
        self, resource_key: str, name: str, patch: JSON | list[JSON], *, namespace: str | None = None
    ) -> JSON:
        """JSON merge patch (dict) or JSON patch (list of ops) of the whole object, status included."""
        rs = self.store.resolve(resource_key)
        ptype = "json" if isinstance(patch, list) else "merge"
        return await self._on_loop(
            lambda: self._obj(rs, self.store.patch(rs, name, namespace, patch, patch_type=ptype))
        )

    async def patch_status(
        self, resource_key: str, name: str, status: JSON, *, namespace: str | None = None
    ) -> JSON:
        """Merge-patch ``status`` (like ``kubectl patch --subresource=status --type=merge``)."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(
            lambda: self._obj(rs, self.store.patch(rs, name, namespace, {"status": status}, subresource="status"))
        )

    async def delete(self, resource_key: str, name: str, *, namespace: str | None = None) -> JSON:
        """Delete immediately (no graceful deletion); returns the last state, with its new resourceVersion."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(lambda: self._obj(rs, self.store.delete(rs, name, namespace)))

    async def get(self, resource_key: str, name: str, *, namespace: str | None = None) -> JSON:
        """The stored object (with kind/apiVersion); ApiError 404 if missing."""
        rs = self.store.resolve(resource_key)
        return await self._on_loop(lambda: self._obj(rs, self.store.get(rs, name, namespace)))

    async def objects(self, resource_key: str, *, namespace: str | None = None) -> list[JSON]:
        """All stored objects of a resource (in key order), with kind/apiVersion."""
        rs = self.store.resolve(resource_key)

        def run() -> list[JSON]:
            lo, hi = rs.prefix_range(namespace if rs.rt.namespaced else None)
            return [self._obj(rs, rs.objects[k]) for k in rs.keys if k >= lo and (hi is None or k < hi)]

        return await self._on_loop(run)

    def count(self, resource_key: str) -> int:
        return len(self.store.resolve(resource_key).objects)

    async def compact(self, resource_key: str | None = None) -> None:
        """Drop the event history (all resources, or one): continue tokens and watches from an older
        resourceVersion now get 410 Gone, like after ``etcdctl compact`` + apiserver restart."""
        rs = self.store.resolve(resource_key) if resource_key else None
        await self._on_loop(lambda: self.store.compact(rs))

    async def close_watches(self, resource_key: str | None = None, *, abort: bool = False) -> int:
        """End the open watch streams (of one resource or all). ``abort=False``: the stream ends cleanly (final
        chunk), as when the apiserver closes a watch early; ``abort=True``: the TCP connection is dropped
        mid-stream (the client sees a payload/connection error). Returns the number of streams closed."""
        rs = self.store.resolve(resource_key) if resource_key else None
        return await self._on_loop(lambda: self._end_watches(rs, abort=abort))

    def _end_watches(self, rs: ResourceStore | None, *, abort: bool) -> int:
        n = 0
        for w in list(self._watches):
            if rs is None or w.rs is rs:
                w.queue.put_nowait(ABORT if abort else CLOSE)
                n += 1
        return n

    async def set_enabled(self, resource_key: str, enabled: bool) -> None:
        """Enable/disable a resource (meant for CRDs): disabled paths answer 404 like a missing CRD, discovery
        omits it, and its open watches are closed. Stored objects are kept."""
        rs = self.store.resolve(resource_key)

        def run() -> None:
            rs.enabled = enabled
            if not enabled:
                self._end_watches(rs, abort=False)

        await self._on_loop(run)

    async def disable_crd(self, resource_key: str) -> None:
        await self.set_enabled(resource_key, False)

    async def enable_crd(self, resource_key: str) -> None:
        await self.set_enabled(resource_key, True)

    async def pause(self, mode: PauseMode = "refuse") -> None:
        """Make the API server "gone". ``"refuse"``: stop listening and drop every open connection (watches
        included), so clients get connection refused/reset. ``"503"``: keep listening but answer every request
        with 503 ServiceUnavailable; open watches are ended cleanly. ``"stall"``: a network partition: stop
        listening, and open watches stay open but send nothing (no event, no bookmark, no end) until resumed."""

        async def run() -> None:
            self._paused = mode
            if mode == "refuse":
                if self._site is not None:
                    await self._site.stop()
                    self._site = None
                self._end_watches(None, abort=True)
                if self._runner is not None and self._runner.server is not None:
                    for conn in self._runner.server.connections:
                        conn.force_close()
            elif mode == "stall":
                if self._site is not None:
                    await self._site.stop()
                    self._site = None
            else:
                self._end_watches(None, abort=False)

        await self._on_loop_async(run)

    async def resume(self) -> None:
        """Undo ``pause``: listen again on the same port."""

        async def run() -> None:
            if self._paused in ("refuse", "stall") and self._site is None and self._runner is not None:
                await self._listen()
            self._paused = None

        await self._on_loop_async(run)

    async def _on_loop_async(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        loop = self._loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover
            running = None
        if loop is None or running is loop:
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), loop))

    def watcher_count(self, resource_key: str | None = None) -> int:
        """Number of open watch streams (of one resource or all)."""
        if resource_key is None:
            return len(self._watches)
        rs = self.store.resolve(resource_key)
        return sum(1 for w in self._watches if w.rs is rs)

    async def wait_for_watchers(self, resource_key: str | None = None, count: int = 1, *,
                                within: float = 5.0) -> None:
        """Wait until at least ``count`` watches are registered (events written afterwards reach them)."""

        async def run() -> None:
            async with asyncio.timeout(within):
                while self.watcher_count(resource_key) < count:
                    await self._watch_change.wait()

        await self._on_loop_async(run)

    def _notify_watch_change(self) -> None:
        self._watch_change.set()
        self._watch_change = asyncio.Event()

    def request_count(self, path: str | None = None, *, method: str | None = None,
                      watch: bool | None = None) -> int:
        """Requests seen (from the bounded ``request_log``), filtered by exact path, method and watch-ness."""
        return sum(
            1
            for r in self.request_log
            if (path is None or r.path == path)
            and (method is None or r.method == method)
            and (watch is None or r.watch == watch)
        )

    def reset_counters(self) -> None:
        self.requests.clear()
        self.request_log.clear()

    # ==========================================================================================================
    # HTTP plumbing
    # ==========================================================================================================

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        h = response.headers
        h["Audit-Id"] = str(uuid.uuid4())
        h["Cache-Control"] = "no-cache, private"
        h["X-Kubernetes-Pf-Flowschema-Uid"] = self._flowschema_uid
        h["X-Kubernetes-Pf-Prioritylevel-Uid"] = self._prioritylevel_uid

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        self.requests[path] += 1
        self.request_log.append(
            RequestRecord(request.method, path, dict(request.query), query_bool(request.query.get("watch")),
                          request.headers.get("Authorization"))
        )
        if self._paused == "refuse":  # a connection that slipped through: drop it
            request.protocol.force_close()
            return _json_response(ApiError(503, "ServiceUnavailable", "gone").body(), 503)
        if self._paused == "503":
            err = ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            return _json_response(err.body(), 503)
        try:
            if self.before_request is not None:
                await self.before_request(request.method, path)  # may answer for the server (ApiError)
            return await handler(request)
        except ApiError as exc:
            return _json_response(exc.body(), exc.code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(text="ok")
        segs = [s for s in path.split("/") if s]
        if request.method == "GET":
            doc = self._discovery(segs)
            if doc is not None:
                return _json_response(doc, 200)
        route = self._route(segs)
        if route is None:
            raise not_found_path()
        rs, namespace, name, sub = route
        method = request.method
        if name is None:
            if method == "GET":
                return await self._get_collection(request, rs, namespace)
            if method == "POST":
                if rs.rt.namespaced and namespace is None:
                    raise _method_not_allowed()
                body = await _read_json(request)
                entry = self.store.create(rs, body, namespace)
                return _raw_response(rs.object_bytes(entry.raw), 201)
            raise _method_not_allowed()
        if method == "GET":
            entry = self.store.get(rs, name, namespace)
        elif method == "PUT":
            body = await _read_json(request)
            if not isinstance(body, dict):
                raise bad_request("the body must be a JSON object")
            body_name = (body.get("metadata") or {}).get("name")
            if body_name and body_name != name:
                raise bad_request("the name of the object does not match the name on the URL")
            entry = self.store.update(
                rs, body, name=name, namespace=namespace, subresource=sub, respect_status_subresource=True
            )
        elif method == "PATCH":
            ctype = request.content_type
            if ctype == "application/json-patch+json":
                ptype = "json"
            elif ctype in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                ptype = "merge"
            else:
                raise ApiError(
                    415, "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types include: "
                    f"application/json-patch+json, application/merge-patch+json, "
                    f"application/strategic-merge-patch+json (got {ctype})",
                )
            body = await _read_json(request)
            entry = self.store.patch(
                rs, name, namespace, body, patch_type=ptype, subresource=sub, respect_status_subresource=True
            )
        elif method == "DELETE" and sub is None:
            entry = self.store.delete(rs, name, namespace)
        else:
            raise _method_not_allowed()
        return _raw_response(rs.object_bytes(entry.raw), 200)

    def _route(self, segs: list[str]) -> tuple[ResourceStore, str | None, str | None, str | None] | None:
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "v1":
            group, version, rest = "", "v1", segs[2:]
        elif len(segs) >= 4 and segs[0] == "apis":
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            return None
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] != "status":
            namespace, rest = rest[1], rest[2:]
            rs = self.store.find(group, version, rest[0])
            if rs is None or not rs.rt.namespaced:
                return None
        else:
            rs = self.store.find(group, version, rest[0])
            if rs is None or (rs.rt.namespaced and len(rest) > 1):
                return None
        if len(rest) > 3 or (len(rest) == 3 and (rest[2] != "status" or not rs.rt.status_subresource)):
            return None
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        return rs, namespace, name, sub

    # -- discovery -------------------------------------------------------------------------------------------------

    def _api_resources(self, group: str, version: str) -> list[JSON]:
        out: list[JSON] = []
        for rs in self.store.resources.values():
            rt = rs.rt
            if not rs.enabled or rt.group != group or rt.version != version:
                continue
            res: JSON = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                         "kind": rt.kind, "verbs": _VERBS}
            if rt.short_names:
                res["shortNames"] = list(rt.short_names)
            out.append(res)
            if rt.status_subresource:
                out.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                            "kind": rt.kind, "verbs": _STATUS_VERBS})
        return out

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rs in self.store.resources.values():
            if rs.enabled and rs.rt.group:
                versions = groups.setdefault(rs.rt.group, [])
                if rs.rt.version not in versions:
                    versions.append(rs.rt.version)
        for versions in groups.values():
            versions.sort(key=_version_priority, reverse=True)
        return groups

    def _group_doc(self, name: str, versions: list[str]) -> JSON:
        vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"name": name, "versions": vs, "preferredVersion": vs[0]}

    def _discovery(self, segs: list[str]) -> JSON | None:
        if segs == ["version"]:
            m = re.match(r"v(\d+)\.(\d+)", self.git_version)
            return {
                "major": m.group(1) if m else "1", "minor": m.group(2) if m else "0",
                "gitVersion": self.git_version, "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2026-11-01T00:00:00Z", "goVersion": "go1.26.4", "compiler": "gc",
                "platform": "linux/amd64",
            }
        if segs == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]}
        if segs == ["api", "v1"]:
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": self._api_resources("", "v1")}
        if segs == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [self._group_doc(g, vs) for g, vs in self._groups().items()]}
        if len(segs) == 2 and segs[0] == "apis":
            versions = self._groups().get(segs[1])
            if versions is None:
                raise not_found_path()
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(segs[1], versions)}
        if len(segs) == 3 and segs[0] == "apis":
            if segs[2] not in self._groups().get(segs[1], []):
                raise not_found_path()
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{segs[1]}/{segs[2]}",
                    "resources": self._api_resources(segs[1], segs[2])}
        return None

    # -- list ------------------------------------------------------------------------------------------------------

    async def _get_collection(
        self, request: web.Request, rs: ResourceStore, namespace: str | None
    ) -> web.StreamResponse:
        q = request.query
        labels = parse_label_selector(q.get("labelSelector"))
        fields = parse_field_selector(q.get("fieldSelector"), rs.rt)
        if query_bool(q.get("watch")):
            return await self._watch(request, rs, namespace, labels, fields)
        try:
            limit = int(q.get("limit") or 0)
        except ValueError:
            raise bad_request(f'limit: Invalid value: "{q.get("limit")}"') from None
        page = rs.list_page(
            namespace, labels, fields, limit, q.get("continue") or None, q.get("resourceVersion"),
            q.get("resourceVersionMatch") or None,
        )
        return await self._send_list(request, rs, page)

    async def _send_list(self, request: web.Request, rs: ResourceStore, page: ListPage) -> web.StreamResponse:
        head, tail = rs.list_envelope(page.rv, page.continue_token, page.remaining)
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        raws = page.raws
        step = 2000  # items per write: ~3 MiB of compact pods
        if len(raws) <= step:
            await resp.write(head + b",".join(raws) + tail)
        else:
            await resp.write(head)
            for i in range(0, len(raws), step):
                chunk = b",".join(raws[i : i + step])
                await resp.write(chunk if i == 0 else b"," + chunk)
            await resp.write(tail)
        await resp.write_eof()
        return resp

    # -- watch -----------------------------------------------------------------------------------------------------

    async def _watch(
        self,
        request: web.Request,
        rs: ResourceStore,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
    ) -> web.StreamResponse:
        q = request.query
        timeout: float | None = self.default_watch_timeout
        if q.get("timeoutSeconds"):
            try:
                secs = int(q["timeoutSeconds"])
            except ValueError:
                raise bad_request(f'timeoutSeconds: Invalid value: "{q["timeoutSeconds"]}"') from None
            if secs > 0:
                timeout = float(secs)
        bookmarks = query_bool(q.get("allowWatchBookmarks"))
        sie = q.get("sendInitialEvents")
        send_initial = query_bool(sie) if sie is not None else None
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        try:
            start = rs.open_watch(namespace, labels, fields, q.get("resourceVersion"), send_initial)
        except TooOldResourceVersion as exc:
            # HTTP 200 with a single in-stream ERROR event, then end of stream (listwatch-*-too-old-410.ndjson)
            err = ApiError(410, "Expired", str(exc))
            await resp.prepare(request)
            await resp.write(b'{"type":"ERROR","object":' + orjson.dumps(err.body()) + b"}\n")
            await resp.write_eof()
            return resp
        w = start.watcher
        self._watches[w] = request
        self._notify_watch_change()
        try:
            await resp.prepare(request)
            lines = start.replay
            for i in range(0, len(lines), 500):
                await resp.write(b"".join(lines[i : i + 500]))
            if start.initial:
                buf: list[bytes] = []
                size = 0
                for e in start.initial:
                    line = rs.line(ADDED, e.raw)
                    buf.append(line)
                    size += len(line)
                    if size >= _WRITE_BATCH:
                        await resp.write(b"".join(buf))
                        buf, size = [], 0
                if buf:
                    await resp.write(b"".join(buf))
            if send_initial and bookmarks:
                await resp.write(rs.bookmark_line(start.start_rv, {"k8s.io/initial-events-end": "true"}))
            if await self._pump(request, resp, rs, w, timeout, bookmarks):
                await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client went away
        finally:
            rs.remove_watcher(w)
            self._watches.pop(w, None)
            self._notify_watch_change()
        return resp

    async def _pump(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        rs: ResourceStore,
        w: Watcher,
        duration: float | None,
        bookmarks: bool,
    ) -> bool:
        """Forward queued events until timeout/close. Returns False if the connection was aborted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration if duration else None
        q = w.queue
        next_bookmark: float | None = None
        if bookmarks and self.bookmark_interval > 0:
            next_bookmark = loop.time() + self.bookmark_interval
        while True:
            if self._paused == "stall":
                await asyncio.sleep(0.05)  # silent, past any deadline, until resumed
                continue
            now = loop.time()
            if deadline is not None and now >= deadline:
                return True
            if next_bookmark is not None and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval
                if q.empty() and self.store.rv >= w.start_rv:
                    await resp.write(rs.bookmark_line(self.store.rv))
                continue
            wake = min((t for t in (deadline, next_bookmark) if t is not None), default=None)
            try:
                async with asyncio.timeout_at(wake):
                    item = await q.get()
            except TimeoutError:
                continue
            batch: list[bytes] = []
            while isinstance(item, bytes):
                batch.append(item)
                if q.empty() or len(batch) >= 500:
                    break
                item = q.get_nowait()
            if batch:
                await resp.write(b"".join(batch))
            if item is CLOSE:
                return True
            if item is ABORT:
                request.protocol.force_close()
                return False


# ==============================================================================================================
# helpers
# ==============================================================================================================


def _json_response(doc: JSON, status: int) -> web.Response:
    # Go's json.Encoder: compact, one trailing newline (as in every captured body)
    return web.Response(status=status, body=orjson.dumps(doc) + b"\n", content_type="application/json")


def _raw_response(body: bytes, status: int) -> web.Response:
    return web.Response(status=status, body=body + b"\n", content_type="application/json")


def _method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource",
                    details={})


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake kube-apiserver (plain HTTP) for ipguard tests/benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    parser.add_argument("--history-limit", type=int, default=10_000)
    parser.add_argument("--disable", action="append", default=[], help="resource key of a CRD to leave out")
    args = parser.parse_args(argv)

    async def run() -> None:
        fk = FakeKube(host=args.host, port=args.port, bookmark_interval=args.bookmark_interval,
                      history_limit=args.history_limit, disabled=args.disable)
        print(await fk.start(), flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fk.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
