"""Steps on one link: MAC, MTU, master, up, a bridge port's root_block, and bridge-port
VLAN entries.

Undo restores the previous value only while the link is still the one we changed
(same ifindex: a reused tap name is a new plug) and still holds the value we set
(someone who changed it since owns it now). A vanished link counts as undone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.records import checks, rebuilds, undoes
from nichooks.errors import NetlinkError, PlumbingError
from nichooks.host.netlink import LinkState, ignore_gone

if TYPE_CHECKING:
    from nichooks.host.host import Host

ATTRS = ("mac", "mtu", "master", "up", "root_block")


def _current(state: LinkState, attr: str) -> Any:
    return {"mac": state.mac, "mtu": state.mtu, "master": state.master, "up": state.up,
            "root_block": state.root_block}[attr]


def require_link(net: Host, ifname: str) -> LinkState:
    """The link by name, or the error a step reports when its device vanished under it."""
    state = net.netlink.find(ifname)
    if state is None:
        raise NetlinkError(19, f"{ifname} has disappeared")
    return state


def _set(net: Host, index: int, attr: str, value: Any) -> None:
    if attr == "root_block":
        net.netlink.set_root_block(index, bool(value))
    else:
        net.netlink.set_link(index, **_netlink_args(attr, value))


def _netlink_args(attr: str, value: Any) -> dict[str, Any]:
    if attr == "mac":
        return {"address": value}
    if attr == "mtu":
        return {"mtu": value}
    if attr == "master":
        return {"master": value or 0}
    return {"state": "up" if value else "down"}


@dataclass(frozen=True)
class SetLink:
    """Set one attribute of a link (`ifname`), remembering the old value."""

    ifname: str
    attr: str
    value: Any
    shown: str = ""  # how to show the value (a bridge name rather than its ifindex)
    kind: str = "link.attr"

    def describe(self) -> str:
        shown = self.shown or str(self.value)
        return {
            "mac": f"set {self.ifname} MAC to {shown}",
            "mtu": f"set {self.ifname} MTU to {shown}",
            "master": f"attach {self.ifname} to bridge {shown}",
            "up": f"bring {self.ifname} {'up' if self.value else 'down'}",
            "root_block": f"{'set' if self.value else 'clear'} root_block on bridge port "
                          f"{self.ifname}",
        }[self.attr]

    def as_data(self) -> dict[str, Any]:
        return {"step": f"link.{self.attr}", "ifname": self.ifname,
                "value": self.shown or self.value}

    def prepare(self, net: Host) -> Record:
        state = require_link(net, self.ifname)
        return Record(kind=self.kind, step=self.describe(), undo={
            "ifindex": state.index, "ifname": self.ifname, "attr": self.attr,
            "old": _current(state, self.attr), "new": self.value})

    def apply(self, net: Host) -> None:
        _set(net, require_link(net, self.ifname).index, self.attr, self.value)

    def verify(self, net: Host) -> str | None:
        state = net.netlink.find(self.ifname)
        if state is None:
            return f"{self.ifname} has disappeared"
        now = _current(state, self.attr)
        if now != self.value:
            return f"{self.ifname} {self.attr} is {now!r}, expected {self.value!r}"
        return None


@undoes("link.attr")
def undo_link_attr(net: Host, undo: dict[str, Any]) -> None:
    state = net.netlink.by_index(undo["ifindex"])
    if state is None:
        return  # the link is gone, and everything we set on it with it
    attr = undo["attr"]
    if attr not in ATTRS:
        raise ValueError(f"unknown link attribute {attr!r}")
    if _current(state, attr) != undo["new"]:
        return  # changed by someone else since (or no longer a bridge port): theirs now
    old = undo["old"]
    if attr == "master" and old and net.netlink.by_index(old) is None:
        old = None  # the previous master is gone: detach only
    with ignore_gone():
        _set(net, state.index, attr, old)


@checks("link.attr")
def link_attr_present(net: Host, undo: dict[str, Any]) -> bool:
    state = net.netlink.by_index(undo["ifindex"])
    return state is not None and _current(state, undo["attr"]) == undo["new"]


@dataclass(frozen=True)
class BridgeVlans:
    """VLAN entries of a port on a VLAN-filtering bridge: the untagged PVID and the
    tagged trunks, replacing whatever default entries the bridge gave the port (its
    default_pvid, VLAN 1 unless configured otherwise)."""

    ifname: str
    access: int | None
    trunks: tuple[int, ...]
    kind: str = "bridge.vlans"

    def wanted(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {vid: set() for vid in self.trunks}
        if self.access is not None:
            out[self.access] = {"pvid", "untagged"}
        return out

    def describe(self) -> str:
        parts = []
        if self.access is not None:
            parts.append(f"vid {self.access} pvid untagged")
        parts += [f"vid {vid} tagged" for vid in self.trunks]
        return f"bridge vlan on {self.ifname}: " + ", ".join(parts) + "; remove the default VLAN"

    def as_data(self) -> dict[str, Any]:
        return {"step": "bridge.vlans", "ifname": self.ifname,
                "pvid_untagged": self.access, "tagged": list(self.trunks)}

    def prepare(self, net: Host) -> Record:
        state = require_link(net, self.ifname)
        before = net.netlink.port_vlans(state.index)
        return Record(kind=self.kind, step=self.describe(), undo={
            "ifindex": state.index, "ifname": self.ifname,
            "added": sorted(self.wanted()),
            "removed": {str(vid): sorted(flags) for vid, flags in before.items()
                        if vid not in self.wanted()}})

    def apply(self, net: Host) -> None:
        state = require_link(net, self.ifname)
        wanted = self.wanted()
        for vid, flags in sorted(wanted.items()):
            net.netlink.vlan_add(state.index, vid, pvid="pvid" in flags, untagged="untagged" in flags)
        for vid in net.netlink.port_vlans(state.index):
            if vid not in wanted:
                net.netlink.vlan_del(state.index, vid)

    def verify(self, net: Host) -> str | None:
        state = net.netlink.find(self.ifname)
        if state is None:
            return f"{self.ifname} has disappeared"
        have = net.netlink.port_vlans(state.index)
        if have != self.wanted():
            return f"{self.ifname} VLANs are {have}, expected {self.wanted()}"
        return None


@undoes("bridge.vlans")
def undo_bridge_vlans(net: Host, undo: dict[str, Any]) -> None:
    state = net.netlink.by_index(undo["ifindex"])
    if state is None or state.slave_kind != "bridge":
        return  # gone, or no longer a bridge port: its VLAN entries went with it
    with ignore_gone():
        for vid in undo["added"]:
            net.netlink.vlan_del(state.index, int(vid))
        for vid, flags in undo["removed"].items():
            net.netlink.vlan_add(state.index, int(vid), pvid="pvid" in flags, untagged="untagged" in flags)


@checks("bridge.vlans")
def bridge_vlans_present(net: Host, undo: dict[str, Any]) -> bool:
    state = net.netlink.by_index(undo["ifindex"])
    if state is None or state.slave_kind != "bridge":
        return False
    return set(undo["added"]) <= set(net.netlink.port_vlans(state.index))


def describe_non_bridge(link: LinkState, net: Host) -> str:
    """Say what LINK is, so the operator knows which setting is wrong."""
    if link.slave_kind == "bond" or (link.master and _kind_of(net, link.master) == "bond"):
        return (f"LINK {link.name} is a bond member, not a bridge: cannot plug a guest into "
                "a bond slave; use the bridge on top of the bond")
    if link.slave_kind == "bridge" and link.master:
        master = net.netlink.by_index(link.master)
        return (f"LINK {link.name} is a port of bridge {master.name if master else link.master}, "
                "not a bridge")
    if link.kind == "openvswitch":
        return f"LINK {link.name} is an Open vSwitch device, not a Linux bridge: use MODE=openvswitch"
    if link.kind is None:
        return f"LINK {link.name} is a plain network interface, not a bridge"
    return f"LINK {link.name} is a {link.kind} device, not a bridge"


def _kind_of(net: Host, index: int) -> str | None:
    state = net.netlink.by_index(index)
    return state.kind if state else None


@rebuilds("link.attr")
def rebuild_link_attr(undo: dict[str, Any], nic: Any, net: Host) -> SetLink:
    """The value set at plug time; for `master`, the bridge LINK names now (a bridge
    deleted and created again has a new ifindex, and the tap belongs on the new one)."""
    attr, ifname = str(undo["attr"]), str(undo["ifname"])
    if attr not in ATTRS:
        raise ValueError(f"unknown link attribute {attr!r}")
    if attr == "master":
        link = getattr(nic, "link", None)
        bridge = net.netlink.find(link) if link else None
        if bridge is None:
            raise NetlinkError(19, f"LINK {link}: no such device")
        if bridge.kind != "bridge":
            raise PlumbingError(describe_non_bridge(bridge, net))
        return SetLink(ifname, attr, bridge.index, shown=bridge.name)
    return SetLink(ifname, attr, undo["new"])
