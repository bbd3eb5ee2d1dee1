"""The addresses a guest may use, derived once for every mode.

A guest sends from its IP and, in a /64 NETWORK_SUBNET6, from the SLAAC address its
MAC gives it (EUI-64, what a guest without privacy addresses configures itself).
Routed mode routes them, the anti-spoofing flows and filters allow them, and the
announcements use the link-local EUI-64 address: one rule, here.
"""

from __future__ import annotations

import ipaddress

from nichooks.errors import InvalidInput
from nichooks.model.nic import Nic

LINK_LOCAL = "fe80::/64"


def eui64(subnet: str, mac: str) -> str:
    """The SLAAC EUI-64 address of `mac` (aa:bb:cc:dd:ee:ff) in a /64."""
    net = ipaddress.IPv6Network(subnet, strict=False)
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    iid = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return str(net.network_address + int.from_bytes(bytes(iid), "big"))


def slaac_subnet(nic: Nic) -> str | None:
    """NETWORK_SUBNET6 when it is a /64 (SLAAC needs one), else None."""
    subnet6 = nic.network.subnet6
    if subnet6 and ipaddress.IPv6Network(subnet6, strict=False).prefixlen == 64:
        return subnet6
    return None


def guest_addresses(nic: Nic) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IPv4, IPv6) the guest may send from: IP first, then the EUI-64 address."""
    v4: list[str] = []
    v6: list[str] = []
    if nic.ip is not None:
        (v4 if nic.ip.version == 4 else v6).append(str(nic.ip))
    subnet = slaac_subnet(nic)
    if subnet:
        derived = eui64(subnet, nic.mac)
        if derived not in v6:
            v6.append(derived)
    return tuple(v4), tuple(v6)


def primary_addresses(nic: Nic) -> dict[int, str]:
    """IP version (4, 6) -> the one address routed to the guest in it: the first of
    guest_addresses per family. A routed NIC needs at least one."""
    v4, v6 = guest_addresses(nic)
    out = {version: found[0] for version, found in ((4, v4), (6, v6)) if found}
    if not out:
        raise InvalidInput("IP", "is not set, and there is no NETWORK_SUBNET6 /64 to derive an "
                           "IPv6 address from the MAC: a routed NIC needs an address")
    return out
