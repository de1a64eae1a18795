"""The kube-apiserver's side of admission, for running ipguard without a cluster (`ipguard demo`, `check`).

What the apiserver does to an object before and between the webhook calls, as the real captures in the
shared fixtures show it: defaults applied before the mutating call; no `metadata.name` there for a
`generateName` object; the generated name, a uid, a creation time and `status.phase: Pending` by the
validating call; every call with its own `request.uid`.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson


class Kind(NamedTuple):
    """An object's group/version/kind and the resource the apiserver names in a review."""

    group: str
    version: str
    kind: str
    resource: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


POD = Kind("", "v1", "Pod", "pods")
SECURITY_GROUP_POLICY = Kind("vpcresources.k8s.aws", "v1beta1", "SecurityGroupPolicy", "securitygrouppolicies")
ENI_CONFIG = Kind("crd.k8s.amazonaws.com", "v1alpha1", "ENIConfig", "eniconfigs", namespaced=False)

_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's generateName suffix alphabet
_TOLERATION_SECONDS = 300  # DefaultTolerationSeconds admission


def clone(value: Any) -> Any:
    """A deep copy of JSON data."""
    return orjson.loads(orjson.dumps(value))


def generated_name(prefix: str, rng: random.Random) -> str:
    """A name as the apiserver makes it from `generateName`: the prefix and five random characters."""
    return prefix + "".join(rng.choice(_NAME_ALPHABET) for _ in range(5))


def default_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the pod with the defaults the apiserver applies before any webhook sees it."""
    result: dict[str, Any] = clone(dict(pod))
    result.setdefault("kind", "Pod")
    result.setdefault("apiVersion", "v1")
    spec = result.setdefault("spec", {})
    for key, value in (("restartPolicy", "Always"), ("terminationGracePeriodSeconds", 30),
                       ("dnsPolicy", "ClusterFirst"), ("securityContext", {}),
                       ("schedulerName", "default-scheduler"), ("enableServiceLinks", True), ("priority", 0),
                       ("preemptionPolicy", "PreemptLowerPriority")):
        spec.setdefault(key, value)
    for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        if isinstance(container, dict):
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", "IfNotPresent")
    tolerations = spec.setdefault("tolerations", [])
    if isinstance(tolerations, list):
        keys = {t.get("key") for t in tolerations if isinstance(t, dict)}
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if key not in keys:
                tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute",
                                    "tolerationSeconds": _TOLERATION_SECONDS})
    result.setdefault("status", {})
    return result


def as_created(obj: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The object as the validating webhook sees it: named, with a uid and a creation time (a pod Pending)."""
    result: dict[str, Any] = clone(dict(obj))
    metadata = result.setdefault("metadata", {})
    metadata["name"] = name
    metadata["uid"] = str(uuid.uuid4())
    metadata["generation"] = 1
    metadata["creationTimestamp"] = "2026-01-01T00:00:00Z"
    if result.get("kind") == "Pod":
        result["status"] = {"phase": "Pending", "qosClass": "Burstable"}
    return result


def admission_review(
    obj: dict[str, Any], namespace: str | None, name: str | None, dry_run: bool = False, *, kind: Kind = POD,
    username: str = "system:serviceaccount:kube-system:replicaset-controller",
    old_object: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An AdmissionReview v1 request as the apiserver sends it: a CREATE, or an UPDATE of `old_object`."""
    gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
    gvr = {"group": kind.group, "version": kind.version, "resource": kind.resource}
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": gvk,
        "resource": gvr,
        "requestKind": dict(gvk),
        "requestResource": dict(gvr),
    }
    if name:
        request["name"] = name
    if namespace and kind.namespaced:
        request["namespace"] = namespace
    request.update({
        "operation": "CREATE" if old_object is None else "UPDATE",
        "userInfo": {"username": username},
        "object": obj,
        "oldObject": old_object,
        "dryRun": dry_run,
        "options": {"kind": "CreateOptions" if old_object is None else "UpdateOptions",
                    "apiVersion": "meta.k8s.io/v1"},
    })
    return {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1", "request": request}
