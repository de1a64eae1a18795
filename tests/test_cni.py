"""CNI settings from the aws-node env, and the warm-pool prediction, against hand-worked figures.

m5.large: 3 ENIs x 10 IPv4 each, so 9 secondary slots per ENI, 27 pod IPs (432 under prefix delegation).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.model.cni import (
    DEFAULT_ENI_CONFIG_LABEL,
    CniSettings,
    CniSettingsError,
    HeldAddresses,
    predict_held,
)
from webhook.model.limits import LimitsTable, pod_ip_capacity, uses_prefixes

TABLE = LimitsTable()
M5L = TABLE.get("m5.large")

# ---- from_env ---------------------------------------------------------------------------------------------


def test_defaults_from_empty_env() -> None:
    cni = CniSettings.from_env({})
    assert cni == CniSettings()
    assert cni.prefix_delegation is False
    assert cni.warm_eni_target == 1
    assert cni.warm_ip_target is None
    assert cni.minimum_ip_target is None
    assert cni.warm_prefix_target == 1
    assert cni.custom_networking is False
    assert cni.eni_config_label_def == DEFAULT_ENI_CONFIG_LABEL == "k8s.amazonaws.com/eniConfig"
    assert cni.max_eni is None
    assert cni.pod_eni is False
    assert cni.ipv6 is False
    assert cni.uses_ip_targets is False


def test_empty_values_mean_defaults() -> None:
    env = {name: "" for name in (
        "ENABLE_PREFIX_DELEGATION", "WARM_ENI_TARGET", "WARM_IP_TARGET", "MINIMUM_IP_TARGET", "WARM_PREFIX_TARGET",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "ENI_CONFIG_LABEL_DEF", "MAX_ENI", "ENABLE_POD_ENI", "ENABLE_IPv6",
    )}
    assert CniSettings.from_env(env) == CniSettings()
    assert CniSettings.from_env({"WARM_IP_TARGET": "   "}) == CniSettings()


def test_every_variable_parsed() -> None:
    env = {
        "ENABLE_PREFIX_DELEGATION": "true",
        "WARM_ENI_TARGET": "2",
        "WARM_IP_TARGET": "5",
        "MINIMUM_IP_TARGET": "10",
        "WARM_PREFIX_TARGET": "3",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true",
        "ENI_CONFIG_LABEL_DEF": " topology.kubernetes.io/zone ",
        "MAX_ENI": "2",
        "ENABLE_POD_ENI": "true",
        "ENABLE_IPv6": "false",
        "AWS_VPC_K8S_CNI_LOGLEVEL": "DEBUG",  # other aws-node variables are ignored
    }
    cni = CniSettings.from_env(env)
    assert cni == CniSettings(
        prefix_delegation=True,
        warm_eni_target=2,
        warm_ip_target=5,
        minimum_ip_target=10,
        warm_prefix_target=3,
        custom_networking=True,
        eni_config_label_def="topology.kubernetes.io/zone",
        max_eni=2,
        pod_eni=True,
        ipv6=False,
    )
    assert cni.uses_ip_targets
    mode = cni.mode
    assert (mode.prefix_delegation, mode.custom_networking, mode.max_eni, mode.pod_eni) == (True, True, 2, True)


@pytest.mark.parametrize("text", ["true", "True", "TRUE", "1", " true "])
def test_boolean_true_spellings(text: str) -> None:
    assert CniSettings.from_env({"ENABLE_PREFIX_DELEGATION": text}).prefix_delegation is True
    assert CniSettings.from_env({"ENABLE_IPv6": text}).ipv6 is True


@pytest.mark.parametrize("text", ["false", "False", "0"])
def test_boolean_false_spellings(text: str) -> None:
    assert CniSettings.from_env({"ENABLE_POD_ENI": text}).pod_eni is False


def test_zero_targets() -> None:
    cni = CniSettings.from_env({"WARM_ENI_TARGET": "0", "WARM_IP_TARGET": "0", "WARM_PREFIX_TARGET": "0"})
    assert cni.warm_eni_target == 0
    assert cni.warm_prefix_target == 0
    # WARM_IP_TARGET=0 is "not set" for ipamd: WARM_ENI_TARGET rules.
    assert cni.uses_ip_targets is False


def test_max_eni_zero_means_no_cap() -> None:
    assert CniSettings.from_env({"MAX_ENI": "0"}).max_eni is None


def test_max_eni_negative_means_no_cap() -> None:
    assert CniSettings.from_env({"MAX_ENI": "-1"}).max_eni is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ENABLE_PREFIX_DELEGATION", "maybe"),
        ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "enabled"),
        ("ENABLE_POD_ENI", "2"),
        ("ENABLE_IPv6", "sure"),
        ("WARM_ENI_TARGET", "one"),
        ("WARM_ENI_TARGET", "-1"),
        ("WARM_IP_TARGET", "5.5"),
        ("WARM_IP_TARGET", "-3"),
        ("MINIMUM_IP_TARGET", "ten"),
        ("WARM_PREFIX_TARGET", "x"),
        ("MAX_ENI", "lots"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(CniSettingsError) as info:
        CniSettings.from_env({name: value})
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)


# ---- predict_held: WARM_ENI_TARGET ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("assigned", "held"),
    [(0, 9), (1, 18), (8, 18), (9, 18), (10, 27), (18, 27), (19, 27), (25, 27), (27, 27)],
)
def test_warm_eni_target_1(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_ENI_TARGET": "1"})
    assert predict_held(assigned, M5L, cni) == HeldAddresses(held)


@pytest.mark.parametrize(("assigned", "held"), [(0, 18), (1, 27), (9, 27), (10, 27)])
def test_warm_eni_target_2(assigned: int, held: int) -> None:
    assert predict_held(assigned, M5L, CniSettings(warm_eni_target=2)).ips == held


@pytest.mark.parametrize(("assigned", "held"), [(0, 0), (1, 9), (9, 9), (10, 18)])
def test_warm_eni_target_0(assigned: int, held: int) -> None:
    assert predict_held(assigned, M5L, CniSettings(warm_eni_target=0)).ips == held


def test_warm_eni_target_t3_medium() -> None:
    # 5 secondary IPs per ENI, 3 ENIs.
    t3 = TABLE.get("t3.medium")
    assert [predict_held(a, t3, CniSettings()).ips for a in (0, 1, 5, 6, 11, 15)] == [5, 10, 10, 15, 15, 15]


# ---- predict_held: WARM_IP_TARGET / MINIMUM_IP_TARGET -----------------------------------------------------


@pytest.mark.parametrize(("assigned", "held"), [(0, 5), (1, 6), (10, 15), (22, 27), (23, 27), (27, 27)])
def test_warm_ip_target(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "5"})
    assert predict_held(assigned, M5L, cni) == HeldAddresses(held)


@pytest.mark.parametrize(("assigned", "held"), [(0, 10), (2, 10), (10, 10), (11, 11), (27, 27)])
def test_minimum_ip_target(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"MINIMUM_IP_TARGET": "10"})
    assert predict_held(assigned, M5L, cni).ips == held


@pytest.mark.parametrize(("assigned", "held"), [(0, 10), (2, 10), (5, 10), (6, 11), (8, 13), (25, 27)])
def test_warm_and_minimum_ip_targets(assigned: int, held: int) -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "5", "MINIMUM_IP_TARGET": "10"})
    assert predict_held(assigned, M5L, cni).ips == held


def test_ip_targets_override_warm_eni_target() -> None:
    cni = CniSettings.from_env({"WARM_IP_TARGET": "2", "WARM_ENI_TARGET": "3"})
    assert predict_held(0, M5L, cni).ips == 2
    assert predict_held(4, M5L, cni).ips == 6


# ---- predict_held: prefix delegation ----------------------------------------------------------------------

PD = {"ENABLE_PREFIX_DELEGATION": "true"}


@pytest.mark.parametrize(
    ("assigned", "prefixes"), [(0, 1), (1, 2), (15, 2), (16, 2), (17, 3), (32, 3), (33, 4), (420, 27), (432, 27)]
)
def test_warm_prefix_target_1(assigned: int, prefixes: int) -> None:
    cni = CniSettings.from_env({**PD, "WARM_PREFIX_TARGET": "1"})
    assert predict_held(assigned, M5L, cni) == HeldAddresses(prefixes * 16, prefixes)


def test_warm_prefix_target_2() -> None:
    cni = CniSettings.from_env({**PD, "WARM_PREFIX_TARGET": "2"})
    assert [predict_held(a, M5L, cni).prefixes for a in (0, 1, 16, 17)] == [2, 3, 3, 4]


@pytest.mark.parametrize(("assigned", "prefixes"), [(0, 1), (11, 1), (12, 2), (27, 2), (28, 3), (430, 27)])
def test_prefix_delegation_with_warm_ip_target(assigned: int, prefixes: int) -> None:
    # max(assigned + 5, 0) addresses, in whole /28s
    cni = CniSettings.from_env({**PD, "WARM_IP_TARGET": "5"})
    assert predict_held(assigned, M5L, cni) == HeldAddresses(prefixes * 16, prefixes)


def test_prefix_delegation_with_minimum_ip_target() -> None:
    cni = CniSettings.from_env({**PD, "MINIMUM_IP_TARGET": "20", "WARM_IP_TARGET": "1"})
    assert predict_held(0, M5L, cni) == HeldAddresses(32, 2)
    assert predict_held(31, M5L, cni) == HeldAddresses(32, 2)
    assert predict_held(32, M5L, cni) == HeldAddresses(48, 3)


def test_prefix_delegation_on_non_nitro_falls_back_to_ips() -> None:
    m4 = TABLE.get("m4.large")  # 2 ENIs x 9 slots, no prefixes
    cni = CniSettings.from_env(PD)
    assert predict_held(0, m4, cni) == HeldAddresses(9, 0)
    assert predict_held(10, m4, cni) == HeldAddresses(18, 0)


# ---- predict_held: capacity-reducing modes ----------------------------------------------------------------


def test_custom_networking_reduces_the_cap() -> None:
    cni = CniSettings.from_env({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"})
    # 2 usable ENIs x 9: 18 at most
    assert [predict_held(a, M5L, cni).ips for a in (0, 1, 9, 10, 18)] == [9, 18, 18, 18, 18]
    cni_ip = CniSettings.from_env({"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "WARM_IP_TARGET": "5"})
    assert predict_held(15, M5L, cni_ip).ips == 18


def test_max_eni_and_pod_eni_reduce_the_cap() -> None:
    assert predict_held(9, M5L, CniSettings(max_eni=1)).ips == 9
    assert predict_held(9, M5L, CniSettings(pod_eni=True)).ips == 18
    assert predict_held(20, M5L, CniSettings(pod_eni=True, warm_ip_target=5)).ips == 18
    cni_pd = CniSettings(prefix_delegation=True, max_eni=1)
    assert predict_held(200, M5L, cni_pd) == HeldAddresses(9 * 16, 9)


def test_negative_assigned_is_zero() -> None:
    assert predict_held(-3, M5L, CniSettings()) == predict_held(0, M5L, CniSettings())


# ---- properties -------------------------------------------------------------------------------------------

# A spread of real types: small, trunking and not, Nitro and not, big.
TYPES = ["m5.large", "t3.medium", "t3.nano", "m4.large", "t2.medium", "c5.18xlarge", "m5.xlarge", "c5.9xlarge"]

cni_settings = st.builds(
    CniSettings,
    prefix_delegation=st.booleans(),
    warm_eni_target=st.integers(0, 4),
    warm_ip_target=st.one_of(st.none(), st.integers(0, 40)),
    minimum_ip_target=st.one_of(st.none(), st.integers(0, 60)),
    warm_prefix_target=st.integers(0, 4),
    custom_networking=st.booleans(),
    max_eni=st.one_of(st.none(), st.integers(1, 16)),
    pod_eni=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(TYPES), cni=cni_settings, data=st.data())
def test_held_properties(name: str, cni: CniSettings, data: st.DataObject) -> None:
    limits = TABLE.get(name)
    capacity = pod_ip_capacity(limits, cni.mode)
    assigned = data.draw(st.integers(0, capacity + 20), label="assigned")
    held = predict_held(assigned, limits, cni)
    assert 0 <= held.ips <= capacity
    if assigned <= capacity:
        assert held.ips >= assigned
    more = predict_held(assigned + 1, limits, cni)
    assert more.ips >= held.ips, "held is monotone in assigned"
    if uses_prefixes(limits, cni.mode):
        assert held.ips % 16 == 0
        assert held.ips == held.prefixes * 16
    else:
        assert held.prefixes == 0


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(TYPES), cni=cni_settings)
def test_held_monotone_over_whole_range(name: str, cni: CniSettings) -> None:
    limits = TABLE.get(name)
    capacity = pod_ip_capacity(limits, cni.mode)
    figures = [predict_held(a, limits, cni).ips for a in range(0, capacity + 2)]
    assert figures == sorted(figures)
    assert all(figures[a] >= a for a in range(0, capacity + 1))
