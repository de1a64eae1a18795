"""VPC CNI settings: the aws-node container's env, parsed with the CNI's own defaults.

What ipamd does with them (warm pools, growth, ENI requests) is `webhook.model.ipamd`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from webhook.model.limits import CapacityMode


class CniSettingsError(ValueError):
    """A bad value in the aws-node env; the message names the variable."""


# ipamd's defaults when the variable is unset (`getWarmENITarget`, `getWarmPrefixTarget`): the shipped aws-node
# manifests set WARM_PREFIX_TARGET=1 explicitly, which the env then carries.
DEFAULT_WARM_ENI_TARGET = 1
DEFAULT_WARM_PREFIX_TARGET = 0
DEFAULT_ENI_CONFIG_LABEL = "k8s.amazonaws.com/eniConfig"
DEFAULT_ENI_CONFIG_NAME = "default"  # the ENIConfig MyENIConfig falls back to
DEFAULT_IP_COOLDOWN = 30.0
DEFAULT_BRANCH_COOLDOWN = 60.0
DEFAULT_ENI_CONFIG_ANNOTATION = "k8s.amazonaws.com/eniConfig"
# Said once in the log, by `report` and by /readyz: ipamd gives each node a /80 prefix in IPv6 mode.
IPV6_STAND_ASIDE = "IPv6 cluster (ENABLE_IPv6=true): pod addresses are not the constraint; ipguard admits every pod"


@dataclass(frozen=True, slots=True)
class CniSettings:
    prefix_delegation: bool = False
    warm_eni_target: int = DEFAULT_WARM_ENI_TARGET
    warm_ip_target: int | None = None
    minimum_ip_target: int | None = None
    warm_prefix_target: int = DEFAULT_WARM_PREFIX_TARGET
    custom_networking: bool = False
    eni_config_label_def: str = DEFAULT_ENI_CONFIG_LABEL
    eni_config_annotation_def: str = DEFAULT_ENI_CONFIG_ANNOTATION
    max_eni: int | None = None
    pod_eni: bool = False
    ipv6: bool = False
    manage_enis_non_schedulable: bool = False  # AWS_MANAGE_ENIS_NON_SCHEDULABLE
    subnet_discovery: bool = True  # ENABLE_SUBNET_DISCOVERY (CNI 1.18+)
    ip_cooldown: float = DEFAULT_IP_COOLDOWN  # IP_COOLDOWN_PERIOD: seconds before ipamd reuses a freed IP
    # The resource controller's branch ENI cooldown (its own ConfigMap, not aws-node's env): 60 s by default.
    branch_cooldown: float = DEFAULT_BRANCH_COOLDOWN

    # Derived once: read for every node on every change, and on the request path.
    mode: CapacityMode = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "mode", CapacityMode(self.prefix_delegation, self.custom_networking, self.max_eni, self.pod_eni)
        )

    @property
    def uses_ip_targets(self) -> bool:
        """WARM_IP_TARGET / MINIMUM_IP_TARGET override WARM_ENI_TARGET (and WARM_PREFIX_TARGET)."""
        return bool(self.warm_ip_target) or bool(self.minimum_ip_target)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CniSettings:
        """Parse the aws-node env with the CNI's defaults for anything unset or empty."""
        return cls(
            prefix_delegation=_bool(env, "ENABLE_PREFIX_DELEGATION", False),
            warm_eni_target=_int(env, "WARM_ENI_TARGET", DEFAULT_WARM_ENI_TARGET) or 0,
            warm_ip_target=_int(env, "WARM_IP_TARGET", None),
            minimum_ip_target=_int(env, "MINIMUM_IP_TARGET", None),
            warm_prefix_target=_int(env, "WARM_PREFIX_TARGET", DEFAULT_WARM_PREFIX_TARGET) or 0,
            custom_networking=_bool(env, "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", False),
            eni_config_label_def=(env.get("ENI_CONFIG_LABEL_DEF") or DEFAULT_ENI_CONFIG_LABEL).strip(),
            eni_config_annotation_def=(
                env.get("ENI_CONFIG_ANNOTATION_DEF") or DEFAULT_ENI_CONFIG_ANNOTATION
            ).strip(),
            max_eni=_positive(env, "MAX_ENI"),
            pod_eni=_bool(env, "ENABLE_POD_ENI", False),
            ipv6=_bool(env, "ENABLE_IPv6", False),
            manage_enis_non_schedulable=_bool(env, "AWS_MANAGE_ENIS_NON_SCHEDULABLE", False),
            subnet_discovery=_bool(env, "ENABLE_SUBNET_DISCOVERY", True),
            ip_cooldown=float(_int(env, "IP_COOLDOWN_PERIOD", int(DEFAULT_IP_COOLDOWN)) or 0),
        )


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _raw(env, name)
    if value is None:
        return default
    # The CNI reads booleans with Go's strconv.ParseBool: exactly these spellings.
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise CniSettingsError(f"{name}={value!r} is not a boolean (expected true or false)")


def _whole(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise CniSettingsError(f"{name}={value!r} is not a whole number") from None


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = _raw(env, name)
    if value is None:
        return default
    number = _whole(name, value)
    if number < 0:
        raise CniSettingsError(f"{name}={value!r} must not be negative")
    return number


def _positive(env: Mapping[str, str], name: str) -> int | None:
    value = _raw(env, name)
    if value is None:
        return None
    number = _whole(name, value)
    # The CNI treats MAX_ENI below 1 as "no cap".
    return number if number >= 1 else None
