"""The anti-spoofing flow set as data: what each mode allows and denies."""

from __future__ import annotations

import pytest

from nichooks.net_common.openflow import (
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
    assert {t.split("nd_target=")[1].split(",")[0] for t in nas} == {"2001:db8::1", "fe80::/64"}
    assert any(f.startswith(f"priority={P_DENY}") and "icmp_type=134" in f for f in flows)


def test_without_addresses_or_in_mac_mode_any_ip_from_the_mac() -> None:
    for guest in (Guest(ofport=1, mac=MAC), Guest(ofport=1, mac=MAC, ipv4=("10.0.0.1",), mode="mac")):
        flows = antispoof_flows(guest)
        assert any(f.endswith(f"dl_src={MAC},vlan_tci=0x0000/0x1000,ip,actions=NORMAL") for f in flows)
        assert not any("nw_src=10.0.0.1" in f for f in flows)


@pytest.mark.parametrize("trunks", [False, True])
def test_tagged_frames_only_on_trunks(trunks: bool) -> None:
    flows = antispoof_flows(Guest(ofport=1, mac=MAC, trunks=trunks))
    tagged = [f for f in flows if f.startswith(f"priority={P_TAGGED}")]
    assert bool(tagged) == trunks
    # every other allow is for untagged frames only
    assert all("vlan_tci=0x0000/0x1000" in f for f in flows
               if f.endswith("NORMAL") and f not in tagged)
