"""Rules an Open vSwitch plug and the sweep of its leftovers must agree on."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nichooks.host import ovsdb as db
    from nichooks.settings import Settings


def flows_withheld(settings: Settings, bridge: db.BridgeInfo) -> str | None:
    """Why a plug adds no anti-spoofing flows on this bridge, or None if it adds them.
    One rule for both sides: the sweep deletes flows only where a plug adds them, so
    a flow on any other bridge is someone else's whatever its cookie says."""
    if settings.antispoof == "off":
        return "anti-spoofing flows are off (NICHOOKS_ANTISPOOF=off)"
    managed = bridge.controller_managed
    if managed:
        return f"no anti-spoofing flows: {managed}; filtering is left to the controller"
    return None


def ovs_present(settings: Settings) -> bool:
    """Whether this host runs an OVSDB we can reach (no socket: nothing to look at)."""
    import os

    kind, _, where = settings.ovsdb.partition(":")
    return kind != "unix" or os.path.exists(where)
