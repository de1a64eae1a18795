"""CNI settings from the aws-node env, with the CNI's own defaults and spellings."""

from __future__ import annotations

import pytest

from webhook.model.cni import DEFAULT_ENI_CONFIG_LABEL, CniSettings, CniSettingsError

# ---- from_env ---------------------------------------------------------------------------------------------


def test_defaults_from_empty_env() -> None:
    cni = CniSettings.from_env({})
    assert cni == CniSettings()
    assert cni.prefix_delegation is False
    assert cni.warm_eni_target == 1
    assert cni.warm_ip_target is None
    assert cni.minimum_ip_target is None
    assert cni.warm_prefix_target == 0  # ipamd's getWarmPrefixTarget default; manifests set 1 explicitly
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
