"""A mode added the documented way (docs/architecture.md, "Adding a mode") works
through ifup, status, verify, repair, the agent's watch list and ifdown with no change
to engine/, ops/, callers/ or cli.py: its own module (here, this file), one registry
entry (monkeypatched in) and its record kind.

The host is a fake (no root, no netlink): ifup and ifdown build their Host from the
settings, so the tests hand them this one instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nichooks import settings as settingsmod
from nichooks.engine import records as kinds
from nichooks.engine.journal import Record, State
from nichooks.engine.plan import Plan
from nichooks.engine.store import Store
from nichooks.errors import InvalidInput
from nichooks.host.netlink import LinkState
from nichooks.log import HookLog
from nichooks.model.nic import Nic
from nichooks.modes import registry
from nichooks.modes.base import Mode
from nichooks.ops import plug, unplug, verify

KIND = "test.lamp"
KEY = "3c2b1a09-8f7e-4d6c-9b5a-0f1e2d3c4b5a"
TAP = "tap7"


@dataclass
class Lamps:
    """A fake host: one tap and a row of lamps a lamp step switches on."""

    lit: dict[str, str] = field(default_factory=dict)
    settings: Any = None

    @property
    def netlink(self) -> Lamps:
        return self

    def find(self, name: str) -> LinkState | None:
        return self.by_index(9) if name == TAP else None

    def by_index(self, index: int) -> LinkState | None:
        return LinkState(index=9, name=TAP, kind="tun", slave_kind=None, mac="fe:00:00:00:00:07",
                         mtu=1500, up=True, master=None) if index == 9 else None

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


# -- the new mode: its step, its record kind, the mode ------------------------------------
@dataclass(frozen=True)
class Lamp:
    lamp: str
    colour: str
    kind: str = KIND

    def describe(self) -> str:
        return f"light lamp {self.lamp} {self.colour}"

    def as_data(self) -> dict[str, Any]:
        return {"step": KIND, "lamp": self.lamp, "colour": self.colour}

    def prepare(self, net: Lamps) -> Record:
        return Record(kind=KIND, step=self.describe(),
                      undo={"lamp": self.lamp, "old": net.lit.get(self.lamp), "new": self.colour})

    def apply(self, net: Lamps) -> None:
        net.lit[self.lamp] = self.colour

    def verify(self, net: Lamps) -> str | None:
        have = net.lit.get(self.lamp)
        return None if have == self.colour else f"lamp {self.lamp} is {have}"


def undo_lamp(net: Lamps, undo: dict[str, Any]) -> None:
    if net.lit.get(undo["lamp"]) == undo["new"]:
        net.lit.pop(undo["lamp"])


def lamp_lit(net: Lamps, undo: dict[str, Any]) -> bool:
    return net.lit.get(undo["lamp"]) == undo["new"]


def rebuild_lamp(undo: dict[str, Any], nic: Nic, net: Lamps) -> Lamp:
    return Lamp(str(undo["lamp"]), str(undo["new"]))


class Lights(Mode):
    """LINK names the lamp; VLANs mean nothing here."""

    name = "lights"
    needs_link = True
    vlans = False

    def check_link(self, link: str) -> str:
        return link

    def plan(self, nic: Nic, net: Any, settings: settingsmod.Settings) -> Plan:
        assert nic.link is not None
        return Plan(mode=self.name, nic_label=nic.label(), steps=[Lamp(nic.link, "green")])

    def watched_links(self, journal: Any) -> set[str]:
        return {f"{journal.link}-switch"}


@pytest.fixture
def lights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Lamps, settingsmod.Settings]]:
    assert KIND not in kinds.KINDS
    kinds.undoes(KIND)(undo_lamp)
    kinds.checks(KIND)(lamp_lit)
    kinds.rebuilds(KIND)(rebuild_lamp)
    monkeypatch.setitem(registry.LOADED, "lights", Lights())
    settings = settingsmod.load({"NICHOOKS_STATE_DIR": str(tmp_path / "state"),
                                 "NICHOOKS_CONF_DIR": str(tmp_path / "conf")})
    host = Lamps(settings=settings)
    for module in (plug, unplug):
        monkeypatch.setattr(module, "Host", lambda _settings: host)
    try:
        yield host, settings
    finally:
        del kinds.KINDS[KIND]


def test_a_new_mode_plugs_verifies_repairs_and_unplugs(lights: tuple[Lamps, settingsmod.Settings]) -> None:
    host, settings = lights
    with pytest.raises(InvalidInput, match="VLAN"):
        registry.nic_from_variables({"MODE": "lights", "MAC": "aa:00:00:00:00:07",
                                     "INTERFACE": TAP, "LINK": "porch", "VLAN": "5"})
    nic = registry.nic_from_variables({"MODE": "lights", "MAC": "aa:00:00:00:00:07",
                                       "INTERFACE": TAP, "INTERFACE_UUID": KEY, "LINK": "porch"})
    plug.ifup(settings, nic, env={})
    assert host.lit == {"porch": "green"}
    store = Store(settings.state_dir)
    journal = store.load(KEY)
    assert journal is not None and journal.state == State.APPLIED and journal.ifindex == 9
    assert [r.kind for r in journal.records] == [KIND]
    assert verify.drift(host, settings, journal) == []
    assert [c.present for c in verify.check_records(host, journal)] == [True]
    from nichooks.ops.agent import _depends_on

    assert _depends_on(journal) == {"porch-switch"}

    host.lit["porch"] = "red"  # someone else's change: drift, then repair from the record
    assert verify.drift(host, settings, journal) == ["missing: light lamp porch green"]
    actions = verify.repair(store, host, settings, KEY, HookLog(verbose=False))
    assert [a.what for a in actions] == ["repaired"] and host.lit == {"porch": "green"}

    warnings = unplug.ifdown(settings, KEY, TAP, env={})
    assert warnings == [] and host.lit == {}
    assert not store.exists(KEY) and store.tap_owner(TAP) is None


def test_the_registry_lists_each_mode_once(lights: tuple[Lamps, settingsmod.Settings]) -> None:
    """A sweep asks every mode for its orphans once, whether it was loaded before or not."""
    registry.find("openvswitch")
    names = [m.name for m in registry.every()]
    assert sorted(names) == sorted({*registry.PLACES, "lights"})
