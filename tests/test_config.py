"""ipguard's ConfigMap: defaults, every key, errors naming the key."""

from __future__ import annotations

import pytest

from webhook.model.config import KNOWN_KEYS, ConfigError, Mode, Settings
from webhook.service import ServeOptions, min_staleness


def test_defaults() -> None:
    for data in (None, {}):
        s = Settings.from_configmap(data)
        assert s == Settings()
        assert s.mode is Mode.ENFORCE
        assert s.zone_reserve == 0
        assert dict(s.zone_reserves) == {}
        assert s.node_reserve == 0
        assert s.exempt_namespaces == frozenset({"kube-system"})
        assert s.reservation_ttl == 30.0
        assert s.staleness_bound == 120.0
        assert s.max_steered_nodes == 20


def test_every_key_but_zone_reserves() -> None:
    data = {
        "mode": "warn",
        "zoneReserve": "5",
        "zoneReserves": "us-east-1a=10,us-east-1b=0",
        "nodeReserve": "2",
        "exemptNamespaces": "kube-system, karpenter,monitoring",
        "reservationTTLSeconds": "12.5",
        "stalenessSeconds": "60",
        "maxSteeredNodes": "7",
        "securityGroupsPerENI": "10",
        "rulesPerSecurityGroup": "100",
        "reservationConfirmSeconds": "4",
        "maxUnconfirmedReservations": "15",
    }
    assert set(data) == KNOWN_KEYS
    s = Settings.from_configmap(data)
    assert s.mode is Mode.WARN
    assert s.zone_reserve == 5
    assert set(s.zone_reserves) == {"us-east-1a", "us-east-1b"}
    assert s.node_reserve == 2
    assert s.exempt_namespaces == frozenset({"kube-system", "karpenter", "monitoring"})
    assert s.reservation_ttl == 12.5
    assert s.staleness_bound == 60.0
    assert s.max_steered_nodes == 7
    assert (s.groups_per_eni, s.rules_per_group) == (10, 100)
    assert s.reservation_confirm == 4.0
    assert s.max_unconfirmed == 15


@pytest.mark.parametrize(("key", "text"), [("securityGroupsPerENI", "17"), ("securityGroupsPerENI", "0"),
                                           ("rulesPerSecurityGroup", "1001"), ("rulesPerSecurityGroup", "x")])
def test_quota_settings_out_of_range_name_the_key(key: str, text: str) -> None:
    """The EC2 quotas allow 1-16 groups per ENI and at most 1000 rules per group."""
    with pytest.raises(ConfigError, match=key):
        Settings.from_configmap({key: text})


@pytest.mark.parametrize(("text", "mode"), [("enforce", Mode.ENFORCE), ("warn", Mode.WARN), ("dry-run", Mode.DRY_RUN),
                                            (" Warn ", Mode.WARN), ("DRY-RUN", Mode.DRY_RUN)])
def test_modes(text: str, mode: Mode) -> None:
    assert Settings.from_configmap({"mode": text}).mode is mode


def test_reserve_for_zone() -> None:
    s = Settings.from_configmap({"zoneReserve": "5", "zoneReserves": "us-east-1a=10, us-east-1c=0"})
    assert s.reserve_for_zone("us-east-1a") == 10
    assert s.reserve_for_zone("us-east-1b") == 5
    assert s.reserve_for_zone("us-east-1c") == 0  # an explicit 0 overrides the default


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        (" , ", {}),
        ("us-east-1a=0", {"us-east-1a": 0}),
        pytest.param("us-east-1a=10", {"us-east-1a": 10}),
        pytest.param(" us-east-1a = 10 , us-east-1b=5 ,", {"us-east-1a": 10, "us-east-1b": 5}),
        pytest.param("us-east-1a=1,,us-east-1b=2", {"us-east-1a": 1, "us-east-1b": 2}),
    ],
)
def test_zone_reserves_parsing(text: str, expected: dict[str, int]) -> None:
    assert dict(Settings.from_configmap({"zoneReserves": text}).zone_reserves) == expected


@pytest.mark.parametrize(
    "text",
    [
        "us-east-1a",
        "=10",
        "us-east-1a:10",
        pytest.param("us-east-1a=ten"),
        pytest.param("us-east-1a=-1"),
        pytest.param("us-east-1a=1.5"),
    ],
)
def test_zone_reserves_bad(text: str) -> None:
    with pytest.raises(ConfigError, match="zoneReserves"):
        Settings.from_configmap({"zoneReserves": text})


def test_zone_reserves_missing_count_rejected() -> None:
    with pytest.raises(ConfigError, match="zoneReserves"):
        Settings.from_configmap({"zoneReserve": "5", "zoneReserves": "us-east-1a="})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mode", "strict"),
        ("mode", "dryrun"),
        ("zoneReserve", "five"),
        ("zoneReserve", "-1"),
        ("zoneReserve", "2.5"),
        ("nodeReserve", "x"),
        ("nodeReserve", "-2"),
        ("maxSteeredNodes", "many"),
        ("maxSteeredNodes", "-1"),
        ("reservationTTLSeconds", "soon"),
        ("reservationTTLSeconds", "0"),
        ("reservationTTLSeconds", "-5"),
        ("reservationTTLSeconds", "nan"),
        ("reservationTTLSeconds", "inf"),
        ("stalenessSeconds", "0"),
        ("stalenessSeconds", "2m"),
        ("exemptNamespaces", "Kube-System"),
        ("exemptNamespaces", "ok,bad_name"),
        ("exemptNamespaces", "-leading"),
        ("exemptNamespaces", "a" * 64),
    ],
)
def test_bad_values_name_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_configmap({key: value})
    assert key in str(info.value)
    assert isinstance(info.value, ValueError)


def test_blank_numbers_mean_defaults() -> None:
    s = Settings.from_configmap({"zoneReserve": " ", "nodeReserve": "", "reservationTTLSeconds": "",
                                 "stalenessSeconds": " ", "maxSteeredNodes": ""})
    assert s == Settings()


def test_empty_exempt_namespaces_means_none_exempt() -> None:
    assert Settings.from_configmap({"exemptNamespaces": ""}).exempt_namespaces == frozenset()
    assert Settings.from_configmap({"exemptNamespaces": " , "}).exempt_namespaces == frozenset()


def test_zero_counts_allowed() -> None:
    s = Settings.from_configmap({"zoneReserve": "0", "nodeReserve": "0", "maxSteeredNodes": "0"})
    assert (s.zone_reserve, s.node_reserve, s.max_steered_nodes) == (0, 0, 0)


@pytest.mark.parametrize("keys", [["zonereserve"], ["ZoneReserve"], ["reserve"], ["mode", "bogus", "other"]])
def test_unknown_keys_rejected(keys: list[str]) -> None:
    data = {k: "1" for k in keys}
    if "mode" in data:
        data["mode"] = "warn"
    with pytest.raises(ConfigError) as info:
        Settings.from_configmap(data)
    for key in keys:
        if key not in KNOWN_KEYS:
            assert key in str(info.value)


def test_staleness_below_what_the_sources_support_is_refused_and_the_serve_minimum_is_60() -> None:
    """A bound smaller than a quiet watch's longest silence would fail decisions open on healthy data."""
    with pytest.raises(ConfigError, match="stalenessSeconds='10' is below 60"):
        Settings.from_configmap({"stalenessSeconds": "10"}, min_staleness=60)
    assert Settings.from_configmap({"stalenessSeconds": "60"}, min_staleness=60).staleness_bound == 60
    assert min_staleness(ServeOptions()) == 60  # as README and config.py say
    assert min_staleness(ServeOptions(ec2_period=120)) == 130
