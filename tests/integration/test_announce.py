"""Gratuitous ARP and unsolicited NA on the real kernel.

A "router" namespace and a "host" namespace share a veth pair (router end `vr` with
198.51.100.1/24 and 2001:db8:100::1/64; host end `vh` with no address for the guest).
The host announces the guest's addresses; the router's neighbour table is read back
with `ip -j neigh`, and the frames as they arrived are captured on `vr` and decoded
here, independently of the code that built them.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import packets as pk
from tests.support.frames import DEADLINE, Heard, capture_announcements
from tests.support.frames import SCRIPT as FRAMES
from tests.support.hooks import wait_for
from tests.support.netns import Netns, require_root
from tests.support.packets import eui64, mac_bytes, parse_arp, parse_na

ROUTER_IF, HOST_IF = "vr", "vh"
ROUTER4, ROUTER6 = "198.51.100.1", "2001:db8:100::1"
GUEST4, GUEST6 = "198.51.100.50", "2001:db8:100::50"
PROBE4, PROBE6 = "198.51.100.77", "2001:db8:100::77"  # the host's stand-ins in router_caught_up
OLD_MAC = "02:00:00:00:00:99"


def link_locals(ns: Netns, ifname: str) -> list[dict[str, Any]]:
    return [a for link in ns.ipj("-6", "addr", "show", "dev", ifname)
            for a in link.get("addr_info", []) if a.get("scope") == "link"]


@dataclass
class Lan:
    router: Netns
    host: Netns
    host_mac: str

    def announce(self, call: str) -> subprocess.CompletedProcess[str]:
        """Run `call` in the host namespace with both functions imported."""
        return self.host.run(
            sys.executable, "-c",
            "from nichooks.host.announce import gratuitous_arp, unsolicited_na\n" + call,
            check=False, timeout=10)

    def neigh(self, addr: str) -> dict[str, Any] | None:
        found = self.router.ipj("neigh", "show", "to", addr, "dev", ROUTER_IF)
        return found[0] if found else None

    def seed(self, addr: str) -> None:
        """The guest used to live behind the old host."""
        self.router.ip("neigh", "replace", addr, "lladdr", OLD_MAC, "nud", "stale", "dev", ROUTER_IF)
        assert (self.neigh(addr) or {}).get("lladdr") == OLD_MAC

    def moved(self, addr: str) -> dict[str, Any]:
        """The router's entry for `addr`, once it points at the host."""
        return wait_for(f"{addr} -> {self.host_mac}",  # type: ignore[no-any-return]
                        lambda: (n := self.neigh(addr)) and n.get("lladdr") == self.host_mac and n,
                        DEADLINE)

    def router_caught_up(self, family: int) -> None:
        """Return once the router has processed a frame the host sends now, so all the
        host sent before: an ARP request for the router's address (IPv4), or a
        Neighbour Solicitation for it (IPv6), from a probe address. The router answers
        either by creating an entry for the probe, whatever its arp_accept and
        accept_untracked_na say; that entry is the sign."""
        if family == 4:
            probe = PROBE4
            frame = pk.ethernet(pk.BROADCAST, self.host_mac, 0x0806,
                                pk.arp(1, self.host_mac, PROBE4, "00:00:00:00:00:00", ROUTER4))
        else:
            probe = PROBE6
            frame = pk.ethernet("33:33:ff:00:00:01", self.host_mac, 0x86DD,
                                pk.neighbour_solicit(PROBE6, ROUTER6, self.host_mac))
        assert self.neigh(probe) is None
        self.host.run(sys.executable, FRAMES, "send", HOST_IF, frame.hex())
        wait_for(f"the router's entry for the probe {probe}", lambda: self.neigh(probe), DEADLINE)

    def sysctl(self, ns: Netns, key: str, value: str) -> None:
        ns.run("sysctl", "-qw", f"{key}={value}")

    def capture(self) -> AbstractContextManager[Heard]:
        """The ARP and NA frames the block sends, as they arrived at the router's end of
        the wire (bound before the block runs; when it ends, a control frame from the
        host's end proves that all the block sent has arrived)."""
        return capture_announcements(self.router.name, ROUTER_IF, sender=(self.host.name, HOST_IF))


@contextmanager
def make_lan(host_v6: str = "ready") -> Iterator[Lan]:
    """host_v6: "ready" (valid link-local), "tentative" (link-local still in DAD),
    "none" (no IPv6 address on the host end at all)."""
    require_root()
    router = Netns()
    try:
        host = Netns()
        try:
            host.ip("link", "add", HOST_IF, "type", "veth", "peer", "name", ROUTER_IF,
                    "netns", router.name)
            router.ip("addr", "add", f"{ROUTER4}/24", "dev", ROUTER_IF)
            router.ip("addr", "add", f"{ROUTER6}/64", "dev", ROUTER_IF, "nodad")
            router.ip("link", "set", ROUTER_IF, "up")
            if host_v6 == "ready":
                host.run("sysctl", "-qw", f"net.ipv6.conf.{HOST_IF}.accept_dad=0")
            elif host_v6 == "tentative":  # DAD takes 30 s: tentative for the whole test
                host.run("sysctl", "-qw", f"net.ipv6.conf.{HOST_IF}.dad_transmits=30")
            else:
                host.ip("link", "set", HOST_IF, "addrgenmode", "none")
            host.ip("link", "set", HOST_IF, "up")
            for ns, ifname in ((host, HOST_IF), (router, ROUTER_IF)):
                wait_for(f"{ifname} up", lambda ns=ns, ifname=ifname:  # type: ignore[misc]
                         ns.link(ifname).get("operstate") == "UP", DEADLINE)
            wait_for("router link-local", lambda: link_locals(router, ROUTER_IF), DEADLINE)
            if host_v6 != "none":
                wait_for("host link-local", lambda: link_locals(host, HOST_IF), DEADLINE)
            yield Lan(router, host, host.link(HOST_IF)["address"])
        finally:
            host.delete()
    finally:
        router.delete()


@pytest.fixture
def lan() -> Iterator[Lan]:
    with make_lan("ready") as site:
        yield site


# --- an entry exists: the announcement moves it --------------------------------------


def test_gratuitous_arp_moves_existing_entry_and_frames_are_garp(lan: Lan) -> None:
    lan.seed(GUEST4)
    with lan.capture() as heard:
        r = lan.announce(f"gratuitous_arp({HOST_IF!r}, {GUEST4!r}, count=2)")
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    got = [parse_arp(f) for f in heard.frames]
    entry = lan.moved(GUEST4)
    # Broadcast announcements never assert reachability.
    assert entry["state"] == ["STALE"]
    mac = mac_bytes(lan.host_mac)
    assert [a["op"] for a in got] == [1, 2, 1, 2]  # request, reply, per round
    for a in got:
        assert a["dst"] == b"\xff" * 6 and a["src"] == mac and a["sha"] == mac
        assert a["spa"] == a["tpa"] == GUEST4
        assert a["tha"] == (bytes(6) if a["op"] == 1 else mac)
        assert a["len"] == 60  # padded to the Ethernet minimum


@pytest.mark.parametrize("host_v6", ["ready", "tentative", "none"])
def test_unsolicited_na_moves_existing_entry(host_v6: str) -> None:
    """From the link-local through an ICMPv6 raw socket when the kernel allows it;
    built whole on a packet socket while it is tentative, or from the MAC's EUI-64
    link-local when the interface has none. The router takes all three."""
    with make_lan(host_v6) as lan:
        lls = link_locals(lan.host, HOST_IF)
        if host_v6 == "none":
            assert lls == []
            source = ipaddress.IPv6Address(eui64("fe80::/64", lan.host_mac))
        else:
            [ll] = lls
            assert bool(ll.get("tentative")) == (host_v6 == "tentative")
            source = ipaddress.IPv6Address(ll["local"])
        lan.seed(GUEST6)
        with lan.capture() as heard:
            r = lan.announce(f"unsolicited_na({HOST_IF!r}, {GUEST6!r}, count=2)")
            assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
        got = [parse_na(f) for f in heard.frames]
        entry = lan.moved(GUEST6)
        assert entry["state"] == ["STALE"]
        assert "router" not in entry
        if host_v6 == "tentative":  # still tentative: we did not wait for DAD
            assert link_locals(lan.host, HOST_IF)[0].get("tentative")
        mac = mac_bytes(lan.host_mac)
        assert len(got) == 2
        for na in got:
            assert na["dst_mac"] == bytes.fromhex("333300000001") and na["src_mac"] == mac
            assert (na["etype"], na["version"], na["next"], na["hops"]) == (0x86DD, 6, 58, 255)
            assert na["src"] == source and na["dst"] == ipaddress.IPv6Address("ff02::1")
            assert (na["type"], na["code"], na["checksum_ok"]) == (136, 0, True)
            assert (na["override"], na["solicited"], na["router"]) == (True, False, False)
            assert na["target"] == ipaddress.IPv6Address(GUEST6)
            assert na["options"] == b"\x02\x01" + mac  # Target Link-Layer Address


TENTATIVE_PROBE = """
import socket
idx = socket.if_nametoindex({ifname!r})
for bind in (True, False):
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
    try:
        if bind:
            s.bind(({ll!r}, 0, 0, idx))
        s.sendto(bytes([136]) + bytes(23), ("ff02::1", 0, 0, idx))
        print("sent")
    except OSError as e:
        print(e.errno)
"""


def test_kernel_refuses_tentative_link_local_as_source() -> None:
    """Why the packet-socket path exists: during DAD an ICMPv6 raw socket can neither
    bind the link-local nor send without it (no source address: EADDRNOTAVAIL)."""
    with make_lan("tentative") as lan:
        [ll] = link_locals(lan.host, HOST_IF)
        assert ll.get("tentative")
        r = lan.host.run(sys.executable, "-c", TENTATIVE_PROBE.format(ifname=HOST_IF, ll=ll["local"]))
        assert r.stdout.split() == ["99", "99"]


# --- no entry: what the kernel does by default, and what the knobs change -------------


@pytest.mark.parametrize(("arp_accept", "created"), [("0", False), ("1", True), ("2", True)])
def test_gratuitous_arp_without_entry(lan: Lan, arp_accept: str, created: bool) -> None:
    assert lan.router.sysctl(f"net.ipv4.conf.{ROUTER_IF}.arp_accept") == "0"  # the default
    lan.sysctl(lan.router, f"net.ipv4.conf.{ROUTER_IF}.arp_accept", arp_accept)
    assert lan.neigh(GUEST4) is None
    with lan.capture() as heard:
        r = lan.announce(f"gratuitous_arp({HOST_IF!r}, {GUEST4!r})")
        assert r.returncode == 0, r.stderr
    assert len(heard.frames) == 2  # both arrived (so an absent entry is the kernel's choice)
    if created:
        assert lan.moved(GUEST4)["state"] == ["STALE"]
    else:
        lan.router_caught_up(4)
        assert lan.neigh(GUEST4) is None


@pytest.mark.parametrize(("untracked", "forwarding", "created"), [
    ("0", "0", False),  # kernel default, host
    ("0", "1", False),  # kernel default, router
    ("1", "0", False),  # accepting, but not a router: RFC 9131 is for routers only
    ("1", "1", True),
    ("2", "1", True),   # same subnet as the source: our fe80:: source is on-link
])
def test_unsolicited_na_without_entry(lan: Lan, untracked: str, forwarding: str, created: bool) -> None:
    assert lan.router.sysctl(f"net.ipv6.conf.{ROUTER_IF}.accept_untracked_na") == "0"  # the default
    lan.sysctl(lan.router, "net.ipv6.conf.all.forwarding", forwarding)
    lan.sysctl(lan.router, f"net.ipv6.conf.{ROUTER_IF}.accept_untracked_na", untracked)
    assert lan.router.sysctl(f"net.ipv6.conf.{ROUTER_IF}.forwarding") == forwarding
    assert lan.neigh(GUEST6) is None
    with lan.capture() as heard:
        r = lan.announce(f"unsolicited_na({HOST_IF!r}, {GUEST6!r})")
        assert r.returncode == 0, r.stderr
    assert len(heard.frames) == 1
    if created:
        assert lan.moved(GUEST6)["state"] == ["STALE"]
    else:
        lan.router_caught_up(6)
        assert lan.neigh(GUEST6) is None


# --- errors -------------------------------------------------------------------------

ERROR_PROBE = """
from nichooks.errors import PlumbingError
from nichooks.host.announce import AnnounceError, gratuitous_arp, unsolicited_na
try:
    {call}
except AnnounceError as e:
    assert isinstance(e, PlumbingError)
    print(e.ifname, e.ip, e.errno, sep="|")
    print(e)
else:
    print("no error")
"""


@pytest.mark.parametrize(("call", "ifname", "ip", "cause"), [
    (f"gratuitous_arp('nosuch0', {GUEST4!r})", "nosuch0", GUEST4, "no such interface"),
    (f"unsolicited_na('nosuch0', {GUEST6!r})", "nosuch0", GUEST6, "no such interface"),
    (f"gratuitous_arp('a-name-far-too-long', {GUEST4!r})", "a-name-far-too-long", GUEST4,
     "not a valid interface name"),
    (f"gratuitous_arp({HOST_IF!r}, {GUEST6!r})", HOST_IF, GUEST6, "not an IPv4 address"),
    (f"unsolicited_na({HOST_IF!r}, {GUEST4!r})", HOST_IF, GUEST4, "not an IPv6 address"),
    (f"unsolicited_na({HOST_IF!r}, 'ff02::1')", HOST_IF, "ff02::1", "multicast"),
    (f"gratuitous_arp('lo', {GUEST4!r})", "lo", GUEST4, "not an Ethernet interface"),
    (f"gratuitous_arp('down0', {GUEST4!r})", "down0", GUEST4, "Network is down"),
    (f"unsolicited_na('down0', {GUEST6!r})", "down0", GUEST6, "Network is down"),
])
def test_errors_name_interface_and_address(lan: Lan, call: str, ifname: str, ip: str, cause: str) -> None:
    lan.host.ip("link", "add", "down0", "type", "veth", "peer", "name", "down1")
    r = lan.host.run(sys.executable, "-c", ERROR_PROBE.format(call=call), check=False)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    fields, message = r.stdout.splitlines()
    assert fields.split("|")[:2] == [ifname, ip]
    assert message.startswith(f"cannot announce {ip} on {ifname}: ")
    assert cause in message
