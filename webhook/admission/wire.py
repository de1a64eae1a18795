"""AdmissionReview wire types (admission.k8s.io/v1 and v1beta1) and the parsing of an incoming body.

What the kube-apiserver sends and accepts is in DESIGN.md "Wire contract"; the rules enforced here are the
ones whose violation the apiserver turns into a failed request (missing uid, wrong apiVersion/kind, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import orjson

API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_BODY_BYTES = 7 * 1024 * 1024  # the apiserver's own request limit is about this; more is not a review


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class GroupVersionResource(TypedDict):
    group: str
    version: str
    resource: str


class AdmissionRequest(TypedDict):
    uid: str
    kind: GroupVersionKind
    resource: GroupVersionResource
    operation: str
    object: NotRequired[dict[str, Any] | None]
    oldObject: NotRequired[dict[str, Any] | None]
    namespace: NotRequired[str]
    name: NotRequired[str]
    dryRun: NotRequired[bool]
    userInfo: NotRequired[dict[str, Any]]
    options: NotRequired[dict[str, Any] | None]


class Status(TypedDict, total=False):
    code: int
    reason: str
    message: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    status: NotRequired[Status]
    patch: NotRequired[str]
    patchType: NotRequired[Literal["JSONPatch"]]
    warnings: NotRequired[list[str]]
    auditAnnotations: NotRequired[dict[str, str]]


class AdmissionReview(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    response: AdmissionResponse


class BadReview(ValueError):
    """A body that is not an AdmissionReview we can answer: HTTP `status` with `reason`."""

    def __init__(self, reason: str, status: int = 400, uid: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.uid = uid


@dataclass(frozen=True, slots=True)
class Review:
    """A parsed request: only the parts ipguard reads, checked."""

    api_version: str
    uid: str
    group: str
    kind: str
    resource: str
    operation: str
    namespace: str | None
    name: str | None
    dry_run: bool
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None


# The parts of a Pod ipguard reads, with their types in the Pod schema (null is accepted everywhere, as the
# apiserver's decoder does). The apiserver only ever sends decodable pods; anything else did not come from it.
_STR, _BOOL, _INT = "string", "boolean", "integer"
_STRING_MAP: dict[str, Any] = {"*": _STR}
_REQUIREMENT = {"key": _STR, "operator": _STR, "values": [_STR]}
_TERM = {"matchExpressions": [_REQUIREMENT], "matchFields": [_REQUIREMENT]}
_CONTAINER: dict[str, Any] = {"resources": {"requests": {}, "limits": {}}}
_POD_SHAPE: dict[str, Any] = {
    "metadata": {"name": _STR, "generateName": _STR, "namespace": _STR, "labels": _STRING_MAP,
                 "annotations": _STRING_MAP},
    "spec": {
        "nodeName": _STR, "schedulerName": _STR, "hostNetwork": _BOOL, "nodeSelector": _STRING_MAP,
        "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [_TERM]},
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": _INT, "preference": _TERM}],
        }},
        "containers": [_CONTAINER], "initContainers": [_CONTAINER],
    },
    "status": {"phase": _STR},
}
_TYPES: dict[str, tuple[type, ...]] = {_STR: (str,), _BOOL: (bool,), _INT: (int,)}


def _shape_error(value: Any, shape: Any, where: str) -> str | None:
    """Where `value` does not have `shape` (a dict: an object, its listed keys checked, "*" for every value;
    a one-item list: an array of that; a type name), or None. Runs on every review: the path is only built
    once a problem is found."""
    found = _mismatch(value, shape)
    if found is None:
        return None
    path, kind = found
    text = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in reversed(path))
    return f"{text} must be {'an' if kind in (_INT, 'object', 'array') else 'a'} {kind}"


def _mismatch(value: Any, shape: Any) -> tuple[list[str | int], str] | None:
    if value is None:
        return None
    if type(shape) is dict:
        if type(value) is not dict:
            return [], "object"
        every = shape.get("*")
        if every is _STR:  # a string map (labels, annotations): checked inline, it is most of the calls
            for key, child in value.items():
                if type(child) is not str and child is not None:
                    return [key], _STR
            return None
        for key, sub in shape.items():
            child = value.get(key)
            if child is None:
                continue
            found = _leaf(child, sub) if type(sub) is str else _mismatch(child, sub)
            if found is not None:
                found[0].append(key)
                return found
        return None
    if type(shape) is list:
        if type(value) is not list:
            return [], "array"
        for i, item in enumerate(value):
            found = _mismatch(item, shape[0])
            if found is not None:
                found[0].append(i)
                return found
        return None
    return _leaf(value, shape)


def _leaf(value: Any, kind: str) -> tuple[list[str | int], str] | None:
    if not isinstance(value, _TYPES[kind]) or (kind == _INT and isinstance(value, bool)):
        return [], kind
    return None


def parse_review(body: bytes) -> Review:
    if len(body) > MAX_BODY_BYTES:
        raise BadReview(f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted", 413)
    if not body:
        raise BadReview("empty request body: expected an AdmissionReview")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadReview(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadReview("request body is not a JSON object: expected an AdmissionReview")
    request = document.get("request")
    uid = request.get("uid") if isinstance(request, dict) else None
    known_uid = uid if isinstance(uid, str) and uid else None
    api_version = document.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise BadReview(
            f"apiVersion {api_version!r} is not supported: expected one of {', '.join(API_VERSIONS)}", uid=known_uid
        )
    if document.get("kind") != "AdmissionReview":
        raise BadReview(f"kind {document.get('kind')!r}: expected AdmissionReview", uid=known_uid)
    if not isinstance(request, dict):
        raise BadReview("AdmissionReview has no request object")
    if known_uid is None:
        raise BadReview("request.uid is missing or empty: the apiserver requires it echoed")
    kind = request.get("kind")
    resource = request.get("resource")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise BadReview("request.kind is missing or malformed", uid=known_uid)
    if not isinstance(resource, dict) or not isinstance(resource.get("resource"), str):
        raise BadReview("request.resource is missing or malformed", uid=known_uid)
    operation = request.get("operation")
    if not isinstance(operation, str) or not operation:
        raise BadReview("request.operation is missing", uid=known_uid)
    obj = request.get("object")
    if operation in ("CREATE", "UPDATE") and not isinstance(obj, dict):
        raise BadReview(f"request.object is missing or not an object for {operation}", uid=known_uid)
    group = str(kind.get("group") or "")
    if kind["kind"] == "Pod" and group == "" and isinstance(obj, dict):
        problem = _shape_error(obj, _POD_SHAPE, "request.object")
        if problem:
            raise BadReview(f"request.object is not a valid Pod: {problem}", uid=known_uid)
    old = request.get("oldObject")
    namespace = request.get("namespace")
    name = request.get("name")
    return Review(
        api_version=api_version,
        uid=known_uid,
        group=group,
        kind=kind["kind"],
        resource=resource["resource"],
        operation=operation,
        namespace=namespace if isinstance(namespace, str) and namespace else None,
        name=name if isinstance(name, str) and name else None,
        dry_run=request.get("dryRun") is True,
        object=obj if isinstance(obj, dict) else None,
        old_object=old if isinstance(old, dict) else None,
    )


def review_envelope(api_version: str, response: AdmissionResponse) -> AdmissionReview:
    """The answer, in the apiVersion the request came in (the apiserver rejects any other)."""
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}
