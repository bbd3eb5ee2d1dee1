"""The nftables objects of a NIC's filter, as libnftables JSON: pure data, built from
typed, validated values (ipaddress objects, a checked MAC), never from pasted text.

Layout, per family (`bridge` for bridged NICs, `inet` for routed ones), in a table
called `nichooks` that nothing else uses:
- one base chain `pre` (prerouting: before the bridge learns a source MAC, before
  routing and conntrack) holding a single rule, `iifname vmap @nics`;
- the verdict map `nics`: tap name -> `goto nic-<journal key>`. One hash lookup per
  packet and one element per plug, however many NICs are filtered;
- one chain `nic-<journal key>` per NIC with only what differs between NICs (its MAC,
  VLANs and addresses), ending in `goto guest`;
- two chains every NIC shares: `guest` (what never comes from a guest, neighbour
  discovery shapes, the allowed protocols, then `drop`) and `unspecified` (what may
  come from 0.0.0.0 and ::).
Every rule carries the comment `nichooks <digest>`: the read-back compares those,
because nft normalises expressions when it lists them.

Cost stays flat with the number of NICs: no rule uses an anonymous set ("not one of
these" is a few range matches instead; nftables 1.0.6 fetches every set's elements
whenever it reads a table), and the NICs' chains stay short (each commit re-validates
every rule reachable from the base chain).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

TABLE = "nichooks"
BASE_CHAIN = "pre"
MAP = "nics"
DISPATCH = "nichooks dispatch"
CHAIN_PREFIX = "nic-"
# bridge: before the bridge's own prerouting work (FDB learning follows the hook);
# inet: before conntrack (-200), as a raw-priority anti-spoofing chain does.
PRIORITY = {"bridge": -200, "inet": -300}
RARP = 0x8035
ND_NS, ND_NA = "nd-neighbor-solicit", "nd-neighbor-advert"
# ICMPv6 NS/NA bodies, in bits from the ICMPv6 header: the target address, then the
# first option's type and length (one 16-bit word) and link-layer address.
ND_TARGET = (64, 128)
ND_OPTION = (192, 16)
ND_LLADDR = (208, 48)
ND_LENGTHS = (24, 32)          # IPv6 payload length: no option, one 8-byte option
SLLA, TLLA, NONCE = 0x0101, 0x0201, 0x0E01  # option type << 8 | length (in 8 bytes)
# (R)ARP for Ethernet and IPv4, in network header bits: sender hardware and IP address.
ARP_SHA_BITS = (64, 48)
ARP_SPA_BITS = (112, 32)
# What a guest without an address yet may send from ::, by ICMPv6 type: MLD reports
# (131, 143), router and neighbour solicitations (133, 135).
UNSPECIFIED_ICMPV6 = (131, 133, 135, 143)

Expr = dict[str, Any]
Rule = list[Expr]


@dataclass(frozen=True)
class Filter:
    """One NIC's filter. `level`: on (MAC and addresses) or mac (MAC only)."""

    family: str                      # bridge | inet
    chain: str
    ifname: str
    mac: str
    level: str = "on"
    ipv4: tuple[ipaddress.IPv4Address, ...] = ()
    ipv6: tuple[ipaddress.IPv6Address, ...] = ()
    trunks: tuple[int, ...] = ()     # bridge: the tagged VLANs the guest may send on

    @property
    def filters_ips(self) -> bool:
        return self.level == "on" and bool(self.ipv4 or self.ipv6)

    def rules(self) -> list[Rule]:
        return bridge_rules(self) if self.family == "bridge" else inet_rules(self)

    def digest(self) -> str:
        """What the read-back compares: 16 hex digits of the rules' JSON."""
        text = json.dumps([self.ifname, self.rules()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def chain_name(key: str) -> str:
    return CHAIN_PREFIX + key


# -- expressions -------------------------------------------------------------------------
def match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def field(protocol: str, name: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": name}}


def raw(base: str, bits: tuple[int, int]) -> Expr:
    return {"payload": {"base": base, "offset": bits[0], "len": bits[1]}}


def meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def hexval(value: int, bits: int) -> str:
    """A raw payload's value: hex text, since JSON integers stop at 64 bits."""
    return f"0x{value:0{bits // 4}x}"


def mac_hex(mac: str) -> str:
    return hexval(int(mac.replace(":", ""), 16), 48)


DROP: Expr = {"drop": None}
ACCEPT: Expr = {"accept": None}
GUEST_CHAIN, UNSPECIFIED_CHAIN = "guest", "unspecified"
GUEST: Expr = {"goto": {"target": GUEST_CHAIN}}
TO_UNSPECIFIED: Expr = {"goto": {"target": UNSPECIFIED_CHAIN}}


def gaps(allowed: Iterable[int], lo: int, hi: int) -> list[tuple[int, int]]:
    """The ranges of [lo, hi] outside `allowed`: "not one of these" as plain range
    matches, one rule each. An anonymous set ({a, b}) would be a kernel set per rule,
    and nftables 1.0.6 fetches every set's elements whenever it reads a table, so a
    plug's cost would grow with the number of NICs already filtered."""
    out: list[tuple[int, int]] = []
    start = lo
    for value in sorted(set(allowed)):
        if value > start:
            out.append((start, value - 1))
        start = max(start, value + 1)
    if start <= hi:
        out.append((start, hi))
    return out


def _span(first: Any, last: Any) -> Any:
    return first if first == last else {"range": [first, last]}


def drop_outside(head: list[Expr], left: Expr, allowed: Iterable[int], bits: int,
                 render: Callable[[int], Any] = int) -> list[Rule]:
    """Drop what `head` matches when `left` is none of `allowed` (a `bits`-wide value)."""
    values = sorted(set(allowed))
    if len(values) == 1:
        return [[*head, match(left, render(values[0]), "!="), DROP]]
    return [[*head, match(left, _span(render(a), render(b))), DROP]
            for a, b in gaps(values, 0, (1 << bits) - 1)]


def _ipv4(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def _ipv6(value: int) -> str:
    return str(ipaddress.IPv6Address(value))


def _hex128(value: int) -> str:
    return hexval(value, 128)


def _never_from_guest() -> list[Rule]:
    """Router advertisements and redirects, DHCP and DHCPv6 server replies."""
    l4 = meta("l4proto")
    icmp = [[match(l4, "icmp"), match(field("icmp", "type"), t), DROP]
            for t in ("redirect", "router-advertisement")]
    icmp6 = [[match(l4, "ipv6-icmp"), match(field("icmpv6", "type"), t), DROP]
             for t in ("nd-router-advert", "nd-redirect")]
    udp = [[match(l4, "udp"), match(field("udp", port), n), DROP]
           for port, numbers in (("sport", (67, 547)), ("dport", (68, 546))) for n in numbers]
    return [*icmp, *icmp6, *udp]


ICMP6 = [match(meta("l4proto"), "ipv6-icmp")]
NS = [*ICMP6, match(field("icmpv6", "type"), ND_NS)]
NA = [*ICMP6, match(field("icmpv6", "type"), ND_NA)]
ONE_OPTION = match(field("ip6", "length"), ND_LENGTHS[1])


def _nd_shape() -> list[Rule]:
    """Neighbour solicitations and advertisements carry no option or one 8-byte option
    (a solicitation's source link-layer address or DAD nonce, an advertisement's
    target link-layer address): the only shapes whose address the NIC's chain can
    check at a fixed offset."""
    rules: list[Rule] = []
    for head, options in ((NS, [SLLA, NONCE]), (NA, [TLLA])):
        rules += drop_outside(head, field("ip6", "length"), ND_LENGTHS, 16)
        rules += drop_outside([*head, ONE_OPTION], raw("th", ND_OPTION), options, ND_OPTION[1])
    return rules


def _protocols(family: str) -> tuple[Expr, str, str]:
    """The key naming a packet's network protocol, and its IPv4 and IPv6 values."""
    if family == "inet":
        return meta("nfproto"), "ipv4", "ipv6"
    return meta("protocol"), "ip", "ip6"  # bridge: the type inside any VLAN tag


def shared_rules(family: str) -> dict[str, list[Rule]]:
    """The rules every NIC shares, in two chains every NIC's chain ends in (a `goto`):
    - `guest`: what never comes from a guest, the neighbour discovery shapes, and the
      allowed protocols (bridge);
    - `unspecified`: packets from 0.0.0.0 or ::, reached only at level `on`: a DHCP
      client's DISCOVER/REQUEST, DAD, router solicitations and MLD reports.
    Kept out of the NICs' chains because the kernel re-validates every chain reachable
    from the base chain at each commit: a plug's cost grows with the rules of all the
    NICs' chains, so those hold only what differs between NICs."""
    proto, v4, v6 = _protocols(family)
    guest = _never_from_guest()
    if family == "bridge":
        guest += _nd_shape()
        guest += [[match(proto, kind), ACCEPT] for kind in ("arp", "ip", "ip6", RARP)]
        guest.append([DROP])
    else:
        guest.append([ACCEPT])
    unspecified: list[Rule] = [
        [match(proto, v4), match(meta("l4proto"), "udp"), match(field("udp", "sport"), 68),
         match(field("udp", "dport"), 67), GUEST],
        [match(proto, v4), DROP],
        [match(proto, v6), match(meta("l4proto"), "ipv6-icmp", "!="), DROP],
        *drop_outside([match(proto, v6)], field("icmpv6", "type"), UNSPECIFIED_ICMPV6, 8),
        [GUEST]]
    return {GUEST_CHAIN: guest, UNSPECIFIED_CHAIN: unspecified}


def _own_sources(f: Filter) -> list[Rule]:
    """IPv4 and IPv6 sources among the guest's addresses; 0.0.0.0 and :: go to the
    `unspecified` chain."""
    proto, v4, v6 = _protocols(f.family)
    rules: list[Rule] = [
        [match(proto, v4), match(field("ip", "saddr"), "0.0.0.0"), TO_UNSPECIFIED]]
    rules += drop_outside([match(proto, v4)], field("ip", "saddr"),
                          [int(a) for a in f.ipv4], 32, _ipv4)
    rules.append([match(proto, v6), match(field("ip6", "saddr"), "::"), TO_UNSPECIFIED])
    rules += drop_outside([match(proto, v6)], field("ip6", "saddr"),
                          [int(a) for a in f.ipv6], 128, _ipv6)
    return rules


def bridge_rules(f: Filter) -> list[Rule]:
    """The NIC's own checks: its MAC as every source hardware address, its VLANs, its
    addresses as ARP senders, NA targets and IP sources. ARP is matched by the
    protocol inside any VLAN tag (`meta protocol`) and raw offsets, which hold for a
    tagged frame as for an untagged one (`arp saddr ether` would test `ether type`,
    which reads 802.1Q on a tagged frame). A trunk's tagged frames get the MAC checks
    and the shared ones only: the NIC's addresses are its untagged network's, and what
    it uses on its other VLANs is unknown."""
    protocol = meta("protocol")
    rules: list[Rule] = [[match(field("ether", "saddr"), f.mac, "!="), DROP],
                         [match(field("ether", "type"), "8021ad"), DROP]]
    if f.trunks:
        rules += drop_outside([], field("vlan", "id"), f.trunks, 12)
    else:
        rules.append([match(field("ether", "type"), "8021q"), DROP])
    rules += [[match(protocol, kind), match(raw("nh", ARP_SHA_BITS), mac_hex(f.mac), "!="), DROP]
              for kind in ("arp", RARP)]
    for head, option in ((NS, SLLA), (NA, TLLA)):
        rules.append([*head, ONE_OPTION, match(raw("th", ND_OPTION), option),
                      match(raw("th", ND_LLADDR), mac_hex(f.mac), "!="), DROP])
    if f.filters_ips:
        if f.trunks:
            rules.append([match(field("ether", "type"), "8021q"), GUEST])
        rules += drop_outside([match(protocol, "arp")], raw("nh", ARP_SPA_BITS),
                              [0, *(int(a) for a in f.ipv4)], 32)
        rules += drop_outside(NA, raw("th", ND_TARGET), [int(a) for a in f.ipv6], 128, _hex128)
        rules += _own_sources(f)
    rules.append([GUEST])
    return rules


def inet_rules(f: Filter) -> list[Rule]:
    rules: list[Rule] = [[match(field("ether", "saddr"), f.mac, "!="), DROP]]
    if f.filters_ips:
        rules += _own_sources(f)
    rules.append([GUEST])
    return rules


# -- commands ----------------------------------------------------------------------------
def obj(family: str, **fields: Any) -> dict[str, Any]:
    return {"family": family, "table": TABLE, **fields}


def shared_digest(family: str) -> str:
    """What the read-back of the shared chains compares (see Filter.digest)."""
    text = json.dumps(shared_rules(family), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def skeleton(family: str) -> list[dict[str, Any]]:
    """The table, its base chain, the map and the shared chains, (re)made idempotently:
    `add` keeps what exists, and each chain of ours is flushed and given its rules
    again in the same transaction (a newer nichooks brings its own)."""
    cmds: list[dict[str, Any]] = [
        {"add": {"table": {"family": family, "name": TABLE}}},
        {"add": {"chain": obj(family, name=BASE_CHAIN, type="filter", hook="prerouting",
                               prio=PRIORITY[family], policy="accept")}},
        {"add": {"map": obj(family, name=MAP, type="ifname", map="verdict")}},
    ]
    comment = "nichooks " + shared_digest(family)
    shared = shared_rules(family)
    for name in shared:
        cmds += [{"add": {"chain": obj(family, name=name)}},
                 {"flush": {"chain": obj(family, name=name)}}]
    for name, chain_rules in shared.items():
        cmds += [{"add": {"rule": obj(family, chain=name, comment=comment, expr=rule)}}
                 for rule in chain_rules]
    cmds += [
        {"flush": {"chain": obj(family, name=BASE_CHAIN)}},
        {"add": {"rule": obj(family, chain=BASE_CHAIN, comment=DISPATCH,
                              expr=[{"vmap": {"key": meta("iifname"), "data": "@" + MAP}}])}},
    ]
    return cmds


def element(family: str, ifname: str, chain: str | None = None) -> dict[str, Any]:
    item: Any = [ifname, {"goto": {"target": chain}}] if chain else ifname
    return obj(family, name=MAP, elem=[item])


def install(f: Filter, replace_element: bool) -> list[dict[str, Any]]:
    """One transaction: skeleton, the NIC's chain with its rules, then its element
    (the previous element of the tap name first, when one points elsewhere)."""
    comment = "nichooks " + f.digest()
    cmds = skeleton(f.family)
    cmds += [{"add": {"chain": obj(f.family, name=f.chain)}},
             {"flush": {"chain": obj(f.family, name=f.chain)}}]
    cmds += [{"add": {"rule": obj(f.family, chain=f.chain, comment=comment, expr=rule)}}
             for rule in f.rules()]
    if replace_element:
        cmds.append({"delete": {"element": element(f.family, f.ifname)}})
    cmds.append({"add": {"element": element(f.family, f.ifname, f.chain)}})
    return cmds


def remove(family: str, chain: str, ifname: str | None) -> list[dict[str, Any]]:
    """Delete the element (if `ifname`: it is known to point at `chain`), then the chain."""
    cmds: list[dict[str, Any]] = []
    if ifname is not None:
        cmds.append({"delete": {"element": element(family, ifname)}})
    cmds += [{"flush": {"chain": obj(family, name=chain)}},
             {"delete": {"chain": obj(family, name=chain)}}]
    return cmds
