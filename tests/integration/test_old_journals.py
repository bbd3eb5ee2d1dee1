"""Journals written by an earlier nichooks (tests/fixtures/journals, captured from
commit 5dd953e) are still undone, repaired and announced by the code under test.

Black box: no import from the `nichooks` package, only the installed entry points
(kvm-ifup, kvm-ifdown, `nichooks`). For each mode the host state is made real by a
kvm-ifup of the same NIC, then the journal it wrote is replaced by the fixture, filled
in with this host's values (ifindexes, the uplink's name, the time); from then on
only the fixture says what was done. Everything is observed with `ip -j`, sysctl,
ovs-vsctl and ovs-ofctl.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.bridged_env import Site
from tests.integration.ovs_env import Switch
from tests.integration.routed_env import (
    GUEST4,
    GUEST6,
    GW6,
    PRIORITY,
    PROTO,
    TABLE,
    Host,
    World,
    make_world,
    tap_sysctl_keys,
)
from tests.support.constants import GUEST_MAC, HAVE_OVS, NO_OVS
from tests.support.hooks import bin_path, hook_env
from tests.support.links import assert_bridge_port
from tests.support.netns import Netns, require_root
from tests.support.scripts import write_script
from tests.support.state import journal_path, journals, tap_index

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "journals"
# The INTERFACE_UUID the fixtures were captured with (their key; the OVS cookie derives from it).
KEY = "5dd953e0-0b5e-4c1e-9a11-000000000001"
# The taps' own MACs when the fixtures were captured (the kernel's random veth MACs):
# the fixtures' MAC records restore them, so the tests give the taps the same ones.
BRIDGED_TAP_MAC = "0e:db:79:fd:d0:34"
OVS_TAP_MAC = "da:4f:a3:28:b7:f4"
OVS_GUEST_IP = "10.0.0.1"
EXT_LINK = "custom-net-7"

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
needs_ovs = pytest.mark.skipif(not HAVE_OVS, reason=NO_OVS)


# --- the fixtures ------------------------------------------------------------------------
def fill(name: str, **values: Any) -> dict[str, Any]:
    """The fixture `name`.json with its placeholders filled in: a string that is one
    placeholder becomes the value itself (an ifindex stays an int), a placeholder inside
    a longer string is replaced by the value's text. Every placeholder must be given,
    and every value used."""
    used: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        used.add(m[1])
        return str(values[m[1]])

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            whole = PLACEHOLDER.fullmatch(x)
            if whole:
                used.add(whole[1])
                return values[whole[1]]
            return PLACEHOLDER.sub(sub, x)
        return x

    data = walk(json.loads((FIXTURES / f"{name}.json").read_text()))
    assert used == set(values), f"{name}: placeholders {sorted(used)}, values {sorted(values)}"
    assert data["key"] == KEY, data["key"]
    return data  # type: ignore[no-any-return]


def replace_journal(state: Path, name: str, **values: Any) -> dict[str, Any]:
    """Overwrite the journal kvm-ifup just wrote with the filled-in fixture (in place:
    the file keeps the owner and mode the hook gave it)."""
    path = journal_path(state, KEY)
    assert path.is_file(), f"kvm-ifup wrote no journal at {path}"
    data = fill(name, created=time.time(), **values)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return data


def ifindex(ns: Netns, name: str) -> int:
    return int(ns.link(name)["ifindex"])


def run(ns: Netns, *argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return ns.run(bin_path(argv[0]), *argv[1:], env=env, check=False, timeout=60)


def assert_ok(r: subprocess.CompletedProcess[str], what: str) -> None:
    assert r.returncode == 0, f"{what}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert r.stderr == "", f"{what}: warnings on stderr: {r.stderr!r}"


def assert_repaired(ns: Netns, env: dict[str, str], broken: Callable[[], bool]) -> None:
    """verify sees the drift and changes nothing; verify --repair puts it back; a
    following verify is clean."""
    assert broken(), "the test did not break anything"
    drift = run(ns, "nichooks", "verify", "tap0", env=env)
    assert drift.returncode == 1, f"verify missed the drift:\n{drift.stdout}{drift.stderr}"
    assert broken(), "verify without --repair changed the host"
    fixed = run(ns, "nichooks", "verify", "--repair", "tap0", env=env)
    assert fixed.returncode == 0, f"repair: exit {fixed.returncode}\n{fixed.stdout}{fixed.stderr}"
    assert not broken(), f"verify --repair did not put it back:\n{fixed.stdout}{fixed.stderr}"
    again = run(ns, "nichooks", "verify", "tap0", env=env)
    assert again.returncode == 0, f"verify after the repair:\n{again.stdout}{again.stderr}"


def assert_state_dir_empty(state: Path) -> None:
    assert journals(state) == [], journals(state)
    assert tap_index(state) == {}, tap_index(state)


# --- bridged -----------------------------------------------------------------------------
def bridged_plugged(site: Site, tmp_path: Path, uplink: bool = False
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """br0 and tap0 (with its captured MAC), plugged by kvm-ifup, its journal replaced by
    bridged.json; returns the snapshot from before the plug and the settings-only
    environment (as QEMU's downscript or an operator runs the hooks). `uplink`: br0 has
    another port (a veth standing in for the uplink) before the plug."""
    site.nic_uuid = KEY
    site.add_bridge("br0", addr="192.0.2.1/24")
    if uplink:
        site.host.ip("link", "add", "up0", "type", "veth", "peer", "name", "up0-peer")
        site.host.ip("link", "set", "up0", "master", "br0")
    site.add_tap()
    site.host.ip("link", "set", "tap0", "address", BRIDGED_TAP_MAC)
    before = site.host.snapshot()
    # As the version that wrote the fixture plugged it: no filter, no tap sysctl.
    assert_ok(site.hook("kvm-ifup", "tap0", env=site.env(NICHOOKS_ANTISPOOF="off")), "kvm-ifup")
    site.host.run("sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=0")
    assert_bridge_port(site.host, "tap0", "br0", BRIDGED_TAP_MAC)
    replace_journal(site.state, "bridged", tap_ifindex=ifindex(site.host, "tap0"),
                    bridge_ifindex=ifindex(site.host, "br0"))
    settings = hook_env(site.state, site.conf, NICHOOKS_OVSDB=f"unix:{tmp_path / 'no-ovsdb.sock'}")
    return before, settings


def test_bridged_journal_is_undone(site: Site, tmp_path: Path) -> None:
    before, settings = bridged_plugged(site, tmp_path)
    assert_ok(run(site.host, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    tap = site.host.link("tap0")
    assert tap.get("master") is None, f"tap0 still on {tap.get('master')}"
    assert tap["address"] == BRIDGED_TAP_MAC and "UP" not in tap["flags"], tap
    assert site.host.snapshot() == before
    assert_state_dir_empty(site.state)


@pytest.mark.parametrize("damage", ["nomaster", "mtu"])
def test_bridged_journal_is_repaired(site: Site, tmp_path: Path, damage: str) -> None:
    # With the tap as its only port, the bridge's MTU follows the tap's: no drift to
    # repair then, the plan rebuilt follows the bridge. An uplink port holds it at 1500.
    before, settings = bridged_plugged(site, tmp_path, uplink=damage == "mtu")
    assert run(site.host, "nichooks", "verify", "tap0", env=settings).returncode == 0
    if damage == "nomaster":
        site.host.ip("link", "set", "tap0", "nomaster")
    else:
        site.host.ip("link", "set", "tap0", "mtu", "9000")
        assert site.host.link("br0")["mtu"] == 1500
    assert_repaired(site.host, settings, lambda: site.host.link("tap0").get("master") != "br0"
                    or site.host.link("tap0")["mtu"] != 1500)
    assert_bridge_port(site.host, "tap0", "br0", BRIDGED_TAP_MAC)
    assert_ok(run(site.host, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    assert site.host.snapshot() == before
    assert_state_dir_empty(site.state)


# --- openvswitch -------------------------------------------------------------------------
# The cookie openvswitch.json's flow record names (nichooks' prefix 0x4e48, the rest from KEY).
OVS_COOKIE = 0x4E48C2B64AF9F6FA


def link_view(ns: Netns) -> list[tuple[str, str, int, bool]]:
    return sorted((lk["ifname"], lk.get("address", ""), lk.get("mtu", 0), "UP" in lk.get("flags", []))
                  for lk in ns.ipj("link", "show"))


def cookie_flows(sw: Switch) -> list[str]:
    return sw.flows("br0", f"cookie={OVS_COOKIE:#x}/-1")


def ovs_plugged(sw: Switch, dirs: tuple[Path, Path]) -> tuple[list[Any], dict[str, str]]:
    guest = sw.add_guest("tap0", GUEST_MAC, f"{OVS_GUEST_IP}/24")
    guest.uuid = KEY
    sw.host.ip("link", "set", "tap0", "address", OVS_TAP_MAC)
    before = link_view(sw.host)
    assert_ok(sw.hook("kvm-ifup", "tap0", env=sw.nic_env(*dirs, guest)), "kvm-ifup")
    assert sw.ports("br0") == {"tap0"} and cookie_flows(sw)
    replace_journal(dirs[0], "openvswitch", tap_ifindex=ifindex(sw.host, "tap0"))
    settings = hook_env(*dirs, NICHOOKS_OVSDB=sw.db, OVS_RUNDIR=str(sw.dir), NICHOOKS_OVS_TIMEOUT="5")
    return before, settings


@needs_ovs
def test_openvswitch_journal_is_undone(switch: Switch, dirs: tuple[Path, Path]) -> None:
    before, settings = ovs_plugged(switch, dirs)
    assert_ok(run(switch.host, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    assert switch.ports("br0") == set()
    assert cookie_flows(switch) == [] and switch.our_flows("br0") == []
    tap = switch.host.link("tap0")
    assert tap["address"] == OVS_TAP_MAC and "UP" not in tap["flags"], tap
    assert link_view(switch.host) == before
    assert_state_dir_empty(dirs[0])


@needs_ovs
@pytest.mark.parametrize("damage", ["del-port", "del-flows"])
def test_openvswitch_journal_is_repaired(switch: Switch, dirs: tuple[Path, Path], damage: str) -> None:
    before, settings = ovs_plugged(switch, dirs)
    assert run(switch.host, "nichooks", "verify", "tap0", env=settings).returncode == 0
    flows = len(cookie_flows(switch))
    if damage == "del-port":
        switch.vsctl("del-port", "br0", "tap0")
    else:
        switch.ofctl("del-flows", f"unix:{switch.dir / 'br0.mgmt'}", f"cookie={OVS_COOKIE:#x}/-1")

    def broken() -> bool:
        if "tap0" not in switch.ports("br0"):
            return True
        ofport = switch.row("Interface", "tap0", "ofport")["ofport"]
        mine = cookie_flows(switch)
        return len(mine) != flows or not all(f"in_port={ofport}," in f or f"in_port={ofport} " in f
                                             for f in mine)

    assert_repaired(switch.host, settings, broken)
    assert switch.row("Port", "tap0", "external_ids")["external_ids"].get("nichooks-nic") == KEY
    assert switch.row("Interface", "tap0", "external_ids")["external_ids"].get("iface-id") == KEY
    assert_ok(run(switch.host, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    assert switch.ports("br0") == set() and switch.our_flows("br0") == []
    assert link_view(switch.host) == before
    assert_state_dir_empty(dirs[0])


# --- routed ------------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    require_root()
    with make_world(tmp_path, hosts=("a",)) as w:
        yield w


def uplink_proxy(host: Host, fam: str, addr: str) -> list[dict[str, Any]]:
    return [p for p in host.proxies(fam, host.uplink) if p["dst"] == addr]


def assert_nothing_routed(host: Host) -> None:
    """No rule at our priority, no route or proxy entry with our protocol, anywhere."""
    for fam in ("-4", "-6"):
        assert host.our_rules(fam) == [], host.our_rules(fam)
        routes = [r for r in host.ns.ipj(fam, "route", "show", "table", "all")
                  if r.get("protocol") == PROTO]
        assert routes == [], routes
        proxies = [p for p in host.proxies(fam) if p.get("protocol") == PROTO]
        assert proxies == [], proxies


def routed_plugged(world: World, name: str, **overrides: str
                   ) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """tap0 on host A, plugged by kvm-ifup, its journal replaced by fixture `name`;
    returns A's snapshot and tap0's sysctls from before the plug, and the settings-only
    environment."""
    a = world.a
    guest = world.plug(a, nic_uuid=KEY)
    before, sysctls = a.ns.snapshot(), a.sysctls(tap_sysctl_keys("tap0"))
    none = f"unix:{world.tmp / 'no-ovsdb.sock'}"
    # As the version that wrote the fixtures plugged it: no filter, no accept_ra.
    assert_ok(world.ifup(a, guest, NICHOOKS_OVSDB=none, NICHOOKS_ANTISPOOF="off", **overrides),
              "kvm-ifup")
    a.ns.run("sysctl", "-qw", f"net.ipv6.conf.tap0.accept_ra={sysctls['net.ipv6.conf.tap0.accept_ra']}")
    # Deferred entries name the uplink only: routed-pre.json has no uplink ifindex.
    uplink_index = {"uplink_ifindex": ifindex(a.ns, a.uplink)} if name == "routed" else {}
    replace_journal(a.state, name, tap_ifindex=ifindex(a.ns, "tap0"), uplink=a.uplink, **uplink_index)
    settings = hook_env(a.state, a.conf, NICHOOKS_IPROUTE2_DIR=str(a.iproute2), NICHOOKS_OVSDB=none)
    return before, sysctls, settings


def assert_routed_undone(world: World, before: dict[str, Any], sysctls: dict[str, str],
                         settings: dict[str, str]) -> None:
    a = world.a
    assert_ok(run(a.ns, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    assert_nothing_routed(a)
    assert a.sysctls(tap_sysctl_keys("tap0")) == sysctls
    assert a.ns.snapshot() == before
    assert_state_dir_empty(a.state)


def test_routed_journal_is_undone(world: World) -> None:
    a = world.a
    before, sysctls, settings = routed_plugged(world, "routed")
    # What the fixture's records stand for is really there, so that undoing it shows.
    assert {r["iif"] for fam in ("-4", "-6") for r in a.our_rules(fam)} == {"tap0"}
    assert uplink_proxy(a, "-4", GUEST4) and uplink_proxy(a, "-6", GUEST6)
    assert a.sysctl("net.ipv4.conf.tap0.proxy_arp") == "1"
    # The host routes and the tap's own proxy entry would also go with the tap's link
    # (the up record's undo brings it down): test_routed_journal_is_repaired is what
    # shows that their records are read.
    assert_routed_undone(world, before, sysctls, settings)


def _host_route(host: Host, fam: str, addr: str) -> list[dict[str, Any]]:
    return [r for r in host.routes(fam) if r.get("dst") == addr and r.get("dev") == "tap0"]


def _ip(*args: str) -> Callable[[Host], object]:
    return lambda h: h.ns.ip(*args)


# name: (how to break it, as an operator or a flapping uplink would; whether it is broken)
ROUTED_DAMAGE: dict[str, tuple[Callable[[Host], object], Callable[[Host], bool]]] = {
    "uplink-proxy-4": (_ip("-4", "neigh", "del", "proxy", GUEST4, "dev", "a-up"),
                       lambda h: not uplink_proxy(h, "-4", GUEST4)),
    "uplink-proxy-6": (_ip("-6", "neigh", "del", "proxy", GUEST6, "dev", "a-up"),
                       lambda h: not uplink_proxy(h, "-6", GUEST6)),
    "tap-proxy-6": (_ip("-6", "neigh", "del", "proxy", GW6, "dev", "tap0"),
                    lambda h: [p["dst"] for p in h.proxies("-6", "tap0")] != [GW6]),
    "host-route-4": (_ip("-4", "route", "del", f"{GUEST4}/32", "table", TABLE),
                     lambda h: not _host_route(h, "-4", GUEST4)),
    "host-route-6": (_ip("-6", "route", "del", f"{GUEST6}/128", "table", TABLE),
                     lambda h: not _host_route(h, "-6", GUEST6)),
    "rule-6": (_ip("-6", "rule", "del", "priority", str(PRIORITY), "iif", "tap0", "table", TABLE),
               lambda h: [r["iif"] for r in h.our_rules("-6")] != ["tap0"]),
    "tap-sysctl": (lambda h: h.set_sysctl("net.ipv4.conf.tap0.proxy_arp", "0"),
                   lambda h: h.sysctl("net.ipv4.conf.tap0.proxy_arp") != "1"),
}


@pytest.mark.parametrize("damage", sorted(ROUTED_DAMAGE))
def test_routed_journal_is_repaired(world: World, damage: str) -> None:
    a = world.a
    before, sysctls, settings = routed_plugged(world, "routed")
    assert run(a.ns, "nichooks", "verify", "tap0", env=settings).returncode == 0
    breaks, broken = ROUTED_DAMAGE[damage]
    breaks(a)
    assert_repaired(a.ns, settings, lambda: broken(a))
    assert_routed_undone(world, before, sysctls, settings)


def test_routed_pre_journal_is_announced_then_undone(world: World) -> None:
    a = world.a
    before, sysctls, settings = routed_plugged(world, "routed-pre", MIGRATION_PHASE="pre")
    assert uplink_proxy(a, "-4", GUEST4) == [] and uplink_proxy(a, "-6", GUEST6) == []
    announced = run(a.ns, "nichooks", "announce", "tap0", env=settings)
    assert announced.returncode == 0, announced.stdout + announced.stderr
    for fam, addr in (("-4", GUEST4), ("-6", GUEST6)):
        assert [p.get("protocol") for p in uplink_proxy(a, fam, addr)] == [PROTO], \
            f"{addr} on {a.uplink}: {a.proxies(fam)}"
    assert run(a.ns, "nichooks", "verify", "tap0", env=settings).returncode == 0
    assert_routed_undone(world, before, sysctls, settings)


# --- ext ---------------------------------------------------------------------------------
def test_ext_journal_runs_the_ifdown_scripts(site: Site, tmp_path: Path) -> None:
    site.nic_uuid = KEY
    site.add_tap()
    seen = tmp_path / "seen"
    write_script(site.conf / "ifdown.d", "10-record",
                 f'echo "$NICHOOKS_CONTEXT $1 $MODE $LINK $INSTANCE $INTERFACE $INTERFACE_UUID '
                 f'$MAC [$TAGS]" >> {seen}')
    before = site.host.snapshot()
    assert_ok(site.hook("kvm-ifup", "tap0", env=site.env(MODE="ext", LINK=EXT_LINK)), "kvm-ifup")
    replace_journal(site.state, "ext", tap_ifindex=ifindex(site.host, "tap0"))
    assert not seen.exists()
    # No NIC variables: what the script sees can only come from the journal.
    settings = hook_env(site.state, site.conf, NICHOOKS_OVSDB=f"unix:{tmp_path / 'no-ovsdb.sock'}")
    assert_ok(run(site.host, "kvm-ifdown", "tap0", env=settings), "kvm-ifdown")
    assert seen.read_text().splitlines() == [
        f"shutdown tap0 ext {EXT_LINK} inst1.example.org tap0 {KEY} {GUEST_MAC} [web prod]"]
    assert site.host.snapshot() == before
    assert_state_dir_empty(site.state)
