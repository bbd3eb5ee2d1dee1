"""Open vSwitch mode: preflight, the plan, repair's rebuild, the agent's audit.

Order: the tap's MAC is moved out of the guest's range and its MTU set
while it is down; then ONE OVSDB transaction drops any stale port of the same name
and creates the Port and Interface with tag / trunks / vlan_mode, mtu_request and
the OVN/libvirt external_ids, so the port never exists untagged (OpenNebula #1177);
then the anti-spoofing flows, in one OpenFlow bundle, before the tap comes up; and
only then the tap goes up. The steps are in host/steps/ovs.py; what a plug left
that no journal claims is found by modes/ovs_orphans.py.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Status
from nichooks.engine.plan import Plan
from nichooks.engine.records import Step, rebuilds
from nichooks.errors import PlumbingError
from nichooks.host import ovsdb as db
from nichooks.host.openflow import cookie
from nichooks.host.ovsdb_view import owned_ports
from nichooks.host.steps.link import SetLink
from nichooks.host.steps.ovs import OvsFlows, OvsPort
from nichooks.model.addresses import LINK_LOCAL, eui64
from nichooks.model.nic import Nic
from nichooks.model.policy import filter_policy
from nichooks.modes.base import Mode
from nichooks.modes.ovs_policy import flows_withheld, ovs_present

if TYPE_CHECKING:
    from nichooks.engine.actions import Action
    from nichooks.engine.journal import Journal
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog
    from nichooks.settings import Settings


def _fail(nic: Nic, message: str) -> PlumbingError:
    return PlumbingError(message, nic=nic.label(), step="preflight")


def _describe_non_ovs(net: Host, nic: Nic, link: str) -> str:
    """Say what LINK is when it is not an OVS bridge, so the fix is obvious."""
    ovsdb = net.ovsdb()
    port = ovsdb.port(link)
    if port is not None:
        return f"LINK {link} is a port of an Open vSwitch bridge, not a bridge"
    state = net.netlink.find(link)
    if state is None:
        return f"LINK {link}: no such Open vSwitch bridge (and no such device)"
    if state.kind == "bridge":
        return f"LINK {link} is a Linux bridge, not an Open vSwitch bridge: use MODE=bridged"
    return (f"LINK {link} is a {state.kind or 'plain network'} device, not an Open vSwitch "
            "bridge")


def port_spec(nic: Nic, bridge: str, mtu: int | None) -> db.PortSpec:
    """The Port and Interface one transaction creates: VLANs, MTU, OVN/libvirt ids, our mark."""
    vlan = nic.vlan
    return db.PortSpec(
        bridge=bridge, name=nic.tap, tag=vlan.access if vlan else None,
        trunks=vlan.trunks if vlan else (), vlan_mode=vlan.ovs_vlan_mode if vlan else None,
        mtu_request=mtu,
        iface_external_ids={db.IFACE_ID: nic.uuid, db.ATTACHED_MAC: nic.mac,
                            db.VM_ID: nic.instance, db.IFACE_STATUS: "active",
                            db.OWNER: nic.key},
        port_external_ids={db.OWNER: nic.key})


def flows(nic: Nic, bridge: str, settings: Settings) -> OvsFlows | None:
    """The NIC's anti-spoofing flows under the host's setting and its instance tags
    (model/policy.py), or None when a tag turns them off for this instance."""
    policy = filter_policy(nic, settings.antispoof)
    if policy.level == "off":
        return None
    link_local = eui64(LINK_LOCAL, nic.mac)  # the flows add it themselves
    return OvsFlows(bridge=bridge, port=nic.tap, cookie=cookie(nic.key), mac=nic.mac,
                    ipv4=policy.ipv4, ipv6=tuple(a for a in policy.ipv6 if a != link_local),
                    trunks=nic.vlan.trunks if nic.vlan else (), mode=policy.level)


def plan(nic: Nic, net: Host, settings: Settings) -> Plan:
    assert nic.link is not None  # the mode requires LINK
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
    tap = net.netlink.find(nic.tap)
    if tap is None:
        raise _fail(nic, f"tap {nic.tap} does not exist")
    reason = tap.not_a_tap() or (f"{nic.tap} is the bridge itself, not a guest tap"
                                  if nic.tap == nic.link else None)
    if reason:
        raise _fail(nic, reason)
    mtu = settings.ovs_mtu or bridge.mtu or tap.mtu
    steps: list[Step] = [
        SetLink(nic.tap, "mac", "fe" + tap.mac[2:]),
        SetLink(nic.tap, "mtu", mtu),
        OvsPort(port_spec(nic, nic.link, mtu), owner=nic.key),
    ]
    notes: list[str] = []
    withheld = flows_withheld(settings, bridge)
    wanted = flows(nic, nic.link, settings)
    if withheld:
        notes.append(withheld)
    elif wanted is None:
        notes.append("anti-spoofing flows are off for this instance (tag nichooks:antispoof:off)")
    else:
        steps.append(wanted)
    steps.append(SetLink(nic.tap, "up", True))
    return Plan(mode="openvswitch", nic_label=label, steps=steps, notes=notes)


@rebuilds("ovs.port")
def rebuild_port(undo: dict[str, Any], nic: Nic, net: Host) -> OvsPort:
    bridge = str(undo["bridge"])
    info = net.ovsdb().bridge(bridge)
    tap = net.netlink.find(nic.tap)
    mtu = net.settings.ovs_mtu or (info.mtu if info else None) or (tap.mtu if tap else None)
    return OvsPort(port_spec(nic, bridge, mtu), owner=str(undo["owner"]))


@rebuilds("ovs.flows")
def rebuild_flows(undo: dict[str, Any], nic: Nic, net: Host) -> OvsFlows | None:
    bridge = net.ovsdb().bridge(str(undo["bridge"]))
    if net.settings.antispoof == "off" or (
            bridge is not None and flows_withheld(net.settings, bridge) is not None):
        return None  # the plug's own rule: no flows where a controller filters
    step = flows(nic, str(undo["bridge"]), net.settings)
    return step if step is not None and step.cookie == int(undo["cookie"]) else None


class OpenVswitch(Mode):
    name = "openvswitch"
    needs_link = True

    def plan(self, nic: Nic, net: Host, settings: Settings) -> Plan:
        return plan(nic, net, settings)

    def watched_links(self, journal: Journal) -> set[str]:
        return {journal.link} if journal.link else set()

    def audit(self, journals: list[Journal], net: Host, settings: Settings) -> set[str]:
        """Every journaled port still there with our mark, and our flows on it: one
        OVSDB select and one flow dump per bridge, however many NICs there are."""
        if not ovs_present(settings):
            return set()
        deadline = time.monotonic() + settings.ovs_timeout
        ports = {(name, owner) for name, owner, _u in owned_ports(settings.ovsdb, deadline)}
        openflow = net.openflow()
        cookies: dict[str, set[int]] = {}
        for bridge in {str(r.undo.get("bridge")) for j in journals for r in j.records
                       if r.kind == "ovs.flows"}:
            cookies[bridge] = openflow.cookies(bridge) if openflow.exists(bridge) else set()
        return {j.key for j in journals if _missing(j, ports, cookies)}

    def orphans(self, store: Store, net: Host, settings: Settings, *, dry_run: bool,
                log: HookLog) -> list[Action]:
        from nichooks.modes.ovs_orphans import sweep_ovs

        return sweep_ovs(store, net, settings, dry_run=dry_run, log=log)


def _missing(journal: Journal, ports: set[tuple[str, str]], cookies: dict[str, set[int]]) -> bool:
    for record in journal.records:
        if record.status == Status.FAILED:
            continue
        undo = record.undo
        if record.kind == "ovs.port" and (undo.get("port"), undo.get("owner")) not in ports:
            return True
        if record.kind == "ovs.flows" and undo.get("cookie") not in cookies.get(
                str(undo.get("bridge")), set()):
            return True
    return False


MODE = OpenVswitch()
