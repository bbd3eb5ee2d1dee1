"""The anti-spoofing flow set as data: what each mode allows and denies."""

from __future__ import annotations

import pytest

from nichooks.host.openflow import (
    COOKIE_PREFIX,
    P_DENY,
    P_DROP,
    P_EXCEPT,
    P_TAGGED,
    Guest,
    antispoof_flows,
    cookie,
)

MAC = "52:54:00:00:00:0a"


def test_cookie_has_our_prefix_and_is_stable_per_nic() -> None:
    a = cookie("0b6a3c1e-0000-4000-8000-000000000001")
    assert a >> 48 == COOKIE_PREFIX
    assert a == cookie("0b6a3c1e-0000-4000-8000-000000000001")
    assert a != cookie("0b6a3c1e-0000-4000-8000-000000000002")
    assert a < 2**64


def test_every_flow_is_on_the_port_and_the_last_resort_is_drop() -> None:
    flows = antispoof_flows(Guest(ofport=7, mac=MAC, ipv4=("10.0.0.1",)))
    assert all(",in_port=7," in f for f in flows)
    assert f"priority={P_DROP},in_port=7,actions=drop" in flows
    assert all(f.endswith(("actions=NORMAL", "actions=drop")) for f in flows)
    allows = [f for f in flows if f.endswith("NORMAL")]
    assert all(f"dl_src={MAC}" in f for f in allows)


def test_known_addresses_are_the_only_sources() -> None:
    flows = antispoof_flows(Guest(ofport=1, mac=MAC, ipv4=("10.0.0.1",), ipv6=("2001:db8::1",)))
    assert any("ip,nw_src=10.0.0.1" in f for f in flows)
    assert any("ipv6,ipv6_src=2001:db8::1" in f for f in flows)
    assert any(f"arp,arp_sha={MAC},arp_spa=10.0.0.1" in f for f in flows)
    assert not any(f.endswith("ip,actions=NORMAL") or ",ip,actions" in f for f in flows)
    nas = [f for f in flows if "icmp_type=136" in f and f.startswith(f"priority={P_EXCEPT}")]
    # its own addresses and its own EUI-64 link-local address, nothing else
    assert {t.split("nd_target=")[1].split(",")[0] for t in nas} == {"2001:db8::1",
                                                                      "fe80::5054:ff:fe00:a"}
    nss = [f for f in flows if "icmp_type=135" in f and f.startswith(f"priority={P_EXCEPT}")]
    assert {f.split("ipv6_src=")[1].split(",")[0] for f in nss} == {
        "2001:db8::1", "fe80::5054:ff:fe00:a", "::"}
    assert [f for f in nss if "ipv6_src=::," in f + ","] == [
        f for f in nss if "nd_sll=00:00:00:00:00:00" in f and "ipv6_src=::," in f + ","]
    assert any(f.startswith(f"priority={P_DENY}") and "udp,tp_dst=68" in f for f in flows)
    assert any(f.startswith(f"priority={P_DENY}") and "icmp_type=134" in f for f in flows)


def test_without_addresses_or_in_mac_mode_any_ip_from_the_mac() -> None:
    for guest in (Guest(ofport=1, mac=MAC), Guest(ofport=1, mac=MAC, ipv4=("10.0.0.1",), mode="mac")):
        flows = antispoof_flows(guest)
        assert any(f.endswith(f"dl_src={MAC},vlan_tci=0x0000/0x1000,ip,actions=NORMAL") for f in flows)
        assert not any("nw_src=10.0.0.1" in f for f in flows)


@pytest.mark.parametrize("trunks", [(), (200, 300)])
def test_tagged_frames_only_on_the_trunks_asked_for(trunks: tuple[int, ...]) -> None:
    flows = antispoof_flows(Guest(ofport=1, mac=MAC, trunks=trunks))
    tagged = [f for f in flows if f.startswith(f"priority={P_TAGGED}")]
    # one exact VID each: never VID 0 or the native VLAN, which OVS would treat as untagged
    assert [f.split("vlan_tci=")[1].split(",")[0] for f in tagged] == [
        f"0x{0x1000 | vid:04x}/0x1fff" for vid in trunks]
    # every other allow is for untagged frames only
    assert all("vlan_tci=0x0000/0x1000" in f for f in flows
               if f.endswith("NORMAL") and f not in tagged)


def test_only_flows_shaped_like_ours_are_parsed_from_a_dump() -> None:
    """The sweep deletes a dumped flow only if it is shaped like one `add` makes (table
    0, no timeouts or flags, one of our priorities, on an in_port): anything else
    with our cookie prefix is someone else's, and is not even parsed."""
    from nichooks.host.openflow import Flow, parse_flow

    ours = parse_flow(" cookie=0x4e484bcb71960b5f, priority=1150,udp,in_port=12,tp_dst=68 actions=drop")
    assert ours == Flow(0x4E484BCB71960B5F, 1150, "udp,in_port=12,tp_dst=68")
    assert ours.in_port == 12 and ours.antispoof_shaped()
    assert ours.strict() == "cookie=0x4e484bcb71960b5f/-1,priority=1150,udp,in_port=12,tp_dst=68"
    for line in (
        " cookie=0x4e48000000000001, table=3, priority=1000,in_port=1 actions=drop",
        " cookie=0x4e48000000000001, idle_timeout=50, priority=1000,in_port=1 actions=drop",
        " cookie=0x4e48000000000001, reset_counts priority=1000,in_port=1 actions=drop",
        " cookie=0x4e48000000000001, in_port=1 actions=drop",                 # default priority
        ' cookie=0x4e48000000000001, priority=1000,in_port="tap a" actions=drop',
    ):
        assert parse_flow(line) is None, line
    for line in (
        " cookie=0x4e48000000000001, priority=5,in_port=1 actions=drop",     # not our priority
        " cookie=0x4e48000000000001, priority=1000,arp actions=drop",        # on no port
        " cookie=0x4e48000000000001, priority=1000,in_port=LOCAL actions=drop",
    ):
        flow = parse_flow(line)
        assert flow is not None and not flow.antispoof_shaped(), line
