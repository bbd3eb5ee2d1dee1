"""The nftables objects of a NIC's filter, as libnftables JSON: pure data, built from
typed, validated values (ipaddress objects, a checked MAC), never from pasted text.

Layout, per family (`bridge` for bridged NICs, `inet` for routed ones), in a table
called `nichooks` that nothing else uses:
- one base chain `pre` (prerouting: before the bridge learns a source MAC, before
  routing and conntrack) holding a single rule, `iifname vmap @nics`;
- the verdict map `nics`: tap name -> `goto nic-<journal key>`. One hash lookup per
  packet and one element per plug, however many NICs are filtered;
- one chain `nic-<journal key>` per NIC, an allow-list ending in `drop`. Every rule
  carries the comment `nichooks <digest>`: the read-back compares those, because
  nft normalises expressions when it lists them.

Drops of what never comes from a guest (router advertisements, redirects, DHCP
server replies) come first, then the address checks, then the accepts: an early
accept must not let a forged frame skip a later check.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

TABLE = "nichooks"
BASE_CHAIN = "pre"
MAP = "nics"
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
ARP_SHA_BITS = (64, 48)        # RARP's sender hardware address (network header bits)

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


def anyof(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else {"set": values}


def hexval(value: int, bits: int) -> str:
    """A raw payload's value: hex text, since JSON integers stop at 64 bits."""
    return f"0x{value:0{bits // 4}x}"


def mac_hex(mac: str) -> str:
    return hexval(int(mac.replace(":", ""), 16), 48)


DROP: Expr = {"drop": None}
ACCEPT: Expr = {"accept": None}


def _never_from_guest() -> list[Rule]:
    """Router advertisements and redirects, DHCP and DHCPv6 server replies."""
    l4 = meta("l4proto")
    return [
        [match(l4, "icmp"), match(field("icmp", "type"), {"set": ["redirect", "router-advertisement"]}),
         DROP],
        [match(l4, "ipv6-icmp"), match(field("icmpv6", "type"), {"set": ["nd-router-advert",
                                                                           "nd-redirect"]}), DROP],
        [match(l4, "udp"), match(field("udp", "sport"), {"set": [67, 547]}), DROP],
        [match(l4, "udp"), match(field("udp", "dport"), {"set": [68, 546]}), DROP],
    ]


def _nd(f: Filter) -> list[Rule]:
    """Neighbour solicitations and advertisements: no option or one 8-byte option
    (a solicitation's source link-layer address or DAD nonce, an advertisement's
    target link-layer address), the link-layer address being the guest's; with
    addresses, an advertisement is only for one of them."""
    icmp6 = [match(meta("l4proto"), "ipv6-icmp")]
    ns = [*icmp6, match(field("icmpv6", "type"), ND_NS)]
    na = [*icmp6, match(field("icmpv6", "type"), ND_NA)]
    one_option = match(field("ip6", "length"), ND_LENGTHS[1])
    rules: list[Rule] = []
    for head, options in ((ns, [SLLA, NONCE]), (na, [TLLA])):
        rules.append([*head, match(field("ip6", "length"), {"set": list(ND_LENGTHS)}, "!="), DROP])
        rules.append([*head, one_option, match(raw("th", ND_OPTION), anyof(options), "!="), DROP])
    for head, option in ((ns, SLLA), (na, TLLA)):
        rules.append([*head, one_option, match(raw("th", ND_OPTION), option),
                      match(raw("th", ND_LLADDR), mac_hex(f.mac), "!="), DROP])
    if f.filters_ips:
        targets = [hexval(int(a), 128) for a in f.ipv6]
        rules.append([*na, match(raw("th", ND_TARGET), anyof(targets), "!="), DROP] if targets
                     else [*na, DROP])
    return rules


def _sources(f: Filter) -> list[Rule]:
    """IPv4 and IPv6 sources among the guest's addresses; 0.0.0.0 only for a DHCP
    client's DISCOVER/REQUEST, :: only for DAD, router solicitations and MLD."""
    proto = meta("nfproto") if f.family == "inet" else meta("protocol")
    v4, v6 = ("ipv4", "ipv6") if f.family == "inet" else ("ip", "ip6")
    rules: list[Rule] = [[
        match(proto, v4), match(field("ip", "saddr"), "0.0.0.0"),
        match(meta("l4proto"), "udp"), match(field("udp", "sport"), 68),
        match(field("udp", "dport"), 67), ACCEPT]]
    if f.ipv4:
        rules.append([match(proto, v4), match(field("ip", "saddr"), anyof([str(a) for a in f.ipv4]),
                                              "!="), DROP])
    else:
        rules.append([match(proto, v4), DROP])
    unspecified = match(field("ip6", "saddr"), "::")
    rules += [
        [match(proto, v6), unspecified, match(meta("l4proto"), "ipv6-icmp", "!="), DROP],
        [match(proto, v6), unspecified, match(field("icmpv6", "type"), {"set": [
            "nd-router-solicit", "nd-neighbor-solicit", "mld-listener-report",
            "mld2-listener-report"]}, "!="), DROP],
        [match(proto, v6), match(field("ip6", "saddr"),
                                 {"set": [*(str(a) for a in f.ipv6), "::"]}, "!="), DROP],
    ]
    return rules


def bridge_rules(f: Filter) -> list[Rule]:
    ether = meta("protocol")  # the frame's type, inside any VLAN tag
    rules: list[Rule] = [[match(field("ether", "saddr"), f.mac, "!="), DROP]]
    if f.trunks:
        rules.append([match(field("vlan", "id"), anyof(list(f.trunks)), "!="), DROP])
    else:
        rules.append([match(field("ether", "type"), {"set": ["8021q", "8021ad"]}), DROP])
    rules.append([match(ether, {"set": ["arp", "ip", "ip6", RARP]}, "!="), DROP])
    rules += _never_from_guest()
    rules.append([match(ether, RARP), match(raw("nh", ARP_SHA_BITS), mac_hex(f.mac), "!="), DROP])
    rules.append([match(field("arp", "saddr ether"), f.mac, "!="), DROP])
    if f.filters_ips:
        rules.append([match(field("arp", "saddr ip"),
                            {"set": [*(str(a) for a in f.ipv4), "0.0.0.0"]}, "!="), DROP])
    rules += _nd(f)
    if f.filters_ips:
        rules += _sources(f)
    rules.append([match(ether, {"set": ["arp", "ip", "ip6", RARP]}), ACCEPT])
    rules.append([DROP])
    return rules


def inet_rules(f: Filter) -> list[Rule]:
    rules: list[Rule] = [[match(field("ether", "saddr"), f.mac, "!="), DROP]]
    rules += _never_from_guest()
    if f.filters_ips:
        rules += _sources(f)
    rules.append([ACCEPT])
    return rules


# -- commands ----------------------------------------------------------------------------
def obj(family: str, **fields: Any) -> dict[str, Any]:
    return {"family": family, "table": TABLE, **fields}


def skeleton(family: str) -> list[dict[str, Any]]:
    """The table, its one base chain and the map, (re)made idempotently: `add` keeps
    what exists, and the base chain is flushed and given its one rule again in the
    same transaction."""
    return [
        {"add": {"table": {"family": family, "name": TABLE}}},
        {"add": {"chain": obj(family, name=BASE_CHAIN, type="filter", hook="prerouting",
                               prio=PRIORITY[family], policy="accept")}},
        {"add": {"map": obj(family, name=MAP, type="ifname", map="verdict")}},
        {"flush": {"chain": obj(family, name=BASE_CHAIN)}},
        {"add": {"rule": obj(family, chain=BASE_CHAIN, comment="nichooks dispatch",
                              expr=[{"vmap": {"key": meta("iifname"), "data": "@" + MAP}}])}},
    ]


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
