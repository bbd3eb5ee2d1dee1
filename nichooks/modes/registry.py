"""Mode name -> Mode, and the one way to build a NIC whose LINK and VLAN its mode
has checked. Importing this module imports every mode, and so registers every
record kind (engine/records.py) a journal can hold: a new mode is added here.
"""

from __future__ import annotations

from collections.abc import Mapping

from nichooks.errors import InvalidInput, PlumbingError
from nichooks.model.nic import Nic, from_variables
from nichooks.modes.base import Mode
from nichooks.modes.bridged import Bridged
from nichooks.modes.ext import Ext
from nichooks.modes.openvswitch import OpenVswitch
from nichooks.modes.routed import Routed

MODES: dict[str, Mode] = {m.name: m for m in (Bridged(), OpenVswitch(), Routed(), Ext())}


def get(name: str) -> Mode:
    """The mode a journal or a NIC names; a journal of a mode this version does not
    know cannot be planned, announced or audited, only undone by its records."""
    mode = MODES.get(name)
    if mode is None:
        raise PlumbingError(f"MODE={name} is not supported by this version of nichooks",
                            step="preflight")
    return mode


def nic_from_variables(env: Mapping[str, str], *, tap: str | None = None) -> Nic:
    """The NIC from Ganeti's variables, with its mode's LINK and VLAN rules applied."""
    raw = env.get("MODE") or ""
    if not raw:
        raise InvalidInput("MODE", "is not set (one of: " + ", ".join(MODES) + ")")
    if raw not in MODES:
        raise InvalidInput("MODE", f"{raw!r} is not one of: " + ", ".join(MODES))
    return from_variables(env, tap=tap, rules=MODES[raw])
