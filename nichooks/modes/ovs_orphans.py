"""What an Open vSwitch plug can leave that no journal claims, found and deleted by
the sweep: ports with our owner mark and anti-spoofing flows of ours. A reboot leaves
them (/run is empty, OVSDB keeps its ports), and so does an ifup killed between its
OVSDB commit and its journal's removal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nichooks.engine.actions import Action
from nichooks.engine.journal import check_key
from nichooks.engine.locks import BUSY_TIMEOUT, locked
from nichooks.engine.store import Store
from nichooks.errors import InvalidInput, LockTimeout
from nichooks.host.openflow import cookie
from nichooks.host.ovsdb_view import switch_view
from nichooks.modes.ovs_policy import flows_withheld, ovs_present

if TYPE_CHECKING:
    from nichooks.host.host import Host
    from nichooks.host.openflow import Flow
    from nichooks.host.ovsdb_view import MarkedPort
    from nichooks.log import HookLog
    from nichooks.settings import Settings


def _claimed_cookies(store: Store) -> set[int]:
    """The flow cookies some journal stands for: derived from the key of every journal,
    readable or moved aside as corrupt (a journal we cannot read is not proof that its
    NIC is gone: a format from another version, a bad disk), and recorded in the flow
    records of the readable ones."""
    claimed = {cookie(k) for k in set(store.journal_keys()) | store.quarantined_keys()}
    for _key, journal in store.journals():
        for record in journal.records if journal is not None else []:
            if record.kind == "ovs.flows":
                try:
                    claimed.add(int(record.undo["cookie"]))
                except (KeyError, TypeError, ValueError):
                    continue
    return claimed


@dataclass
class _Orphans:
    """What one NIC, which no journal claims, left in Open vSwitch."""

    ports: list[MarkedPort] = field(default_factory=list)
    flows: dict[str, list[Flow]] = field(default_factory=dict)  # by bridge


def sweep_ovs(store: Store, net: Host, settings: Settings, *, dry_run: bool,
              log: HookLog) -> list[Action]:
    """Ports with our owner mark and flows of ours that no journal claims: what a
    reboot leaves (/run is empty, OVSDB keeps its ports), or an ifup killed between
    its OVSDB commit and its journal's removal.

    Other software shares the switch and picks its own cookies (a Neutron agent, a
    random one at every restart), so our cookie prefix proves nothing. A flow is
    deleted only if it is provably ours:
    - on a bridge where a plug adds flows (`flows_withheld`, the plug's own rule: not
      with anti-spoofing off, not on a bridge with a controller or fail_mode=secure);
    - shaped like ours: table 0, one of our priorities, on an in_port;
    - on a port that carries our owner mark, or did when this sweep read OVSDB (the
      sweep may delete that port first);
    - with exactly the cookie of a NIC key that an owner mark names: the key whose
      lock is then taken, and whose journal is looked for again under it.
    """
    if not ovs_present(settings):
        return []

    deadline = time.monotonic() + settings.ovs_timeout
    try:
        view = switch_view(settings.ovsdb, deadline)
        # Flows first, journals after: a flow is added only after its journal exists, so
        # a cookie no journal read *later* claims is an orphan.
        openflow = net.openflow()
        found = {b.name: [f for f in openflow.flows(b.name) if f.antispoof_shaped()]
                 for b in view.bridges
                 if flows_withheld(settings, b) is None and openflow.exists(b.name)}
    except Exception as exc:  # OvsdbError, OpenFlowError: report, do not abort the sweep
        return [Action(settings.ovsdb, "failed", f"cannot read Open vSwitch: {exc}", ok=False)]
    keys = set(store.journal_keys()) | store.quarantined_keys()
    claimed = _claimed_cookies(store)
    actions: list[Action] = []
    orphans: dict[str, _Orphans] = {}
    issued: dict[int, str] = {}       # cookie -> the NIC key an owner mark names
    ours_at: dict[str, set[int]] = {}  # bridge -> port numbers of marked ports
    live: set[str] = set()
    for port in view.ports:
        if port.bridge is not None:
            ours_at.setdefault(port.bridge, set()).update(port.ofports)
        marks = set()
        for mark in port.marks:
            try:
                marks.add(check_key(mark))
            except InvalidInput:
                continue
        issued.update((cookie(k), k) for k in marks)
        if marks - keys and net.netlink.find(port.name) is not None:
            # The device is there: a live guest may be behind it. Without its journal we
            # cannot tell; leave its port and flows alone.
            live |= marks - keys
            if port.owner in marks - keys:
                actions.append(Action(port.name, "kept", f"owned by {port.owner}, which has no "
                                      "journal, but the device exists; left alone", ok=False))
            continue
        if port.owner is None:
            continue  # marked on its Interface only: not a port a plug of ours made
        if port.owner not in marks:
            actions.append(Action(port.name, "kept", f"owner mark {port.owner!r} is not a NIC key",
                                  ok=False))
        elif port.owner not in keys:
            orphans.setdefault(port.owner, _Orphans()).ports.append(port)
    for bridge, flows in sorted(found.items()):
        for flow in flows:
            key = issued.get(flow.cookie)
            if (key is None or key in live or flow.cookie in claimed
                    or flow.in_port not in ours_at.get(bridge, set())):
                continue
            orphans.setdefault(key, _Orphans()).flows.setdefault(bridge, []).append(flow)
    for key in live:
        orphans.pop(key, None)  # not even a stale port of a NIC that may be running
    for key, orphan in sorted(orphans.items()):
        actions += _delete_orphans(store, net, settings, key, orphan, dry_run=dry_run, log=log)
    return actions


def _delete_orphans(store: Store, net: Host, settings: Settings, key: str, orphan: _Orphans,
                    *, dry_run: bool, log: HookLog) -> list[Action]:
    """Delete what one NIC left, under the NIC's lock and only if no journal claims it
    then: a hook plugging that NIC right now holds the lock, and writes its journal
    before it adds anything, so what it plugs is never taken for an orphan."""
    value = cookie(key)
    if dry_run:
        return ([Action(p.name, "orphan-port", f"would delete: no journal for {key}")
                 for p in orphan.ports]
                + [Action(bridge, "orphan-flows", f"would delete {len(flows)} flows of {key} "
                          f"(cookie 0x{value:016x}): no journal claims them")
                   for bridge, flows in sorted(orphan.flows.items())])
    log.info("sweep", owner=key, result="orphan", ports=len(orphan.ports),
             flows=sum(len(f) for f in orphan.flows.values()),
             cause="no journal; checking again under the NIC's lock")
    actions: list[Action] = []
    try:
        with locked(store, key, min(settings.lock_timeout, BUSY_TIMEOUT)):
            if store.exists(key) or key in store.quarantined_keys() \
                    or value in _claimed_cookies(store):
                log.info("sweep", owner=key, result="kept", cause="a journal claims it now")
                return []
            for port in orphan.ports:
                try:
                    net.ovsdb().unplug(port.name, key)
                except Exception as exc:
                    actions.append(Action(port.name, "failed", f"cannot delete orphan port: {exc}",
                                          ok=False))
                    continue
                log.info("sweep", port=port.name, owner=key, result="orphan port deleted")
                actions.append(Action(port.name, "orphan-port", f"deleted: no journal for {key}"))
            for bridge, flows in sorted(orphan.flows.items()):
                try:
                    net.openflow().delete_exactly(bridge, flows)
                except Exception as exc:
                    actions.append(Action(bridge, "failed", f"cannot delete orphan flows: {exc}",
                                          ok=False))
                    continue
                log.info("sweep", bridge=bridge, owner=key, flows=len(flows),
                         result="orphan flows deleted")
                actions.append(Action(bridge, "orphan-flows", f"deleted {len(flows)} flows of {key} "
                                      f"(cookie 0x{value:016x}): no journal claims them"))
    except LockTimeout:
        return [Action(name, "busy", f"a hook holds its NIC {key}; left for the next sweep",
                       ok=False) for name in [p.name for p in orphan.ports] + sorted(orphan.flows)]
    return actions
