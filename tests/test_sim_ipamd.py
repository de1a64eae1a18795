"""The simulator's ipamd, rule by rule, against what aws/amazon-vpc-cni-k8s's ipamd does (pkg/ipamd/ipamd.go)."""

from __future__ import annotations

import random

import pytest

from webhook.model.limits import CapacityMode, LimitsTable, max_pods
from webhook.sim import ipamd as ip
from webhook.sim.addresses import INSUFFICIENT_BLOCKS, AddressSpace, Ec2Error
from webhook.sim.ec2 import CNI_TAG, Ec2

TABLE = LimitsTable()


def node(instance_type: str = "t3.medium", env: dict[str, str] | None = None, *, cidr: str = "10.0.0.0/22",
         max_pods_value: int = 10_000, extra_subnets: dict[str, tuple[str, dict[str, str]]] | None = None,
         eni_config_subnet: str | None = None) -> ip.Ipamd:
    ec2 = Ec2(seed=1)
    ec2.add_subnet("subnet-node", "us-east-1a", cidr)
    for subnet_id, (subnet_cidr, tags) in (extra_subnets or {}).items():
        ec2.add_subnet(subnet_id, "us-east-1a", subnet_cidr, tags)
    settings = ip.IpamdSettings.from_env(env or {})
    return ip.start_ipamd(ec2, "node-1", instance_type, TABLE.get(instance_type), "subnet-node", settings,
                          max_pods=max_pods_value, eni_config_subnet=eni_config_subnet, rng=random.Random(3),
                          now=-1000.0)


def settle(n: ip.Ipamd, now: float = 0.0, steps: int = 100) -> None:
    """Run the pool manager until it stops changing anything."""
    for i in range(steps):
        before = ip.pool_stats(n, now + i * ip.POOL_INTERVAL)
        enis = len(n.enis)
        ip.update_pool(n, now + i * ip.POOL_INTERVAL)
        if ip.pool_stats(n, now + i * ip.POOL_INTERVAL) == before and len(n.enis) == enis:
            return


def fill(n: ip.Ipamd, pods: int, now: float = 0.0) -> int:
    """Start up to `pods` pods, letting the pool manager grow between them; how many got an address."""
    started = 0
    for i in range(pods):
        key = f"apps/p{i}"
        if ip.assign_pod_address(n, key, now) is None:
            settle(n, now)
            if ip.assign_pod_address(n, key, now) is None:
                break
        started += 1
    return started


def leave_free(n: ip.Ipamd, subnet_id: str, free: int, blocks: int | None = None) -> None:
    n.ec2.subnets[subnet_id].space.occupy_to(free, blocks)


def secondaries(n: ip.Ipamd) -> list[int]:
    return [len(n.ec2.enis[e].secondaries) for e in n.enis]


def test_full_t3_medium_gets_nothing_from_a_subnet_with_five_free_addresses() -> None:
    """createENI asks for the ENI's primary address plus all 5 secondaries in one CreateNetworkInterface call and
    does not fall back to fewer: 5 free addresses are not enough, and the 120 s shortage cooldown starts."""
    n = full_two_eni_t3_medium()
    leave_free(n, "subnet-node", 5)
    assert ip.pool_too_low(n, ip.pool_stats(n, 0))
    assert not ip.increase_pool(n, 10.0)
    assert len(n.enis) == 2 and n.ec2.subnets["subnet-node"].free == 5
    assert ip.in_insufficient_cidr_cooldown(n, 130.0) and not ip.in_insufficient_cidr_cooldown(n, 131.0)
    assert not ip.growth_possible(n, 131.0)


def test_full_t3_medium_gets_a_whole_eni_from_a_subnet_with_six_free_addresses() -> None:
    """The same node and a subnet with exactly 1 + 5 free addresses: the ENI is created with all five."""
    n = full_two_eni_t3_medium()
    leave_free(n, "subnet-node", 6)
    assert ip.increase_pool(n, 10.0)
    assert len(n.enis) == 3 and sorted(secondaries(n)) == [5, 5, 5]
    assert n.ec2.subnets["subnet-node"].free == 0


def full_two_eni_t3_medium() -> ip.Ipamd:
    n = node("t3.medium", {"WARM_ENI_TARGET": "0"})
    assert fill(n, 10) == 10
    assert len(n.enis) == 2 and ip.pool_stats(n, 0).available == 0
    return n


def test_attached_eni_falls_back_to_one_ip_when_the_subnet_is_short() -> None:
    """tryAssignIPs asks an attached ENI for all its free slots, then for one IP when that fails."""
    n = node("m5.large", {"WARM_ENI_TARGET": "1"})
    leave_free(n, "subnet-node", 3)
    assert ip.increase_pool(n, 0.0)
    assert secondaries(n) == [1]
    assert n.ec2.subnets["subnet-node"].free == 2


def test_one_ip_fallback_failing_starts_the_shortage_cooldown_without_discovery() -> None:
    """Without subnet discovery, a failed one-IP request returns the error: no new ENI, 120 s of nothing."""
    n = node("m5.large", {"ENABLE_SUBNET_DISCOVERY": "false"})
    leave_free(n, "subnet-node", 0)
    assert not ip.increase_pool(n, 0.0)
    assert n.last_insufficient == 0.0 and len(n.enis) == 1


def test_subnet_discovery_creates_the_eni_in_the_tagged_subnet_with_most_free_addresses() -> None:
    """createENI under ENABLE_SUBNET_DISCOVERY: the zone's subnets fit for ENIs (the node's own unless tagged 0,
    others only when tagged), most free first; a dry attached ENI falls through to a new ENI."""
    extra = {
        "subnet-small": ("10.1.0.0/26", {CNI_TAG: "1"}),
        "subnet-big": ("10.2.0.0/24", {CNI_TAG: "1"}),
        "subnet-untagged": ("10.3.0.0/20", {}),
        "subnet-excluded": ("10.4.0.0/20", {CNI_TAG: "0"}),
    }
    n = node("m5.large", {"WARM_ENI_TARGET": "0"}, cidr="10.0.0.0/23", extra_subnets=extra)
    order = [s.subnet_id for s in ip.subnets_for_new_eni(n)]
    assert order == ["subnet-node", "subnet-big", "subnet-small"]
    leave_free(n, "subnet-node", 0)
    assert ip.increase_pool(n, 0.0)
    new = [e for e in n.enis.values() if not e.primary]
    assert [e.subnet_id for e in new] == ["subnet-big"]


def test_prefix_delegation_gets_nothing_from_a_fragmented_subnet() -> None:
    """A /28 needs an aligned free block: free addresses with no whole block give InsufficientCidrBlocks."""
    n = node("m5.large", {"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"})
    leave_free(n, "subnet-node", 200, 0)
    assert n.ec2.subnets["subnet-node"].space.free_block_count == 0
    assert not ip.increase_pool(n, 0.0)
    assert ip.pool_stats(n, 0).prefixes == 0 and n.last_insufficient == 0.0
    with pytest.raises(Ec2Error) as error:
        n.ec2.assign_prefixes(next(iter(n.enis)), 1)
    assert error.value.code == INSUFFICIENT_BLOCKS


def test_address_space_keeps_exactly_the_free_blocks_asked_for() -> None:
    space = AddressSpace("10.0.0.0/24", random.Random(0))
    assert space.free_count == 251 and space.free_block_count == 14
    space.occupy_to(61, 2)
    assert space.free_count == 61 and space.free_block_count == 2


def test_warm_ip_and_minimum_targets_size_the_pool() -> None:
    """datastoreTargetState: short = max(WARM - available, MINIMUM - total)."""
    n = node("m5.large", {"WARM_IP_TARGET": "5", "MINIMUM_IP_TARGET": "10"})
    settle(n)
    assert ip.pool_stats(n, 0).total == 10
    assert fill(n, 8) == 8
    settle(n)
    assert ip.pool_stats(n, 0).available == 5


def test_minimum_ip_target_alone_never_grows_past_the_minimum() -> None:
    """With WARM_IP_TARGET unset, short is 0 once total reaches MINIMUM_IP_TARGET, however many pods wait."""
    n = node("m5.large", {"MINIMUM_IP_TARGET": "4"})
    assert fill(n, 20) == 4
    assert not ip.pool_too_low(n, ip.pool_stats(n, 0))


def test_cooling_addresses_count_as_available_but_are_not_given_out() -> None:
    """Freed IPs wait IP_COOLDOWN_PERIOD (30 s) in the datastore; GetIPStats counts them as available."""
    n = node("t3.medium", {"WARM_ENI_TARGET": "0"})
    assert fill(n, 5) == 5
    ip.unassign_pod_address(n, "apps/p0", 100.0)
    assert ip.assign_pod_address(n, "apps/new", 110.0) is None
    assert not ip.pool_too_low(n, ip.pool_stats(n, 110.0))
    assert ip.assign_pod_address(n, "apps/new", 131.0) is not None


def test_cordoned_node_gets_no_new_address() -> None:
    """isENIAttachmentAllowed: a node tainted unschedulable gets neither IPs nor ENIs."""
    n = node("m5.large")
    n.schedulable = False
    assert ip.pool_too_low(n, ip.pool_stats(n, 0)) and not ip.increase_pool(n, 0.0)
    n.settings = ip.IpamdSettings.from_env({"AWS_MANAGE_ENIS_NON_SCHEDULABLE": "true"})
    assert ip.increase_pool(n, 0.0)


def test_pool_stops_growing_at_max_pods() -> None:
    """isDatastorePoolTooLow: never low once total reaches the kubelet's max-pods."""
    n = node("m5.large", {"ENABLE_PREFIX_DELEGATION": "true", "WARM_PREFIX_TARGET": "1"}, max_pods_value=29)
    assert fill(n, 40) == 32  # two /28s: the second one brought total to 32 >= 29
    assert not ip.pool_too_low(n, ip.pool_stats(n, 0))


def test_max_eni_and_the_trunk_slot_cap_enis() -> None:
    """getMaxENI takes MAX_ENI when lower; hasRoomForEni keeps one slot for the trunk ENI under ENABLE_POD_ENI."""
    n = node("m5.large", {"MAX_ENI": "2"})
    assert fill(n, 100) == 18 and len(n.enis) == 2
    n = node("m5.large", {"ENABLE_POD_ENI": "true"})
    assert fill(n, 100) == 18 and len(n.enis) == 2
    n = node("t3.medium", {"ENABLE_POD_ENI": "true"})  # t3 cannot trunk: no slot kept
    assert fill(n, 100) == 15


def test_custom_networking_leaves_the_primary_eni_empty_and_uses_the_eniconfig_subnet() -> None:
    """GetAllocatableENIs skips the primary ENI; createENI uses the ENIConfig's subnet only."""
    extra = {"subnet-pods": ("100.64.0.0/19", {})}
    n = node("m5.large", {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"}, extra_subnets=extra,
             eni_config_subnet="subnet-pods")
    assert fill(n, 100) == 18
    assert [e.subnet_id for e in n.enis.values() if not e.primary] == ["subnet-pods", "subnet-pods"]
    assert len(n.ec2.enis[next(iter(n.enis))].secondaries) == 0


def test_warm_eni_target_holds_a_whole_spare_eni() -> None:
    """isDatastorePoolTooLow without IP targets: available below WARM_ENI_TARGET ENIs' worth."""
    n = node("m5.large")
    settle(n)
    assert ip.pool_stats(n, 0).total == 9
    assert fill(n, 1) == 1
    settle(n)
    assert ip.pool_stats(n, 0).total == 18


@pytest.mark.parametrize("instance_type", ["p3dn.24xlarge", "t3.small", "m5.large", "c5.xlarge", "t3.medium"])
def test_documented_capacity_secondary_ips(instance_type: str) -> None:
    """A node runs exactly E x (I - 1) pods on secondary IPs (max-pods less the two host-network pods): p3dn.24xlarge
    735 (max-pods 737), t3.small 9 (max-pods 11)."""
    limits = TABLE.get(instance_type)
    n = node(instance_type, {"WARM_ENI_TARGET": "0"}, cidr="10.0.0.0/20")
    assert fill(n, 2000) == max_pods(limits, CapacityMode(), show_max_allowed=True) - 2


@pytest.mark.parametrize("instance_type,pods", [("t3.small", 144), ("m5.large", 432)])
def test_documented_capacity_prefix_delegation(instance_type: str, pods: int) -> None:
    """Under prefix delegation every slot holds a /28: t3.small 3 x 3 x 16 = 144 (max-pods 146 uncapped, 110
    capped); m5.large 3 x 9 x 16 = 432."""
    n = node(instance_type, {"ENABLE_PREFIX_DELEGATION": "true"}, cidr="10.0.0.0/20")
    assert fill(n, 2000) == pods
    limits = TABLE.get(instance_type)
    assert max_pods(limits, CapacityMode(prefix_delegation=True), show_max_allowed=True) == pods + 2


def test_prefix_delegation_stops_at_the_capped_max_pods() -> None:
    """With the kubelet's capped max-pods (110 for a t3.small under prefix delegation) the pool stops at 7 /28s."""
    limits = TABLE.get("t3.small")
    cap = max_pods(limits, CapacityMode(prefix_delegation=True))
    assert cap == 110
    n = node("t3.small", {"ENABLE_PREFIX_DELEGATION": "true"}, max_pods_value=cap)
    assert fill(n, 500) == 112


SAMPLE = [t for i, t in enumerate(TABLE.types()) if i % 97 == 0]


@pytest.mark.parametrize("instance_type", SAMPLE)
@pytest.mark.parametrize("env", [{}, {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"}, {"MAX_ENI": "2"}])
def test_pods_per_node_match_the_max_pods_table(instance_type: str, env: dict[str, str]) -> None:
    """On a sample of the instance table: the pods the simulated node runs are the max-pods calculator's figure
    (uncapped) less the two host-network pods, in each mode."""
    limits = TABLE.get(instance_type)
    settings = ip.IpamdSettings.from_env(env)
    extra = {"subnet-pods": ("100.64.0.0/16", {})}
    n = node(instance_type, {**env, "WARM_ENI_TARGET": "0"}, cidr="10.0.0.0/16", extra_subnets=extra,
             eni_config_subnet="subnet-pods")
    assert fill(n, 5000) == max_pods(limits, settings.cni.mode, show_max_allowed=True) - 2


def test_prefix_delegation_on_a_non_nitro_type_runs_on_secondary_ips() -> None:
    """isConfigValid: ENABLE_PREFIX_DELEGATION on a type that cannot take prefixes falls back to secondary IPs: an
    m4.large's new ENI asks for 1 + 9 addresses, not a /28, and a fragmented subnet serves it."""
    n = node("m4.large", {"ENABLE_PREFIX_DELEGATION": "true", "WARM_ENI_TARGET": "0"})
    assert not n.prefix_mode
    leave_free(n, "subnet-node", 40, 0)
    assert fill(n, 30) == 18  # 2 ENIs x 9
    assert ip.pool_stats(n, 0).prefixes == 0


def test_warm_eni_target_zero_grows_only_when_nothing_is_left() -> None:
    """isDatastorePoolTooLow: with WARM_ENI_TARGET=0 and no IP targets, low only when available == 0."""
    n = node("m5.large", {"WARM_ENI_TARGET": "0"})
    assert ip.pool_too_low(n, ip.pool_stats(n, 0))
    settle(n)
    assert ip.pool_stats(n, 0).total == 9  # tryAssignIPs fills the attached ENI whole
    assert fill(n, 9) == 9 and ip.pool_too_low(n, ip.pool_stats(n, 0))


def test_custom_networking_without_an_eniconfig_gives_no_pod_ip() -> None:
    """MyENIConfig fails when the node has no ENIConfig: no pod ENI is attached, and the primary ENI is skipped."""
    n = node("m5.large", {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true"}, eni_config_subnet=None)
    assert fill(n, 5) == 0
    assert len(n.enis) == 1 and not ip.growth_possible(n, 0.0)


def test_attached_enis_keep_their_subnet_when_the_eniconfig_changes() -> None:
    """An ENIConfig change does not move attached ENIs: their free slots still draw on the old subnet; only new
    ENIs use the new one."""
    extra = {"subnet-old": ("100.64.0.0/24", {}), "subnet-new": ("100.64.1.0/24", {})}
    n = node("m5.large", {"AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "true", "WARM_IP_TARGET": "1"}, extra_subnets=extra,
             eni_config_subnet="subnet-old")
    assert fill(n, 3) == 3
    n.eni_config_subnet = "subnet-new"
    old_free = n.ec2.subnets["subnet-old"].free
    assert fill(n, 6) == 6  # still on the ENI in the old subnet, which has free slots
    assert n.ec2.subnets["subnet-old"].free < old_free and n.ec2.subnets["subnet-new"].free == 251
    assert fill(n, 18) == 18
    assert {e.subnet_id for e in n.enis.values() if not e.primary} == {"subnet-old", "subnet-new"}


def test_excluded_subnet_tag_keeps_new_enis_out_without_discovery() -> None:
    """createENI without subnet discovery: the node's own subnet tagged kubernetes.io/role/cni=0 gives no ENI."""
    n = node("m5.large", {"ENABLE_SUBNET_DISCOVERY": "false", "WARM_ENI_TARGET": "0"})
    n.ec2.subnets["subnet-node"].tags[CNI_TAG] = "0"
    assert fill(n, 9) == 9  # the primary ENI's own slots
    assert fill(n, 10) == 9 and len(n.enis) == 1
