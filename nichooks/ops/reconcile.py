"""Late work on journals, after the hook that wrote them has gone: the sweep, verify,
the undo of a NIC whose device vanished without an ifdown, and re-applying what
someone else removed (a bridge re-created, a foreign `del-port`, a flushed uplink).

Released Ganeti never calls an ifdown, so this is how most NICs end. Every function
here holds the NIC's locks while it decides, and decides from the journal's ifindex
whether the plug it would touch is still the one the journal describes: a soft reboot
reuses the tap *name* within milliseconds, never the ifindex.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nichooks.engine.journal import CorruptJournal, Journal, Record, Store, check_key
from nichooks.engine.plan import PRESENT, Step, load_backends
from nichooks.errors import InvalidInput, LockTimeout, NicHooksError, PlumbingError
from nichooks.host.host import Host
from nichooks.log import HookLog
from nichooks.model import nic as nicmod
from nichooks.model import validate
from nichooks.settings import Settings

if TYPE_CHECKING:
    from nichooks.host.openflow import Flow
    from nichooks.host.ovsdb import MarkedPort

PRESENT_DEVICE, GONE, RENAMED = "present", "gone", "renamed"
BUSY_TIMEOUT = 2.0  # a sweep skips a NIC a hook holds for longer; the next sweep gets it


@dataclass
class Action:
    """One thing a sweep, verify or the agent found or did, for the report."""

    nic: str      # "instance tap (key)" or a port / bridge name
    what: str     # undone, rolled-back, retried, orphan-port, orphan-flows, busy, corrupt,
    #               kept, repaired, drift, failed
    detail: str
    ok: bool = True

    def line(self) -> str:
        return f"{self.what}: {self.nic}: {self.detail}"


@dataclass
class Teardown:
    """A NIC undone late: its ifdown scripts still run, after the locks are released."""

    tap: str
    variables: dict[str, str] = field(default_factory=dict)


def label(journal: Journal) -> str:
    return f"{journal.instance or '-'} {journal.tap} ({journal.key})"


def device_state(net: Host, journal: Journal) -> str:
    """Whether the device this plug was made on still exists. By ifindex: the same name
    on another index is a newer device, and this plug's device is gone."""
    if journal.ifindex is None:
        return PRESENT_DEVICE if net.find(journal.tap) is not None else GONE
    state = net.by_index(journal.ifindex)
    if state is None:
        return GONE
    return PRESENT_DEVICE if state.name == journal.tap else RENAMED


@contextmanager
def locked(store: Store, key: str, timeout: float) -> Iterator[None]:
    from nichooks.ops.plug import lock_nic

    with ExitStack() as stack:
        lock_nic(stack, store, key, None, timeout, key)
        yield


def _load(store: Store, key: str, dry_run: bool, log: HookLog) -> Journal | Action | None:
    try:
        return store.load(key)
    except CorruptJournal as exc:
        if dry_run:
            return Action(key, "corrupt", f"unreadable journal ({exc}); would move it aside", ok=False)
        dest = store.quarantine(key)
        log.error("sweep", journal=key, result="corrupt", moved_to=dest)
        return Action(key, "corrupt", f"unreadable journal ({exc}); moved to {dest}", ok=False)


def undo_whole(store: Store, net: Host, journal: Journal, log: HookLog) -> list[Record]:
    """Replay every record backwards; forget the journal, or keep what failed."""
    from nichooks.ops.plug import undo_records

    failed = undo_records(net, journal.records, log)
    if failed:
        journal.records, journal.state = failed, "undo-failed"
        store.save(journal)
    else:
        store.forget(journal.key, journal.tap)
    return failed


# Undo kinds that find their object by the tap's *name*, not its ifindex.
BY_TAP_NAME = ("route.rule",)


def _drop_claimed_by_others(store: Store, journal: Journal, log: HookLog) -> None:
    """A stale journal's records that find their object by tap name are dropped when
    another NIC has claimed that tap name since: its rule looks the same as ours."""
    owner = store.tap_owner(journal.tap)
    if owner is None or owner == journal.key:
        return
    kept = [r for r in journal.records if r.kind not in BY_TAP_NAME]
    if len(kept) != len(journal.records):
        log.info("sweep", result="skipped", cause=f"{journal.tap} now belongs to {owner}",
                 records=len(journal.records) - len(kept))
        journal.records = kept


def _failed_text(failed: list[Record]) -> str:
    return "; ".join(f"{r.step} ({r.error})" for r in failed)


def settle(store: Store, net: Host, key: str, log: HookLog, *, dry_run: bool = False,
           only_index: int | None = None) -> tuple[list[Action], Teardown | None]:
    """Bring one journal in line with the host; the caller holds the NIC's locks.

    - an ifup that never finished (state `applying` while we hold its lock: its
      process died): roll it back;
    - a device that is gone: undo the plug (context `vanished`);
    - records whose undo failed before: retry them, unless a live record of the same
      plug claims the same thing again.
    `only_index`: the agent's case, act only if the journal's plug was on that ifindex.
    """
    loaded = _load(store, key, dry_run, log)
    if loaded is None or isinstance(loaded, Action):
        return ([loaded] if loaded else []), None
    journal = loaded
    name = label(journal)
    if only_index is not None and journal.ifindex != only_index:
        return [], None  # a newer plug of the NIC on a new device: not ours to touch
    device = device_state(net, journal)
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    if journal.state == "applying" or device == GONE:
        what = "rolled-back" if journal.state == "applying" and device != GONE else "undone"
        why = ("its ifup was interrupted" if what == "rolled-back"
               else f"device {journal.tap} (ifindex {journal.ifindex}) is gone")
        if dry_run:
            return [Action(name, what, f"would undo {len(journal.records)} records: {why}")], None
        log.info("sweep", result=what, cause=why, records=len(journal.records))
        _drop_claimed_by_others(store, journal, log)
        # ifdown scripts once per plug, whoever tears it down; none for an ifup that
        # never finished (its ifup scripts did not all run either).
        teardown = (Teardown(journal.tap, dict(journal.variables))
                    if what == "undone" and not journal.down_scripts_ran else None)
        if teardown:
            journal.down_scripts_ran = True  # saved with the records that failed, if any
        records = len(journal.records)
        failed = undo_whole(store, net, journal, log)
        if failed:
            return [Action(name, "failed", f"{why}; could not undo: {_failed_text(failed)}",
                           ok=False)], teardown
        return [Action(name, what, f"{why}; undid {records} records")], teardown
    if device == RENAMED:
        return [Action(name, "kept", f"ifindex {journal.ifindex} is no longer called "
                       f"{journal.tap}; left alone", ok=False)], None
    # A failed record carried into a newer plug of the NIC may name what that plug now
    # uses (a rule by tap name, the port by name, the flows by cookie): retry it only if
    # no live record of the same kind could be the same thing.
    retry = [r for r in journal.records if r.status == "failed"
             and not any(o.status != "failed" and o.kind == r.kind for o in journal.records)]
    owner = store.tap_owner(journal.tap)
    if owner is not None and owner != journal.key:
        retry = [r for r in retry if r.kind not in BY_TAP_NAME]
    if not retry:
        return [], None
    if dry_run:
        return [Action(name, "retried", f"would retry {len(retry)} failed undo records")], None
    from nichooks.ops.plug import undo_records

    still = undo_records(net, retry, log)
    journal.records = [r for r in journal.records if r not in retry or r in still]
    if journal.state == "undo-failed" and not journal.records:
        # The journal was kept only for these records: the NIC is fully undone now.
        store.forget(journal.key, journal.tap)
    else:
        store.save(journal)
    if still:
        return [Action(name, "failed", f"retried undo still fails: {_failed_text(still)}",
                       ok=False)], None
    return [Action(name, "retried", f"undid {len(retry)} records that had failed before")], None


def run_teardowns(settings: Settings, teardowns: list[Teardown], log: HookLog) -> None:
    """The administrator's ifdown scripts for NICs undone late, context `vanished`."""
    import os

    from nichooks.ops.plug import run_custom

    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for t in teardowns:
        run_custom(settings, t.tap, env, t.variables, "down", "vanished", log,
                   stop_on_failure=False)


# -- sweep ---------------------------------------------------------------------------
def sweep(settings: Settings, *, dry_run: bool, log: HookLog) -> list[Action]:
    """Reconcile every journal with the kernel and OVSDB (`nichooks sweep`, and the
    agent when it starts)."""
    load_backends()
    store = Store(settings.state_dir)
    if not dry_run:
        store.ensure()
    net = Host(settings)
    actions: list[Action] = []
    teardowns: list[Teardown] = []
    try:
        for key in store.journal_keys():
            try:
                with locked(store, key, min(settings.lock_timeout, BUSY_TIMEOUT)):
                    done, teardown = settle(store, net, key, log, dry_run=dry_run)
            except LockTimeout:
                actions.append(Action(key, "busy", "a hook holds this NIC; left for the next sweep",
                                      ok=False))
                continue
            actions += done
            if teardown:
                teardowns.append(teardown)
        actions += sweep_ovs(store, net, settings, dry_run=dry_run, log=log)
    finally:
        net.close()
    if not dry_run:
        run_teardowns(settings, teardowns, log)
    return actions


def ovs_present(settings: Settings) -> bool:
    """Whether this host runs an OVSDB we can reach (no socket: nothing to sweep)."""
    import os

    kind, _, where = settings.ovsdb.partition(":")
    return kind != "unix" or os.path.exists(where)


def _claimed_cookies(store: Store) -> set[int]:
    """The flow cookies some journal stands for: derived from the key of every journal,
    readable or moved aside as corrupt (a journal we cannot read is not proof that its
    NIC is gone: a format from another version, a bad disk), and recorded in the flow
    records of the readable ones."""
    from nichooks.host.openflow import cookie

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
    from nichooks.host import ovsdb as db
    from nichooks.host.openflow import cookie
    from nichooks.modes.openvswitch import flows_withheld

    deadline = time.monotonic() + settings.ovs_timeout
    try:
        view = db.switch_view(settings.ovsdb, deadline)
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
        if marks - keys and net.find(port.name) is not None:
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
    from nichooks.host.openflow import cookie

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


# -- verify and repair ------------------------------------------------------------------
def journaled_steps(net: Host, settings: Settings, journal: Journal) -> list[Step]:
    """The NIC's plan rebuilt from the journal's variables, limited to the steps the
    journal says were applied (a routed NIC past switchover has its uplink entries)."""
    from nichooks.ops.plug import build_plan

    variables = dict(journal.variables)
    if journal.mode == "routed" and not journal.deferred:
        # Switchover happened (`nichooks announce`): the uplink entries are ours now.
        variables.pop("MIGRATION_PHASE", None)
    variables["INTERFACE"] = journal.tap
    nic = nicmod.from_variables(variables, tap=journal.tap)
    if journal.key != nic.key and journal.key.startswith(nic.uuid + "-"):
        nic = replace(nic, device=journal.key[len(nic.uuid) + 1:])
    applied = {(r.kind, r.step) for r in journal.records if r.status != "failed"}
    steps = [s for s in build_plan(nic, net, settings).steps if (s.kind, s.describe()) in applied]
    planned = {(s.kind, s.describe()) for s in steps}
    if journal.mode == "routed":
        # Uplink proxy entries come from the journal itself: the plan finds the uplink
        # through the default route, which an uplink's down/up removes until the
        # operator's network configuration puts it back, while the entries are wanted.
        from nichooks.modes.routed import ProxyNeigh

        for r in journal.records:
            if (r.kind == "route.proxy" and r.status != "failed" and not r.undo.get("foreign")
                    and r.undo.get("dev") != journal.tap and (r.kind, r.step) not in planned):
                step = ProxyNeigh(str(r.undo["addr"]), str(r.undo["dev"]), int(r.undo["proto"]),
                                  "upstream resolves the guest")
                if step.describe() == r.step:
                    steps.append(step)
    return steps


def drift(net: Host, settings: Settings, journal: Journal) -> list[str]:
    """What differs between the journal and the host, one line each (empty: none)."""
    found: list[str] = []
    if journal.state == "applying":
        found.append("its ifup has not finished (interrupted, or still running)")
    device = device_state(net, journal)
    if device == GONE:
        return [*found, f"device {journal.tap} (ifindex {journal.ifindex}) is gone; "
                "`nichooks sweep` undoes the rest"]
    if device == RENAMED:
        found.append(f"ifindex {journal.ifindex} is no longer called {journal.tap}")
    for record in journal.records:
        if record.status == "failed":
            found.append(f"undo failed before and is pending a retry: {record.step} ({record.error})")
            continue
        check = PRESENT.get(record.kind)
        try:
            present = check(net, record.undo) if check else True
        except Exception as exc:
            found.append(f"cannot read back {record.step}: {exc}")
            continue
        if not present:
            found.append(f"missing: {record.step}")
    if found or journal.state != "applied":
        return found
    try:
        steps = journaled_steps(net, settings, journal)
    except NicHooksError as exc:
        return [f"cannot rebuild the plan to compare: {exc}"]
    from nichooks.ops.plug import read_back

    for step in steps:
        mismatch = read_back(step, net)
        if mismatch:
            found.append(f"{step.describe()}: {mismatch}")
    return found


def all_present(net: Host, journal: Journal) -> bool:
    """Every record's effect still in place, by the cheap per-record checks (no plan
    rebuilt): what the agent asks first, on every event that might matter."""
    for record in journal.records:
        check = PRESENT.get(record.kind)
        if record.status == "failed" or check is None:
            continue
        try:
            if not check(net, record.undo):
                return False
        except Exception:
            return False
    return True


def repair(store: Store, net: Host, settings: Settings, key: str, log: HookLog, *,
           quick: bool = False) -> list[Action]:
    """Re-apply, from the journal, every applied step that no longer reads back; the
    caller holds the NIC's locks. A record whose effect is gone is replaced by the new
    one, keeping the value from before nichooks first touched it. `quick`: look no
    further when every record's own check passes."""
    journal = store.load(key)
    if journal is None or journal.state != "applied" or device_state(net, journal) != PRESENT_DEVICE:
        return []
    if quick and all_present(net, journal):
        return []
    name = label(journal)
    log.bind(instance=journal.instance, uuid=journal.key, tap=journal.tap)
    try:
        steps = journaled_steps(net, settings, journal)
    except NicHooksError as exc:
        if device_state(net, journal) != PRESENT_DEVICE:
            return []  # the device went while we looked: the vanished path takes over
        return [Action(name, "failed", f"cannot rebuild the plan: {exc}", ok=False)]
    from nichooks.ops.plug import _cause, read_back

    actions: list[Action] = []
    for step in steps:
        mismatch = read_back(step, net)
        if not mismatch:
            continue
        try:
            record = step.prepare(net)
            _merge(journal, record)
            store.save(journal)
            step.apply(net)
            again = step.verify(net)
        except Exception as exc:
            again = _cause(exc)
        if again and device_state(net, journal) != PRESENT_DEVICE:
            return actions  # the device went while we worked: the vanished path takes over
        if again:
            log.error("repair", step=step.describe(), result="failed", cause=again)
            actions.append(Action(name, "failed", f"{step.describe()}: {again}", ok=False))
            break  # later steps depend on this one (flows on a port)
        log.info("repair", step=step.describe(), result="ok", was=mismatch)
        actions.append(Action(name, "repaired", f"{step.describe()} (was: {mismatch})"))
    return actions


def _merge(journal: Journal, record: Record) -> None:
    for i, old in enumerate(journal.records):
        if old.kind == record.kind and old.step == record.step and old.status != "failed":
            undo: dict[str, Any] = dict(record.undo)
            if "old" in undo and "old" in old.undo:
                undo["old"] = old.undo["old"]  # the value before nichooks first changed it
            journal.records[i] = replace(record, undo=undo)
            return
    journal.records.append(record)


def select(store: Store, which: str | None) -> list[str]:
    """Journal keys matching a tap name or NIC key (all when `which` is None)."""
    if which is None:
        return store.journal_keys()
    found = [k for k in store.journal_keys() if k == which.lower() or k.startswith(which.lower() + "-")]
    try:
        owner = store.tap_owner(validate.ifname("NIC", which))
    except InvalidInput:
        owner = None
    if owner and owner not in found:
        found.append(owner)
    if not found:
        raise PlumbingError(f"no NIC is journaled under {which!r} (a tap name or NIC UUID)",
                            nic=which, step="verify")
    return sorted(found)
