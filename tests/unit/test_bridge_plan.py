"""Bridged plans as data, and the VLAN-filtering path this kernel cannot run.

The kernel here refuses `vlan_filtering 1`, so the VLAN steps are
proven against a small in-memory bridge that keeps VLAN entries as the kernel does:
a port joins with its bridge's default PVID 1 untagged, entries are added and
deleted by vid. The refusal path is also proven on the real kernel
(tests/integration/test_bridged.py)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest

from nichooks.engine import records as kinds
from nichooks.errors import PlumbingError
from nichooks.host.netlink import LinkState
from nichooks.model import nic as nicmod
from nichooks.modes import bridged as bridge
from nichooks.modes import registry  # noqa: F401  installs the loader of every record kind
from nichooks.modes.registry import nic_from_variables


class FakeNet:
    """Just enough of a host (its `netlink` driver is itself) for bridged plans, with
    the kernel's VLAN rules. The tap's sysctl and its nftables filter are planned here
    and applied only on the real kernel (tests/integration/test_bridge_filter.py)."""

    settings = SimpleNamespace(antispoof="on")

    def __init__(self, filtering: bool = True) -> None:
        self.links: dict[int, LinkState] = {}
        self.vlans: dict[int, dict[int, set[str]]] = {}
        self.filtering = filtering
        self.calls: list[tuple[Any, ...]] = []

    @property
    def netlink(self) -> FakeNet:
        return self

    def add(self, index: int, name: str, kind: str | None, **kw: Any) -> None:
        base = dict(index=index, name=name, kind=kind, slave_kind=None, mac=f"02:00:00:00:00:{index:02x}",
                    mtu=1500, up=False, master=None)
        base.update(kw)
        self.links[index] = LinkState(**base)

    def find(self, name: str) -> LinkState | None:
        return next((s for s in self.links.values() if s.name == name), None)

    def by_index(self, index: int) -> LinkState | None:
        return self.links.get(index)

    def bridge_vlan_filtering(self, state: LinkState) -> bool:
        return self.filtering

    def set_link(self, index: int, **changes: Any) -> None:
        self.calls.append(("set", index, changes))
        state = self.links[index]
        if "address" in changes:
            state = dataclasses.replace(state, mac=changes["address"])
        if "mtu" in changes:
            state = dataclasses.replace(state, mtu=changes["mtu"])
        if "state" in changes:
            state = dataclasses.replace(state, up=changes["state"] == "up")
        if "master" in changes:
            master = changes["master"] or None
            state = dataclasses.replace(state, master=master,
                                        slave_kind="bridge" if master else None,
                                        root_block=False if master else None)
            self.vlans[index] = {1: {"pvid", "untagged"}} if master else {}
        self.links[index] = state

    def set_root_block(self, index: int, on: bool) -> None:
        self.calls.append(("root_block", index, on))
        self.links[index] = dataclasses.replace(self.links[index], root_block=on)

    def vlan_add(self, index: int, vid: int, *, pvid: bool, untagged: bool) -> None:
        self.calls.append(("vlan_add", vid, pvid, untagged))
        if pvid:
            for flags in self.vlans[index].values():
                flags.discard("pvid")
        self.vlans[index][vid] = ({"pvid"} if pvid else set()) | ({"untagged"} if untagged else set())

    def vlan_del(self, index: int, vid: int) -> None:
        self.calls.append(("vlan_del", vid))
        self.vlans[index].pop(vid, None)

    def port_vlans(self, index: int) -> dict[int, set[str]]:
        return {vid: set(flags) for vid, flags in self.vlans.get(index, {}).items()}


def make_nic(vlan: str = "", link: str = "br0") -> nicmod.Nic:
    return nic_from_variables({"MODE": "bridged", "MAC": "aa:00:00:00:00:01", "LINK": link,
                                  "VLAN": vlan, "INTERFACE": "tap0", "INSTANCE": "vm1"})


def make_net(filtering: bool = True) -> FakeNet:
    net = FakeNet(filtering)
    net.add(2, "br0", "bridge", mtu=9000)
    net.add(3, "tap0", "tun", mac="6a:11:22:33:44:55")
    return net


def test_plan_as_data_without_vlan() -> None:
    plan = bridge.plan(make_nic(), make_net(filtering=False))
    assert plan.as_data() == [
        {"step": "link.mac", "ifname": "tap0", "value": "fe:11:22:33:44:55"},
        {"step": "link.mtu", "ifname": "tap0", "value": 9000},
        {"step": "sysctl", "key": "net.ipv6.conf.tap0.disable_ipv6", "value": "1"},
        {"step": "nft.filter", "family": "bridge", "chain": "nic-" + plan_key(),
         "ifname": "tap0", "level": "on", "mac": "aa:00:00:00:00:01", "ipv4": [], "ipv6": [],
         "trunks": []},
        {"step": "link.master", "ifname": "tap0", "value": "br0"},
        {"step": "link.root_block", "ifname": "tap0", "value": True},
        {"step": "link.up", "ifname": "tap0", "value": True},
    ]


@pytest.mark.parametrize("vlan,pvid,tagged", [
    ("100", 100, []), (".100", 100, []), (":100:200", None, [100, 200]),
    (".100:200:300", 100, [200, 300]),
])
def test_plan_vlan_entries_before_up(vlan: str, pvid: int | None, tagged: list[int]) -> None:
    plan = bridge.plan(make_nic(vlan), make_net())
    data = plan.as_data()
    assert [d["step"] for d in data] == ["link.mac", "link.mtu", "sysctl", "nft.filter",
                                         "link.master", "link.root_block", "bridge.vlans",
                                         "link.up"]
    assert data[6] == {"step": "bridge.vlans", "ifname": "tap0", "pvid_untagged": pvid, "tagged": tagged}
    assert data[3]["trunks"] == tagged  # the filter lets tagged frames through for these only


def plan_key() -> str:
    return make_nic().key


def run(plan: Any, net: FakeNet) -> list[Any]:
    records = []
    for step in [s for s in plan.steps if s.kind not in ("sysctl.dev", "nft.filter")]:
        records.append(step.prepare(net))
        step.apply(net)
        assert step.verify(net) is None
    return records


@pytest.mark.parametrize("vlan,expect", [
    (".100:200", {100: {"pvid", "untagged"}, 200: set()}),
    (":100:200", {100: set(), 200: set()}),
    ("1", {1: {"pvid", "untagged"}}),
])
def test_apply_sets_vlans_while_down_and_undo_restores(vlan: str, expect: dict[int, set[str]]) -> None:
    net = make_net()
    records = run(bridge.plan(make_nic(vlan), net), net)
    tap = net.links[3]
    assert tap.master == 2 and tap.up and tap.mac == "fe:11:22:33:44:55" and tap.mtu == 9000
    assert net.vlans[3] == expect
    # the port came up only after every VLAN entry was in place
    up_at = next(i for i, c in enumerate(net.calls) if c[0] == "set" and "state" in c[2])
    assert all(i < up_at for i, c in enumerate(net.calls) if c[0].startswith("vlan"))
    for record in reversed(records):
        kinds.undo(net, record)
    tap = net.links[3]
    assert (tap.master, tap.up, tap.mac, tap.mtu) == (None, False, "6a:11:22:33:44:55", 1500)


def test_undo_restores_default_pvid_while_still_a_port() -> None:
    net = make_net()
    records = run(bridge.plan(make_nic(".100"), net), net)
    vlan_record = next(r for r in records if r.kind == "bridge.vlans")
    kinds.undo(net, vlan_record)
    assert net.vlans[3] == {1: {"pvid", "untagged"}}


def test_vlan_on_bridge_that_cannot_filter_is_refused() -> None:
    with pytest.raises(PlumbingError, match="cannot filter VLANs"):
        bridge.plan(make_nic(".100"), make_net(filtering=False))


@pytest.mark.parametrize("setup,fragment", [
    ({"kind": None}, "is a plain network interface, not a bridge"),
    ({"kind": None, "slave_kind": "bond", "master": 7}, "bond member"),
    ({"kind": "openvswitch"}, "use MODE=openvswitch"),
    ({"kind": "bond"}, "is a bond device, not a bridge"),
])
def test_non_bridge_link_is_named(setup: dict[str, Any], fragment: str) -> None:
    net = make_net()
    net.add(5, "eth1", **setup)
    net.add(7, "bond0", "bond")
    with pytest.raises(PlumbingError, match=fragment) as info:
        bridge.plan(make_nic(link="eth1"), net)
    assert "eth1" in str(info.value)
