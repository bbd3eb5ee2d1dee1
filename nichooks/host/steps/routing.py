"""Routed mode's steps: the policy rule, the host route and proxy neighbour entries,
with their undo, check and rebuild (its sysctls are in sysctl.py).

Everything created carries our marks (rule priority, and the `proto` of rules, routes
and proxy entries), and undo removes only what is still ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.records import checks, rebuilds, undoes
from nichooks.errors import NetlinkError, PlumbingError
from nichooks.host.netlink import (
    AF_INET,
    AF_INET6,
    GONE,
    family_of,
    ignore_gone,
)
from nichooks.host.steps.link import require_link
from nichooks.settings import Settings

if TYPE_CHECKING:
    from nichooks.host.host import Host

EEXIST = 17
DEFAULT_PROTO = 241  # NICHOOKS_ROUTE_PROTO's default, for a host without settings
FAMILY_NAME = {AF_INET: "IPv4", AF_INET6: "IPv6"}
UPSTREAM = "upstream resolves the guest"
GATEWAY6 = "the guest resolves its IPv6 gateway"

@dataclass(frozen=True)
class Rule:
    """`ip [-6] rule iif TAP lookup TABLE priority P protocol PROTO`, PROTO being our
    mark (NICHOOKS_ROUTE_PROTO, as on our routes and proxy entries).

    The mark is what makes the rule ours: an operator's rule with the same selector and
    table but no mark (or another one) is a different rule to the kernel, both when it
    looks for a duplicate on add (ours is added next to it) and when it looks for the
    rule to delete (undo never matches it). So the journal only ever names a rule that
    carries the mark, and a marked rule already there (left by a crashed earlier plug
    of this NIC) is rightly taken as ours."""

    family: int
    iifname: str
    table: int
    priority: int
    proto: int
    kind: str = "route.rule"
    probe: bool = False  # read back by an exclusive add (a plug's own read-back only)

    def describe(self) -> str:
        # Without the protocol, as journals written before rules were marked say it.
        fam = "-6 " if self.family == AF_INET6 else ""
        return f"ip {fam}rule iif {self.iifname} lookup {self.table} priority {self.priority}"

    def as_data(self) -> dict[str, Any]:
        return {"step": "rule", "family": FAMILY_NAME[self.family], "iif": self.iifname,
                "table": self.table, "priority": self.priority, "proto": self.proto}

    def _undo(self) -> dict[str, Any]:
        return {"family": self.family, "iifname": self.iifname, "table": self.table,
                "priority": self.priority, "proto": self.proto}

    def prepare(self, net: Host) -> Record:
        return Record(kind=self.kind, step=self.describe(), undo=self._undo())

    def apply(self, net: Host) -> None:
        # Add first, never dump (a rule dump costs ~45 ms per 1000 rules): EEXIST can
        # only mean a rule with our mark, since the kernel compares the protocol.
        try:
            net.netlink.rule_add(self.family, self.iifname, self.table, self.priority, self.proto)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def verify(self, net: Host) -> str | None:
        """A plug's read-back (`probe`) adds the rule again, exclusively, instead of
        dumping every rule (the kernel filters no rule dump: ~45 ms per 1000): EEXIST
        proves ours is there; a success proves it was not, and the rule just added is
        deleted again. Anything else (verify, repair) only reads, by the dump."""
        if not self.probe:
            return None if rule_present(net, self._undo()) else f"{self.describe()} is missing"
        args = (self.family, self.iifname, self.table, self.priority, self.proto)
        try:
            net.netlink.rule_add(*args)
        except NetlinkError as exc:
            if exc.code == EEXIST:
                return None
            raise
        with ignore_gone():
            net.netlink.rule_del(*args)
        return f"{self.describe()} is missing"


@checks("route.rule")
def rule_present(net: Host, undo: dict[str, Any]) -> bool:
    """Whether the guest's traffic is looked up in the table, by whichever rule: an
    operator's identical rule routes it the same way as ours."""
    return any(r["iifname"] == undo["iifname"] and r["table"] == undo["table"]
               and r["priority"] == undo["priority"] for r in net.netlink.rules(undo["family"]))


def rule_proto(net: Host, undo: dict[str, Any]) -> int:
    """The mark of the rule a record names. Records written before rules were marked
    carry none: they are read as naming a rule with today's mark, so that an unmarked
    rule with their selector (which may well be an operator's; the kernel cannot tell)
    is never deleted. A value that is not a protocol number is a tampered journal."""
    proto = undo.get("proto")
    if proto is None:
        settings = getattr(net, "settings", None)
        return settings.route_proto if isinstance(settings, Settings) else DEFAULT_PROTO
    if isinstance(proto, bool) or not isinstance(proto, int) or not 0 < proto < 256:
        raise ValueError(f"rule record has protocol {proto!r}, not 1-255")
    return proto


@undoes("route.rule", by_tap_name=True)
def undo_rule(net: Host, undo: dict[str, Any]) -> None:
    # Rules name the device, so they outlive it: delete by full identity, mark included
    # (the kernel matches the protocol, so an operator's identical rule without our mark
    # is never the one deleted), repeatedly in case an earlier crash left a duplicate.
    proto = rule_proto(net, undo)
    for _ in range(16):
        try:
            net.netlink.rule_del(undo["family"], undo["iifname"], undo["table"], undo["priority"], proto)
        except NetlinkError as exc:
            if exc.code in GONE:
                return
            raise


@dataclass(frozen=True)
class HostRoute:
    family: int
    addr: str
    tap: str
    table: int
    proto: int
    kind: str = "route.host"

    @property
    def plen(self) -> int:
        return 32 if self.family == AF_INET else 128

    def describe(self) -> str:
        fam = "-6 " if self.family == AF_INET6 else ""
        return (f"ip {fam}route add {self.addr}/{self.plen} dev {self.tap} table {self.table} "
                f"proto {self.proto}")

    def as_data(self) -> dict[str, Any]:
        return {"step": "route", "dst": f"{self.addr}/{self.plen}", "dev": self.tap,
                "table": self.table, "proto": self.proto}

    def prepare(self, net: Host) -> Record:
        tap = require_link(net, self.tap)
        return Record(kind=self.kind, step=self.describe(), undo={
            "family": self.family, "addr": self.addr, "oif": tap.index, "dev": self.tap,
            "table": self.table, "proto": self.proto})

    def apply(self, net: Host) -> None:
        # Add first, dump the table only on EEXIST (a dump costs ~50 ms per 1000 routes).
        tap = require_link(net, self.tap)
        try:
            net.netlink.route_add(self.family, self.addr, tap.index, self.table, self.proto)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise
            owner = route_owner(net, self.family, self.addr, self.table)
            if owner is not None and owner["oif"] != tap.index:
                raise PlumbingError(owned_message(net, self.addr, self.table, owner)) from None

    def verify(self, net: Host) -> str | None:
        tap = net.netlink.find(self.tap)
        if tap is None or not _routed_via(net, self.family, self.addr, self.table, tap.index):
            return f"{self.describe()} is missing"
        return None


def route_owner(net: Host, family: int, addr: str, table: int) -> dict[str, Any] | None:
    return host_route_in(net.netlink.routes(family, table), family, addr)


def host_route_in(routes: list[dict[str, Any]], family: int, addr: str) -> dict[str, Any] | None:
    """The /32 or /128 route to `addr` among `routes` (one table's dump), if any."""
    plen = 32 if family == AF_INET else 128
    for route in routes:
        if route["dst"] == addr and route["dst_len"] == plen:
            return route
    return None


def owned_message(net: Host, addr: str, table: int, owner: dict[str, Any]) -> str:
    dev = net.netlink.by_index(owner["oif"]) if owner.get("oif") else None
    where = f"device {dev.name}" if dev else "another device"
    return (f"{addr} is already routed to {where} in table {table} "
            "(another NIC owns this address); nothing was changed")


def _routed_via(net: Host, family: int, addr: str, table: int,
                oif: int) -> dict[str, Any] | None:
    """The host route to `addr` in `table` through device `oif`: a dump the kernel
    filters to that device, flat however many guests share the table."""
    return host_route_in(net.netlink.routes_via(family, table, oif), family, addr)


@undoes("route.host")
def undo_host_route(net: Host, undo: dict[str, Any]) -> None:
    ours = _routed_via(net, undo["family"], undo["addr"], undo["table"], undo["oif"])
    if ours is None or ours["proto"] != undo["proto"]:
        return  # gone with the tap, or someone else's now
    with ignore_gone():
        net.netlink.route_del(undo["family"], undo["addr"], undo["oif"], undo["table"],
                              undo["proto"])


@checks("route.host")
def host_route_present(net: Host, undo: dict[str, Any]) -> bool:
    return _routed_via(net, undo["family"], undo["addr"], undo["table"], undo["oif"]) is not None


@dataclass(frozen=True)
class ProxyNeigh:
    """`ip [-6] neigh add proxy ADDR dev DEV proto P`."""

    addr: str
    dev: str
    proto: int
    why: str  # "upstream resolves the guest" / "the guest resolves its gateway"
    kind: str = "route.proxy"

    def describe(self) -> str:
        fam = "-6 " if family_of(self.addr) == AF_INET6 else ""
        return f"ip {fam}neigh add proxy {self.addr} dev {self.dev} ({self.why})"

    def as_data(self) -> dict[str, Any]:
        return {"step": "proxy", "addr": self.addr, "dev": self.dev, "proto": self.proto}

    def prepare(self, net: Host) -> Record:
        dev = require_link(net, self.dev)
        existing = net.netlink.proxy_get(self.addr, dev.index)
        # An entry someone else made (another proto) stays theirs: undo leaves it.
        foreign = existing is not None and existing["proto"] != self.proto
        return Record(kind=self.kind, step=self.describe(), undo={
            "addr": self.addr, "ifindex": dev.index, "dev": self.dev, "proto": self.proto,
            "foreign": foreign})

    def apply(self, net: Host) -> None:
        dev = require_link(net, self.dev)
        if net.netlink.proxy_get(self.addr, dev.index) is None:
            net.netlink.proxy_add(self.addr, dev.index, self.proto)

    def verify(self, net: Host) -> str | None:
        dev = net.netlink.find(self.dev)
        if dev is None or net.netlink.proxy_get(self.addr, dev.index) is None:
            return f"{self.describe()} is missing"
        return None


@undoes("route.proxy")
def undo_proxy(net: Host, undo: dict[str, Any]) -> None:
    if undo.get("foreign"):
        return
    dev = net.netlink.by_index(undo["ifindex"])
    if dev is None:
        return  # the device went, and its proxy entries with it
    entry = net.netlink.proxy_get(undo["addr"], dev.index)
    if entry is None or entry["proto"] != undo["proto"]:
        return
    with ignore_gone():
        net.netlink.proxy_del(undo["addr"], dev.index)


@checks("route.proxy")
def proxy_present(net: Host, undo: dict[str, Any]) -> bool:
    dev = net.netlink.by_index(undo["ifindex"])
    return dev is not None and net.netlink.proxy_get(undo["addr"], dev.index) is not None


# -- rebuilt from their records (repair) -------------------------------------------------
@rebuilds("route.rule")
def rebuild_rule(undo: dict[str, Any], nic: Any, net: Host) -> Rule:
    return Rule(int(undo["family"]), str(undo["iifname"]), int(undo["table"]),
                int(undo["priority"]), rule_proto(net, undo))


@rebuilds("route.host")
def rebuild_host_route(undo: dict[str, Any], nic: Any, net: Host) -> HostRoute:
    return HostRoute(int(undo["family"]), str(undo["addr"]), str(undo["dev"]),
                     int(undo["table"]), int(undo["proto"]))


@rebuilds("route.proxy")
def rebuild_proxy(undo: dict[str, Any], nic: Any, net: Host) -> ProxyNeigh:
    """Someone else's entry the plug found in place is put back too when it has gone
    (an uplink's down/up flushes them all): the guest needs it, and its new record
    says whose it is then."""
    dev = str(undo["dev"])
    return ProxyNeigh(str(undo["addr"]), dev, int(undo["proto"]),
                      GATEWAY6 if dev == getattr(nic, "tap", None) else UPSTREAM)

