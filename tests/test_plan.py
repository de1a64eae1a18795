"""`ipguard plan` against hand-worked figures (webhook.model.plan, on ipamd's rules in webhook.model.ipamd).

m5.large: 3 ENIs x 10 IPv4 each: 9 secondary slots per ENI, 27 pod IPs (max-pods 29); under prefix delegation
27 slots of 16 = 432 pod IPs, but max-pods 110 (2 vCPUs), so 108 pods per node.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhook.cli import main
from webhook.model.cni import CniSettings
from webhook.model.limits import LimitsTable
from webhook.model.plan import (
    DOES_NOT_FIT,
    FITS,
    FITS_WITH_PREFIX_DELEGATION,
    PREFIX_DELEGATION,
    ModeNeed,
    PlanError,
    largest_fit,
    make_plan,
    mode_need,
    subnet_space,
)

TABLE = LimitsTable()
M5L = TABLE.get("m5.large")
SECONDARY = CniSettings()  # WARM_ENI_TARGET=1
PREFIXES = CniSettings(prefix_delegation=True, warm_prefix_target=1)


@pytest.mark.parametrize(("cidr", "size", "available", "blocks"), [
    ("10.0.0.0/24", 256, 251, 14),
    ("10.0.0.0/26", 64, 59, 2),
    ("10.0.0.0/27", 32, 27, 0),  # both blocks hold a reserved address
    ("10.0.0.0/28", 16, 11, 0),
    ("10.0.0.0/16", 65536, 65531, 4094),
])
def test_subnet_space_takes_out_aws_reserved_addresses_and_their_blocks(
        cidr: str, size: int, available: int, blocks: int) -> None:
    """AWS reserves the first four addresses and the last of each subnet; a /28 block holding any of them
    cannot be a prefix."""
    space = subnet_space(cidr)
    assert (space.size, space.available, space.blocks) == (size, available, blocks)


@pytest.mark.parametrize("cidr", ["10.0.0.1/24", "10.0.0.0/29", "10.0.0.0/15", "2600::/64", "nonsense"])
def test_subnet_space_refuses_what_is_not_an_ec2_ipv4_subnet(cidr: str) -> None:
    with pytest.raises(PlanError):
        subnet_space(cidr)


def test_hundred_pods_on_m5_large_secondary_ips() -> None:
    """predict_held, WARM_ENI_TARGET=1: 3 full nodes of 27 pods hold 27 IPs on 3 ENIs; the 4th, with 19 pods,
    wants 3 ENIs plus a warm one, capped at 3: 27 IPs. 4 node primaries + 8 more ENI primaries + 108 IPs."""
    need = mode_need(100, M5L, SECONDARY)
    assert (need.nodes, need.node_primaries, need.eni_primaries, need.pod_ips, need.idle) == (4, 4, 8, 108, 8)
    assert need.needed == 120


def test_hundred_pods_on_m5_large_prefix_delegation() -> None:
    """One node of 108 pods; 100 pods want 7 prefixes + WARM_PREFIX_TARGET 1 = 8, but growth stops at max-pods
    110 IPs: 7 prefixes (112 IPs), one ENI, its primary the node's."""
    need = mode_need(100, M5L, PREFIXES)
    assert (need.mode, need.nodes, need.blocks, need.pod_ips, need.idle, need.loose) == (
        PREFIX_DELEGATION, 1, 7, 112, 12, 1)


def test_warm_ip_target_holds_the_pods_plus_the_target() -> None:
    """WARM_IP_TARGET=2, 10 pods: 12 IPs over 2 ENIs (9 + 3): 12 + 2 primaries."""
    need = mode_need(10, M5L, CniSettings(warm_ip_target=2))
    assert (need.pod_ips, need.idle, need.node_primaries + need.eni_primaries, need.needed) == (12, 2, 2, 14)


def test_largest_fit_in_a_slash_24_secondary_ips() -> None:
    """30 addresses per full node: 8 nodes take 240 of 251; the 11 left cannot give a 9th node its first pod
    (its primary, 9 IPs, and the warm ENI's primary and 9 IPs: 20)."""
    assert largest_fit(subnet_space("10.0.0.0/24"), M5L, SECONDARY) == 216


def test_largest_fit_in_a_slash_22_both_modes() -> None:
    """Secondary IPs: 1019 // 30 = 33 nodes (891 pods), 29 addresses left: a 34th node with 9 pods takes 20
    (2 ENIs), with 10 it would take 30: 900. Prefixes: 62 usable blocks, 7 per full node: 8 nodes (864 pods),
    6 blocks left: a 9th node holds ceil(r/16) + 1 <= 6 prefixes: 80 pods: 944."""
    space = subnet_space("10.0.0.0/22")
    assert largest_fit(space, M5L, SECONDARY) == 900
    assert largest_fit(space, M5L, PREFIXES) == 944


def test_scattered_primaries_break_a_block_each() -> None:
    """A /24 has 27 addresses outside its 14 usable blocks. 30 primaries spill 3 into the blocks: packed they
    break one, scattered three."""
    space = subnet_space("10.0.0.0/24")
    need = ModeNeed(PREFIX_DELEGATION, 0, 108, 110, 30, 30, 0, 12 * 16, 0, 12)
    assert need.blocks_broken(space, scattered=False) == 1 and need.fits(space)
    assert need.blocks_broken(space, scattered=True) == 3 and not need.fits(space, scattered=True)


def test_verdict_fits_only_with_prefix_delegation() -> None:
    plan = make_plan(["10.0.0.0/22", "10.0.4.0/22"], 920, M5L, SECONDARY)
    assert not plan.fits and plan.verdict == FITS_WITH_PREFIX_DELEGATION


def test_verdict_does_not_fit_either_way() -> None:
    plan = make_plan(["10.0.0.0/24"], 300, M5L, PREFIXES)
    assert plan.verdict == DOES_NOT_FIT


def test_non_nitro_type_has_no_prefix_mode() -> None:
    """ipamd turns prefix delegation off on types that cannot take prefixes (isConfigValid)."""
    plan = make_plan(["10.0.0.0/26"], 20, TABLE.get("c4.large"), PREFIXES)
    assert plan.subnets[0].prefix is None and plan.verdict == FITS


settings_strategy = st.sampled_from([SECONDARY, PREFIXES, CniSettings(warm_eni_target=0), CniSettings(warm_ip_target=3),
                                     CniSettings(warm_ip_target=5, minimum_ip_target=30),
                                     CniSettings(prefix_delegation=True, warm_prefix_target=2)])


@settings(max_examples=60, deadline=None)
@given(pods=st.integers(0, 3000), name=st.sampled_from(["m5.large", "t3.medium", "c5.4xlarge", "m5.24xlarge"]),
       cni=settings_strategy)
def test_more_pods_never_need_fewer_addresses(pods: int, name: str, cni: CniSettings) -> None:
    """The binary search in largest_fit rests on this: needs grow with the pod count."""
    limits = TABLE.get(name)
    one, two = mode_need(pods, limits, cni), mode_need(pods + 1, limits, cni)
    assert two.needed >= one.needed and two.blocks >= one.blocks and two.pod_ips >= pods + 1


@settings(max_examples=40, deadline=None)
@given(prefix=st.integers(20, 28), name=st.sampled_from(["m5.large", "t3.medium", "c5.4xlarge"]),
       cni=settings_strategy)
def test_largest_fit_is_the_edge(prefix: int, name: str, cni: CniSettings) -> None:
    space = subnet_space(f"10.0.0.0/{prefix}")
    limits = TABLE.get(name)
    largest = largest_fit(space, limits, cni)
    assert mode_need(largest, limits, cni).fits(space)
    assert not mode_need(largest + 1, limits, cni).fits(space)


def test_cli_exit_status_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--cidr", "10.0.0.0/24", "--pods", "100", "--instance-type", "m5.large"]) == 0
    text = capsys.readouterr().out
    assert "verdict: fits" in text and "251 after AWS's 5 reserved" in text
    assert main(["plan", "--cidr", "10.0.0.0/22", "--pods", "920", "--instance-type", "m5.large", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == FITS_WITH_PREFIX_DELEGATION
    [subnet] = report["subnets"]
    assert subnet["secondaryIp"]["largestPods"] == 900 and subnet["prefixDelegation"]["largestPods"] == 944
    assert main(["plan", "--cidr", "10.0.0.0/24", "--pods", "300", "--instance-type", "m5.large",
                 "--prefix-delegation"]) == 1
    assert "secondary VPC CIDR" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["--cidr", "10.0.0.0/29", "--pods", "1", "--instance-type", "m5.large"],
    ["--cidr", "10.0.0.0/24", "--pods", "1", "--instance-type", "m5.nonesuch"],
    ["--cidr", "10.0.0.0/24", "--pods", "-1", "--instance-type", "m5.large"],
    ["--cidr", "10.0.0.0/24", "--pods", "1", "--instance-type", "m5.large", "--warm-ip-target", "-2"],
    ["--cidr", "10.0.0.0/24", "--pods", "40", "--instance-type", "m5.large", "--minimum-ip-target", "10"],
])
def test_cli_bad_input_is_exit_2_with_a_reason(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    assert capsys.readouterr().err.startswith("ipguard: ")
