"""The other NICs a benchmark host carries, made in bulk, so that a figure shows
whether a plug's cost grows with the host's size. Shared by the benchmarks."""

from __future__ import annotations

import ipaddress
from typing import Any

from nichooks.host.nftrules import Filter, chain_name, install, skeleton

UPLINK = ["link add up0 type veth peer name up1", "link set up0 up", "link set up1 up",
          "addr add 198.51.100.2/24 dev up0"]


def routed_uplink(table: str) -> list[str]:
    """`ip -batch` lines: an uplink veth holding the table's default route."""
    return [*UPLINK, f"route add default via 198.51.100.1 table {table}"]


def other_ipv4(i: int) -> str:
    """The i-th other NIC's IPv4 address (routed: its host route and proxy entry)."""
    return f"10.{i // 250}.{i % 250}.1"


def routed_nics(count: int, table: str) -> list[str]:
    """`ip -batch` lines for `count` routed NICs as a plug leaves them: tap, rule, host
    route in `table`, proxy entry on the uplink up0."""
    lines: list[str] = []
    for i in range(count):
        tap, addr = f"t{i}", other_ipv4(i)
        lines += [f"link add {tap} type veth peer name p{i}", f"link set {tap} up",
                  f"rule add iif {tap} lookup {table} priority 20000",
                  f"route add {addr}/32 dev {tap} table {table} proto 241",
                  f"neigh add proxy {addr} dev up0"]
    return lines


def ovs_ports(count: int, bridge: str = "br0") -> list[str]:
    """`ovs-vsctl` arguments adding `count` internal ports to `bridge` in one call."""
    args: list[str] = []
    for i in range(count):
        args += ["--", "add-port", bridge, f"p{i}", "--", "set", "interface", f"p{i}",
                 "type=internal"]
    return args


def other_key(i: int) -> str:
    """A fixed, UUID-shaped journal key for the i-th other NIC."""
    return f"00000000-0000-4000-8000-{i:012d}"


def other_mac(i: int) -> str:
    return f"aa:01:00:00:{i // 256 % 256:02x}:{i % 256:02x}"


def nft_filters(count: int, family: str) -> dict[str, Any]:
    """The libnftables JSON document (for `nft -j -f`) holding the filters of `count`
    other NICs in `family` (bridge: bridged, inet: routed) as plugs leave them: chain
    `nic-<key>` with the rules nichooks.host.nftrules builds for one MAC and one IPv4
    address, and the map element sending the tap `t{i}` there. The shared table, base
    chain and map come once, ahead of them; one document, one transaction."""
    base = skeleton(family)
    cmds: list[dict[str, Any]] = list(base)
    for i in range(count):
        f = Filter(family=family, chain=chain_name(other_key(i)), ifname=f"t{i}",
                   mac=other_mac(i), ipv4=(ipaddress.IPv4Address(other_ipv4(i)),))
        one = install(f, replace_element=False)
        if one[:len(base)] != base:
            raise RuntimeError("nftrules.install no longer starts with the skeleton")
        cmds += one[len(base):]
    return {"nftables": cmds}
