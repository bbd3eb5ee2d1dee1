"""The Mode interface: everything the engine, the operations and the agent need to
know about one way of plugging a NIC, in one place per mode.

A mode reads the NIC's LINK and VLAN, plans the plug, does what comes after the
read-back, and tells the agent and the sweep what to look at. Records it writes are
undone, checked and rebuilt through engine/records.py, by kind. Everything here has a
default that means "nothing to do", so a mode implements only what it has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.model import validate
from nichooks.model.nic import Nic

if TYPE_CHECKING:
    from nichooks.engine.actions import Action
    from nichooks.engine.journal import Journal
    from nichooks.engine.plan import Plan
    from nichooks.engine.records import Step
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog
    from nichooks.settings import Settings


class Mode:
    name: ClassVar[str]
    needs_link: ClassVar[bool] = False  # LINK names what to plug into
    vlans: ClassVar[bool] = True        # VLAN means something in this mode

    # -- the NIC (model.nic.LinkRules) --------------------------------------------------
    def link(self, link: str | None, bridge: str | None) -> str | None:
        """LINK as this mode reads it; required where the mode plugs into something."""
        if link is None:
            if self.needs_link:
                raise InvalidInput("LINK", f"is not set; {self.name} mode needs the bridge "
                                   "to plug into")
            return None
        return self.check_link(link)

    def check_link(self, link: str) -> str:
        """LINK, normalised (by default: the name of a device to plug into)."""
        return validate.ifname("LINK", link)

    # -- the plug -----------------------------------------------------------------------
    def plan(self, nic: Nic, net: Host, settings: Settings) -> Plan:
        """Preflight and plan; raises before anything is changed."""
        raise NotImplementedError

    def after_verify(self, plan: Plan, settings: Settings, log: HookLog) -> None:
        """What follows once every step is applied and read back, before the scripts run
        and the journal is committed; best effort (routed: the announcements, as early
        as possible: until they go out, a migrated guest is unreachable)."""

    def held_back(self, journal: Journal, settings: Settings) -> list[Step]:
        """`nichooks announce`: the steps a plug on a migration target held back until
        switchover (routed: the uplink proxy entries)."""
        raise PlumbingError("not a routed NIC journaled by nichooks", nic=journal.tap,
                            step="announce")

    def after_switchover(self, journal: Journal, settings: Settings, log: HookLog) -> None:
        """What follows the held-back steps (routed: announce every address)."""

    # -- the agent and the sweep --------------------------------------------------------
    def watched_links(self, journal: Journal) -> set[str]:
        """Devices other than the tap whose re-creation or up event calls for a repair."""
        return set()

    def audit(self, journals: list[Journal], net: Host, settings: Settings) -> set[str]:
        """Keys of the journals (all of this mode, `applied`) whose plumbing is missing,
        by one cheap bulk read; the agent repairs those."""
        return set()

    def orphans(self, store: Store, net: Host, settings: Settings, *, dry_run: bool,
                log: HookLog) -> list[Action]:
        """Find (and unless dry_run, delete) what a plug of this mode left behind that no
        journal claims."""
        return []
