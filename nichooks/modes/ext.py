"""Ganeti 3.2's `ext` mode: the administrator's scripts do all the work."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nichooks.engine.plan import Plan
from nichooks.model import validate
from nichooks.modes.base import Mode

if TYPE_CHECKING:
    from nichooks.host.host import Host
    from nichooks.model.nic import Nic
    from nichooks.settings import Settings


class Ext(Mode):
    name = "ext"

    def check_link(self, link: str) -> str:
        """LINK means something only to the administrator's scripts: free text."""
        return validate.free_text("LINK", link)

    def plan(self, nic: Nic, net: Host, settings: Settings) -> Plan:
        return Plan(mode=self.name, nic_label=nic.label(),
                    notes=["ext mode: only the custom scripts run"])


MODE = Ext()
