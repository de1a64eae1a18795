"""Instance-type limits -> max-pods and pod-IP capacity, against hand-worked figures.

Every expected number below is worked out by hand from the VPC CNI / EKS max-pods calculator formulas
(DESIGN.md "Domain facts"), not copied from the code:
  secondary IPs       E x (I - 1) + 2
  prefix delegation   E x (I - 1) x 16 + 2, Nitro only, VPC CNI >= 1.9.0
  custom networking   (E - 1) x (I - 1) + 2
  ceiling             110 for <= 30 vCPUs, else 250, unless --show-max-allowed
Bundled limits used (E, I, vCPUs, branch ENIs): m5.large (3, 10, 2, 9), m5.xlarge (4, 15, 4, 18),
t3.medium (3, 6, 2, 0), t3.nano (2, 2, 2, 0), c5.18xlarge (15, 50, 72, 107), m5.8xlarge (8, 30, 32, 54),
m4.large (2, 10, 2, 0, not Nitro), t2.medium (3, 6, 2, 0, not Nitro).
"""

from __future__ import annotations

import pytest

from webhook import cli
from webhook.model.limits import (
    CapacityMode,
    InstanceLimits,
    LimitsTable,
    UnknownInstanceType,
    max_pods,
    parse_cni_version,
    pod_ip_capacity,
    usable_enis,
    uses_prefixes,
)

TABLE = LimitsTable()
SECONDARY = CapacityMode()
PD = CapacityMode(prefix_delegation=True)
CUSTOM = CapacityMode(custom_networking=True)


def lim(name: str) -> InstanceLimits:
    return TABLE.get(name)


# ---- the bundled table carries the real EC2 figures -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "enis", "ips", "nitro", "vcpus", "branch"),
    [
        ("m5.large", 3, 10, True, 2, 9),
        ("m5.xlarge", 4, 15, True, 4, 18),
        ("t3.medium", 3, 6, True, 2, 0),
        ("c5.18xlarge", 15, 50, True, 72, 107),
        ("m4.large", 2, 10, False, 2, 0),
    ],
)
def test_bundled_limits(name: str, enis: int, ips: int, nitro: bool, vcpus: int, branch: int) -> None:
    limits = lim(name)
    assert (limits.max_enis, limits.ipv4_per_eni, limits.prefix_delegation, limits.vcpus, limits.branch_enis) == (
        enis, ips, nitro, vcpus, branch,
    )
    assert limits.trunking is (branch > 0)


# ---- secondary-IP mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("m5.large", 29),  # 3 x 9 + 2
        ("t3.medium", 17),  # 3 x 5 + 2
        ("m5.xlarge", 58),  # 4 x 14 + 2
        ("m4.large", 20),  # 2 x 9 + 2
        ("t3.nano", 4),  # 2 x 1 + 2
        ("m5.8xlarge", 234),  # 8 x 29 + 2, under the 250 ceiling of a 32-vCPU type
        ("c5.18xlarge", 250),  # 15 x 49 + 2 = 737, capped at 250 (72 vCPUs)
    ],
)
def test_max_pods_secondary(name: str, expected: int) -> None:
    assert max_pods(lim(name), SECONDARY) == expected


def test_max_pods_secondary_show_max_allowed() -> None:
    assert max_pods(lim("c5.18xlarge"), SECONDARY, show_max_allowed=True) == 737
    assert max_pods(lim("m5.large"), SECONDARY, show_max_allowed=True) == 29


@pytest.mark.parametrize(("name", "expected"), [("m5.large", 27), ("t3.medium", 15), ("m5.xlarge", 56)])
def test_pod_ip_capacity_secondary(name: str, expected: int) -> None:
    # The pod-IP capacity leaves out the +2 host-network pods.
    assert pod_ip_capacity(lim(name), SECONDARY) == expected


# ---- prefix delegation ------------------------------------------------------------------------------------


def test_prefix_delegation_m5_large() -> None:
    assert pod_ip_capacity(lim("m5.large"), PD) == 432  # 3 x 9 x 16
    assert max_pods(lim("m5.large"), PD, show_max_allowed=True) == 434
    assert max_pods(lim("m5.large"), PD) == 110  # 2 vCPUs -> 110 ceiling


@pytest.mark.parametrize(
    ("name", "capped", "uncapped"),
    [
        ("m5.xlarge", 110, 4 * 14 * 16 + 2),
        ("t3.medium", 110, 3 * 5 * 16 + 2),
        ("m5.8xlarge", 250, 8 * 29 * 16 + 2),  # 32 vCPUs > 30
        ("c5.18xlarge", 250, 15 * 49 * 16 + 2),
    ],
)
def test_prefix_delegation_ceilings(name: str, capped: int, uncapped: int) -> None:
    assert max_pods(lim(name), PD) == capped
    assert max_pods(lim(name), PD, show_max_allowed=True) == uncapped


@pytest.mark.parametrize(("name", "expected"), [("m4.large", 20), ("t2.medium", 17)])
def test_prefix_delegation_non_nitro_falls_back_to_secondary_ips(name: str, expected: int) -> None:
    limits = lim(name)
    assert not uses_prefixes(limits, PD)
    assert max_pods(limits, PD) == expected
    assert max_pods(limits, PD, show_max_allowed=True) == expected
    assert pod_ip_capacity(limits, PD) == expected - 2


@pytest.mark.parametrize(
    ("version", "expected"),
    [((1, 8, 0), 29), ((1, 7, 10), 29), ((1, 9, 0), 434), ((1, 10, 1), 434), ((1, 18, 3), 434), ((2, 0, 0), 434)],
)
def test_prefix_delegation_needs_cni_1_9(version: tuple[int, int, int], expected: int) -> None:
    assert max_pods(lim("m5.large"), PD, cni_version=version, show_max_allowed=True) == expected


def test_old_cni_fallback_keeps_other_settings() -> None:
    # PD asked for on CNI 1.8 with custom networking: secondary IPs over E - 1 ENIs.
    mode = CapacityMode(prefix_delegation=True, custom_networking=True)
    assert max_pods(lim("m5.large"), mode, cni_version=(1, 8, 0)) == 20


# ---- custom networking ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("m5.large", 20), ("t3.medium", 12), ("m5.xlarge", 44), ("m4.large", 11)],
)
def test_custom_networking(name: str, expected: int) -> None:
    # (E - 1) x (I - 1) + 2
    assert max_pods(lim(name), CUSTOM) == expected
    assert pod_ip_capacity(lim(name), CUSTOM) == expected - 2


def test_custom_networking_large_type() -> None:
    assert max_pods(lim("c5.18xlarge"), CUSTOM, show_max_allowed=True) == 14 * 49 + 2
    assert max_pods(lim("c5.18xlarge"), CUSTOM) == 250


def test_custom_networking_with_prefix_delegation() -> None:
    mode = CapacityMode(prefix_delegation=True, custom_networking=True)
    assert pod_ip_capacity(lim("m5.large"), mode) == 2 * 9 * 16
    assert max_pods(lim("m5.large"), mode, show_max_allowed=True) == 290
    assert max_pods(lim("m5.large"), mode) == 110


# ---- MAX_ENI and ENABLE_POD_ENI ---------------------------------------------------------------------------


@pytest.mark.parametrize(("max_eni", "expected"), [(1, 11), (2, 20), (3, 29), (5, 29)])
def test_max_eni_caps_enis(max_eni: int, expected: int) -> None:
    assert max_pods(lim("m5.large"), CapacityMode(max_eni=max_eni)) == expected


def test_max_eni_with_custom_networking() -> None:
    # MAX_ENI caps every ENI the instance attaches, the primary one included.
    mode = CapacityMode(custom_networking=True, max_eni=2)
    assert usable_enis(lim("m5.large"), mode) == 1
    assert max_pods(lim("m5.large"), mode) == 11
    assert max_pods(lim("m5.large"), CapacityMode(custom_networking=True, max_eni=1)) == 2


def test_max_eni_with_prefix_delegation() -> None:
    mode = CapacityMode(prefix_delegation=True, max_eni=1)
    assert pod_ip_capacity(lim("m5.large"), mode) == 9 * 16


@pytest.mark.parametrize(("name", "expected"), [("m5.large", 20), ("m5.xlarge", 44), ("t3.medium", 17)])
def test_pod_eni_takes_an_eni_on_trunking_types_only(name: str, expected: int) -> None:
    assert max_pods(lim(name), CapacityMode(pod_eni=True)) == expected


def test_pod_eni_with_custom_networking() -> None:
    mode = CapacityMode(pod_eni=True, custom_networking=True)
    assert usable_enis(lim("m5.large"), mode) == 1
    assert max_pods(lim("m5.large"), mode) == 11
    assert max_pods(lim("t3.medium"), mode) == 12  # not trunking: only custom networking's ENI goes


def test_usable_enis_never_negative() -> None:
    mode = CapacityMode(pod_eni=True, custom_networking=True, max_eni=1)
    assert usable_enis(lim("m5.large"), mode) == 0
    assert pod_ip_capacity(lim("m5.large"), mode) == 0
    assert max_pods(lim("m5.large"), mode) == 2


# ---- the table --------------------------------------------------------------------------------------------


def test_unknown_type_message_names_the_type() -> None:
    with pytest.raises(UnknownInstanceType) as info:
        TABLE.get("m5.huge")
    assert info.value.instance_type == "m5.huge"
    assert "m5.huge" in str(info.value)
    assert "m5." in str(info.value).split("m5.huge", 1)[1]  # suggestions from the family
    assert isinstance(info.value, LookupError)


def test_unknown_family_has_no_suggestions() -> None:
    with pytest.raises(UnknownInstanceType, match=r"zz9\.large") as info:
        TABLE.get("zz9.large")
    assert "did you mean" not in str(info.value)


def test_live_limits_override_and_extend_the_table() -> None:
    table = LimitsTable()
    table.update(InstanceLimits("m5.large", 2, 10, True, 2, 9))
    table.update(InstanceLimits("x9.new", 4, 15, True, 4, 0))
    assert table.get("m5.large").max_enis == 2
    assert max_pods(table.get("m5.large"), SECONDARY) == 20
    assert table.known("x9.new")
    assert "x9.new" in table.types()
    assert max_pods(table.get("x9.new"), SECONDARY) == 58
    assert TABLE.get("m5.large").max_enis == 3  # another table is untouched


def test_types_sorted_and_unique() -> None:
    types = TABLE.types()
    assert types == sorted(set(types))
    assert {"m5.large", "t3.medium", "c5.18xlarge"} <= set(types)


# ---- parse_cni_version ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v1.18.3-eksbuild.1", (1, 18, 3)),
        ("1.18.3", (1, 18, 3)),
        ("1.9", (1, 9, 0)),
        ("V1.9.0", (1, 9, 0)),
        ("  v1.12.6  ", (1, 12, 6)),
        ("1.2.3+meta", (1, 2, 3)),
        ("1", (1, 0, 0)),
        ("v1.19.0-rc.1", (1, 19, 0)),
    ],
)
def test_parse_cni_version_good(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_cni_version(text) == expected


@pytest.mark.parametrize("text", ["", "v", "abc", "1.2.3.4", "1..3", "1.x.0", "-1.2", "1.2.", ".1.2", "latest"])
def test_parse_cni_version_bad(text: str) -> None:
    with pytest.raises(ValueError, match="invalid CNI version"):
        parse_cni_version(text)


# ---- the CLI ----------------------------------------------------------------------------------------------


def test_cli_max_pods(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "m5.large"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "29"
    assert err == ""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["t3.medium"], "17"),
        (["c5.18xlarge"], "250"),
        (["c5.18xlarge", "--show-max-allowed"], "737"),
        (["m5.large", "--prefix-delegation"], "110"),
        (["m5.large", "--prefix-delegation", "--show-max-allowed"], "434"),
        (["m5.large", "--prefix-delegation", "--cni-version", "1.8.0"], "29"),
        (["m5.large", "--prefix-delegation", "--cni-version", "v1.18.3-eksbuild.1", "--show-max-allowed"], "434"),
        (["m4.large", "--prefix-delegation"], "20"),
        (["m5.large", "--custom-networking"], "20"),
        (["m5.large", "--max-eni", "2"], "20"),
        (["m5.large", "--pod-eni"], "20"),
        (["t3.medium", "--pod-eni"], "17"),
    ],
)
def test_cli_max_pods_modes(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert cli.main(["max-pods", *argv]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_cli_max_pods_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(TABLE.types())
    pairs = [line.split(" ") for line in lines]
    assert all(len(p) == 2 and p[1].isdigit() for p in pairs), "every line is 'TYPE N'"
    names = [p[0] for p in pairs]
    assert names == sorted(names)
    figures = dict((p[0], int(p[1])) for p in pairs)
    # eni-max-pods.txt lists the uncapped figures.
    assert figures["m5.large"] == 29
    assert figures["t3.medium"] == 17
    assert figures["m5.xlarge"] == 58
    assert figures["c5.18xlarge"] == 737


def test_cli_max_pods_all_capped(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "--all", "--capped"]) == 0
    figures = dict(line.split(" ") for line in capsys.readouterr().out.splitlines())
    assert figures["c5.18xlarge"] == "250"
    assert figures["m5.large"] == "29"


def test_cli_unknown_type(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "m5.huge"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "m5.huge" in err


def test_cli_bad_cni_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "m5.large", "--cni-version", "banana"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "banana" in err


def test_cli_max_eni_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods", "m5.large", "--max-eni", "0"]) == 2
    assert "--max-eni" in capsys.readouterr().err


def test_cli_needs_a_type_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["max-pods"]) == 2
    assert capsys.readouterr().err
