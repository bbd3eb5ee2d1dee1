"""Open vSwitch mode: preflight, the steps, and their undo.

Order (DESIGN §3): the tap's MAC is moved out of the guest's range and its MTU set
while it is down; then ONE OVSDB transaction drops any stale port of the same name
and creates the Port and Interface with tag / trunks / vlan_mode, mtu_request and
the OVN/libvirt external_ids, so the port never exists untagged (OpenNebula #1177);
then the anti-spoofing flows, in one OpenFlow bundle, before the tap comes up; and
only then the tap goes up. ifdown deletes the flows by cookie and the port only
while it is still ours.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.plan import Plan, Step, checks, undoes
from nichooks.errors import PlumbingError
from nichooks.host import ovsdb as db
from nichooks.host.openflow import Guest, antispoof_flows, cookie
from nichooks.host.steps.link import SetLink
from nichooks.model.nic import Nic

if TYPE_CHECKING:
    from nichooks.host.host import Host
    from nichooks.settings import Settings


def _fail(nic: Nic, message: str) -> PlumbingError:
    return PlumbingError(message, nic=nic.label(), step="preflight")


def _describe_non_ovs(net: Host, nic: Nic, link: str) -> str:
    """Say what LINK is when it is not an OVS bridge, so the fix is obvious."""
    ovsdb = net.ovsdb()
    port = ovsdb.port(link)
    if port is not None:
        return f"LINK {link} is a port of an Open vSwitch bridge, not a bridge"
    state = net.find(link)
    if state is None:
        return f"LINK {link}: no such Open vSwitch bridge (and no such device)"
    if state.kind == "bridge":
        return f"LINK {link} is a Linux bridge, not an Open vSwitch bridge: use MODE=bridged"
    return (f"LINK {link} is a {state.kind or 'plain network'} device, not an Open vSwitch "
            "bridge")


def guest_addresses(nic: Nic) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(IPv4, IPv6) the guest may send from: IP, and the EUI-64 address of the MAC in
    NETWORK_SUBNET6 when that is a /64 (what SLAAC gives a guest without privacy
    addresses)."""
    from nichooks.modes.routed import eui64

    v4: list[str] = []
    v6: list[str] = []
    if nic.ip is not None:
        (v4 if nic.ip.version == 4 else v6).append(str(nic.ip))
    subnet6 = nic.network.subnet6
    if subnet6 and ipaddress.IPv6Network(subnet6, strict=False).prefixlen == 64:
        derived = eui64(subnet6, nic.mac)
        if derived not in v6:
            v6.append(derived)
    return tuple(v4), tuple(v6)


@dataclass(frozen=True)
class OvsPort:
    """The port, its interface, VLANs, MTU and ids: one transaction."""

    spec: db.PortSpec
    owner: str
    kind: str = "ovs.port"

    def describe(self) -> str:
        vlan = []
        if self.spec.tag is not None:
            vlan.append(f"tag={self.spec.tag}")
        if self.spec.trunks:
            vlan.append("trunks=" + ",".join(map(str, self.spec.trunks)))
        if self.spec.vlan_mode:
            vlan.append(f"vlan_mode={self.spec.vlan_mode}")
        extra = (" " + " ".join(vlan)) if vlan else " (no VLAN: tagged frames from the guest dropped)"
        return f"add OVS port {self.spec.name} to {self.spec.bridge}{extra} in one transaction"

    def as_data(self) -> dict[str, Any]:
        return {"step": "ovs.port", "bridge": self.spec.bridge, "port": self.spec.name,
                "tag": self.spec.tag, "trunks": list(self.spec.trunks),
                "vlan_mode": self.spec.vlan_mode, "mtu_request": self.spec.mtu_request,
                "external_ids": self.spec.iface_external_ids}

    def prepare(self, net: Host) -> Record:
        return Record(kind=self.kind, step=self.describe(), undo={
            "bridge": self.spec.bridge, "port": self.spec.name, "owner": self.owner,
            "iface_id": self.spec.iface_external_ids.get(db.IFACE_ID)})

    def apply(self, net: Host) -> dict[str, Any]:
        timing = net.ovsdb().plug(self.spec)
        if timing.applied is None:
            raise db.OvsdbError(f"ovs-vswitchd did not apply the new port within "
                                f"{net.settings.ovs_timeout:g}s (is ovs-vswitchd running?)")
        return {"committed_ms": round(timing.committed * 1000, 1),
                "applied_ms": round(timing.applied * 1000, 1)}

    def verify(self, net: Host) -> str | None:
        port = net.ovsdb().port(self.spec.name)
        if port is None:
            return f"OVS port {self.spec.name} is missing"
        if port.error:
            return f"ovs-vswitchd could not attach {self.spec.name}: {port.error}"
        if not port.ofport or port.ofport < 0:
            return f"OVS port {self.spec.name} has no OpenFlow port number"
        want = (self.spec.tag, self.spec.trunks, self.spec.vlan_mode)
        have = (port.tag, port.trunks, port.vlan_mode)
        if want != have:
            return f"OVS port {self.spec.name} VLANs (tag, trunks, mode) are {have}, expected {want}"
        if port.iface_external_ids.get(db.IFACE_ID) != self.spec.iface_external_ids.get(db.IFACE_ID):
            return f"OVS interface {self.spec.name} iface-id changed under us"
        return None


def _ours(port: db.PortInfo | None, undo: dict[str, Any]) -> bool:
    return (port is not None and port.external_ids.get(db.OWNER) == undo["owner"]
            and port.iface_external_ids.get(db.IFACE_ID) == undo.get("iface_id"))


@undoes("ovs.port")
def undo_ovs_port(net: Host, undo: dict[str, Any]) -> None:
    ovsdb = net.ovsdb()
    if _ours(ovsdb.port(undo["port"]), undo):  # a port someone re-created is theirs
        ovsdb.unplug(undo["port"], undo["owner"])


@checks("ovs.port")
def ovs_port_present(net: Host, undo: dict[str, Any]) -> bool:
    return _ours(net.ovsdb().port(undo["port"]), undo)


_IN_PORT = re.compile(r"\bin_port=(\d+)")


@dataclass(frozen=True)
class OvsFlows:
    """Anti-spoofing flows on the port, by cookie, in one bundle. The OpenFlow port
    number is read when the step runs: it exists only once the port is applied."""

    bridge: str
    port: str
    cookie: int
    mac: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]
    trunks: tuple[int, ...]
    mode: str
    kind: str = "ovs.flows"

    def guest(self, ofport: int) -> Guest:
        return Guest(ofport=ofport, mac=self.mac, ipv4=self.ipv4, ipv6=self.ipv6,
                     trunks=self.trunks, mode=self.mode)

    def describe(self) -> str:
        what = "MAC" if self.mode == "mac" or not (self.ipv4 or self.ipv6) else "MAC and IP"
        addrs = ", ".join((self.mac, *self.ipv4, *self.ipv6)) if what != "MAC" else self.mac
        return (f"anti-spoofing flows ({what}: {addrs}) on {self.port} in {self.bridge}, "
                f"cookie 0x{self.cookie:016x}")

    def as_data(self) -> dict[str, Any]:
        return {"step": "ovs.flows", "bridge": self.bridge, "port": self.port,
                "cookie": f"0x{self.cookie:016x}", "mac": self.mac, "ipv4": list(self.ipv4),
                "ipv6": list(self.ipv6), "tagged_allowed": list(self.trunks), "mode": self.mode}

    def prepare(self, net: Host) -> Record:
        return Record(kind=self.kind, step=self.describe(),
                      undo={"bridge": self.bridge, "cookie": self.cookie})

    def _ofport(self, net: Host) -> int:
        port = net.ovsdb().port(self.port)
        if port is None or not port.ofport or port.ofport < 0:
            raise db.OvsdbError(f"OVS port {self.port} has no OpenFlow port number")
        return int(port.ofport)

    def apply(self, net: Host) -> dict[str, Any]:
        ofport = self._ofport(net)
        flows = antispoof_flows(self.guest(ofport))
        net.openflow().add(self.bridge, self.cookie, flows, ofport)
        return {"flows": len(flows)}

    def verify(self, net: Host) -> str | None:
        ofport = self._ofport(net)
        want = len(antispoof_flows(self.guest(ofport)))
        have = net.openflow().dump(self.bridge, self.cookie)
        if len(have) != want:
            return f"{len(have)} flows with cookie 0x{self.cookie:016x} on {self.bridge}, expected {want}"
        stale = [flow for flow in have if _IN_PORT.findall(flow) != [str(ofport)]]
        if stale:
            # ovs-vswitchd renumbered the port (a restart): the flows guard another port.
            return f"{len(stale)} flows with cookie 0x{self.cookie:016x} match another port than {ofport}"
        return None


@undoes("ovs.flows")
def undo_ovs_flows(net: Host, undo: dict[str, Any]) -> None:
    openflow = net.openflow()
    if not openflow.exists(undo["bridge"]):
        return  # the bridge is gone, and its flows with it
    openflow.delete(undo["bridge"], int(undo["cookie"]))


@checks("ovs.flows")
def ovs_flows_present(net: Host, undo: dict[str, Any]) -> bool:
    openflow = net.openflow()
    return openflow.exists(undo["bridge"]) and bool(
        openflow.dump(undo["bridge"], int(undo["cookie"])))


def flows_withheld(settings: Settings, bridge: db.BridgeInfo) -> str | None:
    """Why a plug adds no anti-spoofing flows on this bridge, or None if it adds them.
    One rule for both sides: the sweep deletes flows only where a plug adds them, so
    a flow on any other bridge is someone else's whatever its cookie says."""
    if settings.ovs_antispoof == "off":
        return "anti-spoofing flows are off (NICHOOKS_OVS_ANTISPOOF=off)"
    managed = bridge.controller_managed
    if managed:
        return f"no anti-spoofing flows: {managed}; filtering is left to the controller"
    return None


def plan(nic: Nic, net: Host, settings: Settings) -> Plan:
    assert nic.link is not None  # nic.py requires LINK in openvswitch mode
    label = nic.label()
    try:
        ovsdb = net.ovsdb()
        ovsdb.watch({nic.tap, nic.link}, {nic.link})
        bridge = ovsdb.bridge(nic.link)
        if bridge is None:
            raise _fail(nic, _describe_non_ovs(net, nic, nic.link))
    except PlumbingError:
        raise
    except Exception as exc:  # OvsdbError, or the ovs library refusing (an older schema)
        raise PlumbingError(str(exc) or type(exc).__name__, nic=label, step="preflight") from None
    tap = net.find(nic.tap)
    if tap is None:
        raise _fail(nic, f"tap {nic.tap} does not exist")
    reason = tap.not_a_tap() or (f"{nic.tap} is the bridge itself, not a guest tap"
                                  if nic.tap == nic.link else None)
    if reason:
        raise _fail(nic, reason)
    mtu = settings.ovs_mtu or bridge.mtu or tap.mtu
    vlan = nic.vlan
    tag = vlan.access if vlan else None
    trunks = vlan.trunks if vlan else ()
    spec = db.PortSpec(
        bridge=nic.link, name=nic.tap, tag=tag, trunks=trunks,
        vlan_mode=vlan.ovs_vlan_mode if vlan else None, mtu_request=mtu,
        iface_external_ids={db.IFACE_ID: nic.uuid, db.ATTACHED_MAC: nic.mac,
                            db.VM_ID: nic.instance, db.IFACE_STATUS: "active",
                            db.OWNER: nic.key},
        port_external_ids={db.OWNER: nic.key})
    steps: list[Step] = [
        SetLink(nic.tap, "mac", "fe" + tap.mac[2:]),
        SetLink(nic.tap, "mtu", mtu),
        OvsPort(spec, owner=nic.key),
    ]
    notes: list[str] = []
    withheld = flows_withheld(settings, bridge)
    if withheld:
        notes.append(withheld)
    else:
        v4, v6 = guest_addresses(nic)
        steps.append(OvsFlows(bridge=nic.link, port=nic.tap, cookie=cookie(nic.key),
                              mac=nic.mac, ipv4=v4, ipv6=v6, trunks=trunks,
                              mode=settings.ovs_antispoof))
    steps.append(SetLink(nic.tap, "up", True))
    return Plan(mode="openvswitch", nic_label=label, steps=steps, notes=notes)
