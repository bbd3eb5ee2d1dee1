"""Routed mode's nftables anti-spoofing filter on the real kernel (table `inet nichooks`).

What a guest sends is judged where it ends up: at the router's bridge port for host A
(tests/integration/routed_env.py draws the picture). The guest sends raw frames, each
carrying a token of its own, through its tap: the forgeries first, then one honest
frame. That honest frame takes the same path as the forgeries (same tap, same route,
same uplink, the same neighbour queue), so once it has reached the router every
forgery that host A forwarded has reached it too: "nothing arrived before the honest
frame" means the forgeries were dropped, not that a capture window closed early.

Raw frames rather than sockets: a guest socket bound to a forged address would make
the guest ARP with that address first, and the test would then measure proxy ARP,
not the filter. The ruleset is read with `nft -j list ruleset` in host A's namespace,
never through nichooks' own nftables code.
"""

from __future__ import annotations

import secrets
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.routed_env import (
    GUEST4,
    GUEST6,
    GW4,
    GW6,
    OTHER4,
    OTHER6,
    Guest,
    Host,
    World,
    make_world,
)
from tests.support.constants import OTHER_MAC
from tests.support.frames import SCRIPT, Listener
from tests.support.netns import Netns, require_root
from tests.support.packets import ethernet, icmp6, udp4
from tests.support.state import journals

EXTRA4 = "198.51.100.77"  # a floating address an operator lets one guest use
ETH_IP, ETH_IP6 = 0x0800, 0x86DD


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """Host A and the router; host A's reverse-path filter is off, so that what stops a
    forged source in these tests can only be our filter (a distribution's
    rp_filter=1 inherited by the namespace would hide a missing one)."""
    require_root()
    with make_world(tmp_path, hosts=("a",)) as w:
        for key in ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter"):
            w.a.set_sysctl(key, "0")
        yield w


# --- the ruleset as nft lists it -----------------------------------------------------------
def chain_of(guest: Guest) -> str:
    return f"nic-{guest.nic_uuid}"


def assert_filtered(host: Host, guest: Guest) -> None:
    view = host.ns.nft_table("inet")
    assert view is not None, f"no inet nichooks table: {host.ns.nft_ruleset()}"
    assert chain_of(guest) in view["chains"], view
    assert view["elements"].get(guest.tap) == chain_of(guest), view


def plug_up(world: World, **overrides: str | None) -> Guest:
    guest = world.plug(world.a)
    up = world.ifup(world.a, guest, **overrides)
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    return guest


# --- frames from the guest, judged at the router -----------------------------------------
def token(name: str) -> bytes:
    return f"NH-probe-{name}-{secrets.token_hex(6)}".encode()


def udp_from(guest: Guest, tap_mac: str, src: str, payload: bytes, mac: str | None = None) -> bytes:
    """A UDP datagram for the router (its discard port), as the guest's eth0 would put
    it on the wire: to the tap's MAC (proxy ARP answers for the gateway)."""
    return ethernet(tap_mac, mac or guest.mac, ETH_IP, udp4(src, GW4, 40000, 9, payload))


def echo6_from(guest: Guest, tap_mac: str, src: str, payload: bytes) -> bytes:
    """An ICMPv6 echo request for the router's GW6, to the tap's MAC."""
    body = struct.pack("!HH", 0x4E48, 1) + payload
    return ethernet(tap_mac, guest.mac, ETH_IP6, icmp6(src, GW6, 128, body))


def send_frames(ns: Netns, ifname: str, frames: list[bytes]) -> None:
    """Every frame, in order, from one packet socket on `ifname` in `ns`."""
    ns.run(sys.executable, SCRIPT, "send", ifname, *(f.hex() for f in frames))


Probe = tuple[bytes, bytes]  # (its token, the frame carrying it)


def arrivals(world: World, guest: Guest, probes: dict[str, Probe], honest: Probe) -> set[str]:
    """The names of the `probes` the router received on host A's port before `honest`,
    which the guest sends after them."""
    honest_token, honest_frame = honest
    with Listener(world.router.name, "pa") as heard:
        send_frames(guest.ns, "eth0", [frame for _token, frame in probes.values()] + [honest_frame])
        before = heard.until(honest_token)
    return {name for name, (tok, _frame) in probes.items()
            if any(tok in seen for _vid, seen in before)}


def probe4(guest: Guest, tap_mac: str, name: str, src: str, mac: str | None = None) -> Probe:
    t = token(name)
    return t, udp_from(guest, tap_mac, src, t, mac)


def probe6(guest: Guest, tap_mac: str, name: str, src: str) -> Probe:
    t = token(name)
    return t, echo6_from(guest, tap_mac, src, t)


def honest4(guest: Guest, tap_mac: str) -> Probe:
    return probe4(guest, tap_mac, "honest", GUEST4)


def tap_mac(host: Host, guest: Guest) -> str:
    mac: str = host.ns.link(guest.tap)["address"]
    return mac


# --- (a) forged IPv4 sources and MACs never leave host A --------------------------------
def test_forged_ipv4_source_and_mac_are_dropped_honest_passes(world: World) -> None:
    guest = plug_up(world)
    assert_filtered(world.a, guest)
    mac = tap_mac(world.a, guest)
    probes = {
        "forged-ip": probe4(guest, mac, "forged-ip", OTHER4),
        "forged-extra": probe4(guest, mac, "forged-extra", EXTRA4),
        "forged-mac": probe4(guest, mac, "forged-mac", GUEST4, mac=OTHER_MAC),
        "honest-early": probe4(guest, mac, "honest-early", GUEST4),
    }
    # An honest probe too: the expected set is never empty, so token matching that
    # found nothing at all could not pass for "every forgery dropped".
    assert arrivals(world, guest, probes, honest4(guest, mac)) == {"honest-early"}


# --- (b) the same for IPv6 ---------------------------------------------------------------
def test_forged_ipv6_source_is_dropped_honest_passes(world: World) -> None:
    guest = plug_up(world)
    mac = tap_mac(world.a, guest)
    probes = {
        "forged6": probe6(guest, mac, "forged6", OTHER6),
        "forged6-other": probe6(guest, mac, "forged6-other", "2001:db8:100::77"),
        "honest6-early": probe6(guest, mac, "honest6-early", GUEST6),
    }
    assert arrivals(world, guest, probes, probe6(guest, mac, "honest6", GUEST6)) == {"honest6-early"}


# --- (c) an allowed extra address passes; with the filter off there is no chain ----------
def test_allow_ip_tag_lets_that_source_through_only(world: World) -> None:
    guest = plug_up(world, TAGS=f"web nichooks:allow-ip:{EXTRA4}")
    assert_filtered(world.a, guest)
    mac = tap_mac(world.a, guest)
    probes = {
        "allowed-extra": probe4(guest, mac, "allowed-extra", EXTRA4),
        "still-forged": probe4(guest, mac, "still-forged", OTHER4),
    }
    assert arrivals(world, guest, probes, honest4(guest, mac)) == {"allowed-extra"}


@pytest.mark.parametrize("overrides", [
    {"NICHOOKS_ANTISPOOF": "off"},
    {"TAGS": "web nichooks:antispoof:off"},
], ids=["setting", "tag"])
def test_antispoof_off_makes_no_chain(world: World, overrides: dict[str, str]) -> None:
    guest = plug_up(world, **overrides)
    ruleset = world.a.ns.run("nft", "-j", "list", "ruleset").stdout
    assert chain_of(guest) not in ruleset, f"{chain_of(guest)} exists: {world.a.ns.nft_table('inet')}"
    assert world.a.ns.nft_table("inet") is None, world.a.ns.nft_table("inet")
    # Unfiltered indeed: a foreign source crosses (so the drops above are the filter's).
    mac = tap_mac(world.a, guest)
    probes = {"unfiltered": probe4(guest, mac, "unfiltered", OTHER4)}
    assert arrivals(world, guest, probes, honest4(guest, mac)) == {"unfiltered"}
    down = world.ifdown(world.a, guest.tap)
    assert down.returncode == 0, down.stderr


# --- (d) accept_ra and the ruleset come back as they were --------------------------------
def test_accept_ra_and_ruleset_are_restored_by_ifdown(world: World) -> None:
    a = world.a
    # Someone else's table, present before and after: ours must not disturb it.
    a.ns.run("nft", "add", "table", "inet", "operator")
    a.ns.run("nft", "add", "chain", "inet", "operator", "input",
             "{ type filter hook input priority 0; policy accept; }")
    guest = world.plug(a)
    a.set_sysctl("net.ipv6.conf.tap0.accept_ra", "2")  # not the default: its restoration shows
    ruleset_before = a.ns.nft_ruleset()
    snapshot_before = a.ns.snapshot()

    up = world.ifup(a, guest)
    assert up.returncode == 0, up.stderr
    assert a.sysctl("net.ipv6.conf.tap0.accept_ra") == "0"
    assert_filtered(a, guest)
    assert a.ns.nft_table("inet", "operator") is not None

    down = world.ifdown(a, guest.tap)
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert a.sysctl("net.ipv6.conf.tap0.accept_ra") == "2"
    assert a.ns.nft_table("inet") is None, a.ns.nft_ruleset()
    assert a.ns.nft_ruleset() == ruleset_before
    assert a.ns.snapshot() == snapshot_before
    assert journals(a.state) == []
