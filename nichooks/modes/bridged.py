"""Linux bridge mode: what to check before touching anything, and the steps.

Order matters: the tap's MAC is moved out of the guest's range (first
octet fe, so the bridge never adopts a guest tap's MAC as its own), the MTU is
copied from the bridge before enslaving (a smaller port MTU would lower the
bridge's), the guest's nftables filter is in place before the tap joins the bridge
(host/steps/nftfilter.py), VLAN entries are set while the port is still down, and
only then is the port brought up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nichooks.engine.plan import Plan
from nichooks.engine.records import Step, rebuilds
from nichooks.errors import PlumbingError
from nichooks.host.netlink import AF_INET6, LinkState, conf_key
from nichooks.host.steps import nftfilter
from nichooks.host.steps.link import BridgeVlans, SetLink, describe_non_bridge
from nichooks.host.steps.nftfilter import NicFilter, nic_filter
from nichooks.host.steps.sysctl import Sysctl
from nichooks.model.nic import Nic
from nichooks.modes.base import Mode

if TYPE_CHECKING:
    from nichooks.engine.actions import Action
    from nichooks.engine.journal import Journal
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog
    from nichooks.settings import Settings


def preflight(nic: Nic, net: Host) -> tuple[LinkState, LinkState]:
    """Check everything that can be checked before a change; return (bridge, tap)."""
    assert nic.link is not None  # nic.py requires LINK in bridged mode
    bridge = net.netlink.find(nic.link)
    if bridge is None:
        raise PlumbingError(f"LINK {nic.link}: no such device", nic=nic.label(), step="preflight")
    if bridge.kind != "bridge":
        raise PlumbingError(describe_non_bridge(bridge, net), nic=nic.label(), step="preflight")
    tap = net.netlink.find(nic.tap)
    if tap is None:
        raise PlumbingError(f"tap {nic.tap} does not exist", nic=nic.label(), step="preflight")
    reason = tap.not_a_tap() or (f"{nic.tap} is the bridge itself, not a guest tap"
                                  if tap.index == bridge.index else None)
    if reason:
        raise PlumbingError(reason, nic=nic.label(), step="preflight")
    if nic.vlan is not None and not net.netlink.bridge_vlan_filtering(bridge):
        raise PlumbingError(
            f"VLAN {nic.vlan.canonical()} requested but bridge {bridge.name} cannot filter VLANs "
            f"(vlan_filtering is off; enable it with 'ip link set {bridge.name} type bridge "
            "vlan_filtering 1' where the kernel supports it, or clear the NIC's VLAN)",
            nic=nic.label(), step="preflight")
    return bridge, tap


def plan(nic: Nic, net: Host) -> Plan:
    bridge, tap = preflight(nic, net)
    guard = nic_filter(nic, "bridge", net)  # a malformed nichooks: tag stops us here
    steps: list[Step] = [
        SetLink(nic.tap, "mac", "fe" + tap.mac[2:]),
        SetLink(nic.tap, "mtu", bridge.mtu),
        # the host must not autoconfigure (nor answer DAD) on a guest's port
        Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "disable_ipv6"), "1"),
    ]
    notes = []
    if guard is None:
        notes.append("no anti-spoofing filter (NICHOOKS_ANTISPOOF=off or tag "
                     "nichooks:antispoof:off)")
    else:
        steps.append(NicFilter(guard))  # before the tap joins the bridge
    steps.append(SetLink(nic.tap, "master", bridge.index, shown=bridge.name))
    if guard is not None:
        # With STP on, the bridge takes BPDUs before any netfilter hook: root_block keeps
        # a guest's superior BPDU from making its port the root port.
        steps.append(SetLink(nic.tap, "root_block", True))
    if nic.vlan is not None:
        steps.append(BridgeVlans(nic.tap, nic.vlan.access, nic.vlan.trunks))
    steps.append(SetLink(nic.tap, "up", True))
    return Plan(mode="bridged", nic_label=nic.label(), steps=steps, notes=notes)


class Bridged(Mode):
    name = "bridged"
    needs_link = True

    def link(self, link: str | None, bridge: str | None) -> str | None:
        return super().link(link or bridge, None)  # Ganeti 2.4 exported BRIDGE before LINK

    def plan(self, nic: Nic, net: Host, settings: Settings) -> Plan:
        return plan(nic, net)

    def watched_links(self, journal: Journal) -> set[str]:
        return {journal.link} if journal.link else set()

    def audit(self, journals: list[Journal], net: Host, settings: Settings) -> set[str]:
        return nftfilter.audit(journals, net, "bridge")

    def orphans(self, store: Store, net: Host, settings: Settings, *, dry_run: bool,
                log: HookLog) -> list[Action]:
        return nftfilter.sweep(store, net, settings, "bridge", dry_run=dry_run, log=log)


@rebuilds("bridge.vlans")
def rebuild_bridge_vlans(undo: dict[str, Any], nic: Nic, net: Host) -> BridgeVlans | None:
    if nic.vlan is None:
        return None
    return BridgeVlans(str(undo["ifname"]), nic.vlan.access, nic.vlan.trunks)


MODE = Bridged()
