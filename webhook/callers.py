"""Which callers' reviews may hold reservations: the control plane's only.

Any pod that reaches the Service could otherwise post made-up reviews, and each admitted made-up pod would
hold a reservation. The allowed sources are networks: a configured CIDR list, plus whatever a
``NetworkSource`` knows (on EKS: the addresses of the cluster's control-plane network interfaces in the VPC,
described ``Amazon EKS <cluster name>``). A caller outside them is still answered (the server never refuses a
review for its source: the control plane gets new addresses on a version update, and a refusal fails every
pod under failurePolicy Fail), but its reviews take no reservation. Health and metrics endpoints are not
judged here.

With nothing configured every caller is allowed, and so while the only configured sources have not learnt
their networks yet.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkSource(Protocol):
    """Networks learnt at run time; None while not known yet."""

    def networks(self) -> Collection[Network] | None: ...


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses (``10.0.0.0/16``, ``10.0.1.23``); ValueError naming the bad one."""
    out: list[Network] = []
    for text in texts:
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"not a CIDR or IP address: {item!r}") from None
    return tuple(out)


@dataclass(slots=True)
class CallerFilter:
    static: tuple[Network, ...] = ()
    sources: tuple[NetworkSource, ...] = ()

    @property
    def restricted(self) -> bool:
        return bool(self.static or self.sources)

    def networks(self) -> tuple[Network, ...] | None:
        """The allowed networks now; None while nothing restricts callers."""
        networks = [*self.static]
        for source in self.sources:
            networks.extend(source.networks() or ())
        return tuple(networks) if networks else None

    def allowed(self, remote: str | None) -> bool:
        """True when the caller's address is in an allowed network (or nothing restricts callers)."""
        networks = self.networks() if self.restricted else None
        if networks is None:
            return True  # only sources not learnt yet: no worse than not being ready
        if remote is None:
            return False
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in networks)


@dataclass(slots=True)
class AddressSource:
    """A ``NetworkSource`` over a set of addresses read at call time (on EKS: the private addresses of the
    control plane's network interfaces, as the EC2 poller last fetched them). None or no address: not known."""

    read: Callable[[], Collection[str] | None]
    _addresses: frozenset[str] = frozenset()
    _networks: tuple[Network, ...] = ()

    def networks(self) -> Collection[Network] | None:
        addresses = frozenset(self.read() or ())
        if not addresses:
            return None
        if addresses != self._addresses:  # parsed once per change, not per request
            self._addresses, self._networks = addresses, parse_networks(sorted(addresses))
        return self._networks
