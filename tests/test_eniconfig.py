"""ENIConfig checks (model/eniconfig.py): subnets and groups that must exist, the zone the ENIConfig serves,
low subnets, subnet changes of ENIConfigs in use, and zones whose nodes find no ENIConfig."""

from __future__ import annotations

from typing import Any

from webhook.model.eniconfig import (
    EniConfig,
    EniConfigContext,
    EniConfigStore,
    eniconfig_findings,
    missing_config_findings,
    parse_eniconfig,
)
from webhook.model.vpc import GroupRules, Quotas, VpcFacts, VpcSubnet

A, B = "us-east-1a", "us-east-1b"
ZONE_LABEL = "topology.kubernetes.io/zone"


def vpc() -> VpcFacts:
    facts = VpcFacts(vpc_id="vpc-0example", static=True)
    facts.set_subnets({"subnet-a": VpcSubnet("subnet-a", A, 500), "subnet-b": VpcSubnet("subnet-b", B, 3)})
    facts.set_groups({"sg-1": GroupRules("sg-1")})
    return facts


def context(**overrides: Any) -> EniConfigContext:
    values: dict[str, Any] = {"custom_networking": True, "label_def": ZONE_LABEL, "zones": frozenset({A, B}),
                              "subnets_current": True, "groups_current": True, "reserve": {A: 5, B: 5},
                              "subnet_free": {}}
    values.update(overrides)
    return EniConfigContext(**values)


def codes(config: EniConfig, store: EniConfigStore | None = None, old: EniConfig | None = None,
          **overrides: Any) -> list[tuple[str, bool]]:
    found = eniconfig_findings(config, old, store or EniConfigStore(), vpc(), Quotas(), context(**overrides))
    return [(f.code, f.deny) for f in found]


def test_a_subnet_that_does_not_exist_is_denied_only_on_current_data() -> None:
    config = EniConfig("pool", "subnet-missing")
    assert ("unknown-subnet", True) in codes(config)
    assert codes(config, subnets_current=False) == [("subnet-unchecked", False)]


def test_a_group_that_does_not_exist_is_denied() -> None:
    assert ("unknown-group", True) in codes(EniConfig("pool", "subnet-a", ("sg-1", "sg-nope")))
    assert ("groups-unchecked", False) in codes(EniConfig("pool", "subnet-a", ("sg-nope",)), groups_current=False)


def test_named_for_a_zone_with_a_subnet_in_another_is_denied() -> None:
    """ENI_CONFIG_LABEL_DEF is the zone label and the ENIConfig is named for a zone: its subnet must be there."""
    assert ("wrong-zone", True) in codes(EniConfig(A, "subnet-b"))
    assert ("wrong-zone", True) not in codes(EniConfig(A, "subnet-a"))
    # another label: a zone name means nothing, and no node selects it
    assert ("wrong-zone", True) not in codes(EniConfig(A, "subnet-b"), label_def="k8s.amazonaws.com/eniConfig")


def test_the_zone_of_the_nodes_that_select_it() -> None:
    store = EniConfigStore()
    store.set_node("n1", "pool", A)
    store.set_node("n2", "pool", A)
    [finding] = [f for f in eniconfig_findings(EniConfig("pool", "subnet-b"), None, store, vpc(), Quotas(),
                                               context()) if f.code == "wrong-zone"]
    assert "the 2 node(s) that select it are in us-east-1a" in finding.message
    store.set_node("n3", "pool", B)  # nodes in two zones: no single zone to hold it to
    assert ("wrong-zone", True) not in codes(EniConfig("pool", "subnet-b"), store)


def test_a_subnet_at_or_below_the_reserve_warns() -> None:
    assert ("subnet-low", False) in codes(EniConfig(B, "subnet-b"))
    assert ("subnet-low", False) not in codes(EniConfig(A, "subnet-a"))
    assert ("subnet-low", False) in codes(EniConfig(A, "subnet-a"), subnet_free={"subnet-a": 5})


def test_changing_the_subnet_of_an_eniconfig_in_use_warns() -> None:
    store = EniConfigStore()
    store.put(EniConfig(A, "subnet-a"))
    store.set_node("n1", A, A)
    found = eniconfig_findings(EniConfig(A, "subnet-c"), EniConfig(A, "subnet-a"), store, vpc(), Quotas(),
                               context(subnets_current=False))
    [changed] = [f for f in found if f.code == "subnet-changed"]
    assert "1 running node(s)" in changed.message and len(changed.warning) <= 120
    store.set_node("n1", None, None)  # no node uses it any more
    assert ("subnet-changed", False) not in codes(EniConfig(A, "subnet-c"), store, EniConfig(A, "subnet-a"))


def test_zones_whose_nodes_find_no_eniconfig() -> None:
    store = EniConfigStore()
    store.put(EniConfig(A, "subnet-a"))
    store.set_node("n1", A, A)
    store.set_node("n2", B, B)
    store.set_node("n3", B, B)
    [finding] = missing_config_findings(store, store.configs)
    assert finding.message.startswith("2 node(s) in us-east-1b select ENIConfig us-east-1b, which does not exist")
    assert missing_config_findings(store, [*store.configs, B]) == []
    assert ("zone-without-eniconfig", False) in codes(EniConfig("other", "subnet-a"), store)
    assert ("zone-without-eniconfig", False) not in codes(EniConfig(B, "subnet-b"), store)
    assert ("zone-without-eniconfig", False) not in codes(EniConfig("other", "subnet-a"), store,
                                                          custom_networking=False)


def test_parse_eniconfig_from_the_real_capture() -> None:
    import json

    from tests.paths import FIXTURES

    obj = json.loads((FIXTURES / "eniconfig-create.validate.json").read_bytes())["request"]["object"]
    config = parse_eniconfig(obj)
    assert config.name == "us-east-1a" and config.subnet.startswith("subnet-") and config.groups
