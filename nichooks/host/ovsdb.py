"""The OVSDB layer: one IDL connection per hook, only the rows it needs.

Modelled on os-vif's native backend: the `ovs` package's IDL, a schema cut down to
the tables and columns we touch, and every multi-step change in one transaction.
Beyond os-vif, the monitor is *conditional* (only the Port and Interface rows named
like our tap, only our bridge), and `Bridge.ports` is never replicated (we only
mutate it), so a plug costs the same on a switch with 2000 ports as on an empty one.

Every wait has a deadline: an ovsdb-server that accepts the connection and then
says nothing, or an ovs-vswitchd that never applies a change, is a clear error
after `timeout` seconds, never a hung hook (Ganeti waits for a hook forever).

Reads of the whole switch (a sweep, an audit) would defeat the conditional monitor,
so they are not done here but over plain JSON-RPC, in ovsdb_view.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nichooks.host.ovsdb_rpc import OvsdbError as OvsdbError  # re-exported: steps raise db.OvsdbError
from nichooks.host.ovsdb_rpc import fetch_schema

# external_ids keys: the ones OVN (ovn-controller binds a port by iface-id) and
# libvirt use, plus our owner mark so a sweep finds our ports after a reboot.
IFACE_ID = "iface-id"
ATTACHED_MAC = "attached-mac"
VM_ID = "vm-id"
IFACE_STATUS = "iface-status"
OWNER = "nichooks-nic"

TABLES: dict[str, list[str]] = {
    "Open_vSwitch": ["next_cfg", "cur_cfg"],
    "Bridge": ["name", "fail_mode", "controller", "datapath_type", "ports"],
    "Controller": ["target"],
    "Port": ["name", "interfaces", "tag", "trunks", "vlan_mode", "external_ids"],
    "Interface": ["name", "type", "external_ids", "mtu_request", "mtu", "ofport", "error"],
}
# Written (mutated) but never replicated: a bridge with 1000 ports would otherwise
# ship 1000 UUIDs to every hook.
UNREPLICATED = {"Bridge": ["ports"]}


@dataclass(frozen=True)
class BridgeInfo:
    name: str
    fail_mode: str | None
    controllers: tuple[str, ...]
    datapath_type: str
    mtu: int | None  # the bridge's own (local) interface

    @property
    def controller_managed(self) -> str | None:
        """Why our flows would not hold on this bridge, or None."""
        if self.fail_mode == "secure":
            return f"bridge {self.name} has fail_mode=secure (a controller such as OVN owns its flows)"
        if self.controllers:
            return f"bridge {self.name} has a controller ({', '.join(self.controllers)})"
        return None


@dataclass(frozen=True)
class PortInfo:
    uuid: str
    name: str
    tag: int | None
    trunks: tuple[int, ...]
    vlan_mode: str | None
    external_ids: dict[str, str]
    iface_external_ids: dict[str, str]
    iface_type: str
    mtu_request: int | None
    ofport: int | None
    error: str | None


@dataclass(frozen=True)
class PortSpec:
    """Everything the one plug transaction writes."""

    bridge: str
    name: str
    tag: int | None
    trunks: tuple[int, ...]
    vlan_mode: str | None
    mtu_request: int | None
    iface_external_ids: dict[str, str] = field(default_factory=dict)
    port_external_ids: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Timing:
    """Seconds from the start of the transaction: committed by ovsdb-server, and
    applied by ovs-vswitchd (cur_cfg caught up; None if it did not within the timeout)."""

    committed: float
    applied: float | None


def _one(value: Any) -> Any:
    """An optional column ([] or [x] in the IDL) as None or x."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _direct_idl_class() -> Any:
    """An Idl that asks for its data monitor at once, skipping the `_Server` database.

    The stock Idl first monitors `_Server.Database`, whose `schema` column holds every
    database's whole schema as one string: ~45 ms per connection in python-ovs' pure
    Python JSON lexer (the PyPI wheel has no C parser), to learn about clusters and
    schema changes that a hook's connection of a few milliseconds never meets. The Idl's
    state machine has this path (IDL_S_INITIAL sends `monitor_cond`), though the stock
    Idl itself never starts on it. What is lost: the leader checks of a clustered
    OVSDB (`leader_only`), which matter only for a clustered `tcp:` remote, not for the
    local `unix:` socket of ovsdb-server. Where the private method is missing (another
    python-ovs), the stock behaviour stands."""
    import ovs.db.idl
    import ovs.jsonrpc

    class DirectIdl(ovs.db.idl.Idl):  # type: ignore[misc]
        def restart_fsm(self) -> None:
            send = getattr(self, "_Idl__send_monitor_request", None)
            if send is None:
                super().restart_fsm()
                return
            # Never JSON-RPC id 0 for the monitor: the Idl clears its in-flight request
            # only `if self._request_id and ...`, so a reply to id 0 would leave it set
            # and block every later monitor_cond_change (the stock Idl spends id 0 of
            # a process on the _Server schema instead).
            if ovs.jsonrpc.Message._next_id == 0:
                ovs.jsonrpc.Message._create_id()
            self.sync_conditions()
            self.state = self.IDL_S_INITIAL   # -> monitor_cond, the conditional monitor
            send()

    return DirectIdl


class Ovsdb:
    def __init__(self, remote: str, timeout: float) -> None:
        self.remote = remote
        self.timeout = timeout
        self._idl: Any = None
        self._names: set[str] = set()
        self._bridges: set[str] = set()

    # -- connection ------------------------------------------------------------------
    def close(self) -> None:
        if self._idl is not None:
            self._idl.close()
            self._idl = None

    def watch(self, ports: set[str], bridges: set[str]) -> None:
        """Make sure the replica holds the Port/Interface rows named in `ports` and
        the Bridge rows (and their local Interface) named in `bridges`."""
        new_ports, new_bridges = ports - self._names, bridges - self._bridges
        if self._idl is not None and not new_ports and not new_bridges:
            return
        self._names |= ports
        self._bridges |= bridges
        deadline = time.monotonic() + self.timeout
        if self._idl is None:
            self._connect(deadline)
        else:
            self._set_conditions()
            self._run_until(self._conditions_acked, deadline,
                            "the OVSDB server to answer a monitor change")

    def _set_conditions(self) -> None:
        """Monitor only rows with our names (clauses of one condition are ORed)."""
        iface_names = sorted(self._names | self._bridges)
        self._idl.cond_change("Port", [["name", "==", n] for n in sorted(self._names)])
        self._idl.cond_change("Interface", [["name", "==", n] for n in iface_names])
        self._idl.cond_change("Bridge", [["name", "==", n] for n in sorted(self._bridges)])

    def _conditions_acked(self) -> bool:
        # Not Idl.cond_change's expected seqno: in ovs 4.0 it is one too high when
        # a table's condition changes after the initial monitor.
        return not self._idl.cond_changed and all(
            t.condition_state.new is None and t.condition_state.requested is None
            for t in self._idl.tables.values())

    def _connect(self, deadline: float) -> None:
        import ovs.db.idl
        import ovs.vlog

        ovs.vlog.Vlog.set_levels_from_string("any:any:off")  # no stray lines on stderr
        helper = ovs.db.idl.SchemaHelper(schema_json=fetch_schema(self.remote, deadline))
        for table, columns in TABLES.items():
            helper.register_columns(table, columns, readonly=UNREPLICATED.get(table, []))
        self._idl = _direct_idl_class()(self.remote, helper, probe_interval=0)
        self._set_conditions()
        self._run_until(lambda: self._idl.state == self._idl.IDL_S_MONITORING, deadline,
                        "the OVSDB server's first reply")

    def _run_until(self, done: Any, deadline: float, what: str) -> None:
        import ovs.poller

        idl = self._idl
        while True:
            idl.run()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise OvsdbError(f"timed out after {self.timeout:g}s waiting for {what} "
                                 f"({self.remote})")
            poller = ovs.poller.Poller()
            idl.wait(poller)
            poller.timer_wait(int(left * 1000) + 1)
            poller.block()

    # -- reading ---------------------------------------------------------------------
    def _rows(self, table: str) -> Any:
        return self._idl.tables[table].rows.values()

    def _row(self, table: str, name: str) -> Any:
        for row in self._rows(table):
            if row.name == name:
                return row
        return None

    def bridge(self, name: str) -> BridgeInfo | None:
        self.watch(set(), {name})
        row = self._row("Bridge", name)
        if row is None:
            return None
        local = self._row("Interface", name)
        return BridgeInfo(
            name=name, fail_mode=_one(row.fail_mode),
            controllers=tuple(sorted(c.target for c in row.controller if c is not None)),
            datapath_type=row.datapath_type or "system",
            mtu=_one(local.mtu) if local is not None else None)

    def port(self, name: str) -> PortInfo | None:
        self.watch({name}, set())
        row = self._row("Port", name)
        if row is None:
            return None
        iface = next((i for i in row.interfaces if i is not None and i.name == name), None)
        return PortInfo(
            uuid=str(row.uuid), name=name, tag=_one(row.tag), trunks=tuple(sorted(row.trunks)),
            vlan_mode=_one(row.vlan_mode), external_ids=dict(row.external_ids),
            iface_external_ids=dict(iface.external_ids) if iface is not None else {},
            iface_type=iface.type if iface is not None else "",
            mtu_request=_one(iface.mtu_request) if iface is not None else None,
            ofport=_one(iface.ofport) if iface is not None else None,
            error=_one(iface.error) if iface is not None else None)

    def interface_names(self) -> set[str]:
        return {row.name for row in self._rows("Interface")}

    # -- writing ---------------------------------------------------------------------
    def plug(self, spec: PortSpec) -> Timing:
        """One transaction: drop any port of the same name (on whatever bridge), create
        the Port and its Interface with VLAN, MTU and ids, add it to the bridge, and
        bump next_cfg; then wait for ovs-vswitchd to apply it."""
        self.watch({spec.name}, {spec.bridge})
        start = time.monotonic()

        def build(txn: Any) -> None:
            bridge = self._row("Bridge", spec.bridge)
            if bridge is None:
                raise OvsdbError(f"bridge {spec.bridge} disappeared from the OVSDB")
            stale = self._row("Port", spec.name)
            iface = txn.insert(self._idl.tables["Interface"])
            iface.name = spec.name
            iface.external_ids = dict(spec.iface_external_ids)
            if spec.mtu_request is not None:
                iface.mtu_request = [spec.mtu_request]
            port = txn.insert(self._idl.tables["Port"])
            port.name = spec.name
            port.interfaces = [iface]
            port.external_ids = dict(spec.port_external_ids)
            if spec.tag is not None:
                port.tag = [spec.tag]
            if spec.trunks:
                port.trunks = list(spec.trunks)
            if spec.vlan_mode is not None:
                port.vlan_mode = [spec.vlan_mode]
            bridge.addvalue("ports", port)
            if stale is not None:
                txn.add_op(_detach_op(str(stale.uuid)))

        seqno = self._transact(build, f"add port {spec.name} to {spec.bridge}")
        return Timing(time.monotonic() - start, self._wait_applied(seqno, start))

    def unplug(self, name: str, owner: str) -> Timing | None:
        """Delete port `name` from whatever bridge holds it, only while it is still
        ours (our owner mark); None if there was nothing of ours to delete."""
        self.watch({name}, set())
        info = self.port(name)
        if info is None or info.external_ids.get(OWNER) != owner:
            return None
        start = time.monotonic()

        def build(txn: Any) -> None:
            row = self._row("Port", name)
            if row is not None and str(row.uuid) == info.uuid:
                # Enforced by the server: the port is still ours when the delete runs.
                txn.add_op({"op": "wait", "table": "Port", "timeout": 0,
                            "where": [["_uuid", "==", ["uuid", info.uuid]]],
                            "columns": ["external_ids"], "until": "==",
                            "rows": [{"external_ids": ["map", sorted(info.external_ids.items())]}]})
                txn.add_op(_detach_op(info.uuid))

        seqno = self._transact(build, f"delete port {name}")
        return Timing(time.monotonic() - start, self._wait_applied(seqno, start))

    def _transact(self, build: Any, what: str) -> int:
        """Commit `build`'s changes plus a next_cfg bump; retry on TRY_AGAIN (someone
        changed a row we read); return the next_cfg to wait for."""
        import ovs.db.idl

        deadline = time.monotonic() + self.timeout
        while True:
            txn = ovs.db.idl.Transaction(self._idl)
            txn.add_comment(f"nichooks: {what}")
            try:
                build(txn)
            except BaseException:
                txn.abort()  # else the IDL keeps it as its open transaction, unusable after
                raise
            root = next(iter(self._rows("Open_vSwitch")), None)
            if root is None:
                txn.abort()
                raise OvsdbError("the OVSDB has no Open_vSwitch row (not initialised: "
                                 "run 'ovs-vsctl init')")
            root.increment("next_cfg")
            baseline = self._idl.change_seqno  # before commit, as Transaction.commit asks
            status = self._commit(txn, deadline, what)
            if status == txn.SUCCESS:
                return int(txn.get_increment_new_value())
            if status == txn.TRY_AGAIN:
                self._run_until(lambda seqno=baseline: self._idl.change_seqno != seqno,
                                deadline, f"the OVSDB to settle before retrying: {what}")
                continue
            error = txn.get_error() or ovs.db.idl.Transaction.status_to_string(status)
            raise OvsdbError(f"{what}: transaction refused: {error}")

    def _commit(self, txn: Any, deadline: float, what: str) -> Any:
        import ovs.poller

        while True:
            status = txn.commit()
            if status != txn.INCOMPLETE:
                return status
            if time.monotonic() > deadline:
                txn.abort()
                raise OvsdbError(f"{what}: no answer from {self.remote} within {self.timeout:g}s")
            self._idl.run()
            poller = ovs.poller.Poller()
            self._idl.wait(poller)
            txn.wait(poller)
            poller.timer_wait(int(max(deadline - time.monotonic(), 0) * 1000) + 1)
            poller.block()

    def _wait_applied(self, next_cfg: int, start: float) -> float | None:
        """Wait for ovs-vswitchd to report cur_cfg >= next_cfg (what ovs-vsctl waits
        for). The change is committed either way: a timeout is returned as None."""
        def applied() -> bool:
            root = next(iter(self._rows("Open_vSwitch")), None)
            return root is not None and root.cur_cfg >= next_cfg

        try:
            self._run_until(applied, time.monotonic() + self.timeout, "ovs-vswitchd")
        except OvsdbError:
            return None
        return time.monotonic() - start


def _detach_op(port_uuid: str) -> dict[str, Any]:
    """Remove a port from whichever bridge holds it; OVSDB's garbage collection then
    deletes the Port and its Interfaces. Needs no replica of Bridge.ports."""
    ref = ["uuid", port_uuid]
    return {"op": "mutate", "table": "Bridge", "where": [["ports", "includes", ref]],
            "mutations": [["ports", "delete", ["set", [ref]]]]}
