"""Routed mode on the real kernel: a router, two hypervisor hosts and guests behind veth
"taps" (tests/integration/routed_env.py draws the picture).

Everything is observed from outside the code under test: `ip -j rule`, `ip -j route`,
`ip -j neigh show proxy`, sysctls, pings, the router's neighbour table, and the
announcements as they arrive at the router's bridge port.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.routed_env import (
    GLOBAL_READY,
    GUEST4,
    GUEST6,
    GW6,
    OTHER4,
    OTHER6,
    PRIORITY,
    PROTO,
    SUBNET6,
    TABLE,
    Guest,
    Host,
    World,
    assert_ping,
    make_world,
    tap_sysctl_keys,
)
from tests.support.constants import GUEST_MAC, OTHER_MAC
from tests.support.frames import DEADLINE, Heard, capture_announcements
from tests.support.hooks import bin_path, hook_env, one_line, wait_for
from tests.support.netns import require_root
from tests.support.packets import Announcement, announcements, eui64
from tests.support.state import journal_path, journals


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    require_root()
    with make_world(tmp_path) as w:
        yield w


# --- what a plugged NIC looks like --------------------------------------------------


def rule_view(r: dict[str, Any]) -> dict[str, Any]:
    """A rule as far as routed mode defines it: priority, iif, table, its protocol (our
    mark; `ip` omits it for an unmarked rule), and no other selector."""
    extra = {k for k in r if k not in ("priority", "src", "iif", "table", "protocol", "iif_detached")}
    assert not extra and r.get("src", "all") == "all", f"unexpected selector in {r}"
    return {"priority": r["priority"], "iif": r.get("iif"), "table": r.get("table"),
            "protocol": r.get("protocol")}


def route_view(r: dict[str, Any]) -> dict[str, Any]:
    assert "gateway" not in r, r
    return {"dst": r["dst"], "dev": r.get("dev"), "protocol": r.get("protocol")}


def proxy_view(p: dict[str, Any]) -> dict[str, Any]:
    return {"dst": p["dst"], "dev": p.get("dev"), "protocol": p.get("protocol")}


def assert_plugged(host: Host, guest: Guest, *, table: str = TABLE, rule: bool = True,
                   uplinks: bool = True, uplink4: str | None = None, uplink6: str | None = None,
                   priority: int = PRIORITY, proto: str = PROTO) -> None:
    """Exactly one of each thing routed mode makes for `guest`, and nothing for a
    family the NIC has no address in."""
    tap = guest.tap
    link = host.ns.link(tap)
    assert "UP" in link["flags"], f"{tap} is not up: {link['flags']}"
    for fam, addr in (("-4", guest.addr4), ("-6", guest.addr6)):
        mine = [rule_view(r) for r in host.ns.ipj(fam, "rule", "show") if r.get("iif") == tap]
        want_rule = ([{"priority": priority, "iif": tap, "table": table, "protocol": proto}]
                     if addr and rule else [])
        assert mine == want_rule, f"{fam} rules for {tap}"
        routes = [route_view(r) for r in host.routes(fam, table)
                  if r.get("dev") == tap and r.get("protocol") != "kernel"]  # not fe80::/64
        want_routes = [{"dst": addr, "dev": tap, "protocol": proto}] if addr else []
        assert routes == want_routes, f"{fam} routes via {tap} in table {table}"
    sysctls = host.sysctls(tap_sysctl_keys(tap))
    if guest.addr4:
        assert sysctls[f"net.ipv4.conf.{tap}.proxy_arp"] == "1"
        assert sysctls[f"net.ipv4.conf.{tap}.forwarding"] == "1"
    if guest.addr6:
        assert sysctls[f"net.ipv6.conf.{tap}.proxy_ndp"] == "1"
    tap_proxies = [proxy_view(p) for p in host.proxies("-6", tap)]
    assert tap_proxies == ([{"dst": GW6, "dev": tap, "protocol": proto}] if guest.addr6 else [])
    assert host.proxies("-4", tap) == []
    for fam, addr, up in (("-4", guest.addr4, uplink4 or host.uplink),
                          ("-6", guest.addr6, uplink6 or host.uplink)):
        entries = [proxy_view(p) for p in host.proxies(fam) if p["dst"] == addr and addr]
        want = [{"dst": addr, "dev": up, "protocol": proto}] if addr and uplinks else []
        assert entries == want, f"{fam} proxy entries for {addr}"


def assert_unplugged(host: Host) -> None:
    """Nothing of ours is left: no rule at our priority, no route or proxy with our
    protocol, anywhere."""
    for fam in ("-4", "-6"):
        assert host.our_rules(fam) == [], host.our_rules(fam)
        ours = [r for r in host.ns.ipj(fam, "route", "show", "table", "all") if r.get("protocol") == PROTO]
        assert ours == []
        assert [p for p in host.proxies(fam) if p.get("protocol") == PROTO] == []
    assert journals(host.state) == []


def assert_router_via(world: World, host: Host, *addrs: str) -> None:
    for addr in addrs:
        assert world.router_mac_for(addr) == host.mac, (
            f"router reaches {addr} via {world.router_neigh(addr)}, not {host.name}-up ({host.mac})")


def guest_announcements(heard: Heard, *addrs: str) -> list[Announcement]:
    return [a for a in announcements(heard.frames) if a.addr in addrs]


def assert_announced(heard: Heard, host: Host, addr4: str | None, addr6: str | None) -> None:
    got = announcements(heard.frames)
    mine = [a for a in got if a.src_mac == host.mac]
    if addr4:
        kinds = {a.kind for a in mine if a.addr == addr4}
        assert kinds == {"garp-request", "garp-reply"}, f"ARP announcements for {addr4}: {got}"
    if addr6:
        nas = [a for a in mine if a.kind == "na" and a.addr == addr6]
        assert nas and all(a.override for a in nas), f"NA for {addr6}: {got}"


def plugged_on_a(world: World) -> tuple[Guest, dict[str, Any], dict[str, Any]]:
    """The guest on host A, plugged; returns it, A's snapshot before the guest
    existed, and A's snapshot with the tap present but not yet plugged."""
    empty = world.a.ns.snapshot()
    guest = world.plug(world.a)
    before = world.a.ns.snapshot()
    up = world.ifup(world.a, guest)
    assert up.returncode == 0, up.stderr
    assert up.stderr == ""
    return guest, empty, before


# --- (1) traffic through host A ---------------------------------------------------------


def test_router_and_guest_reach_each_other_through_host_a(world: World) -> None:
    a = world.a
    empty = a.ns.snapshot()
    guest = world.plug(a)
    a.set_sysctl("net.ipv4.conf.tap0.forwarding", "0")  # so its restoration shows
    before, tap_before = a.ns.snapshot(), a.sysctls(tap_sysctl_keys("tap0"))
    with capture_announcements(world.router.name, "pa", sender=(a.ns.name, a.uplink)) as heard:
        up = world.ifup(a, guest)
        assert up.returncode == 0, up.stderr
        assert up.stderr == ""
    assert_announced(heard, a, GUEST4, GUEST6)
    assert_plugged(a, guest)
    assert len(journals(a.state)) == 1

    assert_ping(world.router, GUEST4)   # proxy ARP on a-up, host route to tap0
    assert_ping(world.router, GUEST6)   # proxy NDP entry on a-up
    assert_router_via(world, a, GUEST4, GUEST6)
    assert_ping(guest.ns, "198.51.100.1")  # proxy_arp on the tap
    assert_ping(guest.ns, GW6)              # the gateway's proxy entry on the tap
    assert guest.ns.ipj("neigh", "show", "to", "198.51.100.1")[0]["lladdr"] == a.ns.link("tap0")["address"]

    down = world.ifdown(a, "tap0")
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert a.ns.snapshot() == before
    assert a.sysctls(tap_sysctl_keys("tap0")) == tap_before
    assert a.sysctls(list(GLOBAL_READY)) == GLOBAL_READY
    assert_unplugged(a)
    world.a.ns.ip("link", "del", "tap0")
    assert a.ns.snapshot() == empty


# --- (2) live migration A -> B ----------------------------------------------------------


@pytest.mark.parametrize("phase", [None, "post"])
def test_migration_moves_the_router_at_once_and_leaves_a_clean(world: World, phase: str | None) -> None:
    """Released Ganeti plugs the routed NIC on the target only after success (no
    MIGRATION_PHASE); Ganeti 3.2 says MIGRATION_PHASE=post."""
    a, b = world.a, world.b
    a_empty, b_empty = a.ns.snapshot(), b.ns.snapshot()
    guest, _, _ = plugged_on_a(world)
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert_router_via(world, a, GUEST4, GUEST6)  # the router knows the guest via A

    # The guest stops on A and continues on B: same MAC, same addresses, same NIC.
    a.ns.ip("link", "del", "tap0")
    moved = world.plug(b, guest.ns, nic_uuid=guest.nic_uuid)
    with capture_announcements(world.router.name, "pb", sender=(b.ns.name, b.uplink)) as heard:
        up = world.ifup(b, moved, MIGRATION_PHASE=phase)
        assert up.returncode == 0, up.stderr
        assert up.stderr == ""
    assert_announced(heard, b, GUEST4, GUEST6)
    # Right after ifup, before the guest said anything (and with nothing sent to it): the
    # announcements, which the router has taken by now, did it.
    world.wait_router_points_at(GUEST4, b.mac, timeout=DEADLINE)
    world.wait_router_points_at(GUEST6, b.mac, timeout=DEADLINE)
    assert_plugged(b, moved)

    down = world.ifdown(a, "tap0", "migrate")
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert a.ns.snapshot() == a_empty
    assert_unplugged(a)

    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert_router_via(world, b, GUEST4, GUEST6)
    assert_ping(moved.ns, "198.51.100.1")
    assert_ping(moved.ns, GW6)

    assert world.ifdown(b, "tap0").returncode == 0
    b.ns.ip("link", "del", "tap0")
    assert b.ns.snapshot() == b_empty


def test_migration_there_and_back(world: World) -> None:
    """A -> B -> A: every move converges and moves the router; both hosts end clean."""
    a, b = world.a, world.b
    empty = {"a": a.ns.snapshot(), "b": b.ns.snapshot()}
    guest = world.plug(a)
    assert world.ifup(a, guest).returncode == 0
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    here = a
    for there in (b, a, b):
        here.ns.ip("link", "del", "tap0")
        guest = world.plug(there, guest.ns, nic_uuid=guest.nic_uuid)
        up = world.ifup(there, guest)
        assert up.returncode == 0, up.stderr
        world.wait_router_points_at(GUEST4, there.mac, timeout=20)
        world.wait_router_points_at(GUEST6, there.mac, timeout=20)
        down = world.ifdown(here, "tap0", "migrate")
        assert down.returncode == 0, down.stderr
        assert here.ns.snapshot() == empty[here.name]
        assert_plugged(there, guest)
        assert_ping(world.router, GUEST4)
        assert_ping(world.router, GUEST6)
        assert_ping(guest.ns, GW6)
        here = there
    assert world.ifdown(here, "tap0").returncode == 0
    here.ns.ip("link", "del", "tap0")
    assert here.ns.snapshot() == empty[here.name]


@pytest.mark.parametrize("switchover", ["announce", "post"])
def test_migration_target_waits_for_switchover(world: World, switchover: str) -> None:
    """MIGRATION_PHASE=pre on B: everything node-local, but no uplink proxy entry and
    no announcement, so the router keeps sending to A; `nichooks announce tap0` (or an
    ifup with MIGRATION_PHASE=post) then moves it, and ifdown on B later removes all."""
    a, b = world.a, world.b
    a_empty, b_empty = a.ns.snapshot(), b.ns.snapshot()
    guest, _, _ = plugged_on_a(world)
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert_router_via(world, a, GUEST4, GUEST6)

    incoming = world.plug(b, nic_uuid=guest.nic_uuid)  # the incoming copy, paused
    with capture_announcements(world.router.name, "pb", sender=(b.ns.name, b.uplink)) as heard:
        pre = world.ifup(b, incoming, MIGRATION_PHASE="pre")
        assert pre.returncode == 0, pre.stderr
    assert guest_announcements(heard, GUEST4, GUEST6) == []
    assert_plugged(b, incoming, uplinks=False)
    assert b.proxies("-4", b.uplink) == [] and b.proxies("-6", b.uplink) == []
    assert_router_via(world, a, GUEST4, GUEST6)
    assert_ping(world.router, GUEST4)   # still the source's guest
    assert_ping(world.router, GUEST6)
    assert_router_via(world, a, GUEST4, GUEST6)

    a.ns.ip("link", "del", "tap0")  # switchover: the source's guest is gone
    with capture_announcements(world.router.name, "pb", sender=(b.ns.name, b.uplink)) as heard:
        if switchover == "announce":
            done = world.announce(b, "tap0")
        else:
            done = world.ifup(b, incoming, MIGRATION_PHASE="post")
        assert done.returncode == 0, done.stderr
    assert_announced(heard, b, GUEST4, GUEST6)
    world.wait_router_points_at(GUEST4, b.mac, timeout=DEADLINE)
    world.wait_router_points_at(GUEST6, b.mac, timeout=DEADLINE)
    assert_plugged(b, incoming)
    if switchover == "announce":  # an operator's retry changes nothing
        again = world.announce(b, "tap0")
        assert again.returncode == 0, again.stderr
        assert_plugged(b, incoming)
        assert len(journals(b.state)) == 1

    assert world.ifdown(a, "tap0", "migrate").returncode == 0
    assert a.ns.snapshot() == a_empty
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert_ping(incoming.ns, "198.51.100.1")

    down = world.ifdown(b, "tap0")
    assert down.returncode == 0, down.stderr
    assert_unplugged(b)  # the proxy entries `announce` added were journaled too
    b.ns.ip("link", "del", "tap0")
    assert b.ns.snapshot() == b_empty


def test_failed_migration_leaves_target_clean_and_source_untouched(world: World) -> None:
    a, b = world.a, world.b
    guest, _, _ = plugged_on_a(world)
    assert_ping(world.router, GUEST4)
    b_before_plug = b.ns.snapshot()
    incoming = world.plug(b, nic_uuid=guest.nic_uuid)
    b_before = b.ns.snapshot()
    assert world.ifup(b, incoming, MIGRATION_PHASE="pre").returncode == 0
    down = world.ifdown(b, "tap0", "migrate-failed")
    assert down.returncode == 0, down.stderr
    assert b.ns.snapshot() == b_before
    assert_unplugged(b)
    assert_plugged(a, guest)
    assert_router_via(world, a, GUEST4)
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    b.ns.ip("link", "del", "tap0")
    assert b.ns.snapshot() == b_before_plug


# --- re-plug, several NICs ---------------------------------------------------------------


def test_same_nic_replugged_converges(world: World) -> None:
    a = world.a
    guest = world.plug(a)
    a.set_sysctl("net.ipv4.conf.tap0.forwarding", "0")
    before, tap_before = a.ns.snapshot(), a.sysctls(tap_sysctl_keys("tap0"))
    for _ in range(3):
        up = world.ifup(a, guest)
        assert up.returncode == 0, up.stderr
        assert_plugged(a, guest)  # one rule per family, one route per address, one proxy each
        assert len(journals(a.state)) == 1
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert_ping(guest.ns, GW6)
    down = world.ifdown(a, "tap0")
    assert down.returncode == 0, down.stderr
    assert a.ns.snapshot() == before
    assert a.sysctls(tap_sysctl_keys("tap0")) == tap_before


def test_replug_with_a_new_address_drops_the_old_one(world: World) -> None:
    """Hot-modify: the same NIC (same UUID) with another IP."""
    a = world.a
    guest = world.plug(a)
    before = a.ns.snapshot()
    assert world.ifup(a, guest).returncode == 0
    guest.ns.ip("addr", "add", f"{OTHER4}/24", "dev", "eth0")
    again = world.ifup(a, guest, IP=OTHER4)
    assert again.returncode == 0, again.stderr
    assert [route_view(r) for r in a.host_routes("-4")] == [{"dst": OTHER4, "dev": "tap0", "protocol": PROTO}]
    assert [p["dst"] for p in a.proxies("-4")] == [OTHER4]
    assert len(a.our_rules("-4")) == 1
    assert_ping(world.router, OTHER4)
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


def test_replug_into_another_table(world: World) -> None:
    """Hot-modify of LINK: the rules and routes move to the new table."""
    a = world.a
    a.ns.ip("route", "add", "default", "via", "198.51.100.1", "dev", a.uplink, "table", "200")
    a.ns.ip("-6", "route", "add", "default", "via", GW6, "dev", a.uplink, "table", "200")
    guest = world.plug(a)
    before = a.ns.snapshot()
    assert world.ifup(a, guest).returncode == 0
    moved = world.ifup(a, guest, LINK="200")
    assert moved.returncode == 0, moved.stderr
    assert_plugged(a, guest, table="200")
    assert a.host_routes("-4") == [] and a.host_routes("-6") == []  # none left in table 100
    assert len(journals(a.state)) == 1
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


def test_tap_name_reused_by_another_nic(world: World) -> None:
    """A guest died without ifdown; the kernel gives tap0 to another NIC: its ifup
    first undoes the stale journal (the old rules and uplink proxy entries survived
    the tap) and plugs the new NIC alone."""
    a = world.a
    empty = a.ns.snapshot()
    _, _, _ = plugged_on_a(world)
    a.ns.ip("link", "del", "tap0")
    other = world.plug(a, mac=OTHER_MAC, addr4=OTHER4, addr6=OTHER6)
    up = world.ifup(a, other)
    assert up.returncode == 0, up.stderr
    assert_plugged(a, other)
    assert {p["dst"] for p in a.proxies("-4") + a.proxies("-6")} == {OTHER4, OTHER6, GW6}
    assert [r["dst"] for r in a.host_routes("-4")] == [OTHER4]
    assert len(a.our_rules("-4")) == 1 and len(a.our_rules("-6")) == 1
    assert len(journals(a.state)) == 1
    assert_ping(world.router, OTHER4)
    assert_ping(world.router, OTHER6)
    assert world.ifdown(a, "tap0").returncode == 0
    assert_unplugged(a)
    a.ns.ip("link", "del", "tap0")
    assert a.ns.snapshot() == empty


def test_two_nics_in_one_table(world: World) -> None:
    a = world.a
    empty = a.ns.snapshot()
    first = world.plug(a)
    second = world.plug(a, tap="tap1", mac=OTHER_MAC, addr4=OTHER4, addr6=OTHER6)
    before = a.ns.snapshot()
    for g in (first, second):
        up = world.ifup(a, g)
        assert up.returncode == 0, up.stderr
    assert_plugged(a, first)
    assert_plugged(a, second)
    assert len(a.our_rules("-4")) == 2 and len(a.our_rules("-6")) == 2
    assert len(journals(a.state)) == 2
    for addr in (GUEST4, GUEST6, OTHER4, OTHER6):
        assert_ping(world.router, addr)
    assert_ping(second.ns, GW6)

    assert world.ifdown(a, "tap0").returncode == 0
    assert_plugged(a, second)  # the other NIC's rules, routes and proxies are intact
    assert [r["iif"] for r in a.our_rules("-4")] == ["tap1"]
    assert [p["dst"] for p in a.proxies("-4", a.uplink)] == [OTHER4]
    assert [p["dst"] for p in a.proxies("-6", a.uplink)] == [OTHER6]
    assert_ping(world.router, OTHER4)
    assert_ping(world.router, OTHER6)
    assert world.ifdown(a, "tap1").returncode == 0
    assert a.ns.snapshot() == before
    for tap in ("tap0", "tap1"):
        a.ns.ip("link", "del", tap)
    assert a.ns.snapshot() == empty


def test_parallel_plugs_on_one_host(world: World) -> None:
    """A node evacuation plugs many NICs at once: every one ends up whole, and
    parallel ifdowns leave nothing."""
    a = world.a
    empty = a.ns.snapshot()
    guests = []
    for i in range(6):
        mac = f"aa:00:00:00:01:{i:02x}"
        guests.append(world.plug(a, tap=f"tap{i}", mac=mac, addr4=f"198.51.100.{60 + i}",
                                 addr6=eui64(SUBNET6, mac)))
    before = a.ns.snapshot()
    procs = [subprocess.Popen(["ip", "netns", "exec", a.ns.name, bin_path("kvm-ifup"), g.tap],
                              env=world.env(a, g), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in guests]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    for g in guests:
        assert_plugged(a, g)
    assert len(journals(a.state)) == len(guests)
    for g in (guests[0], guests[-1]):
        assert g.addr4 and g.addr6
        assert_ping(world.router, g.addr4)
        assert_ping(world.router, g.addr6)
    env = hook_env(a.state, a.conf, NICHOOKS_IPROUTE2_DIR=str(a.iproute2))
    procs = [subprocess.Popen(["ip", "netns", "exec", a.ns.name, bin_path("kvm-ifdown"), g.tap],
                              env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for g in guests]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert a.ns.snapshot() == before
    assert_unplugged(a)
    for g in guests:
        a.ns.ip("link", "del", g.tap)
    assert a.ns.snapshot() == empty


# --- address families --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["derived", "explicit"])
def test_ipv6_only_nic(world: World, how: str) -> None:
    """IP unset: the address is NETWORK_SUBNET6 (a /64) + the MAC's EUI-64; or IP is
    itself an IPv6 address (then nothing is derived)."""
    a = world.a
    addr6 = GUEST6 if how == "derived" else "2001:db8:100::50"
    if how == "derived":
        assert addr6 == eui64(SUBNET6, GUEST_MAC) == "2001:db8:100:0:a800:ff:fe11:2233"
    guest = world.plug(a, addr4=None, addr6=addr6)
    before = a.ns.snapshot()
    up = world.ifup(a, guest, IP=None if how == "derived" else addr6)
    assert up.returncode == 0, up.stderr
    assert_plugged(a, guest)  # no IPv4 rule, route or proxy
    assert [route_view(r) for r in a.host_routes("-6")] == [{"dst": addr6, "dev": "tap0", "protocol": PROTO}]
    assert a.our_rules("-4") == [] and a.proxies("-4") == []
    assert a.sysctl("net.ipv4.conf.tap0.proxy_arp") == "0"  # no IPv4: no proxy ARP
    assert_ping(world.router, addr6)
    assert_ping(guest.ns, GW6)
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


@pytest.mark.parametrize("subnet6", [None, "2001:db8:100::/80"])
def test_ipv4_only_nic(world: World, subnet6: str | None) -> None:
    """No NETWORK_SUBNET6, or one that is not a /64: nothing IPv6 at all."""
    a = world.a
    guest = world.plug(a, addr6=None)
    before = a.ns.snapshot()
    up = world.ifup(a, guest, NETWORK_SUBNET6=subnet6, NETWORK_GATEWAY6=None if subnet6 is None else GW6)
    assert up.returncode == 0, up.stderr
    assert_plugged(a, guest)
    assert a.our_rules("-6") == [] and a.host_routes("-6") == [] and a.proxies("-6") == []
    assert a.sysctl("net.ipv6.conf.tap0.proxy_ndp") == "0"
    assert_ping(world.router, GUEST4)
    assert_ping(guest.ns, "198.51.100.1")
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


# --- tables --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["rt_tables", "rt_tables.d", "hex"])
def test_table_given_by_name(world: World, where: str) -> None:
    """As iproute2 reads the files (lib/rt_names.c): `ID NAME`, optionally followed by
    a comment, ID decimal or `0x` hexadecimal."""
    a = world.a
    if where == "rt_tables":
        with (a.iproute2 / "rt_tables").open("a") as f:
            f.write(f"# guests of the public network\n{TABLE}\tpublic  # the public one\n")
    elif where == "rt_tables.d":
        (a.iproute2 / "rt_tables.d" / "nichooks.conf").write_text(f"{TABLE} public\n")
    else:
        (a.iproute2 / "rt_tables.d" / "nichooks.conf").write_text(f"{int(TABLE):#x} public\n")
    guest = world.plug(a)
    before = a.ns.snapshot()
    up = world.ifup(a, guest, LINK="public")
    assert up.returncode == 0, up.stderr
    assert_plugged(a, guest, table=TABLE)  # `ip` itself does not know the name
    assert_ping(world.router, GUEST4)
    # ifdown needs no name: the journal has the number.
    (a.iproute2 / "rt_tables.d" / "nichooks.conf").unlink(missing_ok=True)
    (a.iproute2 / "rt_tables").write_text("255\tlocal\n254\tmain\n")
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


def test_no_link_means_main_table_and_no_rule(tmp_path: Path) -> None:
    require_root()
    with make_world(tmp_path, uplink_rule=False, hosts=("a",)) as world:
        a = world.a
        guest = world.plug(a)
        before = a.ns.snapshot()
        up = world.ifup(a, guest, LINK=None)
        assert up.returncode == 0, up.stderr
        assert_plugged(a, guest, table="main", rule=False)
        assert a.our_rules("-4") == [] and a.our_rules("-6") == []
        assert a.host_routes("-4") == [] and a.host_routes("-6") == []  # nothing in table 100
        assert_ping(world.router, GUEST4)
        assert_ping(world.router, GUEST6)
        assert_ping(guest.ns, "198.51.100.1")
        assert_ping(guest.ns, GW6)
        assert world.ifdown(a, "tap0").returncode == 0
        assert a.ns.snapshot() == before


# --- settings -------------------------------------------------------------------------


def test_rule_priority_and_route_proto_settings(world: World) -> None:
    """ifdown finds what to remove in the journal, not in today's settings."""
    a = world.a
    guest = world.plug(a)
    before = a.ns.snapshot()
    up = world.ifup(a, guest, NICHOOKS_RULE_PRIORITY="21000", NICHOOKS_ROUTE_PROTO="242")
    assert up.returncode == 0, up.stderr
    assert_plugged(a, guest, priority=21000, proto="242")
    assert a.our_rules("-4") == [] and a.our_rules("-6") == []
    down = world.ifdown(a, "tap0")  # without the two settings
    assert down.returncode == 0, down.stderr
    assert a.ns.snapshot() == before


def test_uplink_override_per_family(world: World) -> None:
    """NICHOOKS_UPLINK4 moves the IPv4 proxy entry and announcement to another device;
    IPv6 keeps the table's default-route device."""
    a = world.a
    a.ns.ip("link", "add", "alt0", "type", "veth", "peer", "name", "alt1")
    a.ns.ip("link", "set", "alt0", "address", "02:00:00:00:0a:02")
    for dev in ("alt0", "alt1"):
        a.ns.ip("link", "set", dev, "up")
    wait_for("alt0 up", lambda: a.ns.link("alt0").get("operstate") == "UP")
    guest = world.plug(a)
    before = a.ns.snapshot()
    with capture_announcements(a.ns.name, "alt1", sender=(a.ns.name, "alt0")) as heard:
        up = world.ifup(a, guest, NICHOOKS_UPLINK4="alt0")
        assert up.returncode == 0, up.stderr
    assert_plugged(a, guest, uplink4="alt0")
    kinds = {(x.kind, x.src_mac) for x in guest_announcements(heard, GUEST4, GUEST6)}
    assert ("garp-request", "02:00:00:00:0a:02") in kinds and ("garp-reply", "02:00:00:00:0a:02") in kinds
    assert not any(k == "na" for k, _ in kinds)
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


def test_announce_off(world: World) -> None:
    a = world.a
    guest = world.plug(a)
    with capture_announcements(world.router.name, "pa", sender=(a.ns.name, a.uplink)) as heard:
        up = world.ifup(a, guest, NICHOOKS_ANNOUNCE="0")
        assert up.returncode == 0, up.stderr
    assert guest_announcements(heard, GUEST4, GUEST6) == []
    assert_plugged(a, guest)  # the proxy entries are still there
    assert_ping(world.router, GUEST4)
    assert world.ifdown(a, "tap0").returncode == 0


def without_anycast(snap: dict[str, Any]) -> dict[str, Any]:
    return {**snap, "routes-6": [r for r in snap["routes-6"] if '"type": "anycast"' not in r]}


def test_manage_sysctls_sets_shared_ones_and_ifdown_keeps_them(tmp_path: Path) -> None:
    require_root()
    with make_world(tmp_path, ready=False, hosts=("a",)) as world:
        a = world.a
        shared = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                  "net.ipv6.conf.a-up.proxy_ndp": "1", "net.ipv6.conf.a-up.accept_ra": "2"}
        assert a.sysctls(list(shared)) == {"net.ipv4.ip_forward": "0",
                                           "net.ipv6.conf.all.forwarding": "0",
                                           "net.ipv6.conf.a-up.proxy_ndp": "0",
                                           "net.ipv6.conf.a-up.accept_ra": "1"}
        guest = world.plug(a)
        before = a.ns.snapshot()
        tap_before = a.sysctls(["net.ipv4.conf.tap0.proxy_arp", "net.ipv6.conf.tap0.proxy_ndp"])
        up = world.ifup(a, guest, NICHOOKS_MANAGE_SYSCTLS="yes")
        assert up.returncode == 0, up.stderr
        assert a.sysctls(list(shared)) == shared
        assert_plugged(a, guest)
        assert_ping(world.router, GUEST4)
        assert_ping(world.router, GUEST6)
        assert world.ifdown(a, "tap0").returncode == 0
        assert a.sysctls(list(shared)) == shared  # shared: other NICs need them
        assert a.sysctls(list(tap_before)) == tap_before
        # IPv6 forwarding, which stays, brings the subnet-router anycast address.
        assert without_anycast(a.ns.snapshot()) == without_anycast(before)


# --- refusals: nothing left behind ---------------------------------------------------


def assert_nothing_changed(world: World, host: Host, before: dict[str, Any],
                           tap_before: dict[str, str]) -> None:
    assert host.ns.snapshot() == before
    assert host.sysctls(list(tap_before)) == tap_before
    assert journals(host.state) == []


def ready_to_refuse(world: World) -> tuple[Guest, dict[str, Any], dict[str, str]]:
    guest = world.plug(world.a)
    return guest, world.a.ns.snapshot(), world.a.sysctls(tap_sysctl_keys("tap0"))


@pytest.mark.parametrize("subnet6", [None, "2001:db8:100::/80"])
def test_no_address_is_invalid_input(world: World, subnet6: str | None) -> None:
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(world.a, guest, IP=None, NETWORK_SUBNET6=subnet6)
    assert r.returncode == 2, r.stderr
    assert re.search(r"\bIP\b", one_line(r.stderr))
    assert_nothing_changed(world, world.a, before, tap_before)


@pytest.mark.parametrize("fam", ["-4", "-6"])
def test_address_already_routed_elsewhere(world: World, fam: str) -> None:
    a = world.a
    a.ns.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
    a.ns.ip("link", "set", "other0", "up")
    addr = GUEST4 if fam == "-4" else GUEST6
    a.ns.ip(fam, "route", "add", addr, "dev", "other0", "table", TABLE)
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(a, guest)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert "is already routed" in line and addr in line
    assert "tap0" in line and "other0" in line
    assert_nothing_changed(world, a, before, tap_before)


@pytest.mark.parametrize(("variable", "value"), [
    ("LINK", "0"), ("LINK", "no such table!"), ("VLAN", ".100"), ("MIGRATION_PHASE", "during"),
    ("IP", "198.51.100.300"), ("NETWORK_GATEWAY6", "198.51.100.1"),
])
def test_malformed_variable_is_invalid_input(world: World, variable: str, value: str) -> None:
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(world.a, guest, **{variable: value})
    assert r.returncode == 2, r.stderr
    assert variable in one_line(r.stderr)
    assert_nothing_changed(world, world.a, before, tap_before)


def test_missing_tap(world: World) -> None:
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(world.a, guest, INTERFACE="tap7")
    assert r.returncode == 1, r.stderr
    assert "tap7" in one_line(r.stderr)
    assert_nothing_changed(world, world.a, before, tap_before)


def test_unknown_table_name(world: World) -> None:
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(world.a, guest, LINK="nosuchtable")
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert "nosuchtable" in line
    assert "tap0" in line, "an exit-1 line names the NIC (README: exit status)"
    assert_nothing_changed(world, world.a, before, tap_before)


@pytest.mark.parametrize(("key", "broken", "fix"), [
    ("net.ipv4.ip_forward", "0", "sysctl -w net.ipv4.ip_forward=1"),
    ("net.ipv6.conf.all.forwarding", "0", "sysctl -w net.ipv6.conf.all.forwarding=1"),
    ("net.ipv6.conf.a-up.proxy_ndp", "0", "sysctl -w net.ipv6.conf.a-up.proxy_ndp=1"),
    ("net.ipv6.conf.a-up.accept_ra", "1", "net.ipv6.conf.a-up.accept_ra=2"),
])
def test_missing_sysctl_is_refused_with_the_fix(world: World, key: str, broken: str, fix: str) -> None:
    a = world.a
    if key.endswith("accept_ra"):
        # accept_ra=2 is needed only when nichooks is about to turn IPv6 forwarding on
        # (forwarding stops RA acceptance); with forwarding already on, accept_ra=1 is
        # the operator's own choice and no reason to refuse.
        a.set_sysctl("net.ipv6.conf.all.forwarding", "0")
    a.set_sysctl(key, broken)
    guest, before, tap_before = ready_to_refuse(world)
    r = world.ifup(a, guest)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert fix in line and "sysctl -w" in line
    assert "tap0" in line
    assert a.sysctl(key) == broken
    assert_nothing_changed(world, a, before, tap_before)


def test_status_reports_routed_items(world: World) -> None:
    a = world.a
    guest = world.plug(a)
    assert world.ifup(a, guest).returncode == 0
    env = hook_env(a.state, a.conf, NICHOOKS_IPROUTE2_DIR=str(a.iproute2))
    status = world.hook(a, "nichooks", "status", env=env)
    assert status.returncode == 0, status.stderr
    items = [ln.strip() for ln in status.stdout.splitlines() if ln.strip().startswith("[")]
    assert len(items) >= 12, status.stdout
    assert all(ln.startswith("[present]") for ln in items), status.stdout
    a.ns.ip("neigh", "del", "proxy", GUEST4, "dev", a.uplink)
    a.ns.ip("-6", "rule", "del", "iif", "tap0", "lookup", TABLE, "priority", str(PRIORITY))
    status = world.hook(a, "nichooks", "status", env=env)
    missing = [ln.strip() for ln in status.stdout.splitlines() if ln.strip().startswith("[MISSING]")]
    assert len(missing) == 2, status.stdout
    assert any(GUEST4 in ln and a.uplink in ln for ln in missing), status.stdout
    assert any("rule" in ln for ln in missing), status.stdout
    assert world.ifdown(a, "tap0").returncode == 0


# --- an ifup killed at every step (a step that fails: test_crash.py) ----------------


def plan_length(world: World, guest: Guest) -> int:
    r = world.hook(world.a, "nichooks", "plan", "--json", guest.tap, env=world.env(world.a, guest))
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert len(steps) >= 10, steps  # tap up, 4 sysctls, 2 rules, 2 routes, 3 proxies
    return len(steps)


def test_killed_ifup_is_undone_by_ifdown_or_converged_by_ifup(world: World) -> None:
    a = world.a
    guest, before, tap_before = ready_to_refuse(world)
    for step in range(1, plan_length(world, guest) + 1):
        for then in ("ifdown", "ifup"):
            r = world.ifup(a, guest, NICHOOKS_TEST_FAULT=f"kill-after:{step}")
            assert r.returncode == -9, (step, r.stderr)
            assert len(journals(a.state)) == 1
            if then == "ifup":
                up = world.ifup(a, guest)
                assert up.returncode == 0, (step, up.stderr)
                assert_plugged(a, guest)
            down = world.ifdown(a, "tap0")
            assert down.returncode == 0, (step, then, down.stderr)
            assert a.ns.snapshot() == before, f"killed after step {step}, then {then}"
            assert a.sysctls(list(tap_before)) == tap_before, f"killed after step {step}, then {then}"
            assert journals(a.state) == []


# --- ifdown -------------------------------------------------------------------------


@pytest.mark.parametrize("context", [None, "vanished", "migrate"])
def test_ifdown_after_the_tap_vanished(world: World, context: str | None) -> None:
    """The kernel takes the routes and the tap's proxy entry with the tap; the rules
    (they name the device) and the uplink proxy entries survive, and ifdown removes them."""
    a = world.a
    _, empty, _ = plugged_on_a(world)
    a.ns.ip("link", "del", "tap0")
    assert len(a.our_rules("-4")) == 1 and len(a.our_rules("-6")) == 1
    assert {p["dst"] for p in a.proxies("-4", a.uplink) + a.proxies("-6", a.uplink)} == {GUEST4, GUEST6}
    down = world.ifdown(a, "tap0", context)
    assert down.returncode == 0, down.stderr
    assert down.stderr == ""
    assert a.ns.snapshot() == empty
    assert_unplugged(a)


@pytest.mark.parametrize("change", ["route-dev", "route-proto", "proxy-proto"])
def test_ifdown_leaves_what_is_no_longer_ours(world: World, change: str) -> None:
    """A route or proxy entry is removed only while it is still ours (device, proto)."""
    a = world.a
    a.ns.ip("link", "add", "other0", "type", "veth", "peer", "name", "other1")
    a.ns.ip("link", "set", "other0", "up")
    guest = world.plug(a)
    # Found up, so ifdown leaves it up: a tap going down would take every route via
    # it with it (the kernel's doing), and the test could not tell who removed what.
    a.ns.ip("link", "set", "tap0", "up")
    assert world.ifup(a, guest).returncode == 0
    if change == "route-dev":
        a.ns.ip("route", "replace", GUEST4, "dev", "other0", "table", TABLE)
        kept = [{"dst": GUEST4, "dev": "other0", "protocol": None}]  # `ip` omits proto boot
    elif change == "route-proto":
        a.ns.ip("route", "replace", GUEST4, "dev", "tap0", "table", TABLE, "proto", "static")
        kept = [{"dst": GUEST4, "dev": "tap0", "protocol": "static"}]
    else:
        a.ns.ip("neigh", "del", "proxy", GUEST4, "dev", a.uplink)
        a.ns.ip("neigh", "add", "proxy", GUEST4, "dev", a.uplink)
    down = world.ifdown(a, "tap0")
    assert down.returncode == 0, down.stderr
    if change.startswith("route"):
        assert [route_view(r) for r in a.host_routes("-4")] == kept
        assert a.proxies("-4", a.uplink) == []
    else:
        assert [proxy_view(p) for p in a.proxies("-4", a.uplink)] == [
            {"dst": GUEST4, "dev": a.uplink, "protocol": None}]
        assert a.host_routes("-4") == []
    # everything else of ours is gone
    assert a.our_rules("-4") == [] and a.our_rules("-6") == []
    assert a.host_routes("-6") == [] and a.proxies("-6") == []


def test_an_administrators_proxy_entry_survives_ifup_and_ifdown(world: World) -> None:
    """Undo touches only what the journal says we created: an uplink proxy entry for
    the guest's address that was there before (not ours: no proto) stays."""
    a = world.a
    a.ns.ip("neigh", "add", "proxy", GUEST4, "dev", a.uplink)
    guest = world.plug(a)
    before = a.ns.snapshot()
    up = world.ifup(a, guest)
    assert up.returncode == 0, up.stderr
    assert_ping(world.router, GUEST4)
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before
    assert [proxy_view(p) for p in a.proxies("-4")] == [{"dst": GUEST4, "dev": a.uplink, "protocol": None}]


# --- rules: ours carry the mark, an operator's identical rule is never ours -----------------


def tap_rules(host: Host, fam: str, tap: str = "tap0") -> list[dict[str, Any]]:
    return [rule_view(r) for r in host.ns.ipj(fam, "rule", "show") if r.get("iif") == tap]


def operator_rule(fam: str, tap: str = "tap0") -> list[str]:
    """`ip rule add` arguments of the very rule routed mode makes, without a protocol
    (what an operator types, or what nichooks before the mark left behind)."""
    return [fam, "rule", "add", "iif", tap, "lookup", TABLE, "priority", str(PRIORITY)]


def test_our_rules_carry_the_protocol_mark(world: World) -> None:
    """Every rule we add is tagged with NICHOOKS_ROUTE_PROTO, as our routes and proxy
    entries are: it is what tells ours from an operator's identical rule."""
    a = world.a
    plugged_on_a(world)
    for fam in ("-4", "-6"):
        assert tap_rules(a, fam) == [
            {"priority": PRIORITY, "iif": "tap0", "table": TABLE, "protocol": PROTO}]
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.our_rules("-4") == [] and a.our_rules("-6") == []


def test_an_operators_identical_rule_survives_ifup_and_ifdown(world: World) -> None:
    """An operator's rule with our very selector, table and priority but no mark, there
    before the plug: ifup adds ours next to it (the kernel tells them apart by
    protocol), ifdown removes ours and leaves theirs."""
    a = world.a
    guest = world.plug(a)
    for fam in ("-4", "-6"):
        a.ns.ip(*operator_rule(fam))
    before = a.ns.snapshot()
    theirs = {"priority": PRIORITY, "iif": "tap0", "table": TABLE, "protocol": None}
    ours = {**theirs, "protocol": PROTO}
    up = world.ifup(a, guest)
    assert up.returncode == 0, up.stderr
    for fam in ("-4", "-6"):
        assert tap_rules(a, fam) == [theirs, ours], f"{fam} rules after ifup"
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    down = world.ifdown(a, "tap0")
    assert down.returncode == 0, down.stderr
    for fam in ("-4", "-6"):
        assert tap_rules(a, fam) == [theirs], f"{fam} rules after ifdown"
    assert a.ns.snapshot() == before
    assert journals(a.state) == []


@pytest.mark.parametrize("recorded", ["old-style", "tampered"])
def test_undo_never_deletes_an_unmarked_rule(world: World, recorded: str) -> None:
    """A journal whose rule records name no mark (as nichooks wrote them before rules
    were marked), or a mark of 0 (which the kernel would read as "any protocol"), and
    whose rules an operator has since replaced with their own unmarked ones: undo
    leaves the operator's rules."""
    a = world.a
    plugged_on_a(world)
    (journal,) = journals(a.state)
    path = journal_path(a.state, journal["key"])
    rules = [r for r in journal["records"] if r["kind"] == "route.rule"]
    assert len(rules) == 2
    for record in rules:
        record["undo"].pop("proto", None)
        assert set(record["undo"]) == {"family", "iifname", "table", "priority"}  # old-style
        if recorded == "tampered":
            record["undo"]["proto"] = 0
    path.write_text(json.dumps(journal))
    for fam in ("-4", "-6"):
        a.ns.ip(fam, "rule", "del", "iif", "tap0", "lookup", TABLE, "priority", str(PRIORITY))
        a.ns.ip(*operator_rule(fam))
    theirs = [{"priority": PRIORITY, "iif": "tap0", "table": TABLE, "protocol": None}]
    down = world.ifdown(a, "tap0")
    for fam in ("-4", "-6"):
        assert tap_rules(a, fam) == theirs, f"{fam} rules after ifdown ({recorded})"
    if recorded == "old-style":
        assert down.returncode == 0, down.stderr
        assert journals(a.state) == []
    else:  # refused, and kept for an operator to look at
        assert "protocol 0" in down.stderr, down.stderr
        (kept,) = journals(a.state)
        assert {r["kind"] for r in kept["records"]} == {"route.rule"}


def test_ifup_repairs_after_an_uplink_restart(world: World) -> None:
    """The kernel flushes every proxy entry of a device that is set down (not on mere
    carrier loss): after `ifdown/ifup` of the uplink, upstream can no longer resolve
    the guests. Re-running ifup restores them; ifdown afterwards still ends clean."""
    a = world.a
    guest = world.plug(a)
    before = a.ns.snapshot()
    assert world.ifup(a, guest).returncode == 0
    a.ns.ip("link", "set", a.uplink, "down")
    a.ns.ip("link", "set", a.uplink, "up")
    wait_for(f"{a.uplink} up", lambda: a.ns.link(a.uplink).get("operstate") == "UP")
    assert a.proxies("-4", a.uplink) == [] and a.proxies("-6", a.uplink) == []  # the premise
    # The host's network configuration comes back (IPv6 addresses and every default
    # route left with the down), as an operator's `ifup` would do.
    a.ns.ip("-6", "addr", "replace", f"{a.addr6}/64", "dev", a.uplink, "nodad")
    for fam in ("-4", "-6"):
        for table in ("main", TABLE):
            a.ns.ip(fam, "route", "replace", "default", "via", "198.51.100.1" if fam == "-4" else GW6,
                    "dev", a.uplink, "table", table)
    again = world.ifup(a, guest)
    assert again.returncode == 0, again.stderr
    assert_plugged(a, guest)
    assert_ping(world.router, GUEST4)
    assert_ping(world.router, GUEST6)
    assert world.ifdown(a, "tap0").returncode == 0
    assert a.ns.snapshot() == before


def test_ifdown_twice_and_of_an_unknown_tap(world: World) -> None:
    a = world.a
    _, _, before = plugged_on_a(world)
    assert world.ifdown(a, "tap0").returncode == 0
    again = world.ifdown(a, "tap0")
    assert again.returncode == 0 and again.stderr == ""
    other = world.ifdown(a, "tap9")
    assert other.returncode == 0 and other.stderr == ""
    assert a.ns.snapshot() == before



def test_kvm_instance_named_like_a_xen_incoming_domain_gets_its_uplink_entries(
        world: World) -> None:
    """`--incoming` is libxl's name for a domain being received; vif-ganeti turns it into
    MIGRATION_PHASE=pre. A KVM instance may just be called that."""
    guest = world.plug(world.a)
    up = world.ifup(world.a, guest, INSTANCE="web--incoming")
    assert up.returncode == 0, up.stderr
    assert_plugged(world.a, guest)  # uplink proxy entries included
    (journal,) = journals(world.a.state)
    assert journal["deferred"] == []
    assert_ping(world.router, GUEST4)
    assert world.ifdown(world.a, "tap0").returncode == 0
    assert_unplugged(world.a)
