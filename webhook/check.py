"""`ipguard check`: admission without a cluster, for people and for CI pipelines.

Each object in the files goes through ipguard exactly as the API server would send it: an AdmissionReview
CREATE to the mutating stage, the returned JSON Patch applied, then the patched object (named, as the
validating webhook sees it) to the validating stage, both answered by the same code the HTTPS server uses
(`admission.handler.handle`). Workloads (Deployment, ReplicaSet, StatefulSet, Job, CronJob, DaemonSet) are
judged as the pods their controllers would create, replica by replica; each admitted pod is then bound by a
scheduler stand-in, so later replicas (and later objects) see the room earlier ones took.

Exit status: 0 when every object would be admitted, 1 when any would be denied, 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jsonpatch
import orjson
import yaml

from webhook.admission.handler import AdmissionState, Stage, handle
from webhook.admission.wire import BadReview, parse_review
from webhook.apiserver import (
    ENI_CONFIG,
    POD,
    SECURITY_GROUP_POLICY,
    Kind,
    admission_review,
    as_created,
    clone,
    default_pod,
    generated_name,
)
from webhook.model.config import Mode
from webhook.model.eniconfig import parse_eniconfig
from webhook.model.index import CapacityIndex, pod_key
from webhook.model.pods import POD_ENI_RESOURCE, pod_use, read_record, wants_branch_eni
from webhook.model.sgp import parse_policy, pod_shape
from webhook.scheduler import Scheduler, node_fits, node_labels

MUTATING_WEBHOOK = "mutate.ipguard.io"  # the names manifests/base/webhooks.yaml registers
VALIDATING_WEBHOOK = "validate.ipguard.io"
WORKLOADS = ("Deployment", "ReplicaSet", "StatefulSet", "Job", "CronJob", "DaemonSet")
JUDGED = {k.kind: k for k in (POD, SECURITY_GROUP_POLICY, ENI_CONFIG)}
CRONJOB_SCHEDULED_MINUTES = 29_500_000  # the CronJob controller names its Jobs <cronjob>-<scheduled minutes>
_SAFE = "bcdfghjklmnpqrstvwxz2456789"
_DIGITS = re.compile(r"[0-9]+")
_POD_NAME = re.compile(r"pod [a-z0-9.-]+/([a-z0-9.-]+)")


class CheckInputError(ValueError):
    """Input that is not a Kubernetes object ipguard can run: one line naming the file and the document."""


@dataclass(frozen=True, slots=True)
class Document:
    source: str  # the file name as given ("-" for standard input)
    number: int  # 1-based, in the file
    obj: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}: document {self.number}"


@dataclass(frozen=True, slots=True)
class Replica:
    """One object (a pod, or a policy) run through both admission stages."""

    name: str
    verdict: str  # admitted | steered | denied | not-judged
    outcome: str  # the validating stage's outcome (allowed, steered, denied, warned, recorded, ...)
    patch: tuple[str, ...]  # what the mutating stage's patch does, in words
    warnings: tuple[str, ...]  # as the apiserver passes them on, mutating stage first
    denial: str | None  # status.message of a denial
    webhook: str | None  # the webhook that denied
    node: str | None = None  # where the scheduler stand-in bound the pod (None: Pending, or not a pod)
    zone: str | None = None
    findings: tuple[str, ...] = ()  # codes of what the checks found (audit annotation `findings`)


@dataclass(slots=True)
class ObjectResult:
    document: Document
    kind: str
    namespace: str | None
    name: str
    replicas: list[Replica] = field(default_factory=list)
    note: str | None = None  # why the object was not run through admission

    @property
    def workload(self) -> bool:
        return self.kind in WORKLOADS

    @property
    def denied(self) -> int:
        return sum(r.verdict == "denied" for r in self.replicas)

    @property
    def steered(self) -> int:
        return sum(r.verdict == "steered" for r in self.replicas)

    @property
    def admitted(self) -> int:
        return len(self.replicas) - self.denied

    @property
    def verdict(self) -> str:
        if self.note is not None:
            return "not-judged"
        if self.denied:
            return "denied"
        if self.steered:
            return "steered"
        if self.replicas and all(r.verdict == "not-judged" for r in self.replicas):
            return "not-judged"
        return "admitted"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace + '/' if self.namespace else ''}{self.name}"


# ---- reading the input ------------------------------------------------------------------------------------


def read_documents(paths: Sequence[str], stdin: TextIO) -> list[Document]:
    """Every object in the files, in order: multi-document YAML or JSON; `kind: List` items one by one."""
    documents: list[Document] = []
    for path in paths:
        if path == "-":
            text = stdin.read()
        else:
            try:
                text = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise CheckInputError(f"{path}: cannot read: {reason}") from None
        for number, raw in enumerate(_parse(text, path), start=1):
            if raw is None:
                continue
            document = Document(path, number, raw)
            if not isinstance(raw, dict):
                raise CheckInputError(f"{document.where}: not an object (a {type(raw).__name__})")
            if isinstance(raw.get("kind"), str) and raw["kind"].endswith("List") and "items" in raw:
                items = raw["items"]
                if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                    raise CheckInputError(f"{document.where}: items must be a list of objects")
                documents.extend(Document(path, number, item) for item in items)
            else:
                documents.append(document)
    return documents


def _parse(text: str, source: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except ValueError:
            pass  # YAML flow style, perhaps: let the YAML parser say what is wrong
        else:
            return value if isinstance(value, list) else [value]
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        number = text[: _offset(text, mark)].count("\n---") + 1 if mark is not None else 1
        raise CheckInputError(f"{source}: document {number}: not valid YAML{where}: {problem}") from None


def _offset(text: str, mark: Any) -> int:
    lines = text.split("\n")
    return sum(len(line) + 1 for line in lines[: mark.line])


# ---- workloads -> the pods their controllers create ---------------------------------------------------------


def _map(value: Any, where: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckInputError(f"{where}: {what} must be a mapping")
    return value


def _count(value: Any, default: int, where: str, what: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckInputError(f"{where}: {what} must be a whole number >= 0, not {value!r}")
    return value


def template_hash(template: Mapping[str, Any]) -> str:
    """A pod-template-hash the way the Deployment controller makes one (FNV-1a of the template, in safe
    characters); not byte-equal to the controller's, which hashes Go's encoding of the template."""
    digest = 0x811C9DC5
    for byte in orjson.dumps(template, option=orjson.OPT_SORT_KEYS):
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_SAFE[ord(c) % len(_SAFE)] for c in str(digest))


def _owned(template: Mapping[str, Any], namespace: str, owner_kind: str, owner_api: str, owner: str,
           labels: Mapping[str, str], where: str) -> dict[str, Any]:
    meta = _map(template.get("metadata"), where, "spec.template.metadata")
    spec = _map(template.get("spec"), where, "spec.template.spec")
    if not spec.get("containers"):
        raise CheckInputError(f"{where}: spec.template.spec.containers is required")
    metadata: dict[str, Any] = {
        "namespace": namespace,
        "labels": {**_map(meta.get("labels"), where, "spec.template.metadata.labels"), **labels},
        "ownerReferences": [{"apiVersion": owner_api, "kind": owner_kind, "name": owner,
                             "uid": "00000000-0000-4000-8000-000000000000", "controller": True,
                             "blockOwnerDeletion": True}],
    }
    if meta.get("annotations"):
        metadata["annotations"] = dict(_map(meta.get("annotations"), where, "spec.template.metadata.annotations"))
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": clone(spec)}


def workload_pods(obj: Mapping[str, Any], namespace: str, name: str, index: CapacityIndex,
                  where: str) -> list[dict[str, Any]]:
    """The pods a workload's controller creates for it (each with `generateName`, or a name when the
    controller names them), in the order it creates them."""
    kind = obj["kind"]
    spec = _map(obj.get("spec"), where, "spec")
    if kind == "CronJob":
        job_template = _map(spec.get("jobTemplate"), where, "spec.jobTemplate")
        spec = _map(job_template.get("spec"), where, "spec.jobTemplate.spec")
        kind, name = "Job", f"{name}-{CRONJOB_SCHEDULED_MINUTES}"
    template = spec.get("template")
    if not isinstance(template, dict):
        raise CheckInputError(f"{where}: spec.template is required (a pod template)")
    pods: list[dict[str, Any]] = []
    if kind in ("Deployment", "ReplicaSet"):
        replicas = _count(spec.get("replicas"), 1, where, "spec.replicas")
        owner, labels = name, {}
        if kind == "Deployment":
            digest = template_hash(template)
            owner, labels = f"{name}-{digest}", {"pod-template-hash": digest}
        pod = _owned(template, namespace, "ReplicaSet", "apps/v1", owner, labels, where)
        pod["metadata"]["generateName"] = f"{owner}-"
        pods = [clone(pod) for _ in range(replicas)]
    elif kind == "StatefulSet":
        replicas = _count(spec.get("replicas"), 1, where, "spec.replicas")
        for i in range(replicas):
            pod = _owned(template, namespace, "StatefulSet", "apps/v1", name,
                         {"statefulset.kubernetes.io/pod-name": f"{name}-{i}", "apps.kubernetes.io/pod-index": str(i)},
                         where)
            pod["metadata"]["name"] = f"{name}-{i}"
            pods.append(pod)
    elif kind == "Job":
        parallelism = _count(spec.get("parallelism"), 1, where, "spec.parallelism")
        completions = _count(spec.get("completions"), parallelism, where, "spec.completions")
        pod = _owned(template, namespace, "Job", "batch/v1", name,
                     {"batch.kubernetes.io/job-name": name, "job-name": name}, where)
        pod["metadata"]["generateName"] = f"{name}-"
        pods = [clone(pod) for _ in range(min(parallelism, completions))]
    elif kind == "DaemonSet":
        pod = _owned(template, namespace, "DaemonSet", "apps/v1", name, {}, where)
        pod["metadata"]["generateName"] = f"{name}-"
        for node in sorted(index.nodes.values(), key=lambda n: n.name):
            if not (node.known and node.schedulable and node_fits(pod, node_labels(node), lenient=True)):
                continue
            placed = clone(pod)
            # The DaemonSet controller replaces the required node affinity with its node's name.
            affinity = placed["spec"].setdefault("affinity", {}).setdefault("nodeAffinity", {})
            affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [{"matchFields": [
                {"key": "metadata.name", "operator": "In", "values": [node.name]}]}]}
            pods.append(placed)
    return pods


# ---- running objects through admission -----------------------------------------------------------------------


def describe_patch(ops: Sequence[Mapping[str, Any]] | None, patched: Mapping[str, Any]) -> tuple[str, ...]:
    """What the mutating stage's patch does to the pod, in words (from ipguard's steering record)."""
    if not ops:
        return ()
    record = read_record(patched)
    if record is None:
        return ("takes back ipguard's earlier steering",)
    how = "prefers (weight 100)" if record.get("soft") else "requires"
    words = []
    if record.get("avoidZones"):
        words.append(f"{how} zone not in {', '.join(record['avoidZones'])}")
    nodes = record.get("avoidNodes") or []
    if nodes:
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        words.append(f"{how} a node other than {shown}")
    prefer = record.get("preferZones") or []
    if prefer:
        words.append("prefers zone " + ", ".join(f"{zone} (weight {weight})" for zone, weight in prefer))
    return tuple(words)


class Checker:
    """Runs documents through admission against one index, in order; the index keeps what each took."""

    def __init__(self, state: AdmissionState, *, seed: int = 0) -> None:
        self.state = state
        self.scheduler = Scheduler(state.index)
        self.rng = random.Random(seed)

    def check(self, document: Document) -> ObjectResult:
        obj = document.obj
        kind, api_version = obj.get("kind"), obj.get("apiVersion")
        if not isinstance(kind, str) or not kind or not isinstance(api_version, str) or not api_version:
            raise CheckInputError(f"{document.where}: apiVersion and kind are required")
        metadata = _map(obj.get("metadata"), document.where, "metadata")
        name = metadata.get("name") or metadata.get("generateName")
        if not isinstance(name, str) or not name:
            raise CheckInputError(f"{document.where}: {kind} has no metadata.name")
        judged = JUDGED.get(kind) if api_version == (JUDGED[kind].api_version if kind in JUDGED else None) else None
        workload = kind in WORKLOADS and "/" in api_version
        namespaced = judged.namespaced if judged else True
        namespace = str(metadata.get("namespace") or "default") if namespaced else None
        result = ObjectResult(document, kind, namespace, name)
        if workload:
            assert namespace is not None
            for pod in workload_pods(obj, namespace, name, self.state.index, document.where):
                result.replicas.append(self._admit(pod, POD, namespace, document))
        elif judged is not None:
            obj = default_pod(obj) if judged is POD else clone(obj)
            result.replicas.append(self._admit(obj, judged, namespace, document))
        else:
            result.note = f"ipguard does not judge {kind} objects"
        return result

    def _review(self, obj: dict[str, Any], kind: Kind, namespace: str | None, name: str | None, stage: Stage,
                document: Document, old: dict[str, Any] | None = None) -> Any:
        body = orjson.dumps(admission_review(obj, namespace, name, kind=kind, old_object=old))
        try:
            review = parse_review(body)
        except BadReview as exc:
            raise CheckInputError(f"{document.where}: {exc.reason}") from None
        return handle(review, stage, self.state)

    def _admit(self, obj: dict[str, Any], kind: Kind, namespace: str | None, document: Document) -> Replica:
        metadata = obj.setdefault("metadata", {})
        if namespace is not None:
            metadata["namespace"] = namespace
        name = metadata.get("name")
        warnings: list[str] = []
        patched, ops = obj, None
        controller_words: tuple[str, ...] = ()
        if kind is POD:  # manifests/base/webhooks.yaml registers the mutating webhook for pods only
            # The mutating stage sees no name for a generateName object (DESIGN.md "Wire contract").
            mutated = self._review(clone(obj), kind, namespace, name, "mutate", document)
            warnings.extend(mutated.response.get("warnings", []))
            if not mutated.response["allowed"]:
                return Replica(name or f"{metadata.get('generateName', '')}*", "denied", mutated.outcome, (),
                               tuple(warnings), mutated.response.get("status", {}).get("message"),
                               MUTATING_WEBHOOK)
            ops = mutated.patch
            patched = jsonpatch.apply_patch(obj, ops) if ops else obj
            patched, controller_words = self._resource_controller(patched, namespace)
        name = name or generated_name(str(metadata.get("generateName")), self.rng)
        created = as_created(patched, name)
        # `kubectl apply` of an object that exists is an UPDATE of it.
        old = self._existing(kind, namespace, name)
        validated = self._review(clone(created), kind, namespace, name, "validate", document, old)
        warnings.extend(validated.response.get("warnings", []))
        words = describe_patch(ops, patched) + controller_words
        findings = tuple(f.code for f in validated.decision.findings)
        if not validated.response["allowed"]:
            return Replica(name, "denied", validated.outcome, words, tuple(warnings),
                           validated.response.get("status", {}).get("message"), VALIDATING_WEBHOOK,
                           findings=findings)
        verdict = "steered" if read_record(patched) is not None else "admitted"
        if validated.outcome == "not-applicable" and kind is not POD:
            verdict = "not-judged"
        self._remember(kind, created)
        node = zone = None
        if kind is POD:
            assert namespace is not None
            node = self.scheduler.bind(created, pod_key(namespace, name), pod_use(created))
            self.state.policies.put_pod(pod_key(namespace, name), namespace, pod_shape(created))
            zone = self.state.index.nodes[node].zone if node else None
        return Replica(name, verdict, validated.outcome, words, tuple(warnings), None, None, node, zone, findings)


    def _resource_controller(self, pod: dict[str, Any], namespace: str | None) -> tuple[dict[str, Any],
                                                                                     tuple[str, ...]]:
        """The VPC resource controller's mutating webhook on EKS (with ENABLE_POD_ENI on): a pod that
        SecurityGroupPolicies select gets a vpc.amazonaws.com/pod-eni request in its first container."""
        if not self.state.index.cni.pod_eni or wants_branch_eni(pod):
            return pod, ()
        policies = self.state.policies.pod_policies(pod, namespace or "default")
        containers = pod.get("spec", {}).get("containers")
        if not policies or not isinstance(containers, list) or not containers or not isinstance(containers[0], dict):
            return pod, ()
        pod = clone(pod)
        resources = pod["spec"]["containers"][0].setdefault("resources", {})
        for part in ("requests", "limits"):
            resources.setdefault(part, {})[POD_ENI_RESOURCE] = "1"
        names = ", ".join(p.name for p in policies)
        return pod, (f"(VPC resource controller) requests {POD_ENI_RESOURCE} for SecurityGroupPolicies {names}",)

    def _existing(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object a policy or ENIConfig of this name would replace, in its JSON form."""
        if kind is ENI_CONFIG and name in self.state.eni_configs.configs:
            config = self.state.eni_configs.configs[name]
            return {"apiVersion": ENI_CONFIG.api_version, "kind": ENI_CONFIG.kind, "metadata": {"name": name},
                    "spec": {"subnet": config.subnet, "securityGroups": list(config.groups)}}
        if kind is SECURITY_GROUP_POLICY and name in self.state.policies.policies.get(namespace or "", {}):
            policy = self.state.policies.policies[namespace or ""][name]
            return {"apiVersion": kind.api_version, "kind": kind.kind,
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {"securityGroups": {"groupIds": list(policy.groups)}}}
        return None

    def _remember(self, kind: Kind, obj: dict[str, Any]) -> None:
        """An admitted policy or ENIConfig is there for the objects after it (as the watches would add it)."""
        if kind is SECURITY_GROUP_POLICY:
            self.state.policies.put_policy(parse_policy(obj))
        elif kind is ENI_CONFIG:
            self.state.eni_configs.put(parse_eniconfig(obj))


# ---- output ------------------------------------------------------------------------------------------------


def kubectl_lines(result: ObjectResult, replica: Replica) -> list[str]:
    """The replica's warnings and denial as kubectl prints them (for a workload's pods: as its controller's
    FailedCreate event reads)."""
    lines = [f"Warning: {w}" for w in replica.warnings]
    if replica.denial is not None:
        reason = f'admission webhook "{replica.webhook}" denied the request: {replica.denial}'
        if result.workload:
            lines.append(f"Error creating: {reason}")
        else:
            source = "STDIN" if result.document.source == "-" else result.document.source
            lines.append(f'Error from server (Forbidden): error when creating "{source}": {reason}')
    return lines


def _placement(replica: Replica) -> str:
    if replica.verdict == "denied":
        return ""
    if replica.node is None:
        return " -> Pending (no node fits)"
    return f" -> {replica.zone} {replica.node}"


def format_text(results: Iterable[ObjectResult], out: TextIO) -> None:
    for result in results:
        where = f"({result.document.where})"
        if result.note is not None:
            print(f"{result.label}: not judged: {result.note} {where}", file=out)
            continue
        if result.workload:
            print(f"{result.label}: {len(result.replicas)} replica(s): {result.admitted} admitted "
                  f"({result.steered} steered), {result.denied} denied {where}", file=out)
            shown: list[str] = []
            for replica in result.replicas:
                shown = _print_replica(result, replica, out, f"  pod {replica.name}", same_as=shown)
        else:
            replica = result.replicas[0]
            _print_replica(result, replica, out, f"{result.label}", where)


def _print_replica(result: ObjectResult, replica: Replica, out: TextIO, label: str, where: str = "",
                   same_as: Sequence[str] = ()) -> list[str]:
    """One line for the replica, then its patch, warnings and denial, unless they read as the previous
    replica's did but for the figures (`same_as`): a workload's replicas mostly repeat each other."""
    placement = _placement(replica) if result.workload or result.kind == "Pod" else ""
    print(f"{label}: {replica.verdict}{placement} {where}".rstrip(), file=out)
    indent = "    " if result.workload else "  "
    details = [f"{indent}patch: {words}" for words in replica.patch]
    details += [f"{indent}{line}" for line in kubectl_lines(result, replica)]
    if [_shape(d, replica.name) for d in details] != [_shape(d, _named(same_as)) for d in same_as]:
        for line in details:
            print(line, file=out)
    return details


def _shape(line: str, name: str) -> str:
    return _DIGITS.sub("#", line.replace(name, "<pod>") if name else line)


def _named(details: Sequence[str]) -> str:
    """The pod name a replica's detail lines carry (the denial names it), to compare them without it."""
    for line in details:
        found = _POD_NAME.search(line)
        if found:
            return found.group(1)
    return ""


def to_json(results: Sequence[ObjectResult], code: int) -> dict[str, Any]:
    objects = []
    for result in results:
        objects.append({
            "file": result.document.source, "document": result.document.number, "kind": result.kind,
            "namespace": result.namespace, "name": result.name, "verdict": result.verdict, "note": result.note,
            "summary": {"replicas": len(result.replicas), "admitted": result.admitted, "steered": result.steered,
                        "denied": result.denied},
            "replicas": [{**dataclasses.asdict(r), "kubectl": kubectl_lines(result, r)} for r in result.replicas],
        })
    return {"exitCode": code, "objects": objects}


def exit_code(results: Iterable[ObjectResult]) -> int:
    return 1 if any(r.denied for r in results) else 0


def run_check(state: AdmissionState, documents: Sequence[Document], *, as_json: bool, mode: str | None,
              out: TextIO) -> int:
    """Run the documents in order, print what happened; the exit status."""
    if mode is not None:
        state.settings = dataclasses.replace(state.settings, mode=Mode(mode))
    checker = Checker(state)
    results = [checker.check(document) for document in documents]
    code = exit_code(results)
    if as_json:
        print(json.dumps(to_json(results, code), indent=2), file=out)
    else:
        format_text(results, out)
    return code


def _frozen_clock() -> float:
    return 0.0  # reservations never expire while a check runs, however long it takes


LiveRunner = Callable[..., int]  # cli.with_live_cluster(args, use, not_loaded=...)


def main(args: argparse.Namespace, live: LiveRunner) -> int:
    """The `ipguard check` command (its parser: `add_parser`). Bad input stops it before anything is judged
    (and before connecting to a cluster)."""
    try:
        documents = read_documents(args.file, sys.stdin)
        if args.live:
            return live(args, lambda state: run_check(state, documents, as_json=args.json, mode=args.mode,
                                                      out=sys.stdout), not_loaded=2)
        from webhook.sources.snapshot import SnapshotError, load_snapshot

        try:
            snapshot = load_snapshot(args.snapshot)
        except SnapshotError as exc:
            print(f"ipguard: {exc}", file=sys.stderr)
            return 2
        index = snapshot.build_index(clock=_frozen_clock)
        policies, eni_configs, vpc = snapshot.build_objects(index)
        state = AdmissionState(index, snapshot.settings, policies=policies, eni_configs=eni_configs, vpc=vpc)
        return run_check(state, documents, as_json=args.json, mode=args.mode, out=sys.stdout)
    except CheckInputError as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 2


def add_parser(sub: Any, live_source_args: Callable[[argparse.ArgumentParser], None], default_snapshot: Path,
               live: LiveRunner) -> None:
    cp = sub.add_parser("check", help="run objects from files through ipguard's admission, as the API server would")
    cp.add_argument("-f", "--filename", dest="file", action="append", required=True, metavar="FILE",
                    help="a YAML or JSON file of objects (repeatable; - for standard input)")
    cp.add_argument("--snapshot", default=str(default_snapshot), help="cluster snapshot file (YAML)")
    cp.add_argument("--live", action="store_true", help="judge against the live cluster (and EC2)")
    cp.add_argument("--timeout", type=float, default=60.0, help="with --live: seconds to wait for the data")
    cp.add_argument("--mode", choices=[m.value for m in Mode], help="override the configured mode")
    cp.add_argument("--json", action="store_true", help="machine-readable output")
    live_source_args(cp)
    cp.set_defaults(func=lambda args: main(args, live))
