"""Kubernetes list+watch with kubernetes-asyncio, feeding the handlers in `sources.cluster`.

One Reflector per resource: a paginated list (a consistent snapshot), then a watch from its resourceVersion
with bookmarks and a server-side timeout, re-watched from the last resourceVersion seen. On 410 Gone (in the
HTTP status or as an in-stream ERROR event) it relists and reconciles; on any other failure it backs off and
re-watches, relisting if the server has moved on. A missing CRD (404) is not an error: that feature stands
aside, said once in the log, and is looked for again now and then.

Staleness is measured by the connection, not by the time since the last event: a watch that has shown it is
good (an event or bookmark, or its first WATCH_CONFIRM seconds without the ERROR a refused resourceVersion
starts with) keeps the data current while it stays open, for at most `max_silence` (the watch's own timeout plus
WATCH_GRACE: the server ends it by then) without a byte; a silent connection is dropped at that point. Once the
watch fails, the data ages from the moment it was last known current; after a 410 it is current again only
when the relist has finished.

Responses are read raw (`_preload_content=False`) and parsed with orjson: the generated model classes cost
milliseconds per pod, and only a few fields of each object are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from webhook.sources.cluster import Handler

log = logging.getLogger("ipguard.kube")

ListCall = Callable[..., Awaitable[Any]]
LIST_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=60)
WATCH_TIMEOUT = 55  # seconds the server keeps a watch open (timeoutSeconds)
WATCH_GRACE = 5.0  # past its timeout, how long a watch may take to end before its silence means a dead connection
WATCH_CONFIRM = 1.0  # a watch with no ERROR within this long of opening is good (the API server sends it at once)
PROBE_DELAY = 2.0  # the longest wait between attempts while the API server cannot be reached
# Answers of a server that is away (restarting, or a load balancer with no server behind it), not overloaded:
# probed like a refused connection. 429 and other errors back off in full.
AWAY_STATUSES = frozenset({502, 503, 504})


class Gone(Exception):
    """410: the resourceVersion (or continue token) is too old; relist."""


class Missing(Exception):
    """404 on the collection: the CRD (or API) is not installed."""


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(slots=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    current: float = 0.0

    def next(self, cap: float | None = None) -> float:
        """The next delay: doubling up to `maximum`, or up to `cap` when given (a cheap probe)."""
        limit = self.maximum if cap is None else min(cap, self.maximum)
        self.current = self.initial if self.current == 0 else min(self.current * 2, limit)
        return self.current * random.uniform(0.8, 1.2)  # jitter, so replicas do not retry in step

    def reset(self) -> None:
        self.current = 0.0


@dataclass(slots=True)
class Reflector:
    kind: str
    call: ListCall  # an API method taking the usual list kwargs (watch, resource_version, limit, _continue, ...)
    handler: Handler
    optional: bool = False  # a CRD: missing is not an error
    page_size: int = 500
    # The server ends each watch after this long: a healthy connection is never silent for longer than that
    # (plus WATCH_GRACE), which bounds how soon a dead one can be told from a quiet one (see max_silence).
    watch_timeout: int = WATCH_TIMEOUT
    missing_retry: float = 60.0
    # Connection failures (refused, reset, timed out) and a server that is away (AWAY_STATUSES) cost the API
    # server little: retried at least this often, so a server that is back is noticed within seconds. Other error
    # answers (429 above all) back off up to the maximum.
    probe_max: float = PROBE_DELAY
    clock: Callable[[], float] = time.monotonic
    # state, read by readiness, staleness and metrics
    synced: bool = False
    connected: bool = False  # a watch stream is open
    live: bool = False  # ... and has shown it is good: the data stays current while it is open
    missing: bool = False
    last_current: float | None = None  # the last moment the data was known current
    last_heard: float = 0.0  # the last bytes of the live watch
    resource_version: str | None = None
    lists: int = 0
    relists_410: int = 0
    events: int = 0
    errors: int = 0
    skipped: int = 0  # objects the handler could not take (logged, counted, passed over)
    last_error: str | None = None  # why the last list or watch failed, until a list succeeds (for /readyz)
    backoff: Backoff = field(default_factory=Backoff)
    listed: asyncio.Event = field(default_factory=asyncio.Event)  # set once synced
    _task: asyncio.Task[None] | None = None

    @property
    def max_silence(self) -> float:
        """The longest a good watch connection stays silent: the server ends it at its timeout."""
        return self.watch_timeout + WATCH_GRACE

    def age(self) -> float | None:
        """Seconds since the data was last known current: 0 while a good watch is open, however quiet the
        resource; a connection silent for longer than max_silence ages from then (half-open is not current)."""
        if self.last_current is None:
            return None
        now = self.clock()
        if self.live:
            return max(0.0, now - self.last_heard - self.max_silence)
        return now - self.last_current

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"reflector-{self.kind}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    self.resource_version = await self._list()
                    need_list = False
                self.resource_version = await self._watch(self.resource_version)
                self.backoff.reset()
            except asyncio.CancelledError:
                self.connected = False
                raise
            except Gone:
                self.connected = False
                self.relists_410 += 1
                need_list = True
                log.info("%s: resourceVersion too old (410); relisting", self.kind)
            except Missing:
                self.connected = False
                if not self.missing:
                    log.warning("%s: not served by this cluster (CRD not installed?); this feature stands aside",
                                self.kind)
                self.missing = True
                self.synced = self.optional  # an optional resource that is absent is as synced as it gets
                if self.synced:
                    self.listed.set()
                need_list = True
                await asyncio.sleep(self.missing_retry)
            except Exception as exc:
                self.connected = False
                self.errors += 1
                self.last_error = str(exc)[:200] or type(exc).__name__
                away = isinstance(exc, (aiohttp.ClientConnectionError, TimeoutError, OSError)) or (
                    isinstance(exc, ApiError) and exc.status in AWAY_STATUSES)
                delay = self.backoff.next(self.probe_max if away else None)
                log.warning("%s: watch failed (%s); retrying in %.1fs", self.kind, exc, delay,
                            extra={"fields": {"resource": self.kind, "error": str(exc)}})
                await asyncio.sleep(delay)

    async def _request(self, **kwargs: Any) -> Any:
        response = await self.call(_preload_content=False, **kwargs)
        if response.status == 200:
            return response
        body = await response.read()
        response.release()
        message = body.decode("utf-8", "replace")[:500]
        if response.status == 410:
            raise Gone(message)
        if response.status == 404:
            raise Missing(message)
        raise ApiError(response.status, message)

    async def _list(self) -> str:
        """A paginated list; every item goes to the handler, and what the list lacks is removed after."""
        self.handler.begin_resync()
        token: str | None = None
        resource_version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_request_timeout": LIST_TIMEOUT}
            if token:
                kwargs["_continue"] = token
            response = await self._request(**kwargs)
            page = orjson.loads(await response.read())
            response.release()
            for item in page.get("items") or ():
                self._hand(self.handler.upsert, item)
            meta = page.get("metadata") or {}
            resource_version = str(meta.get("resourceVersion") or resource_version)
            token = meta.get("continue") or None
            if not token:
                break
        # Only a complete list may remove what it lacks; an interrupted one is simply listed again.
        self.handler.end_resync()
        self.lists += 1
        self.synced = True
        self.listed.set()
        self.backoff.reset()  # the server answers again: the next failure starts from a short wait
        self.missing = False
        self.last_error = None
        self.last_current = self.clock()  # current once the list (a relist after 410 too) has finished
        log.info("%s: listed at resourceVersion %s", self.kind, resource_version)
        return resource_version

    async def _watch(self, resource_version: str | None) -> str | None:
        response = await self._request(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout,
            # sock_read: a connection silent for longer than a good one can be is dropped, not waited on.
            _request_timeout=aiohttp.ClientTimeout(total=self.watch_timeout + 60, sock_connect=10,
                                                   sock_read=self.max_silence),
        )
        # Open is not yet current: a resourceVersion the server no longer has gets 200 and then a 410 ERROR.
        self.connected = True
        reader = response.content
        buffer = b""
        try:
            while True:
                if self.live:
                    chunk = await reader.readany()
                else:
                    try:
                        chunk = await asyncio.wait_for(reader.readany(), WATCH_CONFIRM)
                    except TimeoutError:
                        self._heard()  # no ERROR at its start: a good watch on a quiet resource
                        continue
                if not chunk:
                    break
                # Read chunks, not lines: one object can be larger than a stream reader's line limit.
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        resource_version = self._event(line, resource_version)
                        # Kept as it goes: a stream cut mid-way resumes from here, not from its start.
                        self.resource_version = resource_version
                if lines or self.live:
                    self._heard()
            if buffer.strip():
                resource_version = self._event(buffer, resource_version)
            self.last_current = self.clock()  # ended normally: current up to now
        except BaseException:
            if self.live:  # current until it failed, or until its silence stopped proving anything
                self.last_current = min(self.clock(), self.last_heard + self.max_silence)
            raise
        finally:
            response.release()
            self.connected = False
            self.live = False
        return resource_version

    def _heard(self) -> None:
        if not self.live:
            self.live = True
            self.backoff.reset()  # a good watch again: the next failure starts from a short wait
        self.last_heard = self.last_current = self.clock()

    def _event(self, line: bytes, resource_version: str | None) -> str | None:
        event = orjson.loads(line)
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone(str(obj.get("message")))
            raise ApiError(int(code or 500), str(obj.get("message")))
        self.events += 1
        if kind in ("ADDED", "MODIFIED"):
            self._hand(self.handler.upsert, obj)
        elif kind == "DELETED":
            self._hand(self.handler.delete, obj)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        return str(rv) if rv else resource_version

    def _hand(self, take: Callable[[Mapping[str, Any]], None], obj: Mapping[str, Any]) -> None:
        """One object to the handler. One it cannot take is logged, counted and passed over: a bad object (a pod
        anyone may create) failing the watch would replay on every retry and stop all the others for good."""
        try:
            take(obj)
        except Exception as exc:
            self.skipped += 1
            meta = obj.get("metadata") if isinstance(obj, Mapping) else None
            name = "/".join(str(meta.get(k)) for k in ("namespace", "name") if meta.get(k)) if isinstance(
                meta, Mapping) else "?"
            log.exception("%s: object %s skipped: it could not be applied (%s)", self.kind, name or "?",
                          type(exc).__name__, extra={"fields": {"resource": self.kind, "object": name}})


@dataclass(frozen=True, slots=True)
class Watched:
    kind: str
    call: ListCall
    optional: bool


def watched_resources(api: k8s.ApiClient, config_namespace: str, config_name: str) -> list[Watched]:
    """The resources ipguard watches, as list calls of the kubernetes-asyncio client."""
    core = k8s.CoreV1Api(api)
    apps = k8s.AppsV1Api(api)
    custom = k8s.CustomObjectsApi(api)

    def crd(group: str, version: str, plural: str) -> ListCall:
        async def call(**kwargs: Any) -> Any:
            return await custom.list_cluster_custom_object(group, version, plural, **kwargs)
        return call

    def in_namespace(method: ListCall, namespace: str, name: str) -> ListCall:
        async def call(**kwargs: Any) -> Any:
            return await method(namespace, field_selector=f"metadata.name={name}", **kwargs)
        return call

    return [
        Watched("nodes", core.list_node, False),
        Watched("pods", core.list_pod_for_all_namespaces, False),
        Watched("namespaces", core.list_namespace, False),
        # Labels only matter (serviceAccountSelector). Optional means absent-is-fine (404); forbidden (403: the RBAC
        # of an older release) keeps ipguard not ready, and /readyz names the resource and the error.
        Watched("serviceaccounts", core.list_service_account_for_all_namespaces, True),
        Watched("eniconfigs", crd("crd.k8s.amazonaws.com", "v1alpha1", "eniconfigs"), True),
        Watched("securitygrouppolicies", crd("vpcresources.k8s.aws", "v1beta1", "securitygrouppolicies"), True),
        Watched("cninodes", crd("vpcresources.k8s.aws", "v1alpha1", "cninodes"), True),
        Watched("ec2nodeclasses", crd("karpenter.k8s.aws", "v1", "ec2nodeclasses"), True),
        Watched("daemonsets", in_namespace(apps.list_namespaced_daemon_set, "kube-system", "aws-node"), True),
        Watched("configmaps", in_namespace(core.list_namespaced_config_map, config_namespace, config_name), True),
    ]


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


async def api_client(kubeconfig: str | None = None, context: str | None = None, host: str | None = None, *,
                     service_account_dir: Path = SERVICE_ACCOUNT_DIR,
                     environ: Mapping[str, str] | None = None) -> k8s.ApiClient:
    """In-cluster (the pod's service account: its token, re-read as it rotates, and the cluster CA) unless a
    kubeconfig or a host is given."""
    configuration = k8s.Configuration()
    if host is not None:
        configuration.host = host
    elif kubeconfig is not None or context is not None:
        await k8s_config.load_kube_config(config_file=kubeconfig, context=context,
                                          client_configuration=configuration)
    else:
        InClusterConfigLoader(
            token_filename=str(service_account_dir / "token"),
            cert_filename=str(service_account_dir / "ca.crt"),
            environ=dict(os.environ if environ is None else environ),
        ).load_and_set(configuration)
    return k8s.ApiClient(configuration)
