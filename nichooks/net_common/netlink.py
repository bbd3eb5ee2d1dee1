"""A thin netlink layer over pyroute2, opened lazily and once per hook.

pyroute2 costs ~100 ms to import, so nothing imports it until a step needs the
kernel. Everything the plumbing reads about a link is gathered in LinkState so
checks and undo records are built from one snapshot, not from many round trips.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

# "Already gone": the kernel (or someone else) removed the object. Success on undo.
GONE = (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


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


class NetlinkError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Netlink:
    def __init__(self) -> None:
        self._ipr: Any = None

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

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
        )

    def find(self, name: str) -> LinkState | None:
        found = self._call(self.ipr.link_lookup, ifname=name)
        return self.by_index(found[0]) if found else None

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


def _errtext(code: int, exc: Exception) -> str:
    import os

    try:
        return os.strerror(code)
    except ValueError:
        return str(exc)
