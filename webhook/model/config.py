"""ipguard's own settings, read from its ConfigMap (`data` is a flat string-to-string map).

Keys and defaults (documented in README.md):
  mode                     enforce | warn | dry-run                      (default enforce)
  zoneReserve              free pod IPs a zone keeps back                (default 0)
  zoneReserves             per-zone overrides, "us-east-1a=10,us-east-1b=5"
  nodeReserve              free pod IPs a node keeps back                (default 0)
  exemptNamespaces         comma-separated namespaces never judged        (default kube-system)
  reservationTTLSeconds    how long an admitted pod holds its IP          (default 30)
  reservationConfirmSeconds  a reservation whose pod the watch has not shown by then is released (default 10)
  maxUnconfirmedReservations  per zone; past it /validate judges without reserving (default 50)
  stalenessSeconds         data older than this fails open               (default 120; at least 60 with
                           `serve`'s defaults: the watch timeout, 55 s, plus 5 s, and at least the EC2
                           period + 10 s; smaller values are refused, see service.min_staleness)
  maxSteeredNodes          most node names a steering patch lists        (default 20)
  securityGroupsPerENI     EC2 quota, when Service Quotas cannot be read  (default 5; 1-16)
  rulesPerSecurityGroup    EC2 quota per direction and family, likewise   (default 60)
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad ConfigMap value; the message names the key."""


class Mode(enum.Enum):
    ENFORCE = "enforce"
    WARN = "warn"
    DRY_RUN = "dry-run"


KNOWN_KEYS = frozenset(
    {
        "mode",
        "zoneReserve",
        "zoneReserves",
        "nodeReserve",
        "exemptNamespaces",
        "reservationTTLSeconds",
        "reservationConfirmSeconds",
        "maxUnconfirmedReservations",
        "stalenessSeconds",
        "maxSteeredNodes",
        "securityGroupsPerENI",
        "rulesPerSecurityGroup",
    }
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class Settings:
    mode: Mode = Mode.ENFORCE
    zone_reserve: int = 0
    zone_reserves: Mapping[str, int] = field(default_factory=dict)
    node_reserve: int = 0
    exempt_namespaces: frozenset[str] = frozenset({"kube-system"})
    reservation_ttl: float = 30.0
    # The apiserver persists an admitted pod within milliseconds and the watch shows it well within this; a
    # review nobody persisted (made up, or refused by a later admission step) never shows.
    reservation_confirm: float = 10.0
    max_unconfirmed: int = 50
    staleness_bound: float = 120.0
    max_steered_nodes: int = 20
    groups_per_eni: int | None = None  # None: not set (Service Quotas or EC2's default decide)
    rules_per_group: int | None = None

    def reserve_for_zone(self, zone: str) -> int:
        return self.zone_reserves.get(zone, self.zone_reserve)

    @classmethod
    def from_configmap(cls, data: Mapping[str, str] | None, *, min_staleness: float = 0.0) -> Settings:
        """`min_staleness`: the least stalenessSeconds the data sources can keep (smaller is an error)."""
        data = data or {}
        unknown = sorted(set(data) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(KNOWN_KEYS))}"
            )
        defaults = cls()
        mode_text = data.get("mode", defaults.mode.value).strip().lower()
        try:
            mode = Mode(mode_text)
        except ValueError:
            raise ConfigError(f"mode={mode_text!r}: expected one of enforce, warn, dry-run") from None
        staleness_bound = _seconds(data, "stalenessSeconds", defaults.staleness_bound)
        if "stalenessSeconds" in data and staleness_bound < min_staleness:
            raise ConfigError(
                f"stalenessSeconds={data['stalenessSeconds']!r} is below {min_staleness:g}, the least the data "
                "sources can keep: a quiet watch may be silent, and EC2 data that old, between refreshes"
            )
        return cls(
            mode=mode,
            zone_reserve=_count(data, "zoneReserve", defaults.zone_reserve),
            zone_reserves=_zone_map(data.get("zoneReserves", "")),
            node_reserve=_count(data, "nodeReserve", defaults.node_reserve),
            exempt_namespaces=_namespaces(data.get("exemptNamespaces"), defaults.exempt_namespaces),
            reservation_ttl=_seconds(data, "reservationTTLSeconds", defaults.reservation_ttl),
            reservation_confirm=_seconds(data, "reservationConfirmSeconds", defaults.reservation_confirm),
            max_unconfirmed=_count(data, "maxUnconfirmedReservations", defaults.max_unconfirmed),
            staleness_bound=staleness_bound,
            max_steered_nodes=_count(data, "maxSteeredNodes", defaults.max_steered_nodes),
            groups_per_eni=_quota(data, "securityGroupsPerENI", 1, 16),
            rules_per_group=_quota(data, "rulesPerSecurityGroup", 1, 1000),
        )


# In force while ipguard's ConfigMap is refused and no valid settings were ever in force (an invalid ConfigMap at
# start-up): the built-in defaults would enforce, which the admin may never have meant (a typo in a ConfigMap
# that says `mode: warn`). dry-run never denies or steers; a valid ConfigMap replaces it at once.
NO_VALID_SETTINGS = Settings(mode=Mode.DRY_RUN)


def _count(data: Mapping[str, str], key: str, default: int) -> int:
    text = data.get(key)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{key}={text!r} must not be negative")
    return value


def _quota(data: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    text = data.get(key)
    if text is None or not text.strip():
        return None
    value = _count(data, key, 0)
    if not low <= value <= high:
        raise ConfigError(f"{key}={text!r} must be between {low} and {high}")
    return value


def _seconds(data: Mapping[str, str], key: str, default: float) -> float:
    text = data.get(key)
    if text is None or not text.strip():
        return default
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ConfigError(f"{key}={text!r} must be a positive number of seconds")
    return value


def _zone_map(text: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        zone, sep, number = item.partition("=")
        zone = zone.strip()
        if not sep or not zone:
            raise ConfigError(f"zoneReserves entry {item!r}: expected ZONE=COUNT, e.g. us-east-1a=10")
        key = f"zoneReserves[{zone}]"
        if not number.strip():
            raise ConfigError(f"zoneReserves entry {item!r}: the count is missing (expected ZONE=COUNT)")
        result[zone] = _count({key: number}, key, 0)
    return result


def _namespaces(text: str | None, default: frozenset[str]) -> frozenset[str]:
    if text is None:
        return default
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    bad = sorted(n for n in names if not _DNS_LABEL.match(n) or len(n) > 63)
    if bad:
        raise ConfigError(f"exemptNamespaces: {', '.join(bad)} not valid namespace name(s)")
    return names
