"""The controllers' part of a scenario: when pods are created, deleted, completed, nodes cordoned and ENIConfigs
changed.

A scenario's events become a timeline of actions, the same for both runs of a replay: a pod created at a given
second is the same pod (name and template) with or without ipguard, whatever happens to it afterwards.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from webhook.demo import deployment_pod
from webhook.sim.scenario import Scenario, ScenarioError
from webhook.sim.scheduler import POD_ENI


@dataclass(frozen=True, slots=True)
class Create:
    key: str  # namespace/name
    template: dict[str, Any]  # the pod as its controller creates it (generateName, no name)
    owner: str
    runs_for: float | None = None
    groups: int = 1


@dataclass(frozen=True, slots=True)
class Delete:
    owner: str
    count: int
    generation: int | None = None  # only pods of this template generation (rollouts: the old ones)


@dataclass(frozen=True, slots=True)
class Cordon:
    node: str


@dataclass(frozen=True, slots=True)
class EniConfigChange:
    """Custom networking: a node relabelled to another ENIConfig, or an ENIConfig given another subnet."""

    config: str
    node: str | None = None
    subnet: str | None = None


Action = Create | Delete | Cordon | EniConfigChange


def pod_template(name: str, config: dict[str, Any], generation: int = 0) -> dict[str, Any]:
    """A Deployment's (or Job's) pod as its controller creates it, from the scenario's deployment entry."""
    template_hash = hashlib.sha1(f"{name}-{generation}".encode()).hexdigest()[:10]
    pod = deployment_pod(name, str(config.get("namespace", "apps")), template_hash, config.get("nodeSelector"))
    spec = pod["spec"]
    if config.get("affinity"):
        spec["affinity"] = copy.deepcopy(config["affinity"])
    if config.get("tolerations"):
        spec["tolerations"] = spec["tolerations"] + copy.deepcopy(config["tolerations"])
    if config.get("hostNetwork"):
        spec["hostNetwork"] = True
    if config.get("branch"):
        resources = spec["containers"][0]["resources"]
        resources.setdefault("requests", {})[POD_ENI] = "1"
        resources.setdefault("limits", {})[POD_ENI] = "1"
    if config.get("volumes"):
        spec["volumes"] = copy.deepcopy(config["volumes"])
    pod["metadata"]["labels"]["generation"] = str(generation)
    return pod


@dataclass(slots=True)
class Timeline:
    """Actions by time. Pod names are fixed here, so both runs create the same pods."""

    scenario: Scenario
    _heap: list[tuple[float, int, Action]] = field(default_factory=list)
    _order: Iterator[int] = field(default_factory=itertools.count)
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for i, event in enumerate(self.scenario.events):
            self._expand(i, event)

    def _push(self, at: float, action: Action) -> None:
        heapq.heappush(self._heap, (at, next(self._order), action))

    def _create(self, at: float, owner: str, config: dict[str, Any], generation: int = 0,
                runs_for: float | None = None) -> None:
        template = pod_template(owner, config, generation)
        meta = template["metadata"]
        key = f"{meta['namespace']}/{meta['generateName']}{next(self._names):05d}"
        self._push(at, Create(key, template, owner, runs_for, int(config.get("securityGroups", 1))))

    def _expand(self, i: int, event: dict[str, Any]) -> None:
        at = float(event.get("at", 0))
        deployments = self.scenario.deployments
        if "scale" in event:
            owner = str(event["scale"])
            replicas, over = int(event.get("replicas", 1)), float(event.get("over", 0))
            for n in range(replicas):
                self._create(at + over * n / replicas, owner, deployments[owner])
        elif "job" in event:
            owner = str(event["job"])
            config = deployments.get(owner, {"namespace": event.get("namespace", "batch")})
            pods, over = int(event.get("pods", 1)), float(event.get("over", 0))
            for n in range(pods):
                self._create(at + over * n / pods, owner, config, runs_for=float(event.get("runtime", 30)))
        elif "rollout" in event:
            owner = str(event["rollout"])
            generation = int(event.get("generation", 1))
            batch, every, replicas = int(event.get("batch", 10)), float(event.get("every", 10)), int(event["replicas"])
            for n, start in enumerate(range(0, replicas, batch)):
                count = min(batch, replicas - start)
                for _ in range(count):
                    self._create(at + n * every, owner, deployments[owner], generation)
                # maxSurge first, then the old pods go (maxUnavailable 0): a batch later.
                self._push(at + (n + 1) * every, Delete(owner, count, generation - 1))
        elif "delete" in event:
            self._push(at, Delete(str(event["delete"]), int(event.get("count", 1))))
        elif "cordon" in event:
            self._push(at, Cordon(str(event["cordon"])))
        elif "eniConfig" in event and ("node" in event or "subnet" in event):
            node, subnet = event.get("node"), event.get("subnet")
            self._push(at, EniConfigChange(str(event["eniConfig"]), str(node) if node else None,
                                           str(subnet) if subnet else None))
        else:
            raise ScenarioError(f"{self.scenario.source}: events[{i}]: expected scale, job, rollout, delete, cordon "
                                "or eniConfig (with node or subnet)")

    def due(self, now: float) -> list[Action]:
        actions = []
        while self._heap and self._heap[0][0] <= now:
            actions.append(heapq.heappop(self._heap)[2])
        return actions

    def __len__(self) -> int:
        return len(self._heap)
