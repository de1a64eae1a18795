"""Kubernetes LabelSelector semantics (metav1.LabelSelectorAsSelector), as the VPC resource controller uses
them to match SecurityGroupPolicies to pods and service accounts.

- matchLabels and matchExpressions are ANDed; an empty selector (`{}`) matches everything; an absent one
  (None) matches nothing.
- In: the key is present and its value is listed. NotIn: the key is absent, or its value is not listed.
  Exists / DoesNotExist: the key is present / absent, whatever its value.
- In and NotIn need at least one value; Exists and DoesNotExist take none; any other operator is an error.
  A selector with an error matches nothing (the controller logs the error and treats it as unmatched).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SelectorError(ValueError):
    """A selector the apiserver's conversion refuses; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def everything(self) -> bool:
        return not self.requirements

    def describe(self) -> str:
        """`app=api,tier in (db,cache),!legacy`: kubectl's way of writing a selector."""
        parts = []
        for r in self.requirements:
            values = ",".join(sorted(r.values))
            if r.operator == "In":
                parts.append(f"{r.key}={values}" if len(r.values) == 1 else f"{r.key} in ({values})")
            elif r.operator == "NotIn":
                parts.append(f"{r.key} notin ({values})")
            elif r.operator == "Exists":
                parts.append(r.key)
            else:
                parts.append(f"!{r.key}")
        return ",".join(parts) or "(everything)"


def parse_selector(raw: Any) -> LabelSelector:
    """A LabelSelector from its JSON form; raises SelectorError for what the conversion refuses."""
    if not isinstance(raw, Mapping):
        raise SelectorError("a label selector must be an object")
    requirements: list[Requirement] = []
    match_labels = raw.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise SelectorError("matchLabels must be a map of strings")
    for key, value in match_labels.items():
        if not isinstance(value, str):
            raise SelectorError(f"matchLabels[{key}] must be a string")
        requirements.append(Requirement(str(key), "In", frozenset({value})))
    expressions = raw.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise SelectorError("matchExpressions must be a list")
    for i, expr in enumerate(expressions):
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
            raise SelectorError(f"matchExpressions[{i}] needs a key")
        operator = expr.get("operator")
        values = expr.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SelectorError(f"matchExpressions[{i}].values must be a list of strings")
        if operator in ("In", "NotIn") and not values:
            raise SelectorError(f"matchExpressions[{i}]: operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise SelectorError(f"matchExpressions[{i}]: operator {operator} takes no values")
        if operator not in OPERATORS:
            raise SelectorError(f"matchExpressions[{i}]: {operator!r} is not a valid operator")
        requirements.append(Requirement(expr["key"], operator, frozenset(values)))
    return LabelSelector(tuple(requirements))
