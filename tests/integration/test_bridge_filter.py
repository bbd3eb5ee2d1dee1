"""Bridged mode's nftables anti-spoofing filter on the real kernel (table `bridge nichooks`).

    host ns:  br0 (10.0.0.254/24, fixed MAC)
                ├─ tapa ══ eth0 in guest a   10.0.0.1   EUI-64 of its MAC in 2001:db8:1::/64
                ├─ tapb ══ eth0 in guest b   10.0.0.2   "
                └─ tapc ══ eth0 in guest c   10.0.0.3   "

Each tap is plugged by `kvm-ifup` with its guest's MAC, IP and NETWORK_SUBNET6, a /64:
the filter then allows the guest's IPv4 address, its EUI-64 address there and its
EUI-64 link-local address.

A guest sends raw frames from its eth0, all from one packet socket: the frames under
test, honest ones among them, and last a control frame (ovs_env.control_frame: honest
UDP carrying a token). The capture, in the receiving guest or on br0 in the host, reads
until the control frame has arrived: it went through the same tap, filter and bridge
after the others, so a frame sent before it that did not arrive was dropped, not late.
The honest frames of the batch show that the way was open; an expected set is never
empty. Frames are recognised byte for byte (the bridge forwards a frame unchanged), so
an ARP, NA or RA needs no token to be told apart.

A trunk NIC's filter (section 5) is installed by nichooks' own code rather than by
`kvm-ifup`, which wants a VLAN-filtering bridge for VLANs; the taps then join br0 by hand.

Raw frames rather than sockets: a socket bound to a forged address would make the guest
resolve neighbours with it first, and the test would then measure neighbour discovery,
not the filter. The ruleset is read with `nft -j list ruleset`, neighbours, routes and
the bridge's forwarding database with `ip -j` / `bridge -j`, never through nichooks' own
code.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.bridged_env import Site
from tests.integration.ovs_env import Guest, add_guest, control_frame, send_frames
from tests.support import packets as pk
from tests.support.frames import CONTROL_ETHERTYPE, Listener
from tests.support.hooks import wait_for
from tests.support.netns import Netns, require_root
from tests.support.state import journals

SUBNET6 = "2001:db8:1::/64"
LINK_LOCAL = "fe80::/64"
GUESTS = {"a": ("52:54:00:00:00:0a", "10.0.0.1"),
          "b": ("52:54:00:00:00:0b", "10.0.0.2"),
          "c": ("52:54:00:00:00:0c", "10.0.0.3")}
FORGED_MAC = "52:54:00:99:99:99"
FORGED4, FORGED6 = "10.0.0.9", "2001:db8:1::99"
EXTRA4, EXTRA6 = "10.0.0.77", "2001:db8:1::77"  # floating addresses an operator allows
OTHER4, OTHER6 = "192.168.100.5", "2001:db8:100::5"  # a trunk guest's, on one of its VLANs
ETH_IP, ETH_ARP, ETH_IP6, ETH_RARP = 0x0800, 0x0806, 0x86DD, 0x8035
ALL_NODES, ALL_ROUTERS = "33:33:00:00:00:01", "33:33:00:00:00:02"

Probes = dict[str, bytes]  # name -> the frame, as sent


# --- the site ----------------------------------------------------------------------------
@dataclass
class Lan:
    site: Site
    guests: dict[str, Guest]

    @property
    def host(self) -> Netns:
        return self.site.host

    def __getitem__(self, name: str) -> Guest:
        return self.guests[name]

    def env(self, name: str, **overrides: str) -> dict[str, str]:
        g = self.guests[name]
        nic = {"INSTANCE": f"{name}.example.org", "MAC": g.mac, "INTERFACE": g.tap,
               "INTERFACE_UUID": g.uuid, "IP": ip4(g), "NETWORK_SUBNET6": SUBNET6,
               "TAGS": "web"}
        nic.update(overrides)
        return self.site.env(**nic)

    def ifup(self, name: str, **overrides: str) -> Guest:
        up = self.site.hook("kvm-ifup", self.guests[name].tap, env=self.env(name, **overrides))
        assert up.returncode == 0, up.stderr
        assert up.stderr == ""
        return self.guests[name]

    def ifdown(self, name: str) -> None:
        down = self.site.hook("kvm-ifdown", self.guests[name].tap, env=self.env(name))
        assert down.returncode == 0, down.stderr
        assert down.stderr == ""


@pytest.fixture
def lan(dirs: tuple[Path, Path]) -> Iterator[Lan]:
    """br0 in a host namespace and three guests behind taps not plugged yet."""
    require_root()
    host = Netns()
    guests: dict[str, Guest] = {}
    try:
        for name, (mac, ip4) in GUESTS.items():
            guests[name] = add_guest(host, f"tap{name}", mac, f"{ip4}/24", f"{pk.eui64(SUBNET6, mac)}/64")
        site = Site(host=host, guest=guests["a"].ns, state=dirs[0], conf=dirs[1])
        site.add_bridge("br0", addr="10.0.0.254/24")
        yield Lan(site=site, guests=guests)
    finally:
        for guest in guests.values():
            guest.ns.delete()
        host.delete()


def chain_of(guest: Guest) -> str:
    return f"nic-{guest.uuid}"


def assert_filtered(lan: Lan, *guests: Guest) -> None:
    view = lan.host.nft_table("bridge")
    assert view is not None, f"no bridge nichooks table: {lan.host.nft_ruleset()}"
    for guest in guests:
        assert chain_of(guest) in view["chains"], view
        assert view["elements"].get(guest.tap) == chain_of(guest), view


# --- frames ------------------------------------------------------------------------------
def ip4(g: Guest) -> str:
    assert g.ip4 is not None
    return g.ip4


def ip6(g: Guest) -> str:
    return pk.eui64(SUBNET6, g.mac)


def ll6(g: Guest) -> str:
    return pk.eui64(LINK_LOCAL, g.mac)


def udp(g: Guest, dst_mac: str, src: str, dst: str, token: str, ports: tuple[int, int] = (40000, 9),
        mac: str | None = None) -> bytes:
    return pk.ethernet(dst_mac, mac or g.mac, ETH_IP,
                       pk.udp4(src, dst, *ports, f"NH-probe-{token}".encode()))


def echo6(g: Guest, dst_mac: str, src: str, dst: str, token: str) -> bytes:
    body = struct.pack("!HH", 0x4E48, 1) + f"NH-probe-{token}".encode()
    return pk.ethernet(dst_mac, g.mac, ETH_IP6, pk.icmp6(src, dst, 128, body))


def arp(g: Guest, dst_mac: str, op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    return pk.ethernet(dst_mac, g.mac, ETH_ARP, pk.arp(op, sha, spa, tha, tpa))


def na(g: Guest, target: str, lladdr: str) -> bytes:
    """An unsolicited NA (override flag) from g's link-local address for `target`."""
    return pk.ethernet(ALL_NODES, g.mac, ETH_IP6, pk.neighbour_advert(ll6(g), target, lladdr))


def ns(g: Guest, src: str, target: str, lladdr: str | None) -> bytes:
    """An NS for `target` to its solicited-node group, with source link-layer option
    `lladdr` (None: without)."""
    group = "33:33:ff:" + pk.mac_str(ipaddress.IPv6Address(target).packed[13:])
    return pk.ethernet(group, g.mac, ETH_IP6, pk.neighbour_solicit(src, target, lladdr))


def rarp(src_mac: str, sha: str) -> bytes:
    """QEMU's announcement after a migration (qemu_announce_self): a broadcast RARP
    "request reverse" naming the NIC's MAC as sender and target, padded to 60 bytes."""
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, 3) + pk.mac_bytes(sha) + bytes(4) \
        + pk.mac_bytes(sha) + bytes(4)
    return pk.ethernet(pk.BROADCAST, src_mac, ETH_RARP, body).ljust(60, b"\0")


def icmp4(g: Guest, dst_mac: str, src: str, dst: str, icmp_type: int, code: int = 0) -> bytes:
    """An ICMP message (type `icmp_type`, a zero body of 4 bytes) in an IPv4 packet."""
    message = struct.pack("!BBHI", icmp_type, code, 0, 0)
    message = message[:2] + struct.pack("!H", pk.checksum(message)) + message[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(message), 0, 0x4000, 64, 1, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", pk.checksum(header)) + header[12:]
    return pk.ethernet(dst_mac, g.mac, ETH_IP, header + message)


def udp6(g: Guest, dst_mac: str, src: str, dst: str, ports: tuple[int, int], token: str) -> bytes:
    """A UDP datagram in an IPv6 packet, checksum computed (IPv6 requires one)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    payload = f"NH-probe-{token}".encode()
    datagram = struct.pack("!HHHH", *ports, 8 + len(payload), 0) + payload
    csum = pk.checksum(s + d + struct.pack("!I3xB", len(datagram), 17) + datagram) or 0xFFFF
    datagram = datagram[:6] + struct.pack("!H", csum) + datagram[8:]
    packet = struct.pack("!IHBB", 0x60000000, len(datagram), 17, 64) + s + d + datagram
    return pk.ethernet(dst_mac, g.mac, ETH_IP6, packet)


def router_solicit(g: Guest, src: str) -> bytes:
    return pk.ethernet(ALL_ROUTERS, g.mac, ETH_IP6, pk.icmp6(src, "ff02::2", 133, bytes(4)))


def redirect6(g: Guest, dst_mac: str, dst: str, target: str, about: str) -> bytes:
    """An ICMPv6 redirect: "reach `about` through `target`"."""
    body = bytes(4) + ipaddress.IPv6Address(target).packed + ipaddress.IPv6Address(about).packed
    return pk.ethernet(dst_mac, g.mac, ETH_IP6, pk.icmp6(ll6(g), dst, 137, body))


def as_captured(frame: bytes) -> tuple[int | None, bytes]:
    """A frame as a capture reports it: its outer VLAN tag (802.1Q or 802.1ad) apart."""
    if frame[12:14] in (b"\x81\x00", b"\x88\xa8"):
        return int.from_bytes(frame[14:16], "big") & 0xFFF, frame[:12] + frame[16:]
    return None, frame


def arrivals(sender: Guest, capture: tuple[Netns, str], probes: Probes,
             control_dst: str = pk.BROADCAST) -> set[str]:
    """The names of the `probes` that arrived on `capture` (namespace, interface) before
    the control frame `sender` sends right after them."""
    control, token = control_frame(sender, control_dst)
    with Listener(capture[0].name, capture[1]) as heard:
        send_frames(sender, [*probes.values(), control])
        seen = set(heard.until(token))
    return {name for name, frame in probes.items() if as_captured(frame) in seen}


def neighbour(g: Guest, addr: str) -> str | None:
    """The link-layer address g's eth0 has for `addr`, if any."""
    found = g.ns.ipj("neigh", "show", addr, "dev", "eth0")
    return found[0].get("lladdr") if found else None


def learned(lan: Lan, mac: str) -> list[dict[str, Any]]:
    """br0's forwarding database entries for `mac`."""
    out = lan.host.run("bridge", "-j", "fdb", "show", "br", "br0").stdout
    return [e for e in (json.loads(out) if out.strip() else []) if e.get("mac") == mac]


# --- 1. forged frames never arrive, honest ones do ---------------------------------------
def test_forged_frames_from_a_guest_never_arrive(lan: Lan) -> None:
    a, b, c = (lan.ifup(name) for name in "abc")
    assert_filtered(lan, a, b, c)
    # b knows c, as any neighbour on the LAN would: entries a forged ARP reply or NA
    # could move to a's MAC. A reply within `locktime` of the last update never moves
    # an entry: 0, so that one forged reply would be enough.
    b.ns.run("sysctl", "-qw", "net.ipv4.neigh.eth0.locktime=0")
    assert b.ping_until(ip4(c)), "honest IPv4 traffic does not flow"
    assert b.ping_until(ip6(c)), "honest IPv6 traffic does not flow"
    assert (neighbour(b, ip4(c)), neighbour(b, ip6(c))) == (c.mac, c.mac)

    b4, c4 = ip4(b), ip4(c)
    probes: Probes = {
        # honest: a's own MAC and addresses
        "honest4": udp(a, b.mac, ip4(a), b4, "honest4"),
        "honest6": echo6(a, b.mac, ip6(a), ip6(b), "honest6"),
        "honest6-link-local": echo6(a, b.mac, ll6(a), ll6(b), "honest6-ll"),
        "honest-arp-reply": arp(a, b.mac, 2, a.mac, ip4(a), b.mac, b4),
        "honest-na": na(a, ip6(a), a.mac),
        "honest-ns": ns(a, ll6(a), ip6(b), a.mac),
        # a source MAC that is not a's
        "forged-mac": udp(a, b.mac, ip4(a), b4, "forged-mac", mac=FORGED_MAC),
        # IPv4 and IPv6 sources that are not a's
        "forged4-c": udp(a, b.mac, c4, b4, "forged4-c"),
        "forged4-other": udp(a, b.mac, FORGED4, b4, "forged4-other"),
        "forged6-c": echo6(a, b.mac, ip6(c), ip6(b), "forged6-c"),
        "forged6-c-link-local": echo6(a, b.mac, ll6(c), ll6(b), "forged6-c-ll"),
        "forged6-other": echo6(a, b.mac, FORGED6, ip6(b), "forged6-other"),
        "forged6-unspecified": echo6(a, b.mac, "::", ip6(b), "forged6-unspecified"),
        # ARP: c's address at a's MAC (a reply to b, and a gratuitous one), a's
        # address at a MAC that is not a's
        "arp-reply-claims-c": arp(a, b.mac, 2, a.mac, c4, b.mac, b4),
        "garp-claims-c": arp(a, pk.BROADCAST, 2, a.mac, c4, a.mac, c4),
        "arp-forged-sender-mac": arp(a, b.mac, 2, FORGED_MAC, ip4(a), b.mac, b4),
        # neighbour discovery: c's address at a's MAC, link-layer options not a's MAC
        "na-claims-c": na(a, ip6(c), a.mac),
        "na-forged-tlla": na(a, ip6(a), FORGED_MAC),
        "ns-forged-slla": ns(a, ll6(a), ip6(b), FORGED_MAC),
        # never from a guest: router advertisement, redirect, DHCP server replies
        "router-advert": pk.ethernet(ALL_NODES, a.mac, ETH_IP6, pk.router_advert(ll6(a))),
        "redirect6": redirect6(a, b.mac, ll6(b), ll6(a), ip6(c)),
        "dhcp-offer": udp(a, b.mac, ip4(a), b4, "dhcp-offer", ports=(67, 68)),
        "dhcp-offer-broadcast": udp(a, pk.BROADCAST, ip4(a), "255.255.255.255",
                                    "dhcp-offer-bcast", ports=(67, 68)),
        "to-dhcp-client-port": udp(a, b.mac, ip4(a), b4, "to-68", ports=(40000, 68)),
        "icmp-redirect": icmp4(a, b.mac, ip4(a), b4, 5, 1),
        "icmp-router-advert": icmp4(a, pk.BROADCAST, ip4(a), "255.255.255.255", 9),
        "dhcpv6-advertise": udp6(a, b.mac, ll6(a), ll6(b), (547, 546), "dhcpv6-advertise"),
        "to-dhcpv6-client-port": udp6(a, b.mac, ll6(a), ll6(b), (40000, 546), "to-546"),
        # a client's own DHCPv6 and DHCP traffic is honest
        "honest-dhcpv6-solicit": udp6(a, "33:33:00:01:00:02", ll6(a), "ff02::1:2", (546, 547),
                                      "dhcpv6-solicit"),
        "honest-dhcp-request": udp(a, pk.BROADCAST, ip4(a), "255.255.255.255",
                                   "dhcp-request", ports=(68, 67)),
    }
    heard = arrivals(a, (b.ns, "eth0"), probes, control_dst=b.mac)
    observed = {
        "arrived at b": heard,
        "b's neighbour for c's IPv4": neighbour(b, c4),
        "b's neighbour for c's IPv6": neighbour(b, ip6(c)),
        "b's IPv6 default routes": b.ns.ipj("-6", "route", "show", "default"),
        "br0 learned the forged MAC": learned(lan, FORGED_MAC),
    }
    assert observed == {
        "arrived at b": {name for name in probes if name.startswith("honest")},
        "b's neighbour for c's IPv4": c.mac,
        "b's neighbour for c's IPv6": c.mac,
        "b's IPv6 default routes": [],
        "br0 learned the forged MAC": [],
    }


# --- 2. what a guest may send without an address, RARP, VLAN tags -----------------------
def test_dhcp_discover_and_rarp_announcement_pass_tagged_and_foreign_frames_do_not(lan: Lan) -> None:
    """Guest c, known to Ganeti as 10.0.0.3 but not configured yet (it asks DHCP), and
    QEMU announcing it after a migration; judged where the host hears them, on br0."""
    c = lan.ifup("c")
    assert_filtered(lan, c)
    bcast = "255.255.255.255"
    probes: Probes = {
        # allowed: a DHCP client's DISCOVER, QEMU's RARP, ARP probe, DAD, solicitation
        "dhcp-discover": udp(c, pk.BROADCAST, "0.0.0.0", bcast, "discover", ports=(68, 67)),
        "rarp-announcement": rarp(c.mac, c.mac),
        "arp-probe": arp(c, pk.BROADCAST, 1, c.mac, "0.0.0.0", "00:00:00:00:00:00", ip4(c)),
        "dad-ns": ns(c, "::", ip6(c), None),
        "router-solicit": router_solicit(c, "::"),
        # dropped: RARP naming another MAC, 0.0.0.0 for anything but DHCP, a DHCP
        # DISCOVER from another MAC, tagged frames, another EtherType
        "rarp-forged-sender": rarp(c.mac, FORGED_MAC),
        "rarp-forged-mac": rarp(FORGED_MAC, FORGED_MAC),
        "unspecified-not-dhcp": udp(c, pk.BROADCAST, "0.0.0.0", bcast, "zero-to-9", ports=(68, 9)),
        "unspecified-from-67": udp(c, pk.BROADCAST, "0.0.0.0", bcast, "zero-from-67", ports=(67, 67)),
        "dhcp-discover-forged-mac": udp(c, pk.BROADCAST, "0.0.0.0", bcast, "discover-forged",
                                        ports=(68, 67), mac=FORGED_MAC),
        "vlan-5": pk.ethernet(pk.BROADCAST, c.mac, ETH_IP,
                              pk.udp4(ip4(c), bcast, 40000, 9, b"NH-probe-vlan5"), vid=5),
        "vlan-0-priority-tag": pk.ethernet(pk.BROADCAST, c.mac, ETH_IP,
                                           pk.udp4(ip4(c), bcast, 40000, 9, b"NH-probe-vlan0"), vid=0),
        "qinq-5": pk.mac_bytes(pk.BROADCAST) + pk.mac_bytes(c.mac) + struct.pack("!HHH", 0x88A8, 5, ETH_IP)
        + pk.udp4(ip4(c), bcast, 40000, 9, b"NH-probe-qinq5"),
        "other-ethertype": pk.ethernet(pk.BROADCAST, c.mac, CONTROL_ETHERTYPE,
                                       b"NH-probe-other-ethertype").ljust(60, b"\0"),
    }
    allowed = {"dhcp-discover", "rarp-announcement", "arp-probe", "dad-ns", "router-solicit"}
    assert arrivals(c, (lan.host, "br0"), probes) == allowed


# --- 3. exceptions per instance: tags (and the host's setting) --------------------------
def test_allow_ip_tag_lets_that_source_through_only(lan: Lan) -> None:
    a = lan.ifup("a", TAGS=f"web nichooks:allow-ip:{EXTRA4} nichooks:allow-ip:{EXTRA6}")
    b = lan.ifup("b")
    assert_filtered(lan, a, b)
    b4 = ip4(b)
    probes: Probes = {
        "honest4": udp(a, b.mac, ip4(a), b4, "honest4"),
        # the allowed addresses, and what a keepalived taking them over sends
        "extra4": udp(a, b.mac, EXTRA4, b4, "extra4"),
        "extra6": echo6(a, b.mac, EXTRA6, ip6(b), "extra6"),
        "garp-extra4": arp(a, pk.BROADCAST, 1, a.mac, EXTRA4, "00:00:00:00:00:00", EXTRA4),
        "na-extra6": na(a, EXTRA6, a.mac),
        # still forged
        "forged4": udp(a, b.mac, FORGED4, b4, "forged4"),
        "forged6": echo6(a, b.mac, FORGED6, ip6(b), "forged6"),
        "garp-forged4": arp(a, pk.BROADCAST, 1, a.mac, FORGED4, "00:00:00:00:00:00", FORGED4),
        "na-forged6": na(a, FORGED6, a.mac),
        "forged-mac": udp(a, b.mac, EXTRA4, b4, "forged-mac", mac=FORGED_MAC),
    }
    assert arrivals(a, (b.ns, "eth0"), probes, control_dst=b.mac) == {
        "honest4", "extra4", "extra6", "garp-extra4", "na-extra6"}


@pytest.mark.parametrize("overrides", [
    {"NICHOOKS_ANTISPOOF": "mac"},
    {"TAGS": "web nichooks:antispoof:mac"},
], ids=["setting", "tag"])
def test_antispoof_mac_checks_the_mac_only(lan: Lan, overrides: dict[str, str]) -> None:
    a, b = lan.ifup("a", **overrides), lan.ifup("b")
    assert_filtered(lan, a, b)
    b4 = ip4(b)
    probes: Probes = {
        "honest4": udp(a, b.mac, ip4(a), b4, "honest4"),
        # any address, with a's MAC
        "forged4": udp(a, b.mac, FORGED4, b4, "forged4"),
        "forged6": echo6(a, b.mac, FORGED6, ip6(b), "forged6"),
        "arp-claims-c": arp(a, b.mac, 2, a.mac, ip4(lan["c"]), b.mac, b4),
        "na-claims-c": na(a, ip6(lan["c"]), a.mac),
        # another MAC, wherever it is
        "forged-mac": udp(a, b.mac, ip4(a), b4, "forged-mac", mac=FORGED_MAC),
        "arp-forged-sender-mac": arp(a, b.mac, 2, FORGED_MAC, ip4(a), b.mac, b4),
        "na-forged-tlla": na(a, ip6(a), FORGED_MAC),
        "rarp-forged-sender": rarp(a.mac, FORGED_MAC),
        # never from a guest, whatever the level
        "router-advert": pk.ethernet(ALL_NODES, a.mac, ETH_IP6, pk.router_advert(ll6(a))),
        "dhcp-offer": udp(a, b.mac, ip4(a), b4, "dhcp-offer", ports=(67, 68)),
        "vlan-5": pk.ethernet(b.mac, a.mac, ETH_IP, pk.udp4(ip4(a), b4, 40000, 9,
                                                            b"NH-probe-vlan5"), vid=5),
    }
    assert arrivals(a, (b.ns, "eth0"), probes, control_dst=b.mac) == {
        "honest4", "forged4", "forged6", "arp-claims-c", "na-claims-c"}


@pytest.mark.parametrize("overrides", [
    {"NICHOOKS_ANTISPOOF": "off"},
    {"TAGS": "web nichooks:antispoof:off"},
], ids=["setting", "tag"])
def test_antispoof_off_makes_no_chain_for_that_nic(lan: Lan, overrides: dict[str, str]) -> None:
    a, b = lan.ifup("a", **overrides), lan.ifup("b")
    assert_filtered(lan, b)
    view = lan.host.nft_table("bridge")
    assert view is not None and chain_of(a) not in view["chains"], view
    assert a.tap not in view["elements"], view
    b4 = ip4(b)
    probes: Probes = {
        "forged4": udp(a, b.mac, FORGED4, b4, "forged4"),
        "forged6": echo6(a, b.mac, FORGED6, ip6(b), "forged6"),
        "forged-mac": udp(a, b.mac, ip4(a), b4, "forged-mac", mac=FORGED_MAC),
    }
    assert arrivals(a, (b.ns, "eth0"), probes, control_dst=b.mac) == set(probes)


# --- 4. ifdown puts back disable_ipv6 and the ruleset ------------------------------------
def test_ifdown_restores_disable_ipv6_and_the_ruleset(lan: Lan) -> None:
    host = lan.host
    # Someone else's bridge table, there before and after: ours must not disturb it.
    host.run("nft", "add", "table", "bridge", "operator")
    host.run("nft", "add", "chain", "bridge", "operator", "pre",
             "{ type filter hook prerouting priority 0; policy accept; }")
    host.run("nft", "add", "rule", "bridge", "operator", "pre", "ether", "type", "arp", "accept")
    operator = host.nft_table("bridge", "operator")

    def disable_ipv6() -> dict[str, str]:
        return {g.tap: host.sysctl(f"net.ipv6.conf.{g.tap}.disable_ipv6") for g in lan.guests.values()}

    assert disable_ipv6() == {"tapa": "0", "tapb": "0", "tapc": "0"}
    ruleset_before, snapshot_before = host.nft_ruleset(), host.snapshot()

    a, b, c = (lan.ifup(name) for name in "abc")
    assert disable_ipv6() == {"tapa": "1", "tapb": "1", "tapc": "1"}
    view = host.nft_table("bridge")
    assert view is not None, host.nft_ruleset()
    # (the table may hold chains the NICs share too: how the rules are laid out is not
    # what this test is about)
    assert {"pre", chain_of(a), chain_of(b), chain_of(c)} <= set(view["chains"]), view
    assert "nics" in view["maps"], view
    assert view["elements"] == {g.tap: chain_of(g) for g in (a, b, c)}, view
    [pre] = [i["chain"] for i in host.nft_ruleset()
             if i.get("chain", {}).get("family") == "bridge" and i["chain"].get("table") == "nichooks"
             and i["chain"]["name"] == "pre"]
    assert (pre.get("type"), pre.get("hook")) == ("filter", "prerouting"), pre

    lan.ifdown("a")
    assert disable_ipv6() == {"tapa": "0", "tapb": "1", "tapc": "1"}
    view = host.nft_table("bridge")
    assert view is not None and view["elements"] == {g.tap: chain_of(g) for g in (b, c)}, view
    assert chain_of(a) not in view["chains"], view

    lan.ifdown("b")
    lan.ifdown("c")
    assert disable_ipv6() == {"tapa": "0", "tapb": "0", "tapc": "0"}
    assert host.nft_table("bridge") is None, host.nft_ruleset()
    assert host.nft_table("bridge", "operator") == operator
    assert host.nft_ruleset() == ruleset_before
    assert host.snapshot() == snapshot_before
    assert journals(lan.site.state) == []


# --- 5. a trunk NIC: tagged frames get the MAC checks, not the address checks ----------
TRUNKS = (100, 200)
# The product's own rules for one bridged NIC, installed by the product's own code in
# the namespace it runs in (argv[1]: the Filter's fields as JSON).
INSTALL = r"""
import ipaddress, json, sys
from nichooks.host.nft import Nft
from nichooks.host.nftrules import Filter, install
spec = json.loads(sys.argv[1])
spec["ipv4"] = tuple(map(ipaddress.IPv4Address, spec["ipv4"]))
spec["ipv6"] = tuple(map(ipaddress.IPv6Address, spec["ipv6"]))
spec["trunks"] = tuple(spec["trunks"])
Nft().run(install(Filter(family="bridge", **spec), replace_element=False))
"""


def tagged(frame: bytes, vid: int, tpid: int = 0x8100) -> bytes:
    """`frame` with a VLAN tag (802.1Q, or 802.1ad with tpid 0x88a8) after its MACs."""
    return frame[:12] + struct.pack("!HH", tpid, vid) + frame[12:]


def port_state(lan: Lan, tap: str) -> str | None:
    """`tap`'s state as a port of br0 (forwarding, disabled...), None if not one."""
    out = lan.host.run("bridge", "-j", "link", "show", "dev", tap).stdout
    found = json.loads(out) if out.strip() else []
    return found[0].get("state") if found else None


def test_trunk_nic_tagged_frames_get_the_mac_checks_but_not_the_address_checks(lan: Lan) -> None:
    """Guest a as a trunk NIC (VLANs 100 and 200 tagged, its addresses those of its
    untagged network), its filter installed directly: this kernel has no VLAN-filtering
    bridge, which kvm-ifup requires for VLANs, so the taps join a plain br0 by hand and
    guest b, unfiltered, listens."""
    a, b, host = lan["a"], lan["b"], lan.host
    before = host.snapshot()
    spec = {"chain": chain_of(a), "ifname": a.tap, "mac": a.mac, "level": "on",
            "ipv4": [ip4(a)], "ipv6": [ip6(a), ll6(a)], "trunks": list(TRUNKS)}
    try:
        for g in (a, b):
            host.ip("link", "set", g.tap, "master", "br0", "up")
        # The bridge enables a port once the kernel has handled its carrier change,
        # which it may put off for up to a second (linkwatch): until then it drops
        # what arrives there, honest frames and control alike.
        wait_for("the taps to forward", lambda: all(port_state(lan, g.tap) == "forwarding"
                                                    for g in (a, b)))
        done = host.run(sys.executable, "-c", INSTALL, json.dumps(spec), check=False)
        assert done.returncode == 0, done.stderr
        assert_filtered(lan, a)

        b4, zeros = ip4(b), "00:00:00:00:00:00"
        peer4, peer6 = "192.168.100.9", "2001:db8:100::9"  # someone on VLAN 100
        router_advert = pk.ethernet(ALL_NODES, a.mac, ETH_IP6, pk.router_advert(ll6(a)))
        probes: Probes = {
            # untagged: a's own MAC and addresses
            "honest4": udp(a, b.mac, ip4(a), b4, "honest4"),
            "honest-arp": arp(a, b.mac, 2, a.mac, ip4(a), b.mac, b4),
            # tagged, on its VLANs: addresses of another network, its own MAC
            "honest-v100-other4": tagged(udp(a, b.mac, OTHER4, peer4, "v100-other4"), 100),
            "honest-v100-other-arp": tagged(arp(a, pk.BROADCAST, 1, a.mac, OTHER4, zeros, peer4), 100),
            "honest-v100-other-na": tagged(na(a, OTHER6, a.mac), 100),
            "honest-v200-other6": tagged(echo6(a, b.mac, OTHER6, peer6, "v200-other6"), 200),
            # untagged: sources and ARP senders that are not a's, of its network or another
            "forged4": udp(a, b.mac, FORGED4, b4, "forged4"),
            "forged4-other-net": udp(a, b.mac, OTHER4, b4, "forged4-other-net"),
            "arp-forged-sender-ip": arp(a, b.mac, 2, a.mac, FORGED4, b.mac, b4),
            "arp-other-net-sender-ip": arp(a, b.mac, 2, a.mac, OTHER4, b.mac, b4),
            # tagged on its VLAN: a hardware address that is not a's, wherever it is
            "v100-forged-mac": tagged(udp(a, b.mac, OTHER4, peer4, "v100-forged-mac", mac=FORGED_MAC), 100),
            "v100-arp-forged-sender-mac": tagged(arp(a, b.mac, 2, FORGED_MAC, OTHER4, b.mac, peer4), 100),
            "v100-rarp-forged-sender": tagged(rarp(a.mac, FORGED_MAC), 100),
            "v100-na-forged-tlla": tagged(na(a, OTHER6, FORGED_MAC), 100),
            "v100-ns-forged-slla": tagged(ns(a, ll6(a), peer6, FORGED_MAC), 100),
            # tagged on its VLAN: never from a guest
            "v100-router-advert": tagged(router_advert, 100),
            "v100-dhcp-offer": tagged(udp(a, b.mac, OTHER4, peer4, "v100-dhcp-offer", ports=(67, 68)), 100),
            "v100-dhcpv6-advertise": tagged(udp6(a, b.mac, ll6(a), ll6(b), (547, 546), "v100-dhcpv6"), 100),
            "v100-icmp-redirect": tagged(icmp4(a, b.mac, OTHER4, peer4, 5, 1), 100),
            # other tags: a VLAN not its own, priority tag (VLAN 0), 802.1ad, 802.1Q in 802.1Q
            "v300-own4": tagged(udp(a, b.mac, ip4(a), b4, "v300-own4"), 300),
            "v0-own4": tagged(udp(a, b.mac, ip4(a), b4, "v0-own4"), 0),
            "qinq100-own4": tagged(udp(a, b.mac, ip4(a), b4, "qinq100-own4"), 100, tpid=0x88A8),
            "v100-in-v100": tagged(tagged(udp(a, b.mac, OTHER4, peer4, "v100-in-v100"), 100), 100),
        }
        assert arrivals(a, (b.ns, "eth0"), probes, control_dst=b.mac) == {
            name for name in probes if name.startswith("honest")}
    finally:
        host.run("nft", "delete", "table", "bridge", "nichooks", check=False)
        for g in (a, b):
            host.ip("link", "set", g.tap, "down", "nomaster", check=False)
    assert host.snapshot() == before


# --- 6. spanning tree: a guest's BPDUs never make its port the root port ----------------
def bpdu(g: Guest) -> bytes:
    """An 802.1D configuration BPDU from `g` claiming the best root there is (priority
    0): a bridge running STP makes the port it came in on its root port."""
    best = struct.pack("!H", 0) + pk.mac_bytes("00:00:00:00:00:01")
    body = (struct.pack("!HBBB", 0, 0, 0, 0) + best + struct.pack("!I", 0) + best
            + struct.pack("!HHHHH", 0x8001, 0, 20 * 256, 2 * 256, 15 * 256))
    llc = bytes([0x42, 0x42, 0x03]) + body
    frame = pk.mac_bytes("01:80:c2:00:00:00") + pk.mac_bytes(g.mac) + struct.pack("!H", len(llc))
    return (frame + llc).ljust(60, b"\0")


def root_id(lan: Lan) -> str:
    return lan.host.run("cat", "/sys/class/net/br0/bridge/root_id").stdout.strip()


def test_bpdus_from_a_filtered_guest_never_make_it_the_root(lan: Lan) -> None:
    """With STP on, the bridge takes BPDUs before any netfilter hook, so the filter
    cannot drop them: root_block on the port does. a (filtered) claims the root and
    its port stops forwarding instead, the root unmoved; b, plugged with filtering off
    (no root_block), shows that the same BPDU does move the root."""
    lan.host.ip("link", "set", "br0", "type", "bridge", "stp_state", "1", "forward_delay", "200")
    own = root_id(lan)
    a, b = lan.ifup("a"), lan.ifup("b", NICHOOKS_ANTISPOOF="off")
    assert lan.host.link("tapa")["linkinfo"]["info_slave_data"]["root_block"] is True
    assert lan.host.link("tapb")["linkinfo"]["info_slave_data"]["root_block"] is False
    wait_for("tapa and tapb forwarding",
             lambda: port_state(lan, "tapa") == port_state(lan, "tapb") == "forwarding", 30)

    send_frames(a, [bpdu(a)])
    wait_for("tapa blocked by the BPDU it sent", lambda: port_state(lan, "tapa") != "forwarding", 10)
    assert root_id(lan) == own

    send_frames(b, [bpdu(b)])
    wait_for("the root to move to b's claim", lambda: root_id(lan) == "0000.000000000001", 10)
