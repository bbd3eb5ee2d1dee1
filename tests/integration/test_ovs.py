"""Open vSwitch mode against a real ovsdb-server + ovs-vswitchd (userspace datapath)
in the test's namespace: OVSDB columns, VLAN isolation on real traffic, trunks,
anti-spoofing with forged frames, undo by cookie, refusals, a balance-slb bond."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.ovs_env import (
    Guest,
    Switch,
    control_frame,
    send_control,
    send_control_from_bridge,
    send_frames,
)
from tests.support import packets as pk
from tests.support.constants import HAVE_OVS, NO_OVS
from tests.support.frames import Listener
from tests.support.hooks import one_line
from tests.support.netns import Netns
from tests.support.state import journals, names_in

pytestmark = pytest.mark.skipif(not HAVE_OVS, reason=NO_OVS)


def plug(sw: Switch, dirs: tuple[Path, Path], guest: Guest, **env: str) -> str:
    r = sw.hook("kvm-ifup", guest.tap, env=sw.nic_env(*dirs, guest, **env))
    assert r.returncode == 0, r.stderr
    return r.stderr


def unplug(sw: Switch, dirs: tuple[Path, Path], guest: Guest, **env: str) -> None:
    r = sw.hook("kvm-ifdown", guest.tap, env=sw.nic_env(*dirs, guest, **env))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr


def host_links(sw: Switch) -> list[tuple[str, str, int, bool]]:
    return sorted((link["ifname"], link.get("address", ""), link.get("mtu", 0),
                   "UP" in link.get("flags", [])) for link in sw.host.ipj("link", "show"))


# -- OVSDB columns --------------------------------------------------------------------------
@pytest.mark.parametrize(("vlan", "tag", "trunks", "mode"), [
    ("", [], [], []),
    (".100", 100, [], "access"),
    ("100", 100, [], "access"),
    (":100:200", [], [100, 200], "trunk"),
    (".100:200", 100, [200], "native-untagged"),
])
def test_vlan_spec_becomes_port_columns(switch: Switch, dirs: tuple[Path, Path], vlan: str,
                                        tag: object, trunks: list[int], mode: object) -> None:
    guest = switch.add_guest("tap0", "52:54:00:00:00:01", "10.0.0.1/24")
    before = host_links(switch)
    plug(switch, dirs, guest, VLAN=vlan)
    port = switch.row("Port", "tap0", "tag", "trunks", "vlan_mode", "external_ids")
    port_trunks = port["trunks"] if isinstance(port["trunks"], list) else [port["trunks"]]
    assert (port["tag"], port_trunks, port["vlan_mode"]) == (tag, trunks, mode)
    iface = switch.row("Interface", "tap0", "external_ids", "mtu_request", "ofport")
    ids = iface["external_ids"]
    assert ids["iface-id"] == guest.uuid
    assert ids["attached-mac"] == guest.mac
    assert ids["vm-id"] == "tap0.example.org"
    assert ids["iface-status"] == "active"
    assert ids["nichooks-nic"] == guest.uuid == port["external_ids"]["nichooks-nic"]
    assert iface["mtu_request"] == 1500
    assert iface["ofport"] > 0
    assert switch.host.link("tap0")["mtu"] == 1500
    assert "UP" in switch.host.link("tap0")["flags"]
    assert switch.our_flows("br0")

    unplug(switch, dirs, guest)
    assert switch.ports("br0") == set()
    assert switch.our_flows("br0") == []
    assert host_links(switch) == before
    assert names_in(dirs[0], "nics") == []


def test_mtu_request_follows_the_bridge_or_the_setting(switch: Switch, dirs: tuple[Path, Path]) -> None:
    switch.vsctl("set", "interface", "br0", "mtu_request=1400")
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    plug(switch, dirs, a)
    plug(switch, dirs, b, NICHOOKS_OVS_MTU="1280")
    assert switch.row("Interface", "tapa", "mtu_request")["mtu_request"] == 1400
    assert switch.host.link("tapa")["mtu"] == 1400
    assert switch.row("Interface", "tapb", "mtu_request")["mtu_request"] == 1280
    assert switch.host.link("tapb")["mtu"] == 1280


# -- VLANs on real traffic -------------------------------------------------------------------
def test_access_vlans_isolate_guests(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    c = switch.add_guest("tapc", "52:54:00:00:00:0c", "10.0.0.3/24")
    before = host_links(switch)
    plug(switch, dirs, a, VLAN=".100")
    plug(switch, dirs, b, VLAN="100")
    plug(switch, dirs, c, VLAN=".200")
    assert a.ping_until("10.0.0.2")
    assert not a.ping("10.0.0.3", count=2)
    assert not c.ping("10.0.0.1", count=2)
    for guest in (a, b, c):
        unplug(switch, dirs, guest)
    assert switch.ports("br0") == set()
    assert switch.our_flows("br0") == []
    assert host_links(switch) == before


def test_trunk_port_carries_only_its_trunks(switch: Switch, dirs: tuple[Path, Path]) -> None:
    trunk = switch.add_guest("tapt", "52:54:00:00:00:0f")
    access = {vid: switch.add_guest(f"tap{vid}", f"52:54:00:00:01:{vid % 256:02x}",
                                    f"10.0.{vid // 100}.1/24") for vid in (100, 200, 300)}
    plug(switch, dirs, trunk, VLAN=":100:200")
    for vid, guest in access.items():
        plug(switch, dirs, guest, VLAN=f".{vid}")

    # Each access guest broadcasts one frame: the trunk sees it tagged with the
    # guest's VLAN, and only for its trunks.
    with trunk.listen() as at_trunk, Listener(switch.host.name, "br0") as at_bridge:
        for vid, guest in access.items():
            assert guest.ip4 is not None
            frame = pk.ethernet(pk.BROADCAST, guest.mac, 0x0800,
                                pk.udp4(guest.ip4, "10.0.255.255", 9, 9, b"NH-up-%d" % vid))
            send_frames(guest, [frame])
        # The bridge's own port carries every VLAN: once all three broadcasts reached
        # it, the switch has forwarded each of them everywhere it was going to. Then a
        # control frame on VLAN 100 follows anything they put on the trunk's wire.
        at_bridge.wait("the three broadcasts at br0", lambda frames: {
            vid for vid, frame in frames for v in (100, 200, 300) if b"NH-up-%d" % v in frame
            and vid == v} == {100, 200, 300})
        got = at_trunk.until(send_control(access[100]))
    seen = {(vid, v) for vid, frame in got for v in (100, 200, 300) if b"NH-up-%d" % v in frame}
    assert seen == {(100, 100), (200, 200)}

    # The trunk guest sends tagged frames: VLAN 100 reaches the VLAN-100 guest,
    # untagged; VLAN 300 is not one of its trunks and reaches nobody.
    with ExitStack() as stack:
        captures = {vid: stack.enter_context(guest.listen()) for vid, guest in access.items()}
        send_frames(trunk, [
            pk.ethernet(pk.BROADCAST, trunk.mac, 0x0800,
                        pk.udp4("10.0.1.9", "10.0.1.255", 9, 9, b"NH-down-100"), vid=100),
            pk.ethernet(pk.BROADCAST, trunk.mac, 0x0800,
                        pk.udp4("10.0.3.9", "10.0.3.255", 9, 9, b"NH-down-300"), vid=300),
        ])
        # Control frames from the trunk on its two VLANs: the switch took them after
        # the two above, so once they arrived it has dealt with VLAN 300's as well.
        after100, after200 = send_control(trunk, vid=100), send_control(trunk, vid=200)
        assert captures[100].received(b"NH-down-100", before=after100) == [None]
        assert captures[200].received(b"NH-down", before=after200) == []
        # VLAN 300's wire: a control frame from the bridge's own port, sent only now.
        after300 = send_control_from_bridge(switch, vid=300)
        assert captures[300].received(b"NH-down-300", before=after300) == []


def test_port_without_vlan_drops_tagged_frames_from_the_guest(
        switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    plug(switch, dirs, a)
    plug(switch, dirs, b)
    payload = pk.udp4("10.0.0.1", "10.0.0.2", 9, 9, b"NH-tagged")
    control, token = control_frame(a, b.mac)  # the same, untagged: it arrives
    with b.listen() as capture:
        send_frames(a, [pk.ethernet(b.mac, a.mac, 0x0800, payload, vid=100), control])
        assert capture.received(b"NH-tagged", before=token) == []


# -- anti-spoofing ---------------------------------------------------------------------------
def test_forged_frames_never_arrive(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    subnet6 = {"NETWORK_SUBNET6": "2001:db8:1::/64"}
    plug(switch, dirs, a, **subnet6)
    plug(switch, dirs, b, **subnet6)
    assert a.ping_until("10.0.0.2")  # honest traffic flows

    forged = "52:54:00:99:99:99"
    a_ll = "fe80::5054:ff:fe00:a"
    a_global = "2001:db8:1::5054:ff:fe00:a"   # EUI-64 of a's MAC in NETWORK_SUBNET6
    b_global = "2001:db8:1::5054:ff:fe00:b"

    def udp(src_mac: str, src_ip: str, marker: bytes) -> bytes:
        return pk.ethernet(b.mac, src_mac, 0x0800, pk.udp4(src_ip, "10.0.0.2", 9, 9, marker))

    def arp(sha: str, spa: str, src_mac: str | None = None) -> bytes:
        return pk.ethernet(b.mac, src_mac or a.mac, 0x0806, pk.arp(2, sha, spa, b.mac, "10.0.0.2"))

    b_ll = "fe80::5054:ff:fe00:b"

    def ns(src: str, mac: str) -> bytes:
        return pk.ethernet("33:33:ff:00:00:99", a.mac, 0x86DD,
                           pk.neighbour_solicit(src, "2001:db8:1::99", mac))

    def na(target: str, marker_src: str = a_ll) -> bytes:
        return pk.ethernet(pk.BROADCAST, a.mac, 0x86DD, pk.neighbour_advert(marker_src, target, a.mac))

    control, token = control_frame(a, b.mac)  # last: everything before it was dealt with
    with b.listen() as capture:
        send_frames(a, [
            udp(a.mac, "10.0.0.1", b"NH-honest"),
            udp(forged, "10.0.0.1", b"NH-forged-mac"),
            udp(a.mac, "10.0.0.9", b"NH-forged-ip"),
            arp(a.mac, "10.0.0.1"),                   # honest ARP reply
            arp(a.mac, "10.0.0.2"),                   # claims b's address
            arp(forged, "10.0.0.1"),                  # sender MAC is not the frame's
            arp(forged, "10.0.0.1", src_mac=forged),  # both forged
            na(a_global),                             # honest NA
            na(b_global),                             # claims b's IPv6 address
            pk.ethernet(pk.BROADCAST, a.mac, 0x86DD, pk.router_advert(a_ll)),
            pk.ethernet(pk.BROADCAST, a.mac, 0x0800,
                        pk.udp4("0.0.0.0", "255.255.255.255", 68, 67, b"NH-dhcp-discover")),
            pk.ethernet(b.mac, a.mac, 0x0800, pk.udp4("10.0.0.1", "10.0.0.2", 67, 68, b"NH-dhcp-offer")),
            pk.ethernet(b.mac, a.mac, 0x0800, pk.udp4("10.0.0.1", "10.0.0.2", 1234, 68, b"NH-dhcp-odd")),
            na(b_ll),                                 # claims b's link-local address
            ns(a_global, a.mac),                      # honest solicitation
            ns(b_global, a.mac),                      # "from" b's address with a's MAC
            ns(b_ll, a.mac),                          # "from" b's link-local address
            control,
        ])
        frames = [frame for _vid, frame in capture.until(token)]

    def count(pred: object) -> int:
        return sum(1 for f in frames if pred(f))  # type: ignore[operator]

    assert count(lambda f: b"NH-honest" in f) == 1
    assert count(lambda f: b"NH-forged-mac" in f) == 0
    assert count(lambda f: b"NH-forged-ip" in f) == 0
    arps = [f for f in frames if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02"]
    assert [(f[6:12].hex(":"), f[22:28].hex(":"), socket.inet_ntoa(f[28:32])) for f in arps] == [
        (a.mac, a.mac, "10.0.0.1")]
    nas = [f for f in frames if f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 136
           and f[6:12] == pk.mac_bytes(a.mac)]
    assert [ipaddress.IPv6Address(f[62:78]) for f in nas] == [ipaddress.IPv6Address(a_global)]
    # (b's link-local NA is dropped too: only the one honest NA arrived)
    assert count(lambda f: f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 134) == 0
    assert count(lambda f: b"NH-dhcp-discover" in f) == 1
    assert count(lambda f: b"NH-dhcp-offer" in f) == 0
    assert count(lambda f: b"NH-dhcp-odd" in f) == 0
    nss = [ipaddress.IPv6Address(f[22:38]) for f in frames
           if f[12:14] == b"\x86\xdd" and f[20] == 58 and f[54] == 135
           and f[62:78] == ipaddress.IPv6Address("2001:db8:1::99").packed]
    assert nss == [ipaddress.IPv6Address(a_global)]

    # And with a real stack: an address the NIC was not given gets nothing through.
    a.ns.ip("addr", "add", "10.0.0.9/24", "dev", "eth0")
    assert a.run("ping", "-n", "-c", "2", "-W", "1", "-I", "10.0.0.9", "10.0.0.2").returncode != 0
    assert a.ping("10.0.0.2")


def test_mac_only_mode_and_off(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    plug(switch, dirs, a, NICHOOKS_OVS_ANTISPOOF="mac")
    plug(switch, dirs, b, NICHOOKS_OVS_ANTISPOOF="off")
    assert switch.our_flows("br0")
    assert not [f for f in switch.our_flows("br0")
                if f"in_port={switch.row('Interface', 'tapb', 'ofport')['ofport']} " in f + " "]
    control, token = control_frame(a, b.mac)
    with b.listen() as capture:
        send_frames(a, [
            pk.ethernet(b.mac, a.mac, 0x0800, pk.udp4("10.0.0.9", "10.0.0.2", 9, 9, b"NH-other-ip")),
            pk.ethernet(b.mac, "52:54:00:99:99:99", 0x0800,
                        pk.udp4("10.0.0.1", "10.0.0.2", 9, 9, b"NH-forged-mac")),
            control,
        ])
        frames = [f for _v, f in capture.until(token)]
    assert sum(b"NH-other-ip" in f for f in frames) == 1   # MAC-only: any IP
    assert sum(b"NH-forged-mac" in f for f in frames) == 0


# -- undo ----------------------------------------------------------------------------------------
def test_ifdown_removes_flows_by_cookie_whatever_the_port_number(
        switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a)
    flows = switch.our_flows("br0")
    cookies = {f.split(",")[0] for f in flows}
    assert len(cookies) == 1
    old = switch.row("Interface", "tapa", "ofport")["ofport"]
    switch.vsctl("set", "interface", "tapa", "ofport_request=77")
    assert switch.row("Interface", "tapa", "ofport")["ofport"] == 77 != old
    unplug(switch, dirs, a)
    assert switch.our_flows("br0") == []
    assert switch.ports("br0") == set()


def test_ifdown_leaves_a_port_someone_else_recreated(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a)
    switch.vsctl("--", "del-port", "tapa", "--", "add-port", "br0", "tapa", "--", "set", "interface",
                 "tapa", "external_ids:iface-id=someone-else")
    unplug(switch, dirs, a)
    assert switch.ports("br0") == {"tapa"}
    assert switch.our_flows("br0") == []


def test_stale_port_of_the_same_name_is_replaced(switch: Switch, dirs: tuple[Path, Path]) -> None:
    switch.add_bridge("br1")
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    switch.vsctl("add-port", "br1", "tapa")
    plug(switch, dirs, a, VLAN=".100")
    assert switch.ports("br1") == set()
    assert switch.ports("br0") == {"tapa"}
    assert switch.row("Port", "tapa", "tag")["tag"] == 100


def test_failed_flow_step_rolls_back_everything(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    before = host_links(switch)
    r = switch.hook("kvm-ifup", "tapa",
                    env=switch.nic_env(*dirs, a, NICHOOKS_TEST_FAULT="fail-at:4"))
    assert r.returncode == 1
    assert "anti-spoofing flows" in one_line(r.stderr)
    assert switch.ports("br0") == set()
    assert switch.our_flows("br0") == []
    assert host_links(switch) == before
    assert names_in(dirs[0], "nics") == []


def test_crash_after_the_port_is_cleaned_by_the_next_ifup(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(*dirs, a, NICHOOKS_TEST_FAULT="kill-after:3"))
    assert r.returncode == -9, (r.returncode, r.stderr)  # SIGKILLed: `ip netns exec` execs the hook
    assert switch.ports("br0") == {"tapa"}
    assert switch.our_flows("br0") == []  # killed before step 4, the flows
    [journal] = journals(dirs[0])
    assert journal["state"] == "applying"
    plug(switch, dirs, a, VLAN=".300")
    assert switch.row("Port", "tapa", "tag")["tag"] == 300
    assert len({f.split(",")[0] for f in switch.our_flows("br0")}) == 1
    unplug(switch, dirs, a)
    assert switch.ports("br0") == set()
    assert switch.our_flows("br0") == []


# -- controller-managed bridges ----------------------------------------------------------------
def test_secure_bridge_gets_no_flows_and_says_so(netns: Netns, tmp_path: Path,
                                                 dirs: tuple[Path, Path]) -> None:
    with Switch(netns, tmp_path) as sw:
        try:
            sw.add_bridge("br0", "fail_mode=secure")
            a = sw.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
            stderr = plug(sw, dirs, a, NICHOOKS_DEBUG="1")
            assert "fail_mode=secure" in stderr
            assert sw.our_flows("br0") == []
            assert sw.row("Interface", "tapa", "external_ids")["external_ids"]["iface-id"] == a.uuid
            unplug(sw, dirs, a)
            assert sw.ports("br0") == set()
        finally:
            sw.remove_guests()


# -- refusals ----------------------------------------------------------------------------------
def test_link_that_is_not_an_ovs_bridge_is_refused(switch: Switch, dirs: tuple[Path, Path]) -> None:
    switch.host.ip("link", "add", "lb0", "type", "bridge")
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    before = host_links(switch)
    for link, cause in (
        ("lb0", "LINK lb0 is a Linux bridge, not an Open vSwitch bridge: use MODE=bridged"),
        ("nosuch", "LINK nosuch: no such Open vSwitch bridge (and no such device)"),
        ("tapa", "LINK tapa is a veth device, not an Open vSwitch bridge"),  # the tap itself
    ):
        r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(*dirs, a, LINK=link))
        assert r.returncode == 1, r.stderr
        assert cause in one_line(r.stderr)
    assert host_links(switch) == before
    assert switch.ports("br0") == set()


def test_unreachable_ovsdb_fails_fast_and_cleanly(switch: Switch, dirs: tuple[Path, Path],
                                                  tmp_path: Path) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    before = host_links(switch)
    missing = tmp_path / "nothing.sock"
    r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(*dirs, a, NICHOOKS_OVSDB=f"unix:{missing}"))
    assert r.returncode == 1
    assert str(missing) in one_line(r.stderr)

    # A server that accepts and never answers: a timeout, not a hang.
    mute = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(mute))
    listener.listen(8)
    try:
        start = time.monotonic()
        r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(
            *dirs, a, NICHOOKS_OVSDB=f"unix:{mute}", NICHOOKS_OVS_TIMEOUT="1"))
        assert time.monotonic() - start < 10
        assert r.returncode == 1
        assert "no answer" in one_line(r.stderr)
    finally:
        listener.close()
    assert host_links(switch) == before
    assert names_in(dirs[0], "nics") == []


def test_vswitchd_that_never_applies_is_an_error_and_rolled_back(
        switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    before = host_links(switch)
    pid = int((switch.dir / "ovs-vswitchd.pid").read_text())
    subprocess.run(["kill", "-STOP", str(pid)], check=True)
    try:
        r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(*dirs, a, NICHOOKS_OVS_TIMEOUT="1"))
    finally:
        subprocess.run(["kill", "-CONT", str(pid)], check=True)
    assert r.returncode == 1
    assert "ovs-vswitchd did not apply" in one_line(r.stderr)
    assert "tapa" not in switch.ports("br0")
    assert host_links(switch) == before


def test_vlan_out_of_range_is_invalid_input(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    for vlan in ("4095", ".0", ":100:5000"):
        r = switch.hook("kvm-ifup", "tapa", env=switch.nic_env(*dirs, a, VLAN=vlan))
        assert r.returncode == 2
        assert "VLAN" in one_line(r.stderr)
    assert switch.ports("br0") == set()


# -- a bridge whose uplink is a balance-slb bond (seed document 001) ------------------------------
def test_guest_traffic_over_a_balance_slb_bond(switch: Switch, dirs: tuple[Path, Path]) -> None:
    upstream = Netns()
    try:
        upstream.ip("link", "add", "ub0", "type", "bridge")
        for n in (1, 2):
            switch.host.ip("link", "add", f"m{n}", "type", "veth", "peer", "name", f"u{n}",
                           "netns", upstream.name)
            upstream.ip("link", "set", f"u{n}", "master", "ub0", "up")
            switch.host.ip("link", "set", f"m{n}", "up")
        upstream.ip("addr", "add", "10.0.0.254/24", "dev", "ub0")
        upstream.ip("link", "set", "ub0", "up")
        switch.vsctl("add-bond", "br0", "bond0", "m1", "m2", "bond_mode=balance-slb")
        assert "balance-slb" in switch.appctl("bond/show", "bond0")

        a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
        b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
        plug(switch, dirs, a)
        plug(switch, dirs, b)
        assert a.ping_until("10.0.0.254")
        assert b.ping_until("10.0.0.254")
        unplug(switch, dirs, a)
        unplug(switch, dirs, b)
        assert switch.ports("br0") == {"bond0"}
        assert switch.our_flows("br0") == []
    finally:
        upstream.delete()


def test_status_then_ifdown_after_the_tap_vanished(switch: Switch, dirs: tuple[Path, Path]) -> None:
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    plug(switch, dirs, a)
    env = switch.nic_env(*dirs, a)
    status = switch.hook("nichooks", "status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    items = json.loads(status.stdout)[0]["items"]
    assert [i["present"] for i in items] == [True] * 5
    switch.host.ip("link", "del", "tapa")  # QEMU went away without calling us
    unplug(switch, dirs, a)
    assert switch.ports("br0") == set()
    assert switch.our_flows("br0") == []


def test_bridge_without_openflow14_gets_the_flows_one_by_one(switch: Switch,
                                                             dirs: tuple[Path, Path]) -> None:
    switch.vsctl("set", "bridge", "br0", "protocols=OpenFlow10")
    a = switch.add_guest("tapa", "52:54:00:00:00:0a", "10.0.0.1/24")
    b = switch.add_guest("tapb", "52:54:00:00:00:0b", "10.0.0.2/24")
    plug(switch, dirs, a)
    plug(switch, dirs, b)
    assert len(switch.our_flows("br0")) > 10
    assert a.ping_until("10.0.0.2")
    unplug(switch, dirs, a)
    unplug(switch, dirs, b)
    assert switch.our_flows("br0") == []


def test_hybrid_port_cannot_bypass_the_checks_by_tagging(switch: Switch, dirs: tuple[Path, Path]) -> None:
    """On `.100:200` OVS takes frames tagged 100 (the native VLAN) or 0 into VLAN 100:
    they must get the untagged checks, not a tagged-frame pass."""
    h = switch.add_guest("taph", "52:54:00:00:00:0a", "10.0.1.1/24")
    v100 = switch.add_guest("tapv", "52:54:00:00:00:0b", "10.0.1.2/24")
    v200 = switch.add_guest("tapw", "52:54:00:00:00:0c", "10.0.2.2/24")
    plug(switch, dirs, h, VLAN=".100:200")
    plug(switch, dirs, v100, VLAN=".100")
    plug(switch, dirs, v200, VLAN=".200")

    def udp(dst: Guest, src_ip: str, marker: bytes, vid: int | None) -> bytes:
        assert dst.ip4 is not None
        return pk.ethernet(dst.mac, h.mac, 0x0800, pk.udp4(src_ip, dst.ip4, 9, 9, marker), vid=vid)

    # Last, a control frame on each VLAN (untagged: the native one): all before it on
    # the same port has been dealt with when it arrives.
    control100, token100 = control_frame(h, v100.mac)
    control200, token200 = control_frame(h, v200.mac, vid=200)
    with v100.listen() as c100, v200.listen() as c200:
        send_frames(h, [
            udp(v100, "10.0.1.1", b"NH-native-honest", None),
            udp(v100, "10.0.1.66", b"NH-native-forged-tag100", 100),
            udp(v100, "10.0.1.66", b"NH-native-forged-tag0", 0),
            udp(v100, "10.0.1.66", b"NH-native-forged-untagged", None),
            udp(v200, "10.0.2.1", b"NH-trunk-200", 200),
            control100,
            control200,
        ])
        got100 = [f for _v, f in c100.until(token100)]
        got200 = [f for _v, f in c200.until(token200)]
    assert sum(b"NH-native-honest" in f for f in got100) == 1
    assert sum(b"NH-native-forged" in f for f in got100) == 0
    assert sum(b"NH-trunk-200" in f for f in got200) == 1


WATCH_TWICE = """
import sys
from nichooks.host.ovsdb import Ovsdb
db = Ovsdb(sys.argv[1], 3)
db.watch({"tapa"}, {"br0"})
db.watch({"tapb"}, set())   # a monitor_cond_change on the live connection
db.watch({"tapc"}, {"br1"})
print("ok")
"""


def test_one_connection_watches_more_rows_later(switch: Switch) -> None:
    """A fresh process's IDL (as the agent's is) can widen its monitor after the first
    reply: each watch of new rows is answered, not waited on until the timeout (the
    monitor must not take JSON-RPC id 0, which python-ovs mistakes for none)."""
    import sys

    run = subprocess.run([sys.executable, "-c", WATCH_TWICE, switch.db], capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.strip() == "ok", run.stderr[-1500:]
