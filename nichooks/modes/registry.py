"""Mode name -> Mode, and the one way to build a NIC whose LINK and VLAN its mode has
checked. A new mode is one line in PLACES.

Modes are imported when first asked for: a hook plugging a bridged NIC does not pay
for the OVS and routed modules (their drivers pull in hashlib, subprocess and more).
Whoever meets a record kind (an undo, a sweep, the agent) gets it registered through
engine.records' loader, which this module installs: it imports the module that
registers that kind (KIND_PLACES), or every mode for a kind it does not name.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from nichooks.engine import records
from nichooks.errors import InvalidInput, PlumbingError
from nichooks.model.nic import Nic, from_variables
from nichooks.modes.base import Mode

# name -> the module whose MODE it is, in the order error messages list them
PLACES = {
    "bridged": "nichooks.modes.bridged",
    "openvswitch": "nichooks.modes.openvswitch",
    "routed": "nichooks.modes.routed",
    "ext": "nichooks.modes.ext",
}
LOADED: dict[str, Mode] = {}  # imported so far (tests may add a mode of their own)
# record kind -> the module whose import registers its undo, check and rebuild: an
# undo imports only what its journal's records need (a bridged ifdown, no OVS driver)
KIND_PLACES = {
    "link.attr": "nichooks.host.steps.link",
    "bridge.vlans": "nichooks.modes.bridged",
    "sysctl.dev": "nichooks.host.steps.sysctl",
    "sysctl.shared": "nichooks.host.steps.sysctl",
    "route.rule": "nichooks.host.steps.routing",
    "route.host": "nichooks.host.steps.routing",
    "route.proxy": "nichooks.host.steps.routing",
    "ovs.port": "nichooks.modes.openvswitch",
    "ovs.flows": "nichooks.modes.openvswitch",
    "nft.filter": "nichooks.host.steps.nftfilter",
}


def find(name: str) -> Mode | None:
    """The mode called `name`, imported on first use; None if there is none."""
    mode = LOADED.get(name)
    if mode is None and name in PLACES:
        mode = importlib.import_module(PLACES[name]).MODE
        LOADED[name] = mode
    return mode


def get(name: str) -> Mode:
    """The mode a NIC or a journal names; a journal of a mode this version does not
    know cannot be planned, announced or audited, only undone by its records."""
    mode = find(name)
    if mode is None:
        raise PlumbingError(f"MODE={name} is not supported by this version of nichooks",
                            step="preflight")
    return mode


def every() -> list[Mode]:
    """Every mode, all imported (and so every record kind registered)."""
    names = dict.fromkeys([*PLACES, *LOADED])  # each once: loaded modes are in both
    return [m for m in (find(name) for name in names) if m is not None]


def load_all() -> None:
    every()


def load_kind(kind: str) -> None:
    """Import what registers `kind`; every mode for a kind this table does not name."""
    place = KIND_PLACES.get(kind)
    if place is None:
        load_all()
    else:
        importlib.import_module(place)


records.set_loader(load_kind)


def nic_from_variables(env: Mapping[str, str], *, tap: str | None = None) -> Nic:
    """The NIC from Ganeti's variables, with its mode's LINK and VLAN rules applied."""
    raw = env.get("MODE") or ""
    if not raw:
        raise InvalidInput("MODE", "is not set (one of: " + ", ".join(PLACES) + ")")
    mode = find(raw)
    if mode is None:
        raise InvalidInput("MODE", f"{raw!r} is not one of: " + ", ".join(PLACES))
    return from_variables(env, tap=tap, rules=mode)
