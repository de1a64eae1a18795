"""A subnet as a set of addresses, the way EC2 hands them out.

Addresses are offsets into the subnet's CIDR. AWS reserves the first four and the last one. A /28 prefix
needs an aligned block of 16 free addresses, so a subnet with free addresses scattered over every block has
no prefix to give (EC2: InsufficientCidrBlocks). EC2 does not say which free address it picks; the simulator
picks at random (seeded), which is what makes fragmentation real over time.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

BLOCK = 16  # a /28
AWS_RESERVED_HEAD = 4
AWS_RESERVED_TAIL = 1

INSUFFICIENT_ADDRESSES = "InsufficientFreeAddressesInSubnet"
INSUFFICIENT_BLOCKS = "InsufficientCidrBlocks"


class Ec2Error(Exception):
    """An EC2 API error, by its code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class _Pool:
    """A set of ints with O(1) add, remove and random choice."""

    __slots__ = ("_items", "_where")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._where: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: int) -> bool:
        return item in self._where

    def add(self, item: int) -> None:
        if item not in self._where:
            self._where[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: int) -> None:
        where = self._where.pop(item, None)
        if where is None:
            return
        last = self._items.pop()
        if last != item:
            self._items[where] = last
            self._where[last] = where

    def items(self) -> list[int]:
        return list(self._items)

    def pick(self, rng: random.Random) -> int:
        return self._items[rng.randrange(len(self._items))]


@dataclass(frozen=True, slots=True)
class Prefix:
    """An aligned /28 taken from a subnet: its first offset."""

    offset: int


class AddressSpace:
    """Which addresses of one subnet are taken. Single addresses and /28 blocks come from the same space."""

    def __init__(self, cidr: str, rng: random.Random) -> None:
        self.network = ipaddress.IPv4Network(cidr, strict=False)
        self.size = self.network.num_addresses
        self.rng = rng
        self._used = bytearray(self.size)
        self._block_used = [0] * (self.size // BLOCK)
        self._free = _Pool()
        self._free_blocks = _Pool()
        for offset in range(self.size):
            self._free.add(offset)
        for block in range(len(self._block_used)):
            self._free_blocks.add(block)
        for offset in range(min(AWS_RESERVED_HEAD, self.size)):
            self.take(offset)
        if self.size > AWS_RESERVED_HEAD:
            self.take(self.size - AWS_RESERVED_TAIL)

    # ---- figures ----------------------------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        """DescribeSubnets' AvailableIpAddressCount."""
        return len(self._free)

    @property
    def free_block_count(self) -> int:
        """Aligned /28 blocks with every address free."""
        return len(self._free_blocks)

    def is_free(self, offset: int) -> bool:
        return not self._used[offset]

    def address(self, offset: int) -> str:
        return str(self.network.network_address + offset)

    def prefix_text(self, prefix: Prefix) -> str:
        return f"{self.network.network_address + prefix.offset}/28"

    # ---- taking and giving back -------------------------------------------------------------------------

    def take(self, offset: int) -> None:
        if self._used[offset]:
            raise ValueError(f"address {self.address(offset)} already taken")
        self._used[offset] = 1
        self._free.discard(offset)
        block = offset // BLOCK
        if block < len(self._block_used):
            if self._block_used[block] == 0:
                self._free_blocks.discard(block)
            self._block_used[block] += 1

    def give_back(self, offset: int) -> None:
        if not self._used[offset]:
            raise ValueError(f"address {self.address(offset)} is not taken")
        self._used[offset] = 0
        self._free.add(offset)
        block = offset // BLOCK
        if block < len(self._block_used):
            self._block_used[block] -= 1
            if self._block_used[block] == 0:
                self._free_blocks.add(block)

    def allocate(self, count: int) -> list[int]:
        """`count` single addresses, all or none (EC2 fails the whole call when the subnet is short)."""
        if count > len(self._free):
            raise Ec2Error(INSUFFICIENT_ADDRESSES, f"{count} wanted, {len(self._free)} free")
        chosen = []
        for _ in range(count):
            offset = self._free.pick(self.rng)
            self.take(offset)
            chosen.append(offset)
        return chosen

    def allocate_prefixes(self, count: int) -> list[Prefix]:
        """`count` aligned free /28 blocks, all or none."""
        if count > len(self._free_blocks):
            raise Ec2Error(INSUFFICIENT_BLOCKS, f"{count} /28 wanted, {len(self._free_blocks)} free")
        chosen = []
        for _ in range(count):
            block = self._free_blocks.pick(self.rng)
            for offset in range(block * BLOCK, (block + 1) * BLOCK):
                self.take(offset)
            chosen.append(Prefix(block * BLOCK))
        return chosen

    def release_prefix(self, prefix: Prefix) -> None:
        for offset in range(prefix.offset, prefix.offset + BLOCK):
            self.give_back(offset)

    # ---- laying out a starting state --------------------------------------------------------------------

    def occupy_to(self, free: int, free_blocks: int | None) -> list[int]:
        """Take addresses (used by something outside the simulation) until `free` are left, `free_blocks` of them
        as whole aligned /28 blocks (None: whatever random placement leaves). The addresses already taken stay.
        Returns the addresses taken."""
        taken: list[int] = []
        if free > len(self._free):
            raise ValueError(f"{self.network}: {free} free wanted, only {len(self._free)} can be")
        if free_blocks is None:
            while len(self._free) > free:
                offset = self._free.pick(self.rng)
                self.take(offset)
                taken.append(offset)
            return taken
        if free_blocks * BLOCK > free:
            raise ValueError(f"{self.network}: {free_blocks} free /28 blocks need {free_blocks * BLOCK} free addresses")
        if free_blocks > len(self._free_blocks):
            raise ValueError(
                f"{self.network}: {free_blocks} free /28 blocks wanted, only {len(self._free_blocks)} can be"
            )
        keep = set(self.rng.sample(sorted(self._free_blocks.items()), free_blocks))
        kept = {o for b in keep for o in range(b * BLOCK, (b + 1) * BLOCK)}
        # Scatter the other free addresses so that no further block stays whole: at most 15 per block.
        others = [o for o in sorted(self._free.items()) if o not in kept]
        self.rng.shuffle(others)
        per_block: dict[int, int] = {}
        remaining = free - len(kept)
        chosen: set[int] = set()
        for offset in others:
            if remaining == 0:
                break
            block = offset // BLOCK
            used = self._block_used[block] if block < len(self._block_used) else 1
            if per_block.get(block, 0) >= (BLOCK - used if used else BLOCK - 1):
                continue
            per_block[block] = per_block.get(block, 0) + 1
            chosen.add(offset)
            remaining -= 1
        if remaining:
            raise ValueError(f"{self.network}: cannot leave {free} free with only {free_blocks} whole /28 blocks")
        for offset in others:
            if offset not in chosen:
                self.take(offset)
                taken.append(offset)
        return taken
