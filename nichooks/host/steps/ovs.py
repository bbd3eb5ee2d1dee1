"""Open vSwitch mode's steps: the port (one OVSDB transaction) and the anti-spoofing
flows (one OpenFlow bundle), with their undo and check.

ifdown deletes the flows by cookie and the port only while it is still ours (our
owner mark and the NIC's iface-id): a port someone re-created is theirs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.records import checks, undoes
from nichooks.host import ovsdb as db
from nichooks.host.openflow import Guest, antispoof_flows

if TYPE_CHECKING:
    from nichooks.host.host import Host


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
