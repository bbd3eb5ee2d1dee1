"""A thin netlink layer over pyroute2, opened lazily and once per hook.

pyroute2 costs ~100 ms to import, so nothing imports it until a step needs the
kernel. Everything the plumbing reads about a link is gathered in LinkState so
checks and undo records are built from one snapshot, not from many round trips.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nichooks.errors import NetlinkError

# "Already gone": the kernel (or someone else) removed the object. Success on undo.
GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class LinkState:
    index: int
    name: str
    kind: str | None         # "bridge", "veth", "tun", "openvswitch", "bond", ... (None: a plain NIC)
    slave_kind: str | None   # kind of the master's port: "bridge", "bond", "openvswitch"
    mac: str
    mtu: int
    up: bool
    master: int | None
    loopback: bool = False  # IFF_LOOPBACK: never a guest's tap, whatever its name
    root_block: bool | None = None  # a bridge port's root_block (None: not a bridge port)

    def not_a_tap(self) -> str | None:
        """Why this device cannot be a guest's tap, or None. Loopback would take our MAC
        (and could never be given its all-zero one back), a rule `iif lo` would catch the
        host's own traffic; a bridge or bond is somebody's switch."""
        if self.loopback:
            return f"{self.name} is the loopback device, not a guest tap"
        if self.kind in ("bridge", "openvswitch", "bond"):
            return f"{self.name} is a {self.kind} device, not a guest tap"
        return None


@contextmanager
def ignore_gone() -> Iterator[None]:
    """Undo's rule: an object the kernel or someone else already removed is undone."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise


AF_INET, AF_INET6 = 2, 10
NTF_PROXY = 0x08
RT_SCOPE_LINK = 253


# The agent's copy of the routes (host/routemirror.py), set in its hook server and so
# inherited by every served call's process; None everywhere else.
ROUTE_COPY: Any = None


def family_of(addr: str) -> int:
    return AF_INET6 if ":" in addr else AF_INET


class Netlink:
    """One rtnetlink socket for links, VLAN entries, rules, routes and proxy neighbours."""

    def __init__(self) -> None:
        self._ipr: Any = None
        self._strict: Any = None  # a second socket with NETLINK_GET_STRICT_CHK, or False

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def _strict_socket(self) -> Any:
        """A socket whose dump requests the kernel filters (Linux 4.20+), kept apart
        from `ipr` so that no other request meets the stricter checks; False where the
        kernel cannot."""
        if self._strict is None:
            from pyroute2 import IPRoute

            try:
                self._strict = IPRoute(strict_check=True)
            except OSError:
                self._strict = False
        return self._strict

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._strict:
            self._strict.close()
        self._strict = None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        try:
            return fn(*args, **kwargs)
        except PyNetlinkError as exc:
            raise NetlinkError(exc.code, _errtext(exc.code, exc)) from None

    @staticmethod
    def _state(msg: Any) -> LinkState:
        return LinkState(
            index=msg["index"],
            name=msg.get("ifname"),
            kind=msg.get(("linkinfo", "kind")),
            slave_kind=msg.get(("linkinfo", "slave_kind")),
            mac=(msg.get("address") or "").lower(),
            mtu=msg.get("mtu"),
            up=bool(msg["flags"] & 1),
            master=msg.get("master") or None,
            loopback=bool(msg["flags"] & IFF_LOOPBACK),
            root_block=(bool(msg.get(("linkinfo", "slave_data", "protect")))
                        if msg.get(("linkinfo", "slave_kind")) == "bridge" else None),
        )

    def find(self, name: str) -> LinkState | None:
        """One RTM_GETLINK by name (the kernel looks it up): a hook asks this a dozen
        times, and each request through pyroute2 costs ~0.5 ms."""
        try:
            msgs = self._call(self.ipr.link, "get", ifname=name)
        except NetlinkError as exc:
            if exc.code in GONE:
                return None
            raise
        state = self._state(msgs[0]) if msgs else None
        # Linux >= 5.5 also finds a link by an alternative name: only its own name counts.
        return state if state is not None and state.name == name else None

    def by_index(self, index: int) -> LinkState | None:
        try:
            msgs = self._call(self.ipr.get_links, index)
        except NetlinkError as exc:
            if exc.code in GONE:
                return None
            raise
        return self._state(msgs[0]) if msgs else None

    def set_link(self, index: int, **changes: Any) -> None:
        self._call(self.ipr.link, "set", index=index, **changes)

    def set_root_block(self, index: int, on: bool) -> None:
        """The bridge port's root_block (IFLA_BRPORT_PROTECT)."""
        self._call(self.ipr.brport, "set", index=index, protect=int(on))

    def bridge_vlan_filtering(self, bridge: LinkState) -> bool:
        """Read from sysfs: pyroute2 0.9 does not decode IFLA_BR_VLAN_FILTERING."""
        try:
            with open(f"/sys/class/net/{bridge.name}/bridge/vlan_filtering") as f:
                return f.read().strip() == "1"
        except OSError:
            return False

    def vlan_add(self, index: int, vid: int, *, pvid: bool, untagged: bool) -> None:
        flags = (["pvid"] if pvid else []) + (["untagged"] if untagged else [])
        self._call(self.ipr.vlan_filter, "add", index=index,
                   vlan_info={"vid": vid, "flags": flags})

    def vlan_del(self, index: int, vid: int) -> None:
        self._call(self.ipr.vlan_filter, "del", index=index, vlan_info={"vid": vid})

    def port_vlans(self, index: int) -> dict[int, set[str]]:
        """The VLAN entries of one bridge port: vid -> {"pvid", "untagged"} subsets."""
        from pyroute2.netlink.rtnl.ifinfmsg import RTEXT_FILTER_BRVLAN

        out: dict[int, set[str]] = {}
        msgs = self._call(self.ipr.get_links, index, ext_mask=RTEXT_FILTER_BRVLAN)
        for msg in msgs:
            spec = msg.get("IFLA_AF_SPEC") or {}
            for name, info in spec.get("attrs", []) if isinstance(spec, dict) else []:
                if name == "IFLA_BRIDGE_VLAN_INFO":
                    flags = set()
                    if info["flags"] & 2:
                        flags.add("pvid")
                    if info["flags"] & 4:
                        flags.add("untagged")
                    out[info["vid"]] = flags
        return out

    # -- routing: rules, routes, proxy neighbours (routed mode) ----------------------
    # Each call is one request; lookups filter in Python because the kernel's route
    # `get` is a lookup, not a table filter.
    def rules(self, family: int) -> list[dict[str, Any]]:
        out = []
        for msg in self._call(self.ipr.get_rules, family=family):
            out.append({"priority": msg.get("FRA_PRIORITY") or 0,
                        "table": msg.get("FRA_TABLE") or msg["table"],
                        "iifname": msg.get("FRA_IIFNAME")})
        return out

    def rule_add(self, family: int, iifname: str, table: int, priority: int, proto: int) -> None:
        """`ip rule add iif IIFNAME lookup TABLE priority PRIORITY protocol PROTO`. The
        kernel's duplicate check compares the protocol too, so a rule that differs from
        an existing one only by its protocol is added next to it, not refused."""
        self._call(self.ipr.rule, "add", family=family, iifname=iifname, table=table,
                   priority=priority, protocol=_rule_proto(proto))

    def rule_del(self, family: int, iifname: str, table: int, priority: int, proto: int) -> None:
        """Delete the rule with that selector *and* that protocol (FRA_PROTOCOL): a rule
        with the same selector and another protocol (an operator's) is not a match."""
        self._call(self.ipr.rule, "del", family=family, iifname=iifname, table=table,
                   priority=priority, protocol=_rule_proto(proto))

    def routes(self, family: int, table: int) -> list[dict[str, Any]]:
        """Host routes and everything else in one table: dst/len, oif, proto. A whole
        dump, decoded at ~50 ms per 1000 routes: only where every device counts."""
        return _route_dicts(self._call(self.ipr.get_routes, family=family, table=table),
                            table)

    def recent_routes(self, family: int, table: int) -> list[dict[str, Any]] | None:
        """The table as the agent's copy had it just before this process was forked
        (a served call; host/routemirror.py), or None: ask the kernel."""
        return ROUTE_COPY.table(family, table) if ROUTE_COPY is not None else None

    def routes_via(self, family: int, table: int, oif: int) -> list[dict[str, Any]]:
        """The routes of one table through one device. The kernel filters the dump
        (table and device in the request, on the strict socket), so the cost stays flat
        however many guests share the table; the same filter is applied here too, for a
        kernel that ignores it."""
        strict = self._strict_socket()
        if not strict:
            return [r for r in self.routes(family, table) if r["oif"] == oif]
        msgs = self._call(strict.route, "dump", family=family, table=table, oif=oif,
                          dump_filter=lambda _msg: True)
        return [r for r in _route_dicts(msgs, table) if r["oif"] == oif]

    def route_add(self, family: int, dst: str, oif: int, table: int, proto: int) -> None:
        plen = 32 if family == AF_INET else 128
        self._call(self.ipr.route, "add", family=family, dst=f"{dst}/{plen}", oif=oif,
                   table=table, proto=proto, scope=RT_SCOPE_LINK)

    def route_del(self, family: int, dst: str, oif: int, table: int, proto: int) -> None:
        plen = 32 if family == AF_INET else 128
        self._call(self.ipr.route, "del", family=family, dst=f"{dst}/{plen}", oif=oif,
                   table=table, proto=proto, scope=RT_SCOPE_LINK)

    def proxy_get(self, addr: str, ifindex: int) -> dict[str, Any] | None:
        """A proxy neighbour entry (pyroute2 0.9 cannot dump them; `get` works)."""
        try:
            msgs = self._call(self.ipr.neigh, "get", dst=addr, ifindex=ifindex,
                              flags=NTF_PROXY, family=family_of(addr))
        except NetlinkError as exc:
            if exc.code in GONE:
                return None
            raise
        for msg in msgs:
            return {"dst": msg.get("NDA_DST"), "ifindex": msg["ifindex"],
                    "proto": msg.get("NDA_PROTOCOL")}
        return None

    def proxy_add(self, addr: str, ifindex: int, proto: int) -> None:
        self._call(self.ipr.neigh, "add", dst=addr, ifindex=ifindex, flags=NTF_PROXY,
                   family=family_of(addr), NDA_PROTOCOL=proto)

    def proxy_del(self, addr: str, ifindex: int) -> None:
        self._call(self.ipr.neigh, "del", dst=addr, ifindex=ifindex, flags=NTF_PROXY,
                   family=family_of(addr))


def route_dict(msg: Any) -> dict[str, Any]:
    """A route as the plan and the steps read it (also the agent's route copy)."""
    return {"dst": msg.get("RTA_DST"), "dst_len": msg["dst_len"], "oif": msg.get("RTA_OIF"),
            "proto": msg["proto"], "gateway": msg.get("RTA_GATEWAY"), "type": msg["type"]}


def route_table(msg: Any) -> int:
    return int(msg.get("RTA_TABLE") or msg["table"])


def _route_dicts(msgs: Any, table: int) -> list[dict[str, Any]]:
    return [route_dict(msg) for msg in msgs if route_table(msg) == table]


def default_dev_in(routes: list[dict[str, Any]]) -> int | None:
    """The device of the default (unicast) route among `routes` (one table's dump)."""
    for route in routes:
        if route["dst_len"] == 0 and route["type"] == 1 and route["oif"]:
            return int(route["oif"])
    return None


def _errtext(code: int, exc: Exception) -> str:
    import os

    try:
        return os.strerror(code)
    except ValueError:
        return str(exc)


def _rule_proto(proto: int) -> int:
    """A rule protocol we may send. 0 (RTPROT_UNSPEC) is refused: in a delete the
    kernel reads it as "any protocol", which would match an operator's rule too."""
    if isinstance(proto, bool) or not isinstance(proto, int) or not 0 < proto < 256:
        raise ValueError(f"rule protocol {proto!r} is not 1-255")
    return proto


def sysctl_path(key: str) -> str:
    """`net.ipv4.conf.tap0.proxy_arp` -> /proc/sys/net/ipv4/conf/tap0/proxy_arp. Device
    names may contain dots, so the device part is passed separately by callers that
    build keys (see conf_key)."""
    parts = key.split("/")
    if parts[0] != "net" or len(parts) < 3 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{key!r} is not a network sysctl")  # a tampered journal
    return "/proc/sys/" + key


def conf_key(family: int, dev: str, name: str) -> str:
    return f"net/{'ipv4' if family == AF_INET else 'ipv6'}/conf/{dev}/{name}"


def sysctl_read(key: str) -> str | None:
    try:
        with open(sysctl_path(key)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def sysctl_write(key: str, value: str) -> None:
    with open(sysctl_path(key), "w") as f:
        f.write(value)


def sysctl_name(key: str) -> str:
    """The dotted name an operator types (`sysctl -w` wants '/' for dots in device
    names, which is what the path form gives us)."""
    parts = key.split("/")
    if len(parts) == 5 and parts[2] == "conf":
        dev = parts[3].replace(".", "/")
        return ".".join([*parts[:3], dev, parts[4]])
    return ".".join(parts)
