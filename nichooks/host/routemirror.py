"""A copy of the host's IPv4 and IPv6 routes, kept from the kernel's route events by
the agent's hook server, so that a served routed ifup plans without dumping its table.

A routed plan asks two questions of the NIC's table: whose is the guest's address, and
where does the default route go. The kernel answers neither without a dump of the
whole table (its route `get` is a lookup through the rules, not in a given table),
which pyroute2 decodes at ~50 ms per 1000 routes. The hook server subscribes to route
events, dumps once, then applies each event as it comes and drains the socket right
before it forks a call's process: the process starts with the routes as they were a
moment before, as a dump would give them.

The copy is only ever a shortcut to "nothing to worry about": an answer that would
stop or steer the plug (an owner other than this tap, a default route's device) is
confirmed against the kernel by the caller (routed.py). It turns itself off on an
overflow until it has dumped again; on a host with more than MAX_ROUTES it raises
TooBig, and the server drops it.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from nichooks.host.netlink import route_dict, route_table

RTMGRP_LINK, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
NLM_F_REPLACE = 0x100
IFF_UP = 0x1
MAX_ROUTES = 200_000
Key = tuple[Any, ...]
ROUTE_FIELDS = ("dst", "dst_len", "oif", "proto", "gateway", "type")  # route_dict's keys

RT_SCOPE_HOST = 254


class TooBig(Exception):
    """More routes than MAX_ROUTES: the copy is not kept."""


def _route(msg: Any) -> dict[str, Any]:
    """The route as Netlink.routes gives it, with what the copy is kept by."""
    return {**route_dict(msg), "table": route_table(msg), "family": msg["family"],
            "scope": msg["scope"]}


def _key(route: dict[str, Any], msg: Any) -> Key:
    """The route's identity with its next hop: routes appended next to each other (and
    IPv6's multipath next hops) are kept apart; a replace drops every next hop of the
    same destination first (NLM_F_REPLACE)."""
    return (route["family"], route["table"], route["dst"], route["dst_len"], msg["tos"],
            msg.get("RTA_PRIORITY"), route["oif"], route["gateway"])


class RouteMirror:
    def __init__(self, rcvbuf: int = 8 << 20) -> None:
        from pyroute2.netlink.rtnl.marshal import MarshalRtnl

        self.marshal = MarshalRtnl()
        # (family, table) -> route key -> route; and ifindex -> the keys through it
        self.tables: dict[tuple[int, int], dict[Key, dict[str, Any]]] = {}
        self.by_oif: dict[int, set[Key]] = {}
        self.valid = False
        self.too_big = False
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE))
            self.sock.setblocking(False)
            self.resync()
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def resync(self) -> None:
        """Subscribed first, then one dump: events queued meanwhile are applied after
        it, in order, and each is idempotent, so the copy ends up as the kernel is."""
        from pyroute2 import IPRoute

        self.valid = False
        self.drain(apply=False)
        self.tables, self.by_oif = {}, {}
        count = 0
        with IPRoute() as ipr:
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.route("dump", family=family):  # every table
                    self._apply("RTM_NEWROUTE", msg)
                    count += 1
                    if count > MAX_ROUTES:
                        self.tables, self.by_oif = {}, {}
                        raise TooBig(f"more than {MAX_ROUTES} routes")
        self.valid = True
        self.drain()

    def _apply(self, event: str, msg: Any) -> None:
        route = _route(msg)
        where = self.tables.setdefault((route["family"], route["table"]), {})
        key = _key(route, msg)
        if event == "RTM_NEWROUTE":
            if msg["header"]["flags"] & NLM_F_REPLACE:
                for old in [k for k in where if k[:6] == key[:6]]:  # every old next hop
                    self._drop(where, old)
            where[key] = route
            if route["oif"]:
                self.by_oif.setdefault(route["oif"], set()).add(key)
        else:
            self._drop(where, key)

    def _drop(self, where: dict[Key, dict[str, Any]], key: Key) -> None:
        route = where.pop(key, None)
        if route is not None and route["oif"]:
            self.by_oif.get(route["oif"], set()).discard(key)

    def _link(self, event: str, msg: Any) -> None:
        """IPv4 drops a device's routes when it goes down or away, without a route
        event for each (IPv6 sends them), but keeps its host-scope ones while it is
        down: do the same here."""
        if msg["family"] != socket.AF_UNSPEC:
            return  # AF_BRIDGE: a port's bridge membership, not the device
        gone = event == "RTM_DELLINK"
        if not gone and msg["flags"] & IFF_UP:
            return
        for key in list(self.by_oif.get(msg["index"], ())):
            where = self.tables.get((key[0], key[1]), {})
            route = where.get(key)
            if route is not None and (gone or (key[0] == socket.AF_INET
                                               and route["scope"] != RT_SCOPE_HOST)):
                self._drop(where, key)
        if gone:
            self.by_oif.pop(msg["index"], None)

    def drain(self, apply: bool = True) -> None:
        """Apply every event queued now; on an overflow, dump again."""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.resync()
                    return
                raise
            if not apply:
                continue
            for msg in self.marshal.parse(data):
                event = msg.get("event")
                if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
                    self._apply(event, msg)
                elif event in ("RTM_NEWLINK", "RTM_DELLINK"):
                    self._link(event, msg)

    def table(self, family: int, table: int) -> list[dict[str, Any]] | None:
        """The routes of one table as `Netlink.routes` gives them; None when the copy
        cannot be trusted (ask the kernel)."""
        if not self.valid:
            return None
        return [{k: r[k] for k in ROUTE_FIELDS} for r in self.tables.get((family, table), {}).values()]

    def close(self) -> None:
        self.sock.close()
