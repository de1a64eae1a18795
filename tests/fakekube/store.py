"""In-memory object store for the fake Kubernetes API server.

Modelled on what kube-apiserver + etcd do (see tests/fixtures/apiserver/README.md, "List/watch facts"):

* one global, monotonically increasing resourceVersion shared by every resource (etcd's revision);
* objects are kept serialized (``Entry.raw``, the bytes of a list item) so lists are a ``b",".join`` of
  ready-made bytes and 150k pods cost ~their JSON size in memory;
* each resource keeps a bounded history of events (``ResourceStore.history``, the apiserver's watch cache).
  A list page can be served "as of" any resourceVersion still covered by the history (continue tokens),
  and a watch can replay from it; anything older is "compacted" and gets 410 Gone;
* watchers are plain in-process subscribers with an ``asyncio.Queue`` each; every write renders the event line
  once and hands the same bytes to every interested watcher.

Everything here is synchronous and must run on the server's event loop (``FakeKube`` takes care of that).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import contextlib
import heapq
import json
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

JSON = dict[str, Any]

# --------------------------------------------------------------------------------------------------------------
# Errors (Status bodies)
# --------------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A failure answered as a ``kind: Status`` body; raised by the helpers too (``.code``, ``.body()``)."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: JSON | None = None,
        metadata: JSON | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.metadata = metadata

    def body(self) -> JSON:
        # Same key order as the real apiserver's Status (see listwatch-*-410.json / -504.json).
        out: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": self.metadata if self.metadata is not None else {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def not_found_path() -> ApiError:
    """What kube-apiserver answers for a group/version/resource it does not serve (e.g. a missing CRD)."""
    return ApiError(404, "NotFound", "the server could not find the requested resource", details={})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# --------------------------------------------------------------------------------------------------------------
# Resource types
# --------------------------------------------------------------------------------------------------------------

# Go zero values the apiserver puts in BOOKMARK objects. Node: captured (listwatch-nodes-watch.ndjson). The others
# are derived from the Go struct tags (non-omitempty fields), not captured; clients must only rely on
# metadata.resourceVersion.
_NODE_BOOKMARK_EXTRA: JSON = {
    "spec": {},
    "status": {
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": "",
            "osImage": "",
            "containerRuntimeVersion": "",
            "kubeletVersion": "",
            "kubeProxyVersion": "",
            "operatingSystem": "",
            "architecture": "",
        },
    },
}
_POD_BOOKMARK_EXTRA: JSON = {"spec": {"containers": None}, "status": {}}
_NAMESPACE_BOOKMARK_EXTRA: JSON = {"spec": {}, "status": {}}
_DAEMONSET_BOOKMARK_EXTRA: JSON = {
    "spec": {"selector": None, "template": {"metadata": {}, "spec": {"containers": None}}, "updateStrategy": {}},
    "status": {"currentNumberScheduled": 0, "numberMisscheduled": 0, "desiredNumberScheduled": 0, "numberReady": 0},
}


@dataclass(frozen=True)
class ResourceType:
    plural: str
    singular: str
    kind: str
    group: str  # "" for the core group
    version: str
    namespaced: bool
    crd: bool = False
    short_names: tuple[str, ...] = ()
    status_subresource: bool = True
    has_generation: bool = False
    # field selectors supported besides metadata.name / metadata.namespace
    field_paths: tuple[str, ...] = ()
    bookmark_extra: JSON = field(default_factory=dict)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def qualified(self) -> str:
        """How the apiserver names the resource in messages: ``pods``, ``daemonsets.apps``."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCE_TYPES: Final[tuple[ResourceType, ...]] = (
    ResourceType(
        "nodes", "node", "Node", "", "v1", namespaced=False, short_names=("no",),
        field_paths=("spec.unschedulable",), bookmark_extra=_NODE_BOOKMARK_EXTRA,
    ),
    ResourceType(
        "pods", "pod", "Pod", "", "v1", namespaced=True, short_names=("po",), has_generation=True,
        field_paths=(
            "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
            "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
        ),
        bookmark_extra=_POD_BOOKMARK_EXTRA,
    ),
    ResourceType(
        "namespaces", "namespace", "Namespace", "", "v1", namespaced=False, short_names=("ns",),
        field_paths=("status.phase",), bookmark_extra=_NAMESPACE_BOOKMARK_EXTRA,
    ),
    ResourceType(
        "configmaps", "configmap", "ConfigMap", "", "v1", namespaced=True, short_names=("cm",),
        status_subresource=False,
    ),
    ResourceType("secrets", "secret", "Secret", "", "v1", namespaced=True, status_subresource=False),
    ResourceType(
        "mutatingwebhookconfigurations", "mutatingwebhookconfiguration", "MutatingWebhookConfiguration",
        "admissionregistration.k8s.io", "v1", namespaced=False, status_subresource=False, has_generation=True,
    ),
    ResourceType(
        "validatingwebhookconfigurations", "validatingwebhookconfiguration", "ValidatingWebhookConfiguration",
        "admissionregistration.k8s.io", "v1", namespaced=False, status_subresource=False, has_generation=True,
    ),
    ResourceType(
        "serviceaccounts", "serviceaccount", "ServiceAccount", "", "v1", namespaced=True, short_names=("sa",),
        status_subresource=False,
    ),
    ResourceType(
        "events", "event", "Event", "", "v1", namespaced=True, short_names=("ev",), status_subresource=False,
        field_paths=("reason", "involvedObject.kind", "involvedObject.name", "involvedObject.namespace", "type"),
    ),
    ResourceType(
        "daemonsets", "daemonset", "DaemonSet", "apps", "v1", namespaced=True, short_names=("ds",),
        has_generation=True, bookmark_extra=_DAEMONSET_BOOKMARK_EXTRA,
    ),
    ResourceType(
        "eniconfigs", "eniconfig", "ENIConfig", "crd.k8s.amazonaws.com", "v1alpha1", namespaced=False,
        crd=True, status_subresource=False, has_generation=True,
    ),
    ResourceType(
        "securitygrouppolicies", "securitygrouppolicy", "SecurityGroupPolicy", "vpcresources.k8s.aws", "v1beta1",
        namespaced=True, crd=True, short_names=("sgp",), status_subresource=False, has_generation=True,
    ),
    ResourceType(
        "cninodes", "cninode", "CNINode", "vpcresources.k8s.aws", "v1alpha1", namespaced=False, crd=True,
        short_names=("cnd",), status_subresource=True, has_generation=True,
    ),
    ResourceType(
        "ec2nodeclasses", "ec2nodeclass", "EC2NodeClass", "karpenter.k8s.aws", "v1", namespaced=False, crd=True,
        short_names=("ec2nc", "ec2ncs"), status_subresource=True, has_generation=True,
    ),
)

# --------------------------------------------------------------------------------------------------------------
# Entries, events, selectors
# --------------------------------------------------------------------------------------------------------------


class Entry:
    """One stored object version. Immutable once created; ``raw`` is the list-item serialization."""

    __slots__ = ("fields", "key", "labels", "name", "namespace", "raw", "rv")

    def __init__(
        self, key: str, name: str, namespace: str, rv: int, raw: bytes, labels: dict[str, str],
        fields: dict[str, str],
    ) -> None:
        self.key = key
        self.name = name
        self.namespace = namespace
        self.rv = rv
        self.raw = raw
        self.labels = labels
        self.fields = fields

    def field(self, path: str) -> str:
        if path == "metadata.name":
            return self.name
        if path == "metadata.namespace":
            return self.namespace
        return self.fields.get(path, "")

    def obj(self) -> JSON:
        out: JSON = orjson.loads(self.raw)
        return out


ADDED: Final = "ADDED"
MODIFIED: Final = "MODIFIED"
DELETED: Final = "DELETED"


class Event:
    """A history record. ``entry`` is the new state (for DELETED: the last state with the new rv); ``prev`` the
    state before (None for ADDED)."""

    __slots__ = ("entry", "line", "prev", "rv", "type")

    def __init__(self, type_: str, entry: Entry, prev: Entry | None) -> None:
        self.type = type_
        self.entry = entry
        self.prev = prev
        self.rv = entry.rv
        self.line: bytes | None = None  # rendered lazily, once


_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$")
_SET_RE = re.compile(r"^(?P<key>[^\s!=(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        if self.op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        # "!=" / "notin" match objects without the label too (Kubernetes semantics)
        return labels.get(self.key) not in self.values


def _split_selector(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    cur: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _check_label_key(key: str, term: str) -> None:
    if not _LABEL_KEY_RE.match(key):
        raise bad_request(f"unable to parse requirement: invalid label key {key!r} in {term!r}")


def parse_label_selector(text: str | None) -> tuple[LabelRequirement, ...]:
    if not text:
        return ()
    reqs: list[LabelRequirement] = []
    for term in _split_selector(text):
        m = _SET_RE.match(term)
        if m:
            key = m.group("key")
            _check_label_key(key, term)
            values = frozenset(v.strip() for v in m.group("values").split(",") if v.strip())
            reqs.append(LabelRequirement(key, m.group("op"), values))
        elif term.startswith("!"):
            key = term[1:].strip()
            _check_label_key(key, term)
            reqs.append(LabelRequirement(key, "!exists"))
        elif "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            _check_label_key(key, term)
            reqs.append(LabelRequirement(key, "!=", frozenset({value})))
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=", 1).split("=", 1))
            _check_label_key(key, term)
            reqs.append(LabelRequirement(key, "=", frozenset({value})))
        elif any(c in term for c in "<>() "):
            raise bad_request(f"unable to parse requirement: unsupported label selector term {term!r}")
        else:
            _check_label_key(term, term)
            reqs.append(LabelRequirement(term, "exists"))
    return tuple(reqs)


@dataclass(frozen=True)
class FieldRequirement:
    path: str
    negate: bool
    value: str


def parse_field_selector(text: str | None, rt: ResourceType) -> tuple[FieldRequirement, ...]:
    if not text:
        return ()
    reqs: list[FieldRequirement] = []
    allowed = {"metadata.name", "metadata.namespace", *rt.field_paths}
    for term in _split_selector(text):
        if "!=" in term:
            path, value = term.split("!=", 1)
            negate = True
        elif "=" in term:
            path, value = term.replace("==", "=", 1).split("=", 1)
            negate = False
        else:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{term}'")
        path = path.strip()
        if path not in allowed:
            raise bad_request(f'field label not supported: {path}')
        reqs.append(FieldRequirement(path, negate, value.strip()))
    return tuple(reqs)


_SPLIT_PATHS: dict[str, tuple[str, ...]] = {}


def _extract_fields(rt: ResourceType, obj: JSON) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in rt.field_paths:
        parts = _SPLIT_PATHS.get(path)
        if parts is None:
            parts = _SPLIT_PATHS[path] = tuple(path.split("."))
        cur: Any = obj
        for part in parts:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None or cur == "":
            continue
        out[path] = ("true" if cur else "false") if isinstance(cur, bool) else str(cur)
    return out


# --------------------------------------------------------------------------------------------------------------
# Continue tokens
# --------------------------------------------------------------------------------------------------------------


def encode_continue(rv: int, start: str) -> str:
    # Go's encoding/json of {APIVersion `json:"v"`, ResourceVersion int64 `json:"rv"`, StartKey `json:"start"`};
    # json.dumps escapes NUL as \u0000 exactly like Go does.
    data = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode()).rstrip(b"=").decode()


def decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("v") != "meta.k8s.io/v1":
            raise ValueError("unknown version")
        rv = data["rv"]
        start = data["start"]
        if not isinstance(rv, int) or not isinstance(start, str) or start.startswith("/"):
            raise ValueError("malformed")
    except (ValueError, KeyError, binascii.Error, UnicodeDecodeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from None
    return rv, start


# --------------------------------------------------------------------------------------------------------------
# Object preparation
# --------------------------------------------------------------------------------------------------------------

_META_ORDER: Final = (
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "deletionGracePeriodSeconds", "labels", "annotations", "ownerReferences", "finalizers",
    "managedFields",
)
_GENERATE_CHARS: Final = "bcdfghjklmnpqrstvwxz2456789"


_now_cache: list[Any] = [0, ""]


def _now() -> str:
    """RFC 3339 UTC timestamp with second precision (cached per second: strftime is slow in bulk loads)."""
    sec = int(time.time())
    if _now_cache[0] != sec:
        _now_cache[0] = sec
        _now_cache[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out: str = _now_cache[1]
    return out


def _order_builtin(obj: JSON) -> JSON:
    """Go struct field order: metadata (in ObjectMeta order), spec/data/..., status last; no kind/apiVersion."""
    meta: JSON = obj.get("metadata") or {}
    ordered_meta: JSON = {k: meta[k] for k in _META_ORDER if k in meta}
    for k, v in meta.items():
        ordered_meta.setdefault(k, v)
    out: JSON = {"metadata": ordered_meta}
    for k, v in obj.items():
        if k not in ("kind", "apiVersion", "metadata", "status"):
            out[k] = v
    if "status" in obj:
        out["status"] = obj["status"]
    return out


def _strip_for_compare(rt: ResourceType, obj: JSON, *, keep_status: bool) -> JSON:
    out = {k: v for k, v in obj.items() if k not in ("metadata", "kind", "apiVersion")}
    if not keep_status:
        out.pop("status", None)
    return out


def _labels_of(meta: JSON) -> dict[str, str]:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise ApiError(422, "Invalid", "metadata.labels: Invalid value: must be a map of strings")
    return {str(k): str(v) for k, v in labels.items()}


# --------------------------------------------------------------------------------------------------------------
# Watchers
# --------------------------------------------------------------------------------------------------------------


def entry_matches(
    e: Entry,
    namespace: str | None,
    labels: tuple[LabelRequirement, ...],
    fields: tuple[FieldRequirement, ...],
) -> bool:
    if namespace is not None and e.namespace != namespace:
        return False
    for lr in labels:
        if not lr.matches(e.labels):
            return False
    return all((e.field(fr.path) == fr.value) != fr.negate for fr in fields)


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


CLOSE: Final = _Sentinel("CLOSE")  # end the stream normally (terminating chunk)
ABORT: Final = _Sentinel("ABORT")  # drop the connection mid-stream

QueueItem = bytes | _Sentinel


class Watcher:
    def __init__(
        self,
        rs: ResourceStore,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
        start_rv: int,
    ) -> None:
        self.rs = rs
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.start_rv = start_rv
        self.unfiltered = namespace is None and not labels and not fields
        self.queue: asyncio.Queue[QueueItem] = asyncio.Queue()

    def matches(self, e: Entry) -> bool:
        return entry_matches(e, self.namespace, self.labels, self.fields)

    def render(self, ev: Event) -> bytes | None:
        if ev.rv <= self.start_rv:
            return None
        if self.unfiltered:
            return self.rs.event_line(ev)
        cur = self.matches(ev.entry)
        if ev.type != MODIFIED:
            return self.rs.event_line(ev) if cur else None
        old = ev.prev is not None and self.matches(ev.prev)
        if cur and old:
            return self.rs.event_line(ev)
        if cur:
            return self.rs.line(ADDED, ev.entry.raw)
        if old and ev.prev is not None:
            # the object left the selection: DELETED with its previous state and the new resourceVersion
            prev_obj = ev.prev.obj()
            prev_obj["metadata"]["resourceVersion"] = str(ev.rv)
            return self.rs.line(DELETED, self.rs.dumps(prev_obj))
        return None


# --------------------------------------------------------------------------------------------------------------
# Per-resource store
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ListPage:
    rv: int
    raws: list[bytes]
    continue_token: str | None
    remaining: int | None


@dataclass
class WatchStart:
    watcher: Watcher
    replay: list[bytes]  # history lines to send first
    initial: list[Entry]  # objects to send as synthetic ADDED first
    start_rv: int


class TooOldResourceVersion(Exception):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


class ResourceStore:
    def __init__(self, owner: Store, rt: ResourceType, history_limit: int) -> None:
        self.owner = owner
        self.rt = rt
        self.enabled = True
        self.objects: dict[str, Entry] = {}
        self.keys: list[str] = []  # sorted, like etcd keys under /registry/<resource>/
        self.history: deque[Event] = deque()
        self.history_limit = history_limit
        self.evicted_rv = 0  # rv of the newest event dropped from history
        self.watchers: list[Watcher] = []
        self._dump_opt = orjson.OPT_SORT_KEYS if rt.crd else 0
        if rt.crd:
            # custom resources are unstructured: items carry apiVersion/kind, keys sorted (Go map encoding)
            self._event_prefix = b""
        else:
            self._event_prefix = orjson.dumps({"kind": rt.kind, "apiVersion": rt.api_version})[:-1] + b","

    # -- serialization -------------------------------------------------------------------------------------------

    def dumps(self, obj: JSON) -> bytes:
        return orjson.dumps(obj, option=self._dump_opt)

    def object_bytes(self, raw: bytes) -> bytes:
        """The object as a GET/watch answers it: with kind/apiVersion."""
        if not self._event_prefix:
            return raw
        return self._event_prefix + raw[1:]

    def line(self, type_: str, raw: bytes) -> bytes:
        return b'{"type":"' + type_.encode() + b'","object":' + self.object_bytes(raw) + b"}\n"

    def event_line(self, ev: Event) -> bytes:
        line = ev.line
        if line is None:
            line = ev.line = self.line(ev.type, ev.entry.raw)
        return line

    def bookmark_line(self, rv: int, annotations: dict[str, str] | None = None) -> bytes:
        meta: JSON = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        obj: JSON = {"kind": self.rt.kind, "apiVersion": self.rt.api_version, "metadata": meta}
        obj.update(self.rt.bookmark_extra)
        return b'{"type":"BOOKMARK","object":' + self.dumps(obj) + b"}\n"

    def list_envelope(self, rv: int, continue_token: str | None, remaining: int | None) -> tuple[bytes, bytes]:
        rt = self.rt
        if rt.crd:
            meta: JSON = {"continue": continue_token or "", "resourceVersion": str(rv)}
            if remaining is not None:
                meta["remainingItemCount"] = remaining
            head = b'{"apiVersion":' + orjson.dumps(rt.api_version) + b',"items":['
            tail = b'],"kind":' + orjson.dumps(rt.list_kind) + b',"metadata":' + self.dumps(meta) + b"}\n"
            return head, tail
        meta = {"resourceVersion": str(rv)}
        if continue_token:
            meta["continue"] = continue_token
        if remaining is not None:
            meta["remainingItemCount"] = remaining
        head = (
            b'{"kind":' + orjson.dumps(rt.list_kind) + b',"apiVersion":' + orjson.dumps(rt.api_version)
            + b',"metadata":' + orjson.dumps(meta) + b',"items":['
        )
        return head, b"]}\n"

    # -- keys ------------------------------------------------------------------------------------------------------

    def key_of(self, name: str, namespace: str) -> str:
        return f"{namespace}/{name}" if self.rt.namespaced else name

    @staticmethod
    def prefix_range(namespace: str | None) -> tuple[str, str | None]:
        if namespace is None:
            return "", None
        return namespace + "/", namespace + "0"  # "0" == chr(ord("/") + 1)

    # -- history -----------------------------------------------------------------------------------------------------

    @property
    def min_rv(self) -> int:
        """Oldest resourceVersion a watch or a consistent list page can still start from."""
        return max(self.owner.compacted_rv, self.evicted_rv)

    def overrides_since(self, rv: int) -> dict[str, Entry | None]:
        """For every key written after ``rv``: its state as of ``rv`` (None if it did not exist)."""
        out: dict[str, Entry | None] = {}
        for ev in reversed(self.history):
            if ev.rv <= rv:
                break
            out[ev.entry.key] = ev.prev  # iterating backwards: the earliest event after rv wins
        return out

    def record(self, ev: Event) -> None:
        if self.history_limit <= 0:
            self.evicted_rv = ev.rv
        else:
            if len(self.history) >= self.history_limit:
                self.evicted_rv = self.history.popleft().rv
            self.history.append(ev)
        for w in self.watchers:
            line = w.render(ev)
            if line is not None:
                w.queue.put_nowait(line)

    def compact(self, rv: int) -> None:
        self.history.clear()
        self.evicted_rv = max(self.evicted_rv, rv)

    # -- reads ------------------------------------------------------------------------------------------------------

    def _iter_at(self, lo: str, hi: str | None, overrides: dict[str, Entry | None]) -> Iterator[Entry]:
        keys = self.keys
        i = bisect.bisect_left(keys, lo)
        j = len(keys) if hi is None else bisect.bisect_left(keys, hi)
        objects = self.objects
        if not overrides:
            for idx in range(i, j):
                yield objects[keys[idx]]
            return
        gone = sorted(k for k in overrides if k not in objects and k >= lo and (hi is None or k < hi))
        current = (keys[idx] for idx in range(i, j))
        for k in heapq.merge(current, gone):
            e = overrides[k] if k in overrides else objects[k]
            if e is not None:
                yield e

    def _count_after(self, cursor: str, hi: str | None, overrides: dict[str, Entry | None]) -> int:
        keys = self.keys
        n = (len(keys) if hi is None else bisect.bisect_left(keys, hi)) - bisect.bisect_right(keys, cursor)
        for k, e in overrides.items():
            if k <= cursor or (hi is not None and k >= hi):
                continue
            if k in self.objects:
                if e is None:
                    n -= 1
            elif e is not None:
                n += 1
        return n

    def list_page(
        self,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
        limit: int,
        continue_token: str | None,
        resource_version: str | None,
        rv_match: str | None,
    ) -> ListPage:
        current = self.owner.rv
        prefix, hi = self.prefix_range(namespace)
        lo = prefix
        if continue_token:
            if resource_version not in (None, "", "0"):
                raise bad_request("specifying resource version is not allowed when using continue")
            tok_rv, start = decode_continue(continue_token)
            lo = prefix + start
            if tok_rv <= 0:  # "inconsistent continue" (the token handed out with a 410): current state
                at = current
            else:
                at = tok_rv
                if at < self.min_rv:
                    raise ApiError(
                        410, "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can "
                        "start a new list without the continue parameter, or use the continue token in this "
                        "response to retrieve the remainder of the results. Continuing with the provided token "
                        "results in an inconsistent list - objects that were created, modified, or deleted between "
                        "the time the first chunk was returned and now may show up in the list.",
                        metadata={"continue": encode_continue(-1, start)},
                    )
                if at > current:
                    raise _too_large(at, current)
        elif resource_version in (None, ""):
            if rv_match:
                raise bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
            at = current
        else:
            try:
                want = int(resource_version)
            except ValueError:
                raise bad_request(f'resourceVersion: Invalid value: "{resource_version}"') from None
            exact = rv_match == "Exact" or (not rv_match and limit > 0 and want != 0)
            if rv_match not in (None, "", "Exact", "NotOlderThan"):
                raise bad_request(f'resourceVersionMatch: Unsupported value: "{rv_match}"')
            if rv_match == "Exact" and want == 0:
                raise bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden "
                                  "for resourceVersion \"0\"")
            if want > current:
                raise _too_large(want, current)
            if exact:
                if want < self.min_rv:
                    raise ApiError(410, "Expired", "The resourceVersion for the provided list is too old.")
                at = want
            else:
                at = current
        overrides = self.overrides_since(at) if at < current else {}
        raws: list[bytes] = []
        it = self._iter_at(lo, hi, overrides)
        last: Entry | None = None
        has_more = False
        filtered = bool(labels or fields)
        for e in it:
            if limit > 0 and len(raws) >= limit:
                has_more = True
                break
            if not filtered or entry_matches(e, None, labels, fields):
                raws.append(e.raw)
                last = e
        token: str | None = None
        remaining: int | None = None
        if has_more and last is not None:
            token = encode_continue(at, last.key[len(prefix):] + "\x00")
            if not filtered:
                remaining = self._count_after(last.key, hi, overrides)
        return ListPage(at, raws, token, remaining)

    def open_watch(
        self,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
        resource_version: str | None,
        send_initial_events: bool | None,
    ) -> WatchStart:
        current = self.owner.rv
        replay: list[bytes] = []
        initial: list[Entry] = []
        if resource_version in (None, "", "0") or send_initial_events:
            if resource_version not in (None, "", "0"):
                want = _parse_rv(resource_version)
                if want > current:
                    raise _too_large(want, current)
            start_rv = current
            w = Watcher(self, namespace, labels, fields, start_rv)
            prefix, hi = self.prefix_range(namespace)
            initial = [e for e in self._iter_at(prefix, hi, {}) if w.matches(e)]
        else:
            want = _parse_rv(resource_version)
            if want < self.min_rv:
                raise TooOldResourceVersion(want, self.min_rv)
            start_rv = want
            w = Watcher(self, namespace, labels, fields, start_rv)
            if want < current:
                for ev in self.history:
                    if ev.rv > want:
                        line = w.render(ev)
                        if line is not None:
                            replay.append(line)
        self.watchers.append(w)
        return WatchStart(w, replay, initial, start_rv)

    def remove_watcher(self, w: Watcher) -> None:
        with contextlib.suppress(ValueError):
            self.watchers.remove(w)


def _parse_rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        raise bad_request(f'resourceVersion: Invalid value: "{value}"') from None
    if rv < 0:
        raise bad_request(f'resourceVersion: Invalid value: "{value}"')
    return rv


def _too_large(want: int, current: int) -> ApiError:
    return ApiError(
        504, "Timeout", f"Timeout: Too large resource version: {want}, current: {current}",
        details={"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}]},
    )


# --------------------------------------------------------------------------------------------------------------
# The whole "etcd"
# --------------------------------------------------------------------------------------------------------------


class Store:
    def __init__(self, *, history_limit: int = 10_000, start_rv: int = 1) -> None:
        self.rv = start_rv
        self.compacted_rv = 0
        self.resources: dict[str, ResourceStore] = {}
        self._aliases: dict[str, str] = {}
        for rt in RESOURCE_TYPES:
            self.resources[rt.plural] = ResourceStore(self, rt, history_limit)
            names = {rt.plural, rt.singular, rt.kind, rt.kind.lower(), *rt.short_names}
            if rt.group:
                names |= {f"{rt.plural}.{rt.group}", f"{rt.plural}.{rt.version}.{rt.group}"}
            for n in names:
                self._aliases[n] = rt.plural

    # -- lookup ---------------------------------------------------------------------------------------------------

    def resolve(self, resource_key: str) -> ResourceStore:
        try:
            return self.resources[self._aliases[resource_key]]
        except KeyError:
            raise KeyError(
                f"unknown resource {resource_key!r}; known: {', '.join(sorted(self.resources))}"
            ) from None

    def find(self, group: str, version: str, plural: str) -> ResourceStore | None:
        rs = self.resources.get(plural)
        if rs is None or not rs.enabled or rs.rt.group != group or rs.rt.version != version:
            return None
        return rs

    # -- writes -----------------------------------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _entry(self, rs: ResourceStore, obj: JSON, rv: int) -> Entry:
        meta: JSON = obj["metadata"]
        name: str = meta["name"]
        namespace: str = meta.get("namespace", "") if rs.rt.namespaced else ""
        return Entry(
            rs.key_of(name, namespace), name, namespace, rv, rs.dumps(obj), _labels_of(meta),
            _extract_fields(rs.rt, obj),
        )

    def _normalize(self, rs: ResourceStore, obj: JSON) -> JSON:
        if rs.rt.crd:
            out = dict(obj)
            out["apiVersion"] = rs.rt.api_version
            out["kind"] = rs.rt.kind
            return out
        return _order_builtin(obj)

    def _not_found(self, rs: ResourceStore, name: str) -> ApiError:
        details: JSON = {"name": name}
        if rs.rt.group:
            details["group"] = rs.rt.group
        details["kind"] = rs.rt.plural
        return ApiError(404, "NotFound", f'{rs.rt.qualified} "{name}" not found', details=details)

    def _prepare_create(self, rs: ResourceStore, obj: JSON, namespace: str | None) -> JSON:
        if not isinstance(obj, dict):
            raise bad_request("the object to create must be a JSON object")
        # Only metadata is modified and the result is serialized right away (never retained), so shallow copies
        # keep the caller's dict untouched without the cost of a deepcopy.
        obj = dict(obj)
        meta = obj.get("metadata")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        meta = obj["metadata"] = dict(meta)
        rt = rs.rt
        if rt.namespaced:
            body_ns = meta.get("namespace")
            if namespace is not None and body_ns and body_ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace or body_ns or "default"
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            gen = meta.get("generateName")
            if not gen:
                raise ApiError(
                    422, "Invalid",
                    f"{rt.kind} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                )
            for _ in range(100):
                cand = gen + "".join(random.choice(_GENERATE_CHARS) for _ in range(5))
                if rs.key_of(cand, meta.get("namespace", "")) not in rs.objects:
                    break
            meta["name"] = cand
        meta.pop("resourceVersion", None)
        meta.pop("selfLink", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rt.has_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        return obj

    def _commit_new(self, rs: ResourceStore, obj: JSON) -> Entry:
        meta = obj["metadata"]
        key = rs.key_of(meta["name"], meta.get("namespace", ""))
        if key in rs.objects:
            raise ApiError(
                409, "AlreadyExists", f'{rs.rt.qualified} "{meta["name"]}" already exists',
                details={"name": meta["name"], **({"group": rs.rt.group} if rs.rt.group else {}),
                         "kind": rs.rt.plural},
            )
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        entry = self._entry(rs, self._normalize(rs, obj), rv)
        rs.objects[key] = entry
        return entry

    def create(self, rs: ResourceStore, obj: JSON, namespace: str | None = None) -> Entry:
        prepared = self._prepare_create(rs, obj, namespace)
        entry = self._commit_new(rs, prepared)
        bisect.insort(rs.keys, entry.key)
        rs.record(Event(ADDED, entry, None))
        return entry

    def create_many(self, rs: ResourceStore, objs: Iterable[JSON], namespace: str | None = None) -> int:
        """Bulk create: same events as ``create`` but the sorted key index is rebuilt once."""
        n = 0
        new_keys: list[str] = []
        try:
            for obj in objs:
                entry = self._commit_new(rs, self._prepare_create(rs, obj, namespace))
                new_keys.append(entry.key)
                rs.record(Event(ADDED, entry, None))
                n += 1
        finally:
            if new_keys:
                rs.keys.extend(new_keys)
                rs.keys.sort()
        return n

    def get(self, rs: ResourceStore, name: str, namespace: str | None) -> Entry:
        key = rs.key_of(name, namespace or "")
        entry = rs.objects.get(key)
        if entry is None:
            raise self._not_found(rs, name)
        return entry

    def update(
        self,
        rs: ResourceStore,
        obj: JSON,
        *,
        name: str | None = None,
        namespace: str | None = None,
        subresource: str | None = None,
        respect_status_subresource: bool = False,
    ) -> Entry:
        """Replace an object. ``subresource="status"`` only takes ``status`` from ``obj``;
        ``respect_status_subresource`` (HTTP PUT/PATCH on the main resource) keeps the stored status for
        resources that have a status subresource. A metadata.resourceVersion in ``obj`` must match (409)."""
        if not isinstance(obj, dict):
            raise bad_request("the object must be a JSON object")
        rt = rs.rt
        meta_in = obj.get("metadata") or {}
        name = name or meta_in.get("name")
        if not name:
            raise ApiError(422, "Invalid", f'{rt.kind} "" is invalid: metadata.name: Required value: name is required')
        if rt.namespaced:
            body_ns = meta_in.get("namespace")
            if namespace is not None and body_ns and body_ns != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            namespace = namespace or body_ns or "default"
        prev = self.get(rs, name, namespace)
        want_rv = meta_in.get("resourceVersion")
        if want_rv and str(want_rv) != str(prev.rv):
            raise ApiError(
                409, "Conflict",
                f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been modified; please '
                "apply your changes to the latest version and try again",
                details={"name": name, **({"group": rt.group} if rt.group else {}), "kind": rt.plural},
            )
        old = prev.obj()
        if subresource == "status":
            new = prev.obj()  # a second decoded copy: ``old`` is needed for the no-op check
            if "status" in obj:
                new["status"] = obj["status"]
            else:
                new.pop("status", None)
        else:
            new = dict(obj)  # shallow: only metadata is modified, the result is serialized right away
            new_meta = new["metadata"] = dict(new.get("metadata") or {})
            if respect_status_subresource and rt.status_subresource:
                if "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            old_meta = old["metadata"]
            for k in ("name", "namespace", "uid", "creationTimestamp"):
                if k in old_meta:
                    new_meta[k] = old_meta[k]
                else:
                    new_meta.pop(k, None)
            if rt.has_generation:
                gen = int(old_meta.get("generation", 1))
                keep_status = rt.crd and not rt.status_subresource
                if rt.crd:
                    changed = _strip_for_compare(rt, new, keep_status=keep_status) != _strip_for_compare(
                        rt, old, keep_status=keep_status
                    )
                else:
                    changed = new.get("spec") != old.get("spec")
                new_meta["generation"] = gen + 1 if changed else gen
            else:
                new_meta.pop("generation", None)
        new = self._normalize(rs, new)
        new["metadata"]["resourceVersion"] = str(prev.rv)
        if new == self._normalize(rs, old):
            return prev  # no-op update: no new resourceVersion, no event (like the real apiserver)
        rv = self._next_rv()
        new["metadata"]["resourceVersion"] = str(rv)
        entry = self._entry(rs, new, rv)
        rs.objects[entry.key] = entry
        rs.record(Event(MODIFIED, entry, prev))
        return entry

    def patch(
        self,
        rs: ResourceStore,
        name: str,
        namespace: str | None,
        patch: Any,
        *,
        patch_type: str = "merge",
        subresource: str | None = None,
        respect_status_subresource: bool = False,
    ) -> Entry:
        prev = self.get(rs, name, namespace)
        current = rs.object_bytes(prev.raw)
        doc: JSON = orjson.loads(current)
        if patch_type == "json":
            import jsonpatch  # test dependency; only needed for JSON patches

            try:
                doc = jsonpatch.apply_patch(doc, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                                               f"{exc}") from None
        else:
            if not isinstance(patch, dict):
                raise bad_request("a merge patch must be a JSON object")
            doc = merge_patch(doc, patch)
        if not isinstance(doc, dict):
            raise bad_request("the patched document is not an object")
        meta = doc.setdefault("metadata", {})
        if meta.get("resourceVersion") == str(prev.rv) and not _patch_sets_rv(patch):
            meta.pop("resourceVersion", None)
        return self.update(
            rs, doc, name=name, namespace=namespace if rs.rt.namespaced else None, subresource=subresource,
            respect_status_subresource=respect_status_subresource,
        )

    def delete(self, rs: ResourceStore, name: str, namespace: str | None) -> Entry:
        prev = self.get(rs, name, namespace)
        rv = self._next_rv()
        obj = prev.obj()
        obj["metadata"]["resourceVersion"] = str(rv)
        last = Entry(prev.key, prev.name, prev.namespace, rv, rs.dumps(obj), prev.labels, prev.fields)
        del rs.objects[prev.key]
        idx = bisect.bisect_left(rs.keys, prev.key)
        del rs.keys[idx]
        rs.record(Event(DELETED, last, prev))
        return last

    def compact(self, rs: ResourceStore | None = None) -> None:
        """Like ``etcdctl compact`` + a watch-cache restart: history up to now is gone."""
        if rs is None:
            self.compacted_rv = self.rv
            for r in self.resources.values():
                r.compact(self.rv)
        else:
            rs.compact(self.rv)


def _patch_sets_rv(patch: Any) -> bool:
    if isinstance(patch, dict):
        meta = patch.get("metadata")
        return isinstance(meta, dict) and "resourceVersion" in meta
    if isinstance(patch, list):
        return any(isinstance(op, dict) and op.get("path") == "/metadata/resourceVersion" for op in patch)
    return False


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also used, approximately, for strategic merge patches)."""
    if not isinstance(patch, dict):
        return patch
    out: JSON = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out
