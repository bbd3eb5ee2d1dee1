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

The steps and their undo are in host/steps/routing.py and sysctl.py. Global and uplink
sysctls are shared with other NICs: checked (or set, when the operator allows it),
never undone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import Record
from nichooks.engine.plan import Plan
from nichooks.engine.records import Step
from nichooks.errors import NicHooksError, PlumbingError
from nichooks.host.netlink import AF_INET, AF_INET6, conf_key, default_dev_in, sysctl_name, sysctl_read
from nichooks.host.steps import nftfilter
from nichooks.host.steps.link import SetLink
from nichooks.host.steps.nftfilter import NicFilter, nic_filter
from nichooks.host.steps.routing import (
    FAMILY_NAME,
    GATEWAY6,
    UPSTREAM,
    HostRoute,
    ProxyNeigh,
    Rule,
    host_route_in,
    owned_message,
)
from nichooks.host.steps.sysctl import SharedSysctl, Sysctl
from nichooks.model import validate
from nichooks.model.addresses import primary_addresses
from nichooks.model.nic import Nic
from nichooks.modes.base import Mode
from nichooks.settings import Settings

if TYPE_CHECKING:
    from nichooks.engine.actions import Action
    from nichooks.engine.journal import Journal
    from nichooks.engine.store import Store
    from nichooks.host.host import Host
    from nichooks.log import HookLog

MAIN_TABLE = 254
BUILTIN_TABLES = {"unspec": 0, "default": 253, "main": 254, "local": 255}
FAMILY = {4: AF_INET, 6: AF_INET6}


def addresses(nic: Nic) -> dict[int, str]:
    """Address family -> the NIC's address routed in it (model.addresses's rule)."""
    return {FAMILY[version]: addr for version, addr in primary_addresses(nic).items()}


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




def migration_target_before_switchover(nic: Nic) -> bool:
    """Only MIGRATION_PHASE says so. A Xen domain's `--incoming` suffix is turned into
    it by vif-ganeti; a KVM instance may simply be called `web--incoming`."""
    return nic.migration_phase == "pre"


def _table_routes(net: Host, family: int, table: int, addr: str, tap_index: int,
                  override: str | None) -> list[dict[str, Any]]:
    """The table's routes for the plan. A served call starts from the agent's copy,
    taken just before it was forked; an answer from it that would stop or steer the
    plug (another device owns the address; where the default route goes) is confirmed
    by the kernel, with a whole dump when the copy was wrong."""
    recent = net.netlink.recent_routes(family, table)
    if recent is None:
        return net.netlink.routes(family, table)
    owner = host_route_in(recent, family, addr)
    if owner is not None and owner["oif"] != tap_index:
        return net.netlink.routes(family, table)
    if not override:
        defaults = [r for r in recent if r["dst_len"] == 0 and r["type"] == 1 and r["oif"]]
        if len(defaults) != 1 or default_dev_in(
                net.netlink.routes_via(family, table, int(defaults[0]["oif"]))) is None:
            return net.netlink.routes(family, table)
    return recent


def _uplink(net: Host, nic: Nic, family: int, routes: list[dict[str, Any]],
            override: str | None) -> str | None:
    if override:
        if net.netlink.find(override) is None:
            raise PlumbingError(f"{FAMILY_NAME[family]} uplink {override} (setting): no such device",
                                nic=nic.label(), step="preflight")
        return override
    index = default_dev_in(routes)
    state = net.netlink.by_index(index) if index else None
    return state.name if state else None


def _sysctl_needs(net: Host, families: dict[int, str], uplinks: dict[int, str | None],
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


def plan(nic: Nic, net: Host, settings: Settings) -> Plan:
    label = nic.label()
    families = addresses(nic)
    try:
        table = resolve_table(nic.link, settings.iproute2_dir)
    except PlumbingError as exc:
        raise PlumbingError(exc.cause, nic=label, step="preflight") from None
    tap = net.netlink.find(nic.tap)
    if tap is None:
        raise PlumbingError(f"tap {nic.tap} does not exist", nic=label, step="preflight")
    if tap.loopback:  # a rule `iif lo` would catch the host's own traffic
        raise PlumbingError(f"{nic.tap} is the loopback device, not a guest tap", nic=label,
                            step="preflight")
    # One read of the table per family serves both questions: whose is the address, and
    # where does the default route go (a dump costs ~50 ms per 1000 routes).
    overrides = {AF_INET: settings.uplink4, AF_INET6: settings.uplink6}
    routes = {family: _table_routes(net, family, table, addr, tap.index, overrides[family])
              for family, addr in families.items()}
    for family, addr in families.items():
        owner = host_route_in(routes[family], family, addr)
        if owner is not None and owner["oif"] != tap.index:
            raise PlumbingError(owned_message(net, addr, table, owner), nic=label, step="preflight")
    uplinks = {f: _uplink(net, nic, f, routes[f], overrides[f]) for f in families}
    gateway6 = nic.network.gateway6 if AF_INET6 in families else None

    result = Plan(mode="routed", nic_label=label)
    needs = _sysctl_needs(net, families, uplinks, bool(gateway6))
    if needs and not settings.manage_sysctls:
        fixes = " ".join(f"{sysctl_name(k)}={v}" for k, v in needs)
        raise PlumbingError(f"routed mode needs: sysctl -w {fixes} (or set "
                            "NICHOOKS_MANAGE_SYSCTLS=yes to let nichooks set them)",
                            nic=label, step="preflight")
    steps: list[Step] = [SharedSysctl(k, v) for k, v in needs]
    steps += guard_steps(nic, net, result)
    steps.append(SetLink(nic.tap, "up", True))
    if AF_INET in families:
        steps += [Sysctl(nic.tap, conf_key(AF_INET, nic.tap, "proxy_arp"), "1"),
                  Sysctl(nic.tap, conf_key(AF_INET, nic.tap, "forwarding"), "1")]
    if gateway6:
        steps += [Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "forwarding"), "1"),
                  Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "proxy_ndp"), "1")]
    if nic.link is not None:
        steps += [Rule(f, nic.tap, table, settings.rule_priority, settings.route_proto, probe=True)
                  for f in families]
    steps += [HostRoute(f, a, nic.tap, table, settings.route_proto) for f, a in families.items()]
    if gateway6:
        steps.append(ProxyNeigh(gateway6, nic.tap, settings.route_proto,
                                GATEWAY6))
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
        steps.append(ProxyNeigh(addr, uplink, settings.route_proto, UPSTREAM))
        if settings.announce:
            result.announcements.append((uplink, addr))
    if deferred and result.deferred:
        result.notes.append("migration target before switchover: uplink proxy entries and "
                            "announcements wait for MIGRATION_PHASE=post or `nichooks announce "
                            f"{nic.tap}`")
    result.steps = steps
    return result


def guard_steps(nic: Nic, net: Host, plan: Plan) -> list[Step]:
    """What keeps a routed guest to its own addresses, before its tap comes up: no
    router advertisements accepted on the tap, and the nftables filter."""
    steps: list[Step] = [Sysctl(nic.tap, conf_key(AF_INET6, nic.tap, "accept_ra"), "0")]
    guard = nic_filter(nic, "inet", net)
    if guard is None:
        plan.notes.append("no anti-spoofing filter (NICHOOKS_ANTISPOOF=off or tag "
                          "nichooks:antispoof:off)")
    else:
        steps.append(NicFilter(guard))
    return steps


def deferred_steps(deferred: list[dict[str, str]], proto: int) -> list[Step]:
    return [ProxyNeigh(d["addr"], d["dev"], proto, UPSTREAM) for d in deferred]


class Routed(Mode):
    name = "routed"
    vlans = False

    def check_link(self, link: str) -> str:
        """LINK names a routing table (a number or a name in rt_tables), not a device."""
        return validate.table("LINK", link)

    def plan(self, nic: Nic, net: Host, settings: Settings) -> Plan:
        if nic.device:
            # Only the NIC's main device carries the routes and proxies; the guest talks
            # through one of the two at a time (the emulated NIC until its PV driver
            # loads), so both are filtered.
            second = Plan(mode=self.name, nic_label=nic.label(),
                          notes=[f"routed: {nic.tap} is a second device of the NIC; only its "
                                 "main device carries the routes"])
            second.steps = [*guard_steps(nic, net, second), SetLink(nic.tap, "up", True)]
            return second
        return plan(nic, net, settings)

    def after_verify(self, plan: Plan, settings: Settings, log: HookLog) -> None:
        announce(plan.announcements, log)

    def held_back(self, journal: Journal, settings: Settings) -> list[Step]:
        return deferred_steps(journal.deferred, settings.route_proto)

    def after_switchover(self, journal: Journal, settings: Settings, log: HookLog) -> None:
        if settings.announce:
            announce(sorted(set(uplink_entries(journal.records, journal.tap))), log)

    def watched_links(self, journal: Journal) -> set[str]:
        return {dev for dev, _addr in uplink_entries(journal.records, journal.tap)}

    def audit(self, journals: list[Journal], net: Host, settings: Settings) -> set[str]:
        return nftfilter.audit(journals, net, "inet")

    def orphans(self, store: Store, net: Host, settings: Settings, *, dry_run: bool,
                log: HookLog) -> list[Action]:
        return nftfilter.sweep(store, net, settings, "inet", dry_run=dry_run, log=log)


def announce(announcements: list[tuple[str, str]], log: HookLog) -> None:
    """Tell upstream where the guest is now. Best effort: a plug that works is not rolled
    back because one announcement could not be sent (the router will ARP anyway)."""
    if not announcements:
        return
    from nichooks.errors import cause
    from nichooks.host.announce import gratuitous_arp, unsolicited_na

    for dev, addr in announcements:
        try:
            (unsolicited_na if ":" in addr else gratuitous_arp)(dev, addr)
        except (OSError, NicHooksError) as exc:
            log.error("announce", dev=dev, addr=addr, result="failed", cause=cause(exc))
        else:
            log.info("announce", dev=dev, addr=addr, result="ok")


def uplink_entries(records: list[Record], tap: str) -> list[tuple[str, str]]:
    """(uplink, address) of every proxy entry a routed plug made on an uplink, i.e. on
    another device than its tap: what is announced after switchover, and the uplinks
    the agent watches."""
    return [(str(r.undo.get("dev")), str(r.undo.get("addr"))) for r in records
            if r.kind == "route.proxy" and r.undo.get("dev") != tap]


MODE = Routed()
