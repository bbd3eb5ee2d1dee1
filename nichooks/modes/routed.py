"""Routed mode: policy rule + host routes in the NIC's table, proxy ARP/NDP both ways,
announcements to the uplink.

What has to be true for a routed guest to work, and why each step is here:
- the guest's packets are routed by `ip rule iif TAP lookup TABLE` (per family);
- packets for the guest find it by a /32 or /128 host route to the tap in that table;
- the guest resolves its upstream gateway on the tap: proxy_arp on the tap (IPv4), a
  proxy entry for NETWORK_GATEWAY6 on the tap (IPv6; `proxy_ndp` alone proxies
  nothing, which is why Ganeti's own script leaves IPv6 guests without a gateway);
- upstream resolves the guest on the uplink: one proxy entry per address there (for
  IPv6 the uplink needs proxy_ndp=1; IPv4 needs only forwarding);
- after a migration the upstream router learns the new place at once from a
  gratuitous ARP / unsolicited NA, except on a migration target before switchover,
  where the uplink entries and announcements would pull traffic from the
  still-running source: they wait for MIGRATION_PHASE=post or `nichooks announce`.

Everything we create carries our marks (rule priority, and the `proto` of rules, routes
and proxy entries), and undo removes only what is still ours. Global and uplink sysctls
are shared with other NICs: checked (or set, when the operator allows it), never undone.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nichooks.engine.journal import Record
from nichooks.engine.plan import Plan, Step, checks, undoes
from nichooks.errors import InvalidInput, PlumbingError
from nichooks.host.netlink import (
    AF_INET,
    AF_INET6,
    GONE,
    NetlinkError,
    Routing,
    conf_key,
    family_of,
    ignore_gone,
    sysctl_name,
    sysctl_read,
    sysctl_write,
)
from nichooks.host.steps.link import SetLink, require_link
from nichooks.model.nic import Nic
from nichooks.settings import Settings

MAIN_TABLE = 254
BUILTIN_TABLES = {"unspec": 0, "default": 253, "main": 254, "local": 255}
EEXIST = 17
DEFAULT_PROTO = 241  # NICHOOKS_ROUTE_PROTO's default, for a Routing without settings


# -- facts ---------------------------------------------------------------------------
def eui64(subnet: str, mac: str) -> str:
    """The SLAAC EUI-64 address of `mac` in a /64 (what the guest derives itself)."""
    net = ipaddress.IPv6Network(subnet, strict=False)
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    iid = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    return str(net.network_address + int.from_bytes(bytes(iid), "big"))


def addresses(nic: Nic) -> dict[int, str]:
    """family -> the NIC's address in it. IPv6 is IP when IP is IPv6, else derived from
    NETWORK_SUBNET6 and the MAC when the network is a /64."""
    out: dict[int, str] = {}
    if nic.ip is not None:
        out[AF_INET if nic.ip.version == 4 else AF_INET6] = str(nic.ip)
    subnet6 = nic.network.subnet6
    if AF_INET6 not in out and subnet6 and ipaddress.IPv6Network(subnet6).prefixlen == 64:
        out[AF_INET6] = eui64(subnet6, nic.mac)
    if not out:
        raise InvalidInput("IP", "is not set, and there is no NETWORK_SUBNET6 /64 to derive an "
                           "IPv6 address from the MAC: a routed NIC needs an address")
    return out


def table_files(directory: Path) -> list[Path]:
    files = [directory / "rt_tables"]
    files += sorted((directory / "rt_tables.d").glob("*.conf"))
    if directory == Path("/etc/iproute2"):  # iproute2 >= 6.7 keeps its defaults here
        files += [Path("/usr/share/iproute2/rt_tables")]
        files += sorted(Path("/usr/share/iproute2/rt_tables.d").glob("*.conf"))
    return files


def resolve_table(link: str | None, directory: Path) -> int:
    if link is None:
        return MAIN_TABLE
    if link.isascii() and link.isdigit() and 0 < int(link) < 2 ** 32:
        return int(link)
    if link in BUILTIN_TABLES:
        return BUILTIN_TABLES[link]
    from nichooks.safefile import read_regular

    for path in table_files(directory):
        try:
            raw = read_regular(path, 1 << 20)  # a FIFO there must not hang the hook
        except (OSError, ValueError):
            continue
        for line in (raw or b"").decode(errors="replace").splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 2 and words[1] == link:
                try:
                    table = int(words[0], 0)  # iproute2 accepts 0x64 as well as 100
                except ValueError:
                    continue
                if 0 < table < 2 ** 32:
                    return table
    raise PlumbingError(f"routing table {link!r} (LINK) is not named in {directory}/rt_tables "
                        "or rt_tables.d/*.conf")


FAMILY_NAME = {AF_INET: "IPv4", AF_INET6: "IPv6"}


# -- steps -----------------------------------------------------------------------------
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

    def prepare(self, net: Routing) -> Record:
        state = require_link(net, self.dev)
        return Record(kind=self.kind, step=self.describe(), undo={
            "ifindex": state.index, "dev": self.dev, "key": self.key,
            "old": sysctl_read(self.key), "new": self.value})

    def apply(self, net: Routing) -> None:
        sysctl_write(self.key, self.value)

    def verify(self, net: Routing) -> str | None:
        now = sysctl_read(self.key)
        return None if now == self.value else f"{sysctl_name(self.key)} is {now}, expected {self.value}"


@undoes("sysctl.dev")
def undo_sysctl(net: Routing, undo: dict[str, Any]) -> None:
    state = net.by_index(undo["ifindex"])
    if state is None or state.name != undo["dev"] or undo["old"] is None:
        return  # the device is gone, and its sysctls with it
    if sysctl_read(undo["key"]) == undo["new"]:
        try:
            sysctl_write(undo["key"], undo["old"])
        except FileNotFoundError:
            pass


@checks("sysctl.dev")
def sysctl_present(net: Routing, undo: dict[str, Any]) -> bool:
    state = net.by_index(undo["ifindex"])
    return state is not None and sysctl_read(undo["key"]) == undo["new"]


@dataclass(frozen=True)
class SharedSysctl:
    """A global or uplink sysctl the operator allowed us to set. Other NICs rely on it,
    so it is never undone; it is journaled so `status` can show it."""

    key: str
    value: str
    kind: str = "sysctl.shared"

    def describe(self) -> str:
        return f"sysctl {sysctl_name(self.key)}={self.value} (shared, kept on ifdown)"

    def as_data(self) -> dict[str, Any]:
        return {"step": "sysctl.shared", "key": sysctl_name(self.key), "value": self.value}

    def prepare(self, net: Routing) -> Record:
        return Record(kind=self.kind, step=self.describe(), undo={
            "key": self.key, "old": sysctl_read(self.key), "new": self.value})

    def apply(self, net: Routing) -> None:
        sysctl_write(self.key, self.value)

    def verify(self, net: Routing) -> str | None:
        now = sysctl_read(self.key)
        return None if now == self.value else f"{sysctl_name(self.key)} is {now}, expected {self.value}"


@undoes("sysctl.shared")
def undo_shared_sysctl(net: Routing, undo: dict[str, Any]) -> None:
    """Deliberately nothing: shared by every routed NIC on the host."""


@checks("sysctl.shared")
def shared_sysctl_present(net: Routing, undo: dict[str, Any]) -> bool:
    return bool(sysctl_read(undo["key"]) == undo["new"])


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

    def describe(self) -> str:
        # Without the protocol: verify and repair match a journal's records to the
        # rebuilt plan's steps by this text (reconcile.journaled_steps), and journals
        # written before rules were marked say just this.
        fam = "-6 " if self.family == AF_INET6 else ""
        return f"ip {fam}rule iif {self.iifname} lookup {self.table} priority {self.priority}"

    def as_data(self) -> dict[str, Any]:
        return {"step": "rule", "family": FAMILY_NAME[self.family], "iif": self.iifname,
                "table": self.table, "priority": self.priority, "proto": self.proto}

    def _undo(self) -> dict[str, Any]:
        return {"family": self.family, "iifname": self.iifname, "table": self.table,
                "priority": self.priority, "proto": self.proto}

    def prepare(self, net: Routing) -> Record:
        return Record(kind=self.kind, step=self.describe(), undo=self._undo())

    def apply(self, net: Routing) -> None:
        # Add first, never dump (a rule dump costs ~45 ms per 1000 rules): EEXIST can
        # only mean a rule with our mark, since the kernel compares the protocol.
        try:
            net.rule_add(self.family, self.iifname, self.table, self.priority, self.proto)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise

    def verify(self, net: Routing) -> str | None:
        return None if rule_present(net, self._undo()) else f"{self.describe()} is missing"


@checks("route.rule")
def rule_present(net: Routing, undo: dict[str, Any]) -> bool:
    """Whether the guest's traffic is looked up in the table, by whichever rule: an
    operator's identical rule routes it the same way as ours."""
    return any(r["iifname"] == undo["iifname"] and r["table"] == undo["table"]
               and r["priority"] == undo["priority"] for r in net.rules(undo["family"]))


def rule_proto(net: Routing, undo: dict[str, Any]) -> int:
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


@undoes("route.rule")
def undo_rule(net: Routing, undo: dict[str, Any]) -> None:
    # Rules name the device, so they outlive it: delete by full identity, mark included
    # (the kernel matches the protocol, so an operator's identical rule without our mark
    # is never the one deleted), repeatedly in case an earlier crash left a duplicate.
    proto = rule_proto(net, undo)
    for _ in range(16):
        try:
            net.rule_del(undo["family"], undo["iifname"], undo["table"], undo["priority"], proto)
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

    def prepare(self, net: Routing) -> Record:
        tap = require_link(net, self.tap)
        return Record(kind=self.kind, step=self.describe(), undo={
            "family": self.family, "addr": self.addr, "oif": tap.index, "dev": self.tap,
            "table": self.table, "proto": self.proto})

    def apply(self, net: Routing) -> None:
        # Add first, dump the table only on EEXIST (a dump costs ~50 ms per 1000 routes).
        tap = require_link(net, self.tap)
        try:
            net.route_add(self.family, self.addr, tap.index, self.table, self.proto)
        except NetlinkError as exc:
            if exc.code != EEXIST:
                raise
            owner = route_owner(net, self.family, self.addr, self.table)
            if owner is not None and owner["oif"] != tap.index:
                raise PlumbingError(_owned_message(net, self.addr, self.table, owner)) from None

    def verify(self, net: Routing) -> str | None:
        tap = net.find(self.tap)
        owner = route_owner(net, self.family, self.addr, self.table)
        if tap is None or owner is None or owner["oif"] != tap.index:
            return f"{self.describe()} is missing"
        return None


def route_owner(net: Routing, family: int, addr: str, table: int) -> dict[str, Any] | None:
    plen = 32 if family == AF_INET else 128
    for route in net.routes(family, table):
        if route["dst"] == addr and route["dst_len"] == plen:
            return route
    return None


def _owned_message(net: Routing, addr: str, table: int, owner: dict[str, Any]) -> str:
    dev = net.by_index(owner["oif"]) if owner.get("oif") else None
    where = f"device {dev.name}" if dev else "another device"
    return (f"{addr} is already routed to {where} in table {table} "
            "(another NIC owns this address); nothing was changed")


@undoes("route.host")
def undo_host_route(net: Routing, undo: dict[str, Any]) -> None:
    owner = route_owner(net, undo["family"], undo["addr"], undo["table"])
    if owner is None or owner["oif"] != undo["oif"] or owner["proto"] != undo["proto"]:
        return  # gone with the tap, or someone else's now
    with ignore_gone():
        net.route_del(undo["family"], undo["addr"], undo["oif"], undo["table"], undo["proto"])


@checks("route.host")
def host_route_present(net: Routing, undo: dict[str, Any]) -> bool:
    owner = route_owner(net, undo["family"], undo["addr"], undo["table"])
    return owner is not None and owner["oif"] == undo["oif"]


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

    def prepare(self, net: Routing) -> Record:
        dev = require_link(net, self.dev)
        existing = net.proxy_get(self.addr, dev.index)
        # An entry someone else made (another proto) stays theirs: undo leaves it.
        foreign = existing is not None and existing["proto"] != self.proto
        return Record(kind=self.kind, step=self.describe(), undo={
            "addr": self.addr, "ifindex": dev.index, "dev": self.dev, "proto": self.proto,
            "foreign": foreign})

    def apply(self, net: Routing) -> None:
        dev = require_link(net, self.dev)
        if net.proxy_get(self.addr, dev.index) is None:
            net.proxy_add(self.addr, dev.index, self.proto)

    def verify(self, net: Routing) -> str | None:
        dev = net.find(self.dev)
        if dev is None or net.proxy_get(self.addr, dev.index) is None:
            return f"{self.describe()} is missing"
        return None


@undoes("route.proxy")
def undo_proxy(net: Routing, undo: dict[str, Any]) -> None:
    if undo.get("foreign"):
        return
    dev = net.by_index(undo["ifindex"])
    if dev is None:
        return  # the device went, and its proxy entries with it
    entry = net.proxy_get(undo["addr"], dev.index)
    if entry is None or entry["proto"] != undo["proto"]:
        return
    with ignore_gone():
        net.proxy_del(undo["addr"], dev.index)


@checks("route.proxy")
def proxy_present(net: Routing, undo: dict[str, Any]) -> bool:
    dev = net.by_index(undo["ifindex"])
    return dev is not None and net.proxy_get(undo["addr"], dev.index) is not None


# -- the plan ----------------------------------------------------------------------------
def migration_target_before_switchover(nic: Nic) -> bool:
    """Only MIGRATION_PHASE says so. A Xen domain's `--incoming` suffix is turned into
    it by vif-ganeti; a KVM instance may simply be called `web--incoming`."""
    return nic.migration_phase == "pre"


def _uplink(net: Routing, nic: Nic, family: int, table: int, override: str | None) -> str | None:
    if override:
        if net.find(override) is None:
            raise PlumbingError(f"{FAMILY_NAME[family]} uplink {override} (setting): no such device",
                                nic=nic.label(), step="preflight")
        return override
    index = net.default_route_dev(family, table)
    state = net.by_index(index) if index else None
    return state.name if state else None


def _sysctl_needs(net: Routing, families: dict[int, str], uplinks: dict[int, str | None],
                  gateway6: bool) -> list[tuple[str, str]]:
    """(key, value) of every shared sysctl routed mode needs that is not set yet, in the
    order to set them (accept_ra=2 before IPv6 forwarding, or the uplink drops RAs)."""
    needs: list[tuple[str, str]] = []
    if AF_INET in families:
        if sysctl_read("net/ipv4/ip_forward") != "1":
            needs.append(("net/ipv4/ip_forward", "1"))
        up = uplinks.get(AF_INET)
        if up and sysctl_read(conf_key(AF_INET, up, "forwarding")) != "1" \
                and ("net/ipv4/ip_forward", "1") not in needs:
            needs.append((conf_key(AF_INET, up, "forwarding"), "1"))
    if AF_INET6 in families:
        up = uplinks.get(AF_INET6)
        forwarding = sysctl_read("net/ipv6/conf/all/forwarding") == "1"
        if not forwarding:
            if up and sysctl_read(conf_key(AF_INET6, up, "accept_ra")) == "1":
                needs.append((conf_key(AF_INET6, up, "accept_ra"), "2"))
            needs.append(("net/ipv6/conf/all/forwarding", "1"))
        if up and sysctl_read(conf_key(AF_INET6, up, "proxy_ndp")) != "1" \
                and sysctl_read("net/ipv6/conf/all/proxy_ndp") != "1":
            needs.append((conf_key(AF_INET6, up, "proxy_ndp"), "1"))
    return needs


def plan(nic: Nic, net: Routing, settings: Settings) -> Plan:
    label = nic.label()
    families = addresses(nic)
    try:
        table = resolve_table(nic.link, settings.iproute2_dir)
    except PlumbingError as exc:
        raise PlumbingError(exc.cause, nic=label, step="preflight") from None
    tap = net.find(nic.tap)
    if tap is None:
        raise PlumbingError(f"tap {nic.tap} does not exist", nic=label, step="preflight")
    if tap.loopback:  # a rule `iif lo` would catch the host's own traffic
        raise PlumbingError(f"{nic.tap} is the loopback device, not a guest tap", nic=label,
                            step="preflight")
    for family, addr in families.items():
        owner = route_owner(net, family, addr, table)
        if owner is not None and owner["oif"] != tap.index:
            raise PlumbingError(_owned_message(net, addr, table, owner), nic=label, step="preflight")
    overrides = {AF_INET: settings.uplink4, AF_INET6: settings.uplink6}
    uplinks = {f: _uplink(net, nic, f, table, overrides[f]) for f in families}
    gateway6 = nic.network.gateway6 if AF_INET6 in families else None

    result = Plan(mode="routed", nic_label=label)
    needs = _sysctl_needs(net, families, uplinks, bool(gateway6))
    if needs and not settings.manage_sysctls:
        fixes = " ".join(f"{sysctl_name(k)}={v}" for k, v in needs)
        raise PlumbingError(f"routed mode needs: sysctl -w {fixes} (or set "
                            "NICHOOKS_MANAGE_SYSCTLS=yes to let nichooks set them)",
                            nic=label, step="preflight")
    steps: list[Step] = [SharedSysctl(k, v) for k, v in needs]
    steps.append(SetLink(nic.tap, "up", True))
    if AF_INET in families:
        steps += [Sysctl(nic.tap, conf_key(AF_INET, nic.tap, "proxy_arp"), "1"),
                  Sysctl(nic.tap, conf_key(AF_INET, nic.tap, "forwarding"), "1")]
    if gateway6:
        steps += [Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "forwarding"), "1"),
                  Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "proxy_ndp"), "1")]
    if nic.link is not None:
        steps += [Rule(f, nic.tap, table, settings.rule_priority, settings.route_proto)
                  for f in families]
    steps += [HostRoute(f, a, nic.tap, table, settings.route_proto) for f, a in families.items()]
    if gateway6:
        steps.append(ProxyNeigh(gateway6, nic.tap, settings.route_proto,
                                "the guest resolves its IPv6 gateway"))
    deferred = migration_target_before_switchover(nic)
    for family, addr in families.items():
        uplink = uplinks[family]
        if uplink is None:
            result.notes.append(f"no {FAMILY_NAME[family]} default route in table {table}: no "
                                f"uplink proxy entry for {addr}; upstream must route it to this host")
            continue
        if deferred:
            result.deferred.append({"addr": addr, "dev": uplink})
            continue
        steps.append(ProxyNeigh(addr, uplink, settings.route_proto, "upstream resolves the guest"))
        if settings.announce:
            result.announcements.append((uplink, addr))
    if deferred and result.deferred:
        result.notes.append("migration target before switchover: uplink proxy entries and "
                            "announcements wait for MIGRATION_PHASE=post or `nichooks announce "
                            f"{nic.tap}`")
    result.steps = steps
    return result


def deferred_steps(deferred: list[dict[str, str]], proto: int) -> list[Step]:
    return [ProxyNeigh(d["addr"], d["dev"], proto, "upstream resolves the guest") for d in deferred]
