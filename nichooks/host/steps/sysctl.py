"""Routed mode's sysctls: per device (the tap's, undone on ifdown while still ours)
and shared (forwarding, the uplink's proxy_arp/proxy_ndp: journaled so `status` can
show them, never undone, set only with NICHOOKS_MANAGE_SYSCTLS), with their undo,
check and rebuild."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.records import checks, rebuilds, undoes
from nichooks.errors import PlumbingError
from nichooks.host.netlink import sysctl_name, sysctl_read, sysctl_write
from nichooks.host.steps.link import require_link

if TYPE_CHECKING:
    from nichooks.host.host import Host


@dataclass(frozen=True)
class Sysctl:
    """A per-device sysctl on the tap: the previous value is restored on undo while the
    device is the same one (same ifindex) and still holds our value."""

    dev: str
    key: str
    value: str
    kind: str = "sysctl.dev"

    def describe(self) -> str:
        return f"sysctl {sysctl_name(self.key)}={self.value}"

    def as_data(self) -> dict[str, Any]:
        return {"step": "sysctl", "key": sysctl_name(self.key), "value": self.value}

    def prepare(self, net: Host) -> Record:
        state = require_link(net, self.dev)
        return Record(kind=self.kind, step=self.describe(), undo={
            "ifindex": state.index, "dev": self.dev, "key": self.key,
            "old": sysctl_read(self.key), "new": self.value})

    def apply(self, net: Host) -> None:
        sysctl_write(self.key, self.value)

    def verify(self, net: Host) -> str | None:
        now = sysctl_read(self.key)
        return None if now == self.value else f"{sysctl_name(self.key)} is {now}, expected {self.value}"


@undoes("sysctl.dev")
def undo_sysctl(net: Host, undo: dict[str, Any]) -> None:
    state = net.netlink.by_index(undo["ifindex"])
    if state is None or state.name != undo["dev"] or undo["old"] is None:
        return  # the device is gone, and its sysctls with it
    if sysctl_read(undo["key"]) == undo["new"]:
        try:
            sysctl_write(undo["key"], undo["old"])
        except FileNotFoundError:
            pass


@checks("sysctl.dev")
def sysctl_present(net: Host, undo: dict[str, Any]) -> bool:
    state = net.netlink.by_index(undo["ifindex"])
    return state is not None and sysctl_read(undo["key"]) == undo["new"]


@dataclass(frozen=True)
class SharedSysctl:
    """A global or uplink sysctl the operator allowed us to set. Other NICs rely on it,
    so it is never undone; it is journaled so `status` can show it."""

    key: str
    value: str
    kind: str = "sysctl.shared"
    # False when rebuilt for repair with NICHOOKS_MANAGE_SYSCTLS off: a host-wide value
    # someone reset is then the operator's to set again, and repair says which.
    may_set: bool = True

    def describe(self) -> str:
        return f"sysctl {sysctl_name(self.key)}={self.value} (shared, kept on ifdown)"

    def as_data(self) -> dict[str, Any]:
        return {"step": "sysctl.shared", "key": sysctl_name(self.key), "value": self.value}

    def prepare(self, net: Host) -> Record:
        return Record(kind=self.kind, step=self.describe(), undo={
            "key": self.key, "old": sysctl_read(self.key), "new": self.value})

    def apply(self, net: Host) -> None:
        if not self.may_set:
            raise PlumbingError(f"routed mode needs: sysctl -w {sysctl_name(self.key)}="
                                f"{self.value} (or set NICHOOKS_MANAGE_SYSCTLS=yes to let "
                                "nichooks set it)")
        sysctl_write(self.key, self.value)

    def verify(self, net: Host) -> str | None:
        now = sysctl_read(self.key)
        return None if now == self.value else f"{sysctl_name(self.key)} is {now}, expected {self.value}"


@undoes("sysctl.shared")
def undo_shared_sysctl(net: Host, undo: dict[str, Any]) -> None:
    """Deliberately nothing: shared by every routed NIC on the host."""


@checks("sysctl.shared")
def shared_sysctl_present(net: Host, undo: dict[str, Any]) -> bool:
    return bool(sysctl_read(undo["key"]) == undo["new"])


@rebuilds("sysctl.dev")
def rebuild_sysctl(undo: dict[str, Any], nic: Any, net: Host) -> Sysctl:
    return Sysctl(str(undo["dev"]), str(undo["key"]), str(undo["new"]))


@rebuilds("sysctl.shared")
def rebuild_shared_sysctl(undo: dict[str, Any], nic: Any, net: Host) -> SharedSysctl:
    return SharedSysctl(str(undo["key"]), str(undo["new"]),
                        may_set=net.settings.manage_sysctls)
