"""Whole-switch reads: every bridge, every port carrying our owner mark.

The IDL driver (ovsdb.py) replicates only the rows a hook names, which keeps a plug
as cheap on a switch with 2000 ports as on an empty one. A sweep or an audit needs
every marked port instead, and an IDL replica of every port would cost each of
them what the plug saves; so they send one read-only transaction of selects over
plain JSON-RPC (ovsdb_rpc.py): no replica, no monitor, parts that agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nichooks.host.ovsdb import OWNER, BridgeInfo
from nichooks.host.ovsdb_rpc import OvsdbError, request


def owned_ports(remote: str, deadline: float) -> list[tuple[str, str, str]]:
    """(port name, owner key, port UUID) of every port carrying our owner mark, on any
    bridge. One read-only `select`: a sweep after a reboot must find ports whose
    journals went with /run, and it needs no IDL replica of every port for that."""
    result = request(remote, "transact", ["Open_vSwitch", {
        "op": "select", "table": "Port", "where": [],
        "columns": ["_uuid", "name", "external_ids"]}], deadline)
    if not isinstance(result, list) or not result or "rows" not in result[0]:
        raise OvsdbError(f"{remote}: unexpected reply to select: {result!r:.120}")
    out = []
    for row in result[0]["rows"]:
        ids = dict(row.get("external_ids", ["map", []])[1])
        if OWNER in ids:
            out.append((str(row["name"]), str(ids[OWNER]), str(row["_uuid"][1])))
    return out


@dataclass(frozen=True)
class MarkedPort:
    """A port whose Port row or one of whose Interfaces carries our owner mark."""

    name: str
    uuid: str
    bridge: str | None
    owner: str | None            # the Port row's mark: what unplug() requires
    marks: frozenset[str]        # every mark, Port and Interfaces
    ofports: frozenset[int]


@dataclass(frozen=True)
class SwitchView:
    """What a sweep needs to know of the whole switch, from one read."""

    bridges: tuple[BridgeInfo, ...]
    ports: tuple[MarkedPort, ...]


def _members(value: Any) -> list[Any]:
    """A column in OVSDB's JSON (a bare atom, or ["set", [...]]) as a list of atoms."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return list(value[1])
    return [value]


def _ref(value: Any) -> str:
    return str(value[1]) if isinstance(value, list) and len(value) == 2 else str(value)


def _ids(value: Any) -> dict[str, str]:
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return {str(k): str(v) for k, v in value[1]}
    return {}


def switch_view(remote: str, deadline: float) -> SwitchView:
    """Every bridge (what decides whether we add flows on it: fail_mode, controllers)
    and every port marked as ours, with its bridge and OpenFlow port numbers. One
    read-only transaction of selects, so the parts agree with each other; no IDL
    replica of every port for it."""
    def select(table: str, *columns: str) -> dict[str, Any]:
        return {"op": "select", "table": table, "where": [], "columns": ["_uuid", *columns]}

    result = request(remote, "transact", [
        "Open_vSwitch",
        select("Bridge", "name", "fail_mode", "controller", "datapath_type", "ports"),
        select("Controller", "target"),
        select("Port", "name", "external_ids", "interfaces"),
        select("Interface", "external_ids", "ofport")], deadline)
    if not isinstance(result, list) or len(result) != 4 or not all(
            isinstance(r, dict) and "rows" in r for r in result):
        raise OvsdbError(f"{remote}: unexpected reply to select: {result!r:.120}")
    bridge_rows, controller_rows, port_rows, iface_rows = (r["rows"] for r in result)
    targets = {_ref(row["_uuid"]): str(row["target"]) for row in controller_rows}
    ifaces = {_ref(row["_uuid"]): row for row in iface_rows}
    bridges, bridge_of = [], {}
    for row in bridge_rows:
        name = str(row["name"])
        fail_mode = _members(row.get("fail_mode", ["set", []]))
        controllers = [targets.get(_ref(c), _ref(c)) for c in _members(row.get("controller", ["set", []]))]
        bridges.append(BridgeInfo(
            name=name, fail_mode=str(fail_mode[0]) if fail_mode else None,
            controllers=tuple(sorted(controllers)),
            datapath_type=str(row.get("datapath_type") or "system"), mtu=None))
        for port in _members(row.get("ports", ["set", []])):
            bridge_of[_ref(port)] = name
    ports = []
    for row in port_rows:
        uuid = _ref(row["_uuid"])
        own = _ids(row.get("external_ids")).get(OWNER)
        members = [ifaces[_ref(i)] for i in _members(row.get("interfaces", ["set", []]))
                   if _ref(i) in ifaces]
        marks = {own} if own is not None else set()
        marks |= {m for i in members if (m := _ids(i.get("external_ids")).get(OWNER)) is not None}
        if not marks:
            continue
        ofports = {n for i in members for n in _members(i.get("ofport", ["set", []]))
                   if isinstance(n, int) and n > 0}
        ports.append(MarkedPort(name=str(row["name"]), uuid=uuid, bridge=bridge_of.get(uuid),
                                owner=own, marks=frozenset(marks), ofports=frozenset(ofports)))
    return SwitchView(bridges=tuple(sorted(bridges, key=lambda b: b.name)),
                      ports=tuple(sorted(ports, key=lambda p: p.name)))
